"""mha(linear, phi=elu1, eps=1e-6): linear attention, "Transformers are RNNs" (Katharopoulos et al. 2020).

Per head, with the feature map phi(x) = elu(x) + 1 applied elementwise to q_i, k_j in R^dh (no 1/sqrt(dh)
scaling and no softmax are part of the method):

    bidirectional:  V'_i = phi(q_i)^T S / (phi(q_i)^T z + eps),        S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)
    causal:         V'_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),    S_i, z_i the same sums over j <= i

The causal form runs in chunks of C tokens: within a chunk, the masked C x C products phi(Q) phi(K)^T (j <= i);
across chunks, the [dh x dh] state S and the [dh] state z of all earlier chunks (an exclusive cumulative sum over
per-chunk states). Time and memory are O(n C dh + (n / C) dh^2): no n x n tensor, no per-position [dh x dh]
state. kv_heads < heads shares K/V heads. A rotary position scheme rotates q and k before phi (which keeps
every weight phi(q_i)^T phi(k_j) positive); ALiBi's additive score bias has no place here.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ...decode import slot
from ._common import AttentionBase, AttentionParams, attention_cost, head_symbols, weightless_shape, position_cost

FEATURE_MAPS = {
    "elu1": lambda x: F.elu(x) + 1,  # Katharopoulos et al. 2020, eq. 7
}


class LinearAttentionParams(AttentionParams):
    phi: Literal["elu1"] = Field("elu1", description="feature map applied to q and k: elu1 = elu(x) + 1")
    eps: float = Field(1e-6, ge=0.0, description="added to the denominator phi(q_i)^T sum_j phi(k_j)")




class LinearAttention(AttentionBase):
    chunk = 64  # C, tokens per chunk of the causal form

    def __init__(self, p: LinearAttentionParams, env: OpEnv):
        super().__init__(p, env)
        self.phi, self.eps = p.phi, p.eps
        if hasattr(self.pos, "adopt"):  # a scheme that sizes itself to the features (pos(permute))
            self.pos.adopt(self)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if getattr(self.pos, "attends", False):  # pos(permute): the features permuted at their positions
            return self.pos.attend(self, x, ctx)
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        # padded keys add nothing to the sums S and z: their phi(k) is zeroed
        key_mask = self.key_mask(ctx)
        keep = None if key_mask is None else key_mask[:, None, :, None].to(q.dtype)
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if self.causal and not recording and isinstance(x.shape[1], int) and not torch.jit.is_tracing():
            return self.out(self._causal_inference(q, k, v, keep))
        k, v = self.expand_kv(k), self.expand_kv(v)
        return self.out(self._causal(q, k, v, keep) if self.causal else self._bidirectional(q, k, v, keep))

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding (causal): the new tokens read the running sums S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j)
        of every earlier token, plus each other causally; then S and z take theirs in. The state is [dh x dh]
        and [dh] per K/V head, whatever the number of tokens."""
        q, k, v = self.qkv(x, ctx.offset)
        o, ctx.cache.caches[slot(ctx, self)] = self._state_step(q, k, v, ctx.cache.caches.get(slot(ctx, self)))
        return self.out(o)

    def _state_step(self, q, k, v, state, phi=None):
        """_step's attention: the new q, k, v against the running sums `state` = (S, z), or None at the start:
        (the output [b, h, n, dh], the sums with the new tokens in)."""
        phi = phi or FEATURE_MAPS[self.phi]
        q, k = phi(q), phi(k)
        b, kvh, n, dh = k.shape
        s, z = state if state is not None else (k.new_zeros(b, kvh, dh, v.shape[-1]), k.new_zeros(b, kvh, dh))
        kx, vx = self.expand_kv(k), self.expand_kv(v)
        a = (q @ kx.transpose(-1, -2)).masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), 0.0)
        num = q @ self.expand_kv(s) + a @ vx
        den = (q * self.expand_kv(z)[:, :, None, :]).sum(-1, keepdim=True) + a.sum(-1, keepdim=True)
        return num / (den + self.eps), (s + k.transpose(-1, -2) @ v, z + k.sum(-2))

    def _bidirectional(self, q, k, v, keep=None, phi=None):
        phi = phi or FEATURE_MAPS[self.phi]
        # one copy each, in the [b, h, n, dh] layout the matmuls use (made one at a time)
        q = phi(q.contiguous())
        k = phi(k.contiguous())
        if keep is not None:
            k = k * keep
        v = v.contiguous()
        s = k.transpose(-1, -2) @ v  # [b, h, dh, dh]: sum_j phi(k_j) v_j^T
        z = k.sum(-2, keepdim=True)  # [b, h, 1, dh]: sum_j phi(k_j)
        den = (q * z).sum(-1, keepdim=True)
        return (q @ s) / (den + self.eps)

    def _causal(self, q, k, v, keep=None, phi=None):
        b, h, n, dh = q.shape
        if not isinstance(n, int) or torch.jit.is_tracing():
            return self._prefix_sums(q, k, v, keep, phi)
        c = min(self.chunk, n)
        pad = -n % c  # padded tokens come last, so causally they reach only padded outputs, which are dropped
        m = (n + pad) // c

        def chunked(t):  # one copy, padded, in the [b, h, n, dh] layout the chunked matmuls read as views
            return (F.pad(t, (0, 0, 0, pad)) if pad else t.contiguous()).view(b, h, m, c, t.shape[-1])

        phi = phi or FEATURE_MAPS[self.phi]
        q = phi(chunked(q))
        k = phi(chunked(k))
        if keep is not None:
            k = k * (F.pad(keep, (0, 0, 0, pad)) if pad else keep).view(b, 1, m, c, 1)
        v = chunked(v)
        # within a chunk: phi(q_i)^T phi(k_j) for j <= i, a [C x C] block per chunk
        future = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
        a = (q @ k.transpose(-1, -2)).masked_fill_(future, 0.0)
        # across chunks: the states of all earlier chunks, an exclusive cumulative sum over chunks
        # (shifting by padding after the slice leaves s and z contiguous, so the matmuls below read them uncopied)
        s = F.pad((k.transpose(-1, -2) @ v).cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))  # [b, h, m, dh, dh]
        z = F.pad(k.sum(-2).cumsum(2)[:, :, :-1], (0, 0, 1, 0)).unsqueeze(-1)  # [b, h, m, dh, 1]
        num = (q @ s).add_(a @ v)
        den = a.sum(-1, keepdim=True) + q @ z
        return (num / (den + self.eps)).reshape(b, h, m * c, -1)[:, :, :n]


    def _causal_inference(self, q, k, v, keep=None, phi=None):
        """The causal form without autograd: chunk by chunk, the running sums S and z of the earlier chunks
        (per K/V head, read by its group of query heads in place), each chunk's outputs written into one result
        laid out as q's projection [b, n, h, dh] (o_proj reads it uncopied). Beyond q, k, v and the result it
        holds one chunk's temporaries: the peak of SDPA's flash path. The chunked form (_causal) keeps every
        chunk's states and products for the backward."""
        b, h, n, dh = q.shape
        kvh, dv = k.shape[1], v.shape[-1]
        g, c = h // kvh, min(self.chunk, n)
        phi = phi or FEATURE_MAPS[self.phi]
        o = q.new_empty(b, n, h, dv).transpose(1, 2)
        og, qg = o.view(b, kvh, g, n, dv), q.view(b, kvh, g, n, dh)
        s = q.new_zeros(b, kvh, dh, dv)  # sum over the earlier chunks of phi(k_j) v_j^T
        z = q.new_zeros(b, kvh, dh, 1)  # sum over the earlier chunks of phi(k_j)
        future = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
        for t in range(0, n, c):
            e = min(t + c, n)
            # a K/V head's g query heads as one [g C] block of rows: its matmuls broadcast nothing (no copies)
            qc = phi(qg[:, :, :, t:e]).reshape(b, kvh, g * (e - t), dh)
            kc, vc = phi(k[:, :, t:e]), v[:, :, t:e]
            if keep is not None:
                kc = kc * keep[:, :, t:e]
            a = (qc @ kc.transpose(-1, -2)).view(b, kvh, g, e - t, e - t).masked_fill_(future[:e - t, :e - t], 0.0)
            a = a.view(b, kvh, g * (e - t), e - t)
            num = (qc @ s).add_(a @ vc)
            den = (qc @ z).add_(a.sum(-1, keepdim=True)).add_(self.eps)
            del a, qc
            og[:, :, :, t:e] = num.div_(den).view(b, kvh, g, e - t, dv)
            del num, den
            s += kc.transpose(-1, -2) @ vc
            z += kc.sum(-2).unsqueeze(-1)
        return o

    def _prefix_sums(self, q, k, v, keep=None, phi=None):
        """The causal form for a symbolic n (torch.export, ONNX with a dynamic sequence axis): the running sums
        S_i = sum_{j<=i} phi(k_j) v_j^T and z_i = sum_{j<=i} phi(k_j) as cumulative sums over positions. O(n dh^2)
        memory, linear in n and never n x n, with shapes that only scale n (the chunked layout's reshapes would
        tie the exported graph to some lengths)."""
        phi = phi or FEATURE_MAPS[self.phi]
        q, k = phi(q), phi(k)
        if keep is not None:
            k = k * keep
        s = (k.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)  # [b, h, n, dh, dh]
        z = k.cumsum(2)  # [b, h, n, dh]
        num = (q.unsqueeze(-2) @ s).squeeze(-2)
        den = (q * z).sum(-1, keepdim=True)
        return num / (den + self.eps)


