"""What every multi-head attention variant shares: params (heads, kv_heads for MQA/GQA, head_dim, bias,
dropout), the shape rule, the q/k/v/o projections with the position scheme applied inside attention, and the
cost of those shared parts.

Cost conventions of the attention variants (each variant adds what its kernel does):
- Symbols: b, n, d; h (heads); kv (K/V heads, only where kv_heads != heads); dh (head width, d/h unless
  head_dim is set, so that h*dh reads as d). Memory is in bytes, `s.bytes` per element.
- fwd/bwd: the matmul FLOPs FlopCounterMode counts. F.scaled_dot_product_attention over [B, K] scores counts
  4*B*K*dh forward (causal not halved) and 2.5x that backward (its kernel recomputes the weights); explicit
  matmuls count 2x backward, and so does SDPA's math kernel, which runs in training when the mask needs a
  gradient or with dropout (the fused CPU kernel has none; it computes in float32 for 16-bit dtypes).
- fwd_other: softmax 5 FLOPs per score (scale, max, exp of the difference, sum, divide); any other
  elementwise op 1 per element; bwd_other twice fwd_other.
- saved: what autograd keeps beyond the op's input and output. SDPA keeps q, k, v, its output and a float32
  logsumexp per query; the CPU kernel lays its output out like q, so with q a view of q_proj's [b, n, h, dh]
  output o_proj's reshape is free, and with a contiguous q (rotated, blocked) it is one more copy.
- peak: the largest live total during a no-grad forward (eval: no dropout), the output included, minus the
  output: the Max over the phases that compete (position scheme, mask, kernel, o_proj).
- cache: K and V of the keys a decoder still needs (all n; the last w or S), or linear attention's state.
- bwd_peak: at the peak of the backward with respect to the input (the incoming gradient not counted, no
  parameter gradient), the bytes it has created less those of its saved tensors it has already released
  (autograd frees what a node saved once the node has run): the Max over its phases, the kernel's (the
  gradient of o_proj's input, those of q, k, v and what the kernel's backward builds: weights, scores,
  chunks), the position scheme's, and the projections' (q's gradient beside the input's three, two of them
  summed out of place, when everything the op saved is released: q + 3 inputs - saved).
- A position scheme applied inside attention declares `attach_cost(params, s, heads, kv_heads, head_dim)`:
  its FLOPs; `saved`, what it keeps for backward; `peak`, the bytes it adds over q, k, v while it is built;
  `bwd_peak`, the bytes its backward adds over the gradients of q, k and v (None: it has none).
  That is its cost in dense attention over n x n scores; banded kernels evaluate a score bias (ALiBi) on their
  band only and count it themselves.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols, linear
from ..position._inattention import InAttentionPosition
from ..registry import OpEnv, OpParams, ShapeProblem
from ...decode import slot
from ._collab import collab_qkv, collab_setup

LSE_BYTES = 4  # SDPA's logsumexp per query is float32 whatever the dtype


class AttentionParams(OpParams):
    heads: int = Field(8, ge=1, le=4096, description="query heads")
    kv_heads: int | None = Field(None, ge=1, description="K/V heads: 1 = multi-query, G = grouped-query; default heads")
    head_dim: int | None = Field(None, ge=1, le=4096, description="width of one head; default d_model / heads")
    bias: bool = Field(True, description="biases on the q, k, v and output projections")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the attention weights (training only)")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def attention_shape(p: AttentionParams, env: OpEnv):
    if len(env.shape) != 3 or not isinstance(env.d, int):
        raise ShapeProblem(f"attention needs a [b, n, d] stream, got [{', '.join(map(str, env.shape))}]")
    d = env.d
    if p.head_dim is None and d % p.heads:
        near = sorted(_divisors(d), key=lambda k: abs(k - p.heads))[:3]
        raise ShapeProblem(f"d_model {d} is not divisible by heads={p.heads}", "heads",
                           f"d_model % heads must be 0: try heads={' or '.join(map(str, sorted(near)))}, "
                           f"or set head_dim")
    kv = p.kv_heads or p.heads
    if p.heads % kv:
        raise ShapeProblem(f"heads={p.heads} is not a multiple of kv_heads={kv}", "kv_heads",
                           f"each K/V head serves a group of query heads: kv_heads must divide heads "
                           f"({', '.join(map(str, _divisors(p.heads)))})")
    return env.shape


def weightless_shape(op_id: str):
    """The shape rule of an attention that never forms weights between positions (linear, efficient,
    fastformer): attention_shape, with dropout= refused, as there are no weights to drop out."""
    def shape(p: AttentionParams, env: OpEnv):
        if p.dropout:
            raise ShapeProblem(f"{op_id} never forms the attention weights, so it has none to drop out", "dropout",
                               "remove dropout=, or put dropout(standard) on the stream")
        return attention_shape(p, env)
    return shape


class AttentionBase(nn.Module):
    """Projections q_proj, k_proj, v_proj, o_proj; `pos` is the in-attention position scheme (or None)."""

    def __init__(self, p: AttentionParams, env: OpEnv, d_kv: int | None = None):
        """`d_kv`: the width of the stream keys and values are read from (cross-attention), default d."""
        super().__init__()
        d = env.d
        self.heads, self.kv_heads = p.heads, p.kv_heads or p.heads
        self.head_dim = p.head_dim or d // p.heads
        self.causal, self.dropout = env.causal, p.dropout
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=p.bias)
        self.k_proj = nn.Linear(d_kv or d, self.kv_heads * self.head_dim, bias=p.bias)
        self.v_proj = nn.Linear(d_kv or d, self.kv_heads * self.head_dim, bias=p.bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=p.bias)
        self.pos = env.pos[0].attach(env.pos[1], self.heads, self.head_dim) if env.pos else None
        collab_setup(self, p, d, d_kv or d)  # collab=D_k: shared q, k projections (_collab.py); self.collab

    def qkv(self, x: torch.Tensor, offset: int = 0):
        """q [b, h, n, dh]; k, v [b, kv_heads, n, dh]; the position scheme's rotation applied to q and k (at
        positions offset.. when decoding)."""
        if getattr(self, "collab", None) is not None:  # getattr: a subclass may build its own projections
            return collab_qkv(self, x)
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.pos is not None:
            q, k = self.pos.rotate(q, k, offset)
        return q, k, v

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """[b, kv_heads, ...] -> [b, heads, ...]: each K/V head serves heads / kv_heads query heads."""
        g = self.heads // self.kv_heads
        return t if g == 1 else t.repeat_interleave(g, dim=1)

    def key_mask(self, ctx) -> torch.Tensor | None:
        """ctx.mask, or None where it changes nothing a token reads: a causal op on a right-padded batch (every
        padded key comes after every token), which then keeps its fast, unmasked path."""
        if ctx is None or ctx.mask is None or (self.causal and ctx.right_padded):
            return None
        return ctx.mask

    def allowed(self, ctx, n: int, device) -> torch.Tensor | None:
        """bool [b, 1, n, n], which keys each query may read: no padded key (ctx.mask) and, causal, none after
        it. A query left with no key (a padded position before every token, under left padding) reads its own:
        its output is finite and meaningless, and no token reads it. None when nothing is padded."""
        key_mask = self.key_mask(ctx)
        if key_mask is None:
            return None
        keep = key_mask[:, None, None, :]
        idx = torch.arange(n, device=device)
        own = idx[:, None] == idx[None, :]
        if self.causal:
            keep = keep & (idx[None, :] <= idx[:, None])
        return keep | (own & ~keep.any(-1, keepdim=True))

    def window_step(self, x: torch.Tensor, ctx, window: int, bias=None) -> torch.Tensor:
        """Decoding a causal band (local, adaptive span): the new queries against the cached K/V of the last
        `window` positions and their own, query t reading keys t-window+1 .. t, with the additive score `bias(i,
        j)` [h, ...] of positions (ALiBi's added); the cache then keeps the last `window` (rotated, K/V heads)."""
        q, k, v = self.qkv(x, ctx.offset)
        o, ctx.cache.caches[slot(ctx, self)] = self.window_attend(q, k, v, ctx.cache.caches.get(slot(ctx, self)),
                                                                  ctx.offset, window, bias)
        return self.out(o)

    def window_attend(self, q, k, v, old, start: int, window: int, bias=None):
        """window_step's attention: the new q, k, v (positions start..) against `old` (the cached (K, V), or None):
        (o [b, h, n, dh], the (K, V) of the last `window` positions to cache)."""
        if old is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        n, keys = q.shape[2], k.shape[2]
        i = torch.arange(start, start + n, device=q.device)[:, None]
        j = torch.arange(start + n - keys, start + n, device=q.device)[None, :]
        keep = (j <= i) & (j > i - window)
        mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
        for extra in (self.position_bias(i, j), None if bias is None else bias(i, j)):
            if extra is not None:
                mask = mask + extra.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        # keep the last w (all while there are fewer), with no branch on their number: one exported step serves
        # every length (sym_min: export would read [-w:] as w long); a copy, as a view keeps the concatenation
        drop = keys - torch.sym_min(keys, window)  # the keys that leave the window
        return o, (k[:, :, drop:].clone(), v[:, :, drop:].clone())

    def position_bias(self, i: torch.Tensor, j: torch.Tensor):
        """Additive score bias [h, *broadcast(i, j)] from the position scheme (ALiBi), or None."""
        return None if self.pos is None else self.pos.bias(i, j)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        if getattr(self, "collab", None) is not None:  # v zero-padded to q's width (_collab.py): the padded columns cut
            o = o[..., :self.head_dim]
        b, h, n, dh = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, n, h * dh))


