"""The cost of mha(nsa) (nsa.py): the sliding-window branch is mha(local)'s band (banded_attention_cost: the
projections and the window's kernel, in the form it runs), to which the other branches add their own."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._banded import band_layout, banded_attention_cost
from ._common import LSE_BYTES, head_symbols


def nsa_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """M = floor((n - l) / d) + 1 compressed blocks (0 for n < l), each through two MLPs (K and V) of an
    [l dh] -> dh -> dh map per K/V head; explicit [b, h, n, M] scores against them (quadratic in n with the
    small constant 1/d); SDPA of each query's group over its S = topk l' gathered keys (the gathered K and V,
    [b, kv, n, S, dh], are the largest tensors); the gate's linear map and the gated sum. Params and FLOPs are
    exact, and so are the saved bytes; the inference peak is the selection kernel's phase (or the band's, or the
    compressed scores'), within a few percent; the backward's peak (the selection kernel's gradients) within ~7%
    (tests/ops/test_cost_attention.py). The export's form (a symbolic n) is not costed: tests/test_onnx.py BANDED."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    l, d = s.sym("l", p.block), s.sym("stride", p.stride)
    L, k, w = s.sym("l'", p.select_block), s.sym("topk", p.topk), s.sym("w", p.window)
    lo, hi = w - 1, (0 if env.causal else w - 1)
    window = banded_attention_cost(p, env, s, lo=lo, hi=hi, cache_keys=n)
    M = sp.Max(0, sp.floor((n - l) / d) + 1)
    mlp = (linear(s, l * dh, dh, p.bias, tokens=b * kv * M) + linear(s, dh, dh, p.bias, tokens=b * kv * M)).scaled(2)
    mlp = replace(mlp, params=mlp.params + 2 * l * dh)  # the intra-block position encodings
    cmp = b * h * n * M  # scores against the compressed blocks
    S = k * L
    sel = b * h * n * S
    core = Cost(fwd=4 * cmp * dh + 4 * sel * dh, bwd=8 * cmp * dh + 10 * sel * dh,
                fwd_other=6 * cmp + 5 * sel, bwd_other=12 * cmp + 10 * sel)
    gate = linear(s, s.d, 3 * h, p.bias)
    total = window + mlp + core + gate

    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    one_call = n <= w  # the window covers the sequence: one SDPA call, k and v read as they are
    B, nb, _, _ = band_layout(n, lo, hi, wide=True)
    band_copy = sp.Piecewise((0, one_call), (sp.Min(1, (b - 1) + (nb * B - n)), True))  # the band's o_proj copy
    kc = b * kv * M * dh * by  # K~ (V~)
    kch = b * h * M * dh * by  # K~ (V~) as the h heads read it (repeated for grouped K/V heads)
    scores = b * h * n * M * by
    gathered = b * kv * n * S * dh * by  # the selected keys (values)
    several = sp.Min(1, b - 1)  # q [b, h, n, dh] (a view of its projection) regrouped by a reshape: a copy for b > 1
    g_copy = 0 if kv == h else several * q  # the selection's output regrouped to [b, h, n, dh]
    raw = 0 if kv == h else 2 * kvb  # k, v themselves (the gathers'): the band keeps them when it reads them as they are
    raw = sp.Piecewise((raw, one_call), (2 * kvb, True))
    saved = (2 * (8 * M * l + b * kv * M * l * dh * by + kc)  # the block indices, the MLPs' inputs, relu's outputs
             + several * q + 2 * kch + 2 * n * M + 2 * scores  # q for the matmul, K~ and V~, the masks, softmax and masked
             + 8 * b * kv * n * S + raw + 2 * gathered + b * kv * n * S * by + several * q + q + LSE_BYTES * b * h * n
             # the token indices, k and v, the gathered K and V, the float mask, q regrouped, o, its logsumexp
             + b * n * 3 * h * by + q + g_copy + q)  # the gates, the compressed output, the selection's, o_proj's copy
    saved = window.saved - band_copy * q + saved
    # inference: the selection's kernel leads (the gathered K and V beside the token indices, the masks, the
    # importance and the compressed branch's output and weights); the band's phases with K~, V~ alive
    J = sp.ceiling(n / L) + k
    win = q if env.causal else b * h * nb * B * dh * by  # the band's output (blocked queries, bidirectional)
    select = (q + 2 * kvb + 2 * kc + win + q + scores + b * kv * n * J * by + 8 * b * kv * n * k  # .. importance, top-n
              + 8 * b * kv * n * S + b * kv * n * S + 2 * gathered + several * q + b * kv * n * S * by + q
              + LSE_BYTES * b * h * n)
    compress = q + 2 * kvb + 2 * kc + win + q + (kch if kv != h else 0) + 3 * scores
    peak = sp.Max(select, compress, window.peak + out + 2 * kc) - out
    # backward: the selection kernel's gradients of the gathered K and V and of q, beside the gradients of the
    # branches' outputs and of k and v (the gathers' scatter)
    bwd_peak = sp.Max(2 * gathered + 4 * q + 2 * kvb, window.bwd_peak)
    cache = 2 * b * kv * dh * by * (n + M)  # every raw key and value, and the compressed blocks
    return replace(total, saved=saved, peak=peak, bwd_peak=bwd_peak, cache=cache, saves_input=True, saves_output=False)
