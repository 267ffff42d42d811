"""The cost of HF Reformer's layouts (_adjacent.py): mha(chunk, before=, after=, wrap=) and mha(lsh, form=hf).

Both run B' = b h rows of C chunks of m slots (N = (ceil(n/m) + 1) m slots a run: one chunk of padding, never
read), each chunk's m queries against the J m keys of its J = 1 + before + after neighbours, gathered
([B', C, J m, dh] keys and values): 4 B' N J m dh matmul FLOPs forward, twice that backward; explicit softmax
(the mask, the exponentials, their sum, the weights) and its logsumexp. No n x n tensor: O(n J m d).
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import head_symbols


def _core(slots, K, dh, by):
    """FLOPs of the neighbour kernel over `slots` query slots, K keys each, heads of dh; the scores' bytes."""
    scores = slots * K
    core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=8 * scores, bwd_other=12 * scores)
    return core, scores * by, slots * dh * by


def local_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """q, k, v, o projections; the keys scaled, q, k, v gathered into N slots ([b, h, N, dh] each), the kernel,
    the output gathered back to n positions."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    c, J = s.sym("c", p.c), 1 + p.before + p.after
    N = (sp.ceiling(n / c) + 1) * c
    kv_proj = linear(s, s.d, kv * dh, p.bias)
    proj = linear(s, s.d, h * dh, p.bias) + kv_proj + kv_proj + linear(s, h * dh, s.d, p.bias)
    q, out = b * n * h * dh * by, b * n * s.d * by
    slots = b * h * N
    core, S, sq = _core(slots, J * c, dh, by)
    kk = slots * J * dh * by  # the keys (values) of every chunk's neighbours
    mask = slots * J * c * (2 if env.causal else 1)  # bool: the keys' validity (and causality)
    # kept: o_proj's input; the gathered queries, the neighbours' keys and values (the matmuls), the mask, the
    # exponentials and the weights, their sums; the int64 indices (the neighbour chunks', the slots')
    saved = q + sq + 2 * kk + slots * J * c + 2 * S + slots * by + 8 * slots * J / c + 8 * N
    # the peak at the exponentials: q, k, v and the scaled keys, their gathered copies, the neighbours' keys and
    # values and positions (int64), the masks, the masked scores, less their maximum, and their exponentials
    phases = [4 * q + 3 * sq + 2 * kk + 8 * slots * J + mask + 3 * S, 3 * q + sq + q + out]
    # backward (fitted to the storage tracker, within 5% at dh 16-24, J 2-4): the softmax's score-sized gradients
    # beside the kernel's, the gathered queries' storage released
    bwd = S * sp.Rational(17, 4) - sq * sp.Rational(5, 4)
    return replace(proj + core, saved=saved, peak=sp.Max(*phases) - out, cache=0, saves_input=True,
                   saves_output=False, bwd_peak=bwd)


def lsh_hf_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """q_proj (the keys' source too), v_proj, o_proj; the hash; the R rounds sorted together into R N slots, the
    kernel, the rounds' rows gathered back and combined."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    m, R, B = s.sym("m", p.chunk), s.sym("R", p.rounds), s.sym("B", p.buckets)
    J = 1 + p.before + p.after
    N = (sp.ceiling(n / m) + 1) * m
    proj = linear(s, s.d, h * dh, p.bias) + linear(s, s.d, kv * dh, p.bias) + linear(s, h * dh, s.d, p.bias)
    hashing = b * h * n * dh * R * B if p.buckets > 1 else 0
    q, out = b * n * h * dh * by, b * n * s.d * by
    slots = b * h * R * N
    core, S, sq = _core(slots, J * m, dh, by)
    core = replace(core, fwd=core.fwd + hashing, fwd_other=core.fwd_other + b * h * R * n * sp.log(n, 2))
    kk = slots * J * dh * by
    padded = b * h * N * dh * by  # q and v gathered into the padded slots
    rows = b * h * R * N * dh * by  # the rounds' outputs at their positions
    mask = slots * J * m * (3 if env.causal else 2)  # bool: validity, (causality,) the query's own position
    idx = 8 * slots * J / m + 3 * 8 * slots  # int64: the neighbour chunks; the sort, positions and its inverse
    # kept: o_proj's input; the sorted queries, values and unit keys (and the normalisation's input), the
    # neighbours' keys and values, the mask, exponentials, weights and their sums; the indices; the rows
    saved = q + 4 * sq + 2 * kk + slots * J * m + 2 * S + slots * by + idx + rows
    phases = [2 * q + 2 * padded + 3 * sq + 2 * kk + 8 * slots * J + mask + 3 * S + 4 * 8 * slots,
              2 * q + 2 * rows + q + out]
    # backward (fitted to the storage tracker at dh 16-32, R 1-2, J 2-3: from 6% under to 16% over): score-sized
    # gradients, the sorted queries and the projections' outputs released
    bwd = S * sp.Rational(7, 2) - sq - q
    return replace(proj + core, saved=saved, peak=sp.Max(*phases) - out, cache=0, saves_input=True,
                   saves_output=False, bwd_peak=bwd)
