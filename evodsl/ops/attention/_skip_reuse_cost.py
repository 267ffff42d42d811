"""The cost of mha(skip_reuse) (skip_reuse.py): Phi = ECA(FC2(DwC(FC1(z)))) over the reused attention output,
z [b, n, d]; E = expand * d.

FLOPs: the two linears; the depthwise convolution, 2 b n E k forward and as much for its input's gradient, and
for its weight's gradient what FlopCounterMode counts, 2 b n E k * E (its conv formula ignores groups there: the
multiply-adds are 2 b n E k); ECA's convolution over one descriptor per sequence (bidirectional) or per position
(causal, the prefix means), 2 d k_eca each. Elementwise: two GELUs (5 per element), the mean (cumulative sum),
its division, the sigmoid (4), the gate's product.
Kept for backward: FC1's output (GELU's input), the zero-padded [b, E, n + k - 1] convolution input, its output
(GELU's input), FC2's input (GELU's output made contiguous [b, n, E]), y (the gate's product), and ECA's input and
sigmoid output ([b, 1, d] per sequence; causal [b, n, d], with the [n, 1] counts). The inference peak: FC1's
output and its GELU; the padded input beside h, then beside the convolution's output; that GELU and its
contiguous copy; the copy and y; causal, y with the prefix mean, ECA's output and its sigmoid; at the end, y and
the output. The backward's peak: the gradients of y and of the output's product (2 b n d), or FC2's input's
gradient once y (causal: and the prefix means, the sigmoid's output) is released.
Decoding state (causal): the last k - 1 FC1 outputs and the running sum of y."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv

GELU, SIGMOID = 5, 4  # FLOPs per element (ffn/mlp.py's ACT_FLOPS)


def skip_reuse_cost(p, env: OpEnv, s: Symbols) -> Cost:
    b, n, d, by = s.b, s.n, s.d, s.bytes
    E = s.sym("e", p.expand) * d
    k, ke = s.sym("k", p.k), s.sym("k_eca", p.k_eca)
    rows = n if env.causal else 1  # ECA's descriptors: one per position (prefix means) or one per sequence
    fc = linear(s, d, E, p.bias) + linear(s, E, d, p.bias)
    conv = 2 * b * n * E * k
    dwc = Cost(params=E * k + (E if p.bias else 0), fwd=conv, bwd=conv + conv * E,
               bwd_other=b * n * E if p.bias else 0)
    eca = Cost(params=ke, fwd=2 * b * rows * d * ke, bwd=4 * b * rows * d * ke)
    other = 2 * GELU * b * n * E + b * n * d + b * rows * d * (1 + SIGMOID) + b * n * d
    c = fc + dwc + eca
    hid, padded, D, small = b * n * E * by, b * (n + k - 1) * E * by, b * n * d * by, b * rows * d * by
    saved = 3 * hid + padded + D + 2 * small + (n * by if env.causal else 0)
    phases = [2 * hid, hid + padded, hid + D, 2 * D + small]
    if env.causal:
        phases.append(4 * D)
    cache = b * ((k - 1) * E + d) * by if env.causal else 0
    return Cost(params=c.params, fwd=c.fwd, bwd=c.bwd, fwd_other=other, bwd_other=2 * other + c.bwd_other,
                saves_input=True, saved=saved, peak=sp.Max(*phases) - D, cache=cache,
                bwd_peak=sp.Max(2 * D, hid - (2 * D if env.causal else 2 * small)))
