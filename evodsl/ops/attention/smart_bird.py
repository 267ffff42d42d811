"""mha(smart_bird, s=16, e=16): Smart Bird's learnable sparse attention (Wu et al. 2021).

A single-head low-dimensional sketch scores every pair of tokens, P = softmax(Qs Ks^T / sqrt(e)) with
Qs = X Ws_q, Ks = X Ws_k in R^{n x e}; each head h samples, for each query i, s distinct keys S_hi from the
sketch's row P_i (Gumbel top-s: the s largest log P_ij + g_hij, g Gumbel noise, one draw per head, so heads get
different index matrices); then sparse attention over the sampled pairs only:

    o_i^h = sum_{j in S_hi} softmax_{j in S_hi}(q_i^h . k_j^h / sqrt(dh) + c_ij) v_j^h,   c = Qs Ks^T / sqrt(e)

The paper's text was not reachable; this follows its abstract. The sketch's score c_ij is added to the sampled
pairs' scores so that the sketch, whose sampling has no gradient, learns from the task loss (our reading; at
s >= n with a zero sketch it is softmax attention exactly). The noise g is a counter-based hash of (seed, head,
i, j) (reproducible, identical in an ONNX export; in training the seed advances every call). The sketch is
O(n^2 e) (b n^2 scores, one head), the sparse attention O(n s d): quadratic, in a low dimension.
Bidirectional (the sketch reads every key). Padding: padded keys get no sketch weight, so they are never
sampled ahead of a token; the noise is keyed by positions, so only right padding equals each sequence alone
(left padding is refused, E409). Grouped K/V heads share keys and values; each query head samples its own.
"""
from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols, linear
from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._common import AttentionBase, AttentionParams, attention_cost, attention_shape, head_symbols

MOD = 2 ** 31 - 1  # the Park-Miller modulus: the hash's states stay below 2^31, their products below 2^47
MUL, SALT = 48271, 12345


def gumbel(seed: int, head: int, n, device, dtype) -> torch.Tensor:
    """Gumbel noise g[i, j] = -log(-log u), u uniform in (0, 1) from a hash of (seed, head, i, j): [n, n]."""
    i = torch.arange(n, device=device)
    x = (i * MUL + ((seed * 1009 + head + 1) * 16807) % MOD) % MOD
    x = x[:, None] * MUL + i[None, :]  # one int64 [n, n] state, mixed in place: squarings make it nonlinear
    for _ in range(3):
        x.remainder_(MOD).mul_(x).add_(SALT).remainder_(MOD).mul_(MUL).add_(SALT).remainder_(MOD)
    u = x.to(dtype)
    del x
    return u.add_(0.5).div_(MOD).log_().neg_().log_().neg_()


class SmartBirdParams(AttentionParams):
    s: int = Field(16, ge=1, le=1 << 16, description="keys each query samples per head")
    e: int = Field(16, ge=1, le=4096, description="width of the single-head sketch")
    seed: int = Field(0, ge=0, le=1 << 20, description="seed of the sampling noise (eval; training advances it)")


def smart_bird_shape(p: SmartBirdParams, env: OpEnv):
    if p.dropout:
        raise ShapeProblem("mha(smart_bird) has no dropout on its sparse weights (not built)", "dropout",
                           "remove dropout=, or put dropout(standard) on the stream")
    return attention_shape(p, env)


