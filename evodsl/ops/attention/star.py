"""mha(star, rounds=T): the Star-Transformer's ring and relay (Guo et al. 2019), O(n d^2) projections, O(n d)
attention.

The paper's Algorithm 1, with e_i the input (the embeddings: this op's input x), h^0 = e and the relay
s^0 = mean_i e_i over the tokens; round t = 1..T updates every satellite h_i from its ring neighbours, its
embedding and the relay, then the relay from itself and every satellite:

    C_i = [h_{i-1}; h_i; h_{i+1}; e_i; s]  (ring: the first and last tokens are neighbours)
    h_i <- LayerNorm(ReLU(MultiAtt(h_i, C_i)))                                        (5 keys per token)
    s   <- LayerNorm(ReLU(MultiAtt(s, [s; H])))                                       (n + 1 keys)

and the op's output is H after round T (the last relay update feeds nothing, so it is not computed). MultiAtt
is Vaswani's (q, k, v, o projections, 1/sqrt(dh)); each round has its own ring and relay parameters and
LayerNorms, as the authors' fastNLP code (which zero-pads the ring's ends instead of closing it, and adds
positions and pre-norms there). The spec around it adds what the paper's model adds (a residual, if wanted:
the paper has none). Per token the ring attention is two small matmuls against its 5 stacked keys and values;
the relay's is SDPA over [b, h, 1, n + 1]: never n x n. Padding: the ring closes over each sequence's tokens
(the neighbours of its first and last token are each other), the relay averages and reads only tokens, so a
padded batch equals each sequence alone. K/V heads (GQA) serve every attention. No causal form: the relay
reads every token.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols, linear
from ..registry import Op, OpEnv, register
from ._common import LSE_BYTES, AttentionBase, AttentionParams, attention_cost, head_symbols, projections_cost
from .isab import no_dropout_shape


class StarParams(AttentionParams):
    rounds: int = Field(1, ge=1, le=16, description="T: rounds of ring and relay updates")


class _Attend(nn.Module):
    """One MultiAtt's projections and the LayerNorm after its ReLU."""

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(d, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, d, bias=bias)
        self.norm = nn.LayerNorm(d)


