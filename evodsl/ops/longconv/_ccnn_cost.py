"""The cost of longconv(ccnn) (ccnn.py): the LayerNorm, the masked continuous-kernel convolution (_ck_cost.py), two
GELUs, the pointwise linear and the residual add. Kept for backward beyond the convolution's: the input (the
norm's), its mean and 1/std [b, n] each, both GELUs' inputs and the linear's input; at the inference peak the
norm's output lives beside the convolution's spectra. The backward's peak (wrt the input; fitted to the storage
tracker at b 1..3, n 16..64): the conv's gradients [b, n + 1, d] complex and [b, 2 n, d] with the block's [b, n, d]
ones, less the saved tensors released by then (with dropout, the GELU's output is released sooner: b n d less).
Dropout keeps its mask (in the dtype, as measured)."""
from __future__ import annotations

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._ck_cost import ck_cost


def ccnn_cost(p, env: OpEnv, s: Symbols) -> Cost:
    d, b, n, by = s.d, s.b, s.n, s.bytes
    conv = ck_cost(p, env, s, mask=True)
    out = linear(s, d, d, True)
    t = b * n * d
    other = 8 * t + 2 * 8 * t + t  # the norm, two GELUs, the add
    return Cost(params=conv.params + 2 * d + out.params, fwd=conv.fwd + out.fwd, bwd=conv.bwd + out.bwd,
                fwd_other=conv.fwd_other + other, bwd_other=conv.bwd_other + out.bwd_other + 2 * other,
                saves_input=True, saved=conv.saved + 3 * t * by + 2 * b * n * by + (t * by if p.dropout > 0 else 0),
                peak=conv.peak + t * by,
                bwd_peak=d * by * ((3 if p.dropout > 0 else 4) * b * n - 2 * n + 4), cache=conv.cache)
