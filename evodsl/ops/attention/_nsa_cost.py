"""The cost of mha(nsa) (nsa.py): the sliding-window branch is mha(local)'s band (banded_attention_cost: the
projections and the window's kernel, in the form it runs), to which the other branches add their own."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._banded import band_layout, banded_attention_cost
from ._common import head_symbols
from ._nsa_select import CHUNK


def nsa_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """M = floor((n - l) / d) + 1 compressed blocks (0 for n < l), each through two MLPs (K and V) of an
    [l dh] -> dh -> dh map per K/V head; explicit [b, h, n, M] scores against them (quadratic in n with the
    small constant 1/d); SDPA of each query's group over its S = topk l' gathered keys, in chunks of CHUNK
    queries (a chunk's gathered K and V, [b, kv, C, S, dh], lead the peaks; training keeps no gathered tensor:
    the backward recomputes them); the gate's linear map and the gated sum. Params and FLOPs are exact; memory
    is held to measurement in tests/ops/test_cost_attention.py. The export's form (a symbolic n) is not costed: tests/test_onnx.py BANDED."""
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
    several = sp.Min(1, b - 1)  # q [b, h, n, dh] (a view of its projection) regrouped by a reshape: a copy for b > 1
    raw = 0 if kv == h else 2 * kvb  # k, v themselves (the selection's): the band keeps them when it reads them as they are
    raw = sp.Piecewise((raw, one_call), (2 * kvb, True))
    J = sp.ceiling(n / L) + k  # selection blocks, the last topk padding
    # the selection runs in chunks of C queries (_nsa_select.py): per chunk, the token indices and masks of its
    # S keys, the gathered keys and values (two buffers reused by every chunk), q regrouped, the float mask and
    # the weights (backward)
    C = sp.Min(n, CHUNK)
    pos_c, keep_c = 8 * b * kv * C * S, b * kv * C * S
    gathered_c = b * kv * C * S * dh * by
    weights_c = b * h * C * S * by
    q_c = b * h * C * dh * by
    kvp = b * kv * sp.ceiling(n / L) * L * dh * by  # k (v) as rows of whole blocks, zero-padded
    padded = sp.Piecewise((0, sp.Eq(sp.Mod(n, L), 0)), (2 * kvp, True))
    ids = 8 * b * kv * n * k + n * J + 8 * n * (1 if env.causal else 2)  # the selection, valid blocks, t and last
    saved = (2 * (8 * M * l + b * kv * M * l * dh * by + kc)  # the block indices, the MLPs' inputs, relu's outputs
             + several * q + 2 * kch + 2 * n * M + 2 * scores  # q for the matmul, K~ and V~, the masks, softmax and masked
             + raw + ids + q  # the selection's: k and v, its indices, o
             + b * n * 3 * h * by + q + q)  # the gates, the compressed output, o_proj's copy
    saved = window.saved - band_copy * q + saved
    # inference: a selection chunk leads (its gathered K and V beside the importance, the indices, the compressed
    # branch's output and weights, the selection's output); or the compressed scores, or the band's phases
    win = q if env.causal else b * h * nb * B * dh * by  # the band's output (blocked queries, bidirectional)
    select = (q + 2 * kvb + 2 * kc + win + q + scores + b * kv * n * J * by + ids + q  # .. importance, indices, o
              + pos_c + keep_c + 2 * gathered_c + q_c + b * kv * C * S * by + q_c  # a chunk's, the two buffers
              + padded)  # k and v as whole blocks (a copy when l' does not divide n)
    compress = q + 2 * kvb + 2 * kc + win + q + (kch if kv != h else 0) + 3 * scores
    peak = sp.Max(select, compress, window.peak + out + 2 * kc) - out
    # backward: a chunk's recomputed gather (its buffers then take the gradients of the gathered keys and values),
    # weights and their gradient, beside dq, dk and dv (padded to whole blocks) and the branches' output gradients
    bwd_peak = sp.Max(2 * gathered_c + 2 * weights_c + pos_c + keep_c + 3 * q_c + 4 * q + 2 * kvp + padded,
                      window.bwd_peak)
    cache = 2 * b * kv * dh * by * (n + M)  # every raw key and value, and the compressed blocks
    return replace(total, saved=saved, peak=peak, bwd_peak=bwd_peak, cache=cache, saves_input=True, saves_output=False)
