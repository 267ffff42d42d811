"""The cost of mha(chord) (chord.py): V's projection, M entry MLPs, M gather-and-matmul factors, W_o."""
from __future__ import annotations

import math

import sympy as sp

from ..cost import Cost, Symbols, linear
from ._common import head_symbols

INDEX_BYTES = 8  # the links' positions [n, J] are int64 whatever the dtype


def chord_cost(p, env, s: Symbols) -> Cost:
    """Symbols: h, kv, dh (_common.py), M (factors), hidden (default d). J = 1 + ceil(log2 n) links a row (its own
    position and the offsets 2^k < n), S = 1 + ceil(log2 max_len) entries a row and head from each MLP (a number).
    Matmul FLOPs: v_proj (kv dh wide), o_proj, per factor the MLP (d -> hidden -> h S) and the factor, a [1, J] @
    [J, dh] matmul a row and head (2 b h n J dh), its backward twice that (the entries' gradient and the gathered
    values'). No n x n term: O(M n log n h dh). Other FLOPs (a convention, not measured): GELU 8 an element, the
    gather and its scatter-add backward 1 an element (the MLPs' bias gradients from linear()).
    Bytes: saved, per factor GELU's input and output [b, n, hidden], the gathered values [b, h, n, J, dh] and the
    entries' contiguous copy [b, h, n, J]; the links [n, J] (int64, once); o_proj's input (the heads' outputs
    made contiguous). Inference peak, in a factor's matmul: its input and output [b, h, n, dh], the MLP's output
    [b, n, h S], the gathered values and the entries' copy, the links (less the op's output, b n d). Backward:
    the last factor's matmul, the gradients of the gathered values and of the entries [b, h, n, J (dh + 1)]."""
    b, n, d, by = s.b, s.n, s.d, s.bytes
    h, kv, dh = head_symbols(p, s)
    M = s.sym("M", p.factors)
    hid = s.sym("hidden", p.hidden) if p.hidden is not None else d
    S = 1 + (math.ceil(math.log2(p.max_len)) if p.max_len > 1 else 0)
    J = 1 + sp.ceiling(sp.log(n, 2))
    proj = linear(s, d, kv * dh, p.bias) + linear(s, h * dh, d, p.bias)
    mlp = (linear(s, d, hid, p.bias) + linear(s, hid, h * S, p.bias)).scaled(M)
    rows = b * h * n * J  # (row, head, link) triples
    mix = Cost(fwd=M * 2 * rows * dh, bwd=M * 4 * rows * dh, fwd_other=M * (8 * b * n * hid + rows * dh),
               bwd_other=M * 2 * (8 * b * n * hid + rows * dh))
    total = proj + mlp + mix
    links = n * J * INDEX_BYTES
    saved = M * (2 * b * n * hid + rows * (dh + 1)) * by + links + b * n * h * dh * by
    peak = (2 * b * h * n * dh + b * n * h * S + rows * (dh + 1)) * by + links - b * n * d * by
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=saved, saves_input=True, peak=peak, bwd_peak=rows * (dh + 1) * by)
