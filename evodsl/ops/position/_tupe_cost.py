"""The cost of pos(tupe): its parameters on the stream (once), and inside each dense attention the [h, n, n] term
built from them (tupe.py)."""
from __future__ import annotations

from ..cost import Cost, Symbols


def tupe_cost(p, env, s: Symbols) -> Cost:
    """The identity on the stream; p [max_len, d], the LayerNorm, U_Q and U_K (with biases), b and θ counted here."""
    d = s.d
    params = p.max_len * d + 2 * d + 2 * (d * d + d) + (p.buckets * p.heads if p.mode == "rel" else 0) \
        + (2 * p.heads if p.cls else 0)
    return Cost(params=params, inplace=True)


def tupe_attach_cost(p, s: Symbols, heads, kv_heads, head_dim) -> Cost:
    """Inside dense attention, over the first n rows of p: the LayerNorm (8 FLOPs an element), U_Q and U_K, the
    per-head correlation [h, n, n] scaled (rel: the buckets of the n x n distances, 8 elementwise ops each, looked
    up and added; cls: two selections), added to every score. Backward: the projections' weights and p's rows
    (p is a parameter), the correlation's two inputs. Kept: the LayerNorm's float32 statistics and output, the
    per-head rows of U_Q and U_K (rel: the int64 buckets; cls: the two bool selections). At its peak: the rows,
    their projections, the correlation beside (rel) the looked-up bias and their sum, and the buckets."""
    b, n, by, d = s.b, s.n, s.bytes, s.d
    n2, D = n ** 2, heads * head_dim
    rel, cls = int(p.mode == "rel"), int(p.cls)
    fwd = 2 * 2 * n * d * d + 2 * heads * n2 * head_dim
    bwd = 2 * 4 * n * d * d + 4 * heads * n2 * head_dim
    other = 8 * n * d + heads * n2 * (1 + rel + 2 * cls) + 8 * n2 * rel + b * heads * n2
    saved = 8 * n + n * d * by + 2 * n * D * by + 8 * n2 * rel + 2 * n * cls
    terms = 3 if rel else 1 + cls  # [h, n, n] tensors alive at once
    peak = n * d * by + 2 * n * D * by + 8 * n + terms * heads * n2 * by + 8 * n2 * rel
    return Cost(fwd=fwd, bwd=bwd, fwd_other=other, bwd_other=2 * other, saved=saved, peak=peak)