# -------------------------------------------------------------------- cost of the shared parts


def head_symbols(p: AttentionParams, s: Symbols):
    """h, kv, dh for cost formulas: kv is h itself unless kv_heads differs, dh is d/h unless head_dim is set."""
    h = s.sym("h", p.heads)
    kv = h if p.kv_heads in (None, p.heads) else s.sym("kv", p.kv_heads)
    dh = s.d / h if p.head_dim is None else s.sym("dh", p.head_dim)
    return h, kv, dh


def projections_cost(p: AttentionParams, s: Symbols, h, kv, dh) -> Cost:
    """q, k, v and o projections: params and FLOPs (what they keep is the variant's to count)."""
    return (linear(s, s.d, h * dh, p.bias) + linear(s, s.d, kv * dh, p.bias).scaled(2)
            + linear(s, h * dh, s.d, p.bias))


def rotates(env: OpEnv) -> bool:
    """The position scheme turns q and k (rope): they come back contiguous [b, h, n, dh]."""
    return env.pos is not None and env.pos[0].attach.rotate is not InAttentionPosition.rotate


def score_bias(env: OpEnv) -> bool:
    """The position scheme adds a per-head bias to the scores (ALiBi)."""
    return env.pos is not None and env.pos[0].attach.bias is not InAttentionPosition.bias


