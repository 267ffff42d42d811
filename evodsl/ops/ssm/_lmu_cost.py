"""The cost of ssm(lmu) (lmu.py), from the form that runs: t = b n tokens, U = units, q = order.

FLOPs in matmuls: u = W_u x, W_x x + b, W_m m. Other FLOPs (a convention): the FFTs (5/2 L log2 L a real transform of
length L = 2 n: u's b U, H's q and the products' b U q), the complex products, the sum and tanh. Kept for backward:
u zero-padded to 2 n (its transform's input), H's spectrum, the memory m [t, U q] (W_m's input) and the output (tanh's).
The inference peak: the projections' outputs beside m and u, or the products of spectra and their transform
[b, U, q, 2 n] (U q large). The backward's peak (fitted to the storage tracker at U q 18..256, d 64): the
memory's gradients [t, 3 U q] with one [t, d], or (d large) three [t, d] less m, u and H's spectrum, released.
Decoding: the memory [b, U, q]. Past max_len the impulse response is extended by doubling ([L, q] x [q, q]
products, O(n q^2) matmul FLOPs): not declared (0.6 % of the FLOPs at n = 48, max_len = 16, q = 6)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def lmu_cost(p, env: OpEnv, s: Symbols) -> Cost:
    d, b, n, by = s.d, s.b, s.n, s.bytes
    U, q = s.sym("U", p.units), s.sym("q", p.order)
    t = b * n
    if p.feedback:
        return feedback_cost(s, d, b, n, by, U, q)
    proj = linear(s, d, U, False) + linear(s, d, d, True) + linear(s, U * q, d, False)
    P = 2 * n
    fft = sp.Rational(5, 2) * (b * U + q + b * U * q) * P * sp.log(P, 2)  # rfft of u and H, irfft of the products
    other = fft + 6 * b * (n + 1) * U * q + 3 * t * d  # the complex products, the sum and tanh
    saved = (2 * b * U * n + b * n * U * q) * by + (n + 1) * q * 2 * by  # u padded, m; H's spectrum
    hf = (n + 1) * q * 2 * by  # H's spectrum [q, n + 1], complex
    peak = sp.Max(t * (2 * d + U * q + U) * by, t * 4 * U * q * by + hf)
    bwd_peak = sp.Max(t * (3 * U * q + d) * by + hf, t * (3 * d - U * q - 2 * U) * by - hf)
    return Cost(params=proj.params, fwd=proj.fwd, bwd=proj.bwd, fwd_other=other, bwd_other=2 * other + proj.bwd_other,
                saves_input=True, saves_output=True, saved=saved, peak=peak, bwd_peak=bwd_peak, cache=b * U * q * by)


def feedback_cost(s: Symbols, d, b, n, by, U, q) -> Cost:
    """feedback=true: the input maps at once, then per token h_{t-1} [e_h; W_h]^T, m A_bar^T and m_t [W_m; e_m]^T.
    The first token's h_{t-1} and m_{t-1} are zeros (no gradient): its h product has only the weights' backward,
    its A_bar product none (A_bar is a buffer: the other products' backward is the input's alone)."""
    t = b * n
    inputs = linear(s, d, U, False) + linear(s, d, d, True)
    params = inputs.params + d * U + U * q * U + d * d + U * q * d  # e_h, e_m, W_h, W_m
    hp, ap, mp = 2 * d * (U + d), 2 * U * q * q, 2 * U * q * (d + U)  # a token's products
    fwd = inputs.fwd + t * (hp + ap + mp)
    bwd = inputs.bwd + 2 * t * hp - b * hp + (t - b) * ap + 2 * t * mp
    other = t * (3 * U + 2 * U * q + 3 * d)  # the sums into u, u B_bar and its add, the sums into h and tanh
    R = (d + U * q) * (d + U)  # [e_h; W_h] and [W_m; e_m], made once a forward
    # kept: every token's h_{t-1} and m_t (the products' inputs; h_t is also tanh's output), the zero h_0, both R
    saved = (t * (d + U * q) + b * d + R) * by
    # the loop's last token: the input maps (t (U + d)), the outputs so far (t d), both R, a token's temporaries
    peak = (t * U + 2 * t * d + R + b * d + b * (d + U) + 2 * b * U * q) * by
    # the backward (fitted to the storage tracker, d 32..96, U q 4..256): the last token's gradients (two zero-padded
    # slices' [b, d + U], and h's or m's), or at the end the input maps' three [t, d] (two and their sum) less all
    # that the loop kept (released)
    bwd_peak = sp.Max(2 * b * (d + U) + b * U + b * sp.Max(d + U, U * q), 2 * t * d - t * U * q - R) * by
    return Cost(params=params, fwd=fwd, bwd=bwd, fwd_other=other, bwd_other=2 * other + inputs.bwd_other,
                saves_input=True, saves_output=False, saved=saved, peak=peak, bwd_peak=bwd_peak,
                cache=b * (U * q + d) * by)