def linear_attention_cost(p: LinearAttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """Bidirectional: phi(K)^T V and phi(Q) S, 2*n*dh^2 each per head. Causal, over N = m*C tokens (n padded to
    C-token chunks): per chunk the C x C products phi(Q) phi(K)^T and A V, the state phi(K)^T V and phi(Q) S,
    phi(Q) z. Kept: the inputs of the two phi (copies of q, k), phi(q), phi(k), a copy of v, the numerator,
    the states, the denominator (and A and the causal mask); o_proj's input is a copy. Decoding keeps S and z."""
    if env.pos is not None and getattr(env.pos[0].attach, "attends", False):  # pos(permute)
        return env.pos[0].attach.attention_cost(p, env, s)
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    pos = position_cost(env, s, h, kv, dh)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv, qkv_h = q + 2 * kvb, 3 * q  # q, k, v; and after k, v are repeated to h heads
    if env.causal:
        c = sp.Min(LinearAttention.chunk, n)
        N = sp.ceiling(n / c) * c
        a, mask = b * h * N * c * by, c ** 2  # the C x C blocks, and the bool mask of the future
        fwd = 4 * b * h * N * c * dh + 4 * b * h * N * dh ** 2 + 2 * b * h * N * dh
        other = 7 * b * h * N * dh + 2 * b * h * N * c + b * h * N / c * (dh ** 2 + dh) + 2 * b * h * N
        states = b * h * N / c * (dh ** 2 + dh) * by  # S and z before every chunk
    else:
        N, a, mask = n, 0, 0
        fwd = 4 * b * h * n * dh ** 2
        other = 8 * b * h * n * dh + b * h * n
        states = b * h * (dh ** 2 + dh) * by
    t, den = b * h * N * dh * by, b * h * N * by
    padded = sp.Min(1, N - n)
    v_copy = t if kv == h else t * padded  # v's chunked copy: repeated heads are contiguous already
    core = Cost(fwd=fwd, bwd=2 * fwd, fwd_other=other, bwd_other=2 * other)
    if env.causal:  # inference (_causal_inference) runs the unpadded chunks, m of C tokens and one of r, and
        # updates the states per K/V head
        m = sp.floor(n / c)
        r = n - m * c
        core = replace(core, fwd_inference=4 * b * h * dh * (m * c ** 2 + r ** 2) + 2 * b * h * n * dh ** 2
                       + 2 * b * h * n * dh + 2 * b * kv * n * dh ** 2)
    saved = 6 * t + a + mask + states + den + q + pos.saved
    if env.causal:  # inference runs _causal_inference: the result, the K/V heads' running sums, one chunk's
        # phi(q), phi(k), A and the two terms of the numerator
        C = sp.Min(LinearAttention.chunk, n)
        chunk = b * C * (3 * h * dh + kv * dh + h * C) * by
        phases = [qkv + q + b * kv * (dh ** 2 + dh) * by + chunk,  # at the numerator
                  qkv + q + out]  # at o_proj
    else:
        phases = [qkv_h + 2 * t + v_copy + a + mask + states + 2 * t + 2 * den,  # at the division
                  qkv_h + t + q + out]  # at o_proj
    if env.pos is not None:
        phases.append(qkv + pos.peak)
    # backward: at the division, the numerator's gradient and the denominator's (three temporaries) beside o's
    # (padded: a copy), o_proj's copy released; causal, the gradient of A beside those of q (q z) and v (A^T),
    # (unpadded: and a copy of the numerator's), the division's saved tensors released
    bwd = [5 * t - q] + ([3 * t + a - q - t * padded] if env.causal else [])
    return attention_cost(p, s, h, kv, dh, core, pos, saved, phases, cache=b * kv * (dh ** 2 + dh) * by,
                          bwd_phases=bwd)


OP = register(Op(
    decode="the running sums S [dh x dh] and z [dh] per K/V head: constant in the tokens seen",
    family="mha", variant="linear", params=LinearAttentionParams, module=LinearAttention,
    causal="yes", shape=weightless_shape("mha(linear)"), supports=frozenset({"rope", "permute", "kernel_rpe", "equivariant_kernel"}),
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention, Katharopoulos et al. "
          "2020, arXiv:2006.16236",
    summary="phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j) + eps), phi = elu + 1; causal: j <= i",
    cost=linear_attention_cost,
))