def learned_bias(env: OpEnv) -> bool:
    """The score bias has parameters (T5's table): it needs a gradient, so SDPA runs its math kernel in
    training (the fused kernels give a mask no gradient)."""
    return score_bias(env) and getattr(env.pos[0].attach, "learned", False)


def position_cost(env: OpEnv, s: Symbols, h, kv, dh) -> Cost:
    """The in-attention position scheme's own cost (Cost() without one)."""
    if env.pos is None:
        return Cost()
    op, params = env.pos
    if op.attach_cost is None:
        raise NotImplementedError(f"{op.id} is applied inside attention but declares no attach_cost")
    return op.attach_cost(params, s, h, kv, dh)


def attention_cost(p: AttentionParams, s: Symbols, h, kv, dh, core: Cost, pos: Cost, saved, phases,
                   cache, bwd_phases=(), projections_bwd=None) -> Cost:
    """Projections + position scheme + `core` (the kernel's FLOPs); `saved`, all the bytes kept beyond the
    input and the output; the inference peak is the largest of the live totals in `phases` (the output among
    them where it exists by then), less the output; the backward's peak (bwd_peak) the largest of the kernel's
    `bwd_phases`, the position scheme's and the projections' (`projections_bwd` in place of the default q + 3
    inputs - saved, for an op without three input projections). Attention keeps its input (the projections do),
    never its output."""
    out = s.b * s.n * s.d * s.bytes
    peak = (sp.Max(*phases) if len(phases) > 1 else phases[0]) - out
    q, kvb = s.b * s.n * h * dh * s.bytes, s.b * s.n * kv * dh * s.bytes
    # the projections: q's gradient beside the input's three
    bwd = [q + 3 * out - saved if projections_bwd is None else projections_bwd, *bwd_phases]
    if pos.bwd_peak:  # the position scheme's backward beside the gradients of q, k, v, the kernel's released
        bwd.append(q + 2 * kvb + pos.bwd_peak - (saved - pos.saved))
    total = projections_cost(p, s, h, kv, dh) + pos + core
    return replace(total, saved=saved, peak=peak, cache=cache, saves_input=True, saves_output=False,
                   bwd_peak=sp.Max(*bwd) if len(bwd) > 1 else bwd[0])
