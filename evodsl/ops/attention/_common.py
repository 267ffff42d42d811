"""What every multi-head attention variant shares: params (heads, kv_heads for MQA/GQA, head_dim, bias,
dropout), the shape rule, and the q/k/v/o projections with the position scheme applied inside attention."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..registry import OpEnv, OpParams, ShapeProblem


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


class AttentionBase(nn.Module):
    """Projections q_proj, k_proj, v_proj, o_proj; `pos` is the in-attention position scheme (or None)."""

    def __init__(self, p: AttentionParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.heads, self.kv_heads = p.heads, p.kv_heads or p.heads
        self.head_dim = p.head_dim or d // p.heads
        self.causal, self.dropout = env.causal, p.dropout
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=p.bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=p.bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=p.bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=p.bias)
        self.pos = env.pos[0].attach(env.pos[1], self.heads, self.head_dim) if env.pos else None

    def qkv(self, x: torch.Tensor):
        """q [b, h, n, dh]; k, v [b, kv_heads, n, dh]; the position scheme's rotation applied to q and k."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.pos is not None:
            q, k = self.pos.rotate(q, k)
        return q, k, v

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """[b, kv_heads, ...] -> [b, heads, ...]: each K/V head serves heads / kv_heads query heads."""
        g = self.heads // self.kv_heads
        return t if g == 1 else t.repeat_interleave(g, dim=1)

    def position_bias(self, i: torch.Tensor, j: torch.Tensor):
        """Additive score bias [h, *broadcast(i, j)] from the position scheme (ALiBi), or None."""
        return None if self.pos is None else self.pos.bias(i, j)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        b, h, n, dh = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, n, h * dh))