class SmartBirdAttention(AttentionBase):
    def __init__(self, p: SmartBirdParams, env: OpEnv):
        super().__init__(p, env)
        self.s, self.e, self.seed, self.step = p.s, p.e, p.seed, 0
        self.sketch_q = nn.Linear(env.d, p.e, bias=p.bias)
        self.sketch_k = nn.Linear(env.d, p.e, bias=p.bias)

    def sample(self, sketch: torch.Tensor, n) -> torch.Tensor:
        """The sampled keys [b, n, h, s]: per head, the top s of sketch + Gumbel noise (no gradient). A sketch
        with s columns of -inf appended (a symbolic n) always has s to take: a shorter sequence takes them too."""
        seed = self.seed + (self.step if self.training else 0)
        extra = sketch.shape[-1] - n if isinstance(n, int) else self.s
        with torch.no_grad():
            heads = [(sketch + F.pad(gumbel(seed, h, n, sketch.device, sketch.dtype), (0, extra)))
                     .topk(min(self.s, n) if isinstance(n, int) else self.s, -1).indices for h in range(self.heads)]
        return torch.stack(heads, 2)

    def forward(self, x, ctx):
        b, n, _ = x.shape
        H, G, dh = self.heads, self.kv_heads, self.head_dim
        mask = ctx.mask if ctx is not None else None
        require_right_padding(mask, "mha(smart_bird)", "its sampling noise is keyed by positions, and left padding "  # eagerly (an export holds for right padding)
                                                       "moves the tokens")
        sketch = (self.sketch_q(x) @ self.sketch_k(x).transpose(1, 2)) * self.e ** -0.5  # [b, n, n]: c
        if mask is not None:
            sketch = sketch.masked_fill(~mask[:, None, :], float("-inf"))
        symbolic = not isinstance(n, int) or torch.jit.is_tracing()
        if symbolic:  # exporting: s columns of -inf appended, so that topk(s) holds at every n (weight 0)
            sketch = F.pad(sketch, (0, self.s), value=float("-inf"))
        idx = self.sample(sketch.detach(), n)  # [b, n, H, s]
        if self.training:
            self.step += 1
        q = self.q_proj(x).view(b, n, H, 1, dh)
        # the sampled keys and values, gathered from the projections' [b n G, dh] rows: [b, n, H, s, dh]
        keys = idx.clamp(max=n - 1) if symbolic else idx
        rows = (torch.arange(b, device=x.device).view(b, 1, 1, 1) * n + keys) * G \
            + torch.arange(H, device=x.device).view(1, 1, H, 1) // (H // G)
        k = self.k_proj(x).view(-1, dh)[rows]
        v = self.v_proj(x).view(-1, dh)[rows]
        bias = sketch.gather(2, idx.flatten(2)).view(b, n, H, 1, -1)  # c_ij of the sampled pairs
        w = ((q @ k.transpose(-1, -2)) * dh ** -0.5 + bias).softmax(-1)  # [b, n, H, 1, s]
        return self.o_proj((w @ v).view(b, n, H * dh))


def smart_bird_cost(p: SmartBirdParams, env: OpEnv, s: Symbols) -> Cost:
    """The sketch's projections and its [b, n, n] scores (one head, width e), then per head the s sampled keys:
    [1, dh] @ [dh, s] scores and [1, s] @ [s, dh] per query."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    e, S = s.sym("e", p.e), sp.Min(s.sym("s", p.s), n)
    pairs = b * n * h * S
    sketch = linear(s, s.d, e, p.bias).scaled(2)
    core = sketch + Cost(fwd=2 * b * n * n * e + 4 * pairs * dh, bwd=4 * b * n * n * e + 8 * pairs * dh,
                         fwd_other=b * n * n * (1 + 3 * h) + 6 * pairs, bwd_other=2 * b * n * n + 12 * pairs)
    q, out = b * n * h * dh * by, b * n * s.d * by
    nn_, sel, pw = b * n * n * by, pairs * dh * by, pairs * by
    idx = 8 * pairs  # int64 indices: the sampled keys and their rows
    # kept: the sketch's two projections, its scores, the gathered rows and the sampled keys (int64), q, the
    # gathered keys and values, the sparse weights, o_proj's input
    saved = 2 * b * n * e * by + nn_ + 2 * idx + q + 2 * sel + pw + q
    # sampling one head: the sketch beside the hash's int64 [n, n] state and its float copy; then beside the
    # noise and the noisy sketch
    phases = [nn_ + n * n * (8 + by) + idx, 2 * nn_ + n * n * by + idx,
              nn_ + 2 * idx + q + 2 * sel + 2 * pw + q + out]  # at o_proj: the sketch's scores of the sampled
    # pairs, the sparse weights and the output beside the rest
    # backward: the gathered keys' gradient beside the weights'; the sketch's gradient (scattered from the sampled
    # pairs) and its scaled copy, the gather's index released
    bwd = [sel + pw, 2 * nn_ - idx]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: the sketch reads every key
    family="mha", variant="smart_bird", params=SmartBirdParams, module=SmartBirdAttention,
    causal="no", shape=smart_bird_shape, cost=smart_bird_cost,
    paper="Smart Bird: Learnable Sparse Attention for Efficient and Effective Transformer, Wu et al. 2021, "
          "arXiv:2108.09193",
    summary="a single-head width-e sketch softmax(Qs Ks^T) over all pairs; each head samples s keys per query "
            "from it (Gumbel top-s), then softmax attention over the sampled pairs; O(n^2 e + n s d)",
    note="",  # no note in the reference; CATALOG.md lists it (afa inbox)
))
