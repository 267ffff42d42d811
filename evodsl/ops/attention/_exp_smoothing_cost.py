"""The cost of mha(exp_smoothing) (exp_smoothing.py): the value and output projections, then the chunked form that
torch runs at a known n (the export's dense form, a symbolic n, is not costed: tests/test_onnx.py OTHER_FORMS)."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv

CHUNK = 64  # tokens a chunk of the chunked form


def exp_smoothing_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """Chunks of C = min(64, n) tokens, m = ceil(n / C) of them (L = m C rows, the last chunk zero-padded): the
    [h, C, C] kernel against the [h, C, b m dh] columns, 2 b h L C dh FLOPs forward, once more backward for the
    columns' gradient and, with a learned alpha, once more for the kernel's. Elementwise (1 FLOP an element): the
    carries, 2 b h (m - 1) C dh, and the initial state's decayed term, 2 b n h dh.
    Bytes (w: float32 at least, the form's working dtype): what autograd keeps is the kernel (the columns'
    gradient needs it), o_proj's input, the decay of the initial state and, between chunks, the carries' decay;
    a learned alpha also keeps what the kernel's gradient needs: the columns, the kernel's exp, its lags and mask,
    and each carry (the first a view of the whole matmul output, the others one chunk each)."""
    h = s.sym("h", p.heads)
    dh = s.d / h if p.head_dim is None else s.sym("dh", p.head_dim)
    b, n, by = s.b, s.n, s.bytes
    w = max(4, by)
    C = sp.Min(CHUNK, n)
    m = sp.ceiling(n / C)
    L = m * C
    several = sp.Min(1, m - 1)  # 1 when there is more than one chunk
    padded = sp.Min(1, L - n)  # 1 when the last chunk is padded (F.pad copies only then)
    B, Lb, chunk = b * n * h * dh * by, b * h * L * dh * w, b * h * C * dh * w
    kernel, learned = h * C ** 2 * w, p.alpha is None
    mm = 2 * b * h * L * C * dh
    proj = linear(s, s.d, h * dh, p.bias) + linear(s, h * dh, s.d, p.bias)
    other = 2 * b * h * (m - 1) * C * dh + 2 * b * n * h * dh + 4 * kernel / w
    core = Cost(params=h * dh + (h if learned else 0), fwd=mm, bwd=mm * (2 if learned else 1), fwd_other=other,
                bwd_other=2 * other)
    saved = kernel + B + n * h * w
    if learned:  # the kernel's exp, lags (float) and mask, the columns, the state's decay chain, the carries
        saved += kernel + C ** 2 * (w + 1) + Lb + n * (h * w + w + 1) + C * (h + 1) * w + several * (Lb + (m - 2) * chunk)
    else:
        saved += several * h * C * w  # the carries' decay
    out = b * n * s.d * by
    phases = [B + C ** 2 * (w + 1) + 2 * kernel,  # the kernel built: lags, mask, two [h, C, C] steps alive
              B + padded * Lb + 2 * Lb + C ** 2 * w + kernel,  # the matmul: v, its padded copy, columns, result
              B + padded * Lb + 3 * Lb + (m - 1) * chunk + C ** 2 * w + kernel,  # the carried chunks stacked, reshaped
              2 * B + Lb + n * h * dh * w + out]  # the initial state's term added, at o_proj
    # backward: the padded rows' gradient beside o_proj's input's (released); then the chunks' gradients, carried
    # back (one chunk each), stacked for the matmul, o_proj's input and (fixed alpha) the carries' decay released
    # (a learned alpha has released its carries by then); at v_proj, the input's gradient beside the values' (the
    # padded rows' layout), everything saved released
    unbind = 2 * Lb + (m - 1) * chunk - B - (several * (Lb + (m - 2) * chunk) if learned else several * h * C * w)
    return replace(proj + core, saved=saved, peak=sp.Max(*phases) - out, cache=b * h * dh * by,
                   bwd_peak=sp.Max(Lb, unbind, out + Lb - saved), saves_input=True)