def ring_neighbours(n, mask, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of each token's previous and next token on the ring, [b or 1, n] each: i -+ 1 mod n, or,
    with a padding mask, over each sequence's tokens in order (a padded position gets some token)."""
    i = torch.arange(n, device=device)
    if mask is None:  # (no remainder: ONNX exports none on integers)
        return torch.where(i == 0, n - 1, i - 1)[None], torch.where(i == n - 1, 0, i + 1)[None]
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    rank = mask.long().cumsum(-1) - 1  # a padded position before every token: -1
    # the position of each rank: tokens scatter to their rank, padding to a spare last column
    at = torch.zeros(mask.shape[0], n + 1, dtype=torch.long, device=device)
    at = at.scatter(1, torch.where(mask, rank, n), i.expand(mask.shape[0], n))
    return (at.gather(1, torch.where(rank <= 0, count - 1, rank - 1)),
            at.gather(1, torch.where(rank + 1 >= count, 0, rank + 1)))


class StarAttention(AttentionBase):
    """q_proj, k_proj, v_proj, o_proj and norm: the first round's ring attention; rings: the later rounds';
    relays: the relay updates between rounds."""

    def __init__(self, p: StarParams, env: OpEnv):
        super().__init__(p, env)
        d, args = env.d, (env.d, self.heads, self.kv_heads, self.head_dim, p.bias)
        self.norm = nn.LayerNorm(d)
        self.rings = nn.ModuleList(_Attend(*args) for _ in range(p.rounds - 1))
        self.relays = nn.ModuleList(_Attend(*args) for _ in range(p.rounds - 1))

    def forward(self, x, ctx):
        b, n, _ = x.shape
        mask = self.key_mask(ctx)
        prev, nxt = (t.expand(b, n) for t in ring_neighbours(n, mask, x.device))
        if mask is None:
            s = x.mean(1)
        else:
            s = (x * mask[..., None]).sum(1) / mask.sum(-1, keepdim=True).clamp(min=1)
        h = self._ring(self, x, x, s, prev, nxt)
        for ring, relay in zip(self.rings, self.relays):
            s = self._relay(relay, s, h, mask)
            h = self._ring(ring, h, x, s, prev, nxt)
        return h

    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        return t.view(*t.shape[:-1], heads, self.head_dim)

    def _ring(self, att, h, e, s, prev, nxt):
        """LayerNorm(ReLU(MultiAtt(h_i, [h_{i-1}; h_i; h_{i+1}; e_i; s]))), [b, n, d]."""
        return att.norm(F.relu(att.o_proj(self._ring_heads(att, h, e, s, prev, nxt))))

    def _ring_heads(self, att, h, e, s, prev, nxt):
        """The ring attention's heads, [b, n, h dh]: per token its query heads ([b, n, kv, g, dh]) against its
        5 keys and values ([b, n, kv, 5, dh], stacked once). Its temporaries die on return."""
        b, n, _ = h.shape
        kv, g, dh = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        at_prev, at_next = (t[..., None, None].expand(b, n, kv, dh) for t in (prev, nxt))

        def stacked(proj):  # [b, n, kv, 5, dh]: the projections of h_{i-1}, h_i, h_{i+1}, e_i and s
            t, te = self._split(proj(h), kv), None if e is h else self._split(proj(e), kv)
            ts = self._split(proj(s), kv)[:, None].expand(b, n, kv, dh)
            return torch.stack((t.gather(1, at_prev), t, t.gather(1, at_next), t if te is None else te, ts), 3)

        keys = stacked(att.k_proj)
        w = (att.q_proj(h).view(b, n, kv, g, dh) @ keys.transpose(-1, -2) * dh ** -0.5).softmax(-1)
        del keys
        return (w @ stacked(att.v_proj)).view(b, n, self.heads * dh)  # w: [b, n, kv, g, 5]

    def _relay(self, att, s, h, mask):
        """LayerNorm(ReLU(MultiAtt(s, [s; H]))), [b, d]: SDPA of the relay's query over itself and the tokens."""
        b, n, _ = h.shape
        kv = self.kv_heads
        c = torch.cat((s[:, None], h), 1)  # [b, n + 1, d]
        q = self._split(att.q_proj(s), self.heads)[:, :, None]  # [b, h, 1, dh]
        keep = None if mask is None else F.pad(mask, (1, 0), value=True)[:, None, None, :]
        o = F.scaled_dot_product_attention(q, self._split(att.k_proj(c), kv).transpose(1, 2),
                                           self._split(att.v_proj(c), kv).transpose(1, 2), attn_mask=keep,
                                           enable_gqa=kv != self.heads)
        return att.norm(F.relu(att.o_proj(o.reshape(b, self.heads * self.head_dim))))


def star_cost(p: StarParams, env: OpEnv, s: Symbols) -> Cost:
    """Per round: the ring's q, k, v, o projections (after the first round, k and v of the embeddings too), k
    and v of the relay (b rows), two [g, dh] x [dh, 5] products per token and K/V head, ReLU and LayerNorm;
    between rounds the relay's update: q and o on b rows, k and v on b (n + 1), SDPA over [b, h, 1, n + 1]."""
    h, kv, dh = head_symbols(p, s)
    b, n, by, d, T = s.b, s.n, s.bytes, s.d, p.rounds
    kvp = replace(linear(s, d, kv * dh, p.bias), params=0)  # k and v of the embeddings: the ring's own projections
    ring = replace(linear(s, d, kv * dh, p.bias, tokens=b).scaled(2), params=0) + Cost(
        params=2 * d, fwd=20 * b * n * h * dh, bwd=40 * b * n * h * dh,
        fwd_other=30 * b * n * h + 10 * b * n * d, bwd_other=60 * b * n * h + 20 * b * n * d)
    later = projections_cost(p, s, h, kv, dh) + kvp.scaled(2) + ring
    c = b * (n + 1)
    relay = (linear(s, d, h * dh, p.bias, tokens=b) + linear(s, d, kv * dh, p.bias, tokens=c).scaled(2)
             + linear(s, h * dh, d, p.bias, tokens=b)
             + Cost(params=2 * d, fwd=4 * b * h * (n + 1) * dh, bwd=10 * b * h * (n + 1) * dh,
                    fwd_other=5 * b * h * (n + 1) + 10 * b * d, bwd_other=10 * b * h * (n + 1) + 20 * b * d))
    core = ring + (later + relay).scaled(T - 1)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * d * by
    w, sm, idx, stats = b * n * h * 5 * by, b * d * by, 2 * 8 * n, 2 * 4 * b * n  # weights, relay, ring, LN
    qs, kvc = b * h * dh * by, b * (n + 1) * kv * dh * by  # the relay's query (or output); its keys (or values)
    # kept per ring: the k and v projections (gather keeps its source), the stacked keys and values, q, the
    # weights, o (o_proj's input), ReLU's output (LayerNorm's input) and the norm's statistics; after the first
    # round also its input h and the relay s (the first: s_0 and the ring's indices). Per relay update: [s; H],
    # its query, keys, values, output and logsumexp, ReLU's output, the statistics
    ring_kept = 12 * kvb + 2 * q + w + out + stats
    relay_kept = b * (n + 1) * d * by + 2 * qs + 2 * kvc + LSE_BYTES * b * h + sm + 2 * 4 * b
    saved = sm + idx + ring_kept + (T - 1) * (out + sm + ring_kept + relay_kept)
    # inference: the ring's values stacked (its projection, two gathered copies, the stack) beside its keys'
    # weights; later rounds beside h (and the embeddings' projection); the relay's [s; H], keys and values
    # at the last LayerNorm: ReLU's output and its own (and h before it)
    phases = [8 * kvb + w + sm + idx, (3 if T > 1 else 2) * out + stats + sm + idx]
    if T > 1:
        phases += [out + 9 * kvb + w + sm + idx, 2 * out + 2 * kvc + sm]
    # backward, the last ring: LayerNorm's gradient beside ReLU's; the gradients of the stacked values and of
    # the weights beside o's, o_proj's and ReLU's saved tensors released
    bwd = [2 * out - stats, 5 * kvb + w - out - stats]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: the relay reads every token
    family="mha", variant="star", params=StarParams, module=StarAttention,
    causal="no", shape=no_dropout_shape("mha(star)"), cost=star_cost,
    paper="Star-Transformer, Guo et al. 2019, arXiv:1902.09113",
    summary="h_i <- LN(ReLU(MultiAtt(h_i, [h_{i-1}; h_i; h_{i+1}; e_i; s]))), relay s <- LN(ReLU(MultiAtt(s, "
            "[s; H]))) between rounds, s_0 = mean(e); T rounds; O(n d^2)",
    note="",  # no note in the reference; seed 002 lists it
))
