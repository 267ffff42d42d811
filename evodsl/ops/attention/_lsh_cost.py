"""The cost of mha(lsh) (lsh.py): one form, eager and exported, every round over its sorted chunks."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._adjacent_cost import lsh_hf_cost
from ._common import head_symbols


def lsh_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """q_proj (the keys' source too), v_proj, o_proj; the hash ([b, h, R, n, B/2] projections, no gradient); per
    round the tokens gathered in sorted order into L = (ceil(n/m) + 1) m slots (the last chunk past n), each
    chunk's m queries against its 2m keys (the previous chunk's and its own): [b, h, R, L, 2m] scores, explicit
    softmax with its logsumexp; the rounds' outputs gathered back and combined. The matmuls grow as n; the sort's
    n log n comparisons are counted outside them (fwd_other), so the time class reads n log n."""
    if p.form == "hf":
        return lsh_hf_cost(p, env, s)
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    m, R, B = s.sym("m", p.chunk), s.sym("R", p.rounds), s.sym("B", p.buckets)
    L = (sp.ceiling(n / m) + 1) * m  # C = ceil(n/m) + 1 chunks, the last past n
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    vh = q if kv != h else kvb  # the values, repeated to h heads for grouped ones
    hashing = b * h * n * dh * R * B if p.buckets > 1 else 0  # x R: 2 b h n dh R B/2
    proj = linear(s, s.d, h * dh, p.bias) + linear(s, s.d, kv * dh, p.bias) + linear(s, h * dh, s.d, p.bias)
    slots = b * h * R * L  # query slots over the rounds
    scores = slots * 2 * m
    sort = b * h * R * n * sp.log(n, 2)  # the argsort's comparisons, counted with the elementwise work
    core = Cost(fwd=4 * scores * dh + hashing, bwd=8 * scores * dh, fwd_other=8 * scores + 3 * b * h * n * dh + sort,
                bwd_other=16 * scores)
    S = scores * by  # the scores; the weights
    sq = slots * dh * by  # the sorted queries; keys and values with the previous chunk's: 2 sq each
    idx = 8 * slots  # int64, slot -> token
    tok = 8 * b * h * R * n  # int64 per token and round: the buckets, the sort, the inverse
    rows = b * h * R * n * dh * by  # the rounds' outputs at the original positions
    small = b * h * R * n * by  # the rounds' logsumexps at the original positions, their weights
    # kept: q (the normalisation's, the gathers' input), rsqrt and its scaled copy, the unit keys and the values
    # (the gathers' inputs), the slot and key-slot indices; sq and the keys (the scores' matmul), the mask, the
    # weights (softmax's), the exponentials and their sums' logarithm (the logsumexp), the values (the second
    # matmul); the row index (the gathers back), the rounds' weights and outputs; o_proj's input
    saved = (q + 2 * b * h * n * by + q + vh + idx + 2 * idx + sq + 2 * sq + scores + 2 * S + slots * by + 2 * sq
             + tok + small + rows + q)
    base = q + vh + q + 2 * tok + idx  # q, v, the unit keys; the buckets, the sort; the slot index
    phases = [q + vh + 2 * B * small if p.buckets > 1 else 0,  # the hash's projections
              base + 2 * idx + 4 * sq,  # the keys and values sorted with the previous chunk's
              base + 2 * idx + 5 * sq + S,  # the scores
              # the weights and the logsumexp's exponentials beside the scores, the mask, the keys' buckets
              base + 4 * idx + 3 * sq + scores + 3 * S + 2 * slots * by,
              q + vh + tok + 2 * rows + q + small,  # the rounds combined
              q + vh + tok + 2 * q + out]  # at o_proj
    # backward: the rounds' combination (o's and the weights' gradients); the second matmul's (the gradients of
    # the weights and of the values beside o's, laid out as the slots; o_proj's input, the rows released); the
    # logsumexp's (its exponentials' gradient beside the weights', the values and o's gradient released)
    bwd = [2 * rows + small, S + 3 * sq - q - rows - tok, 2 * S - q - rows - tok]
    return replace(proj + core, saved=saved, peak=sp.Max(*phases) - out, cache=q + kvb, saves_input=True,
                   saves_output=False, bwd_peak=sp.Max(*bwd))
