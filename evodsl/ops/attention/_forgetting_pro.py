"""The "Pro" block of the Forgetting Transformer (Lin et al. 2025, arXiv:2503.02130, section 3.2; the authors'
ForgettingAttentionLayer), as options of mha(forgetting) (pro=true sets all four):

  kv_shift:    data-dependent token shift of keys and values, per K/V head g,
                   k_t = a_t k~_{t-1} + (1 - a_t) k~_t,   a_t = sigmoid(w_a . x_t),   k~_{-1} = 0
               (k~ = W_k x; the same for v with its own w), before QK-norm. Padded positions' k~, v~ are zeroed
               first, as the authors do, so a row's first token shifts in 0 under left padding too.
  qk_norm:     q_h <- RMSNorm(q_h) * g_q[h], k_g <- RMSNorm(k_g) * g_k[g] (per head, a gain per channel; eps 1e-5,
               the authors' GroupNorm default).
  output_norm: o_h <- RMSNorm(o_h) * g_o[h] (eps 1e-6, their norm_eps), before o_proj.
  output_gate: o <- o * sigmoid(W_g x) (W_g [d -> h dh]), after the output norm, before o_proj.

Choices where the authors are silent (their layer has no GQA and no biases): the shift gates and the key norm's
gains are per K/V head; W_g and the shift gates have no bias whatever bias= says; the gates run in the input's
dtype. Decoding keeps k~, v~ of the last position beside the K/V cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QK_EPS, OUT_EPS = 1e-5, 1e-6


def flags(p) -> dict:
    """Which parts are on: pro=true turns on all four."""
    return {k: bool(getattr(p, k) or p.pro) for k in ("kv_shift", "qk_norm", "output_norm", "output_gate")}


class Pro(nn.Module):
    def __init__(self, p, d: int, heads: int, kv_heads: int, dh: int):
        super().__init__()
        self.on = flags(p)
        self.heads, self.kv_heads, self.dh = heads, kv_heads, dh
        if self.on["kv_shift"]:
            self.k_shift, self.v_shift = nn.Linear(d, kv_heads, bias=False), nn.Linear(d, kv_heads, bias=False)
        if self.on["qk_norm"]:
            self.q_norm, self.k_norm = nn.Parameter(torch.ones(heads, dh)), nn.Parameter(torch.ones(kv_heads, dh))
        if self.on["output_norm"]:
            self.o_norm = nn.Parameter(torch.ones(heads, dh))
        if self.on["output_gate"]:
            self.ogate = nn.Linear(d, heads * dh, bias=False)

    def keys(self, x, q, k, v, mask=None, prev=None):
        """q [b, n, h, dh], k, v [b, n, kv, dh] (k~, v~) -> the shifted, normed q, k, v and (k~, v~) of the last
        position (the decoding state; None without kv_shift). prev: that state from the positions before."""
        last = None
        if self.on["kv_shift"]:
            if mask is not None:
                keep = mask[:, :, None, None].to(k.dtype)
                k, v = k * keep, v * keep
            last = (k[:, -1:], v[:, -1:])
            k, v = _shift(k, self.k_shift(x), None if prev is None else prev[0]), \
                _shift(v, self.v_shift(x), None if prev is None else prev[1])
        if self.on["qk_norm"]:
            q = F.rms_norm(q, (self.dh,), eps=QK_EPS) * self.q_norm
            k = F.rms_norm(k, (self.dh,), eps=QK_EPS) * self.k_norm
        return q, k, v, last

    def output(self, x, o):
        """o [b, h, n, dh] (the attention's output) -> normed and gated, the same layout."""
        if self.on["output_norm"]:
            o = F.rms_norm(o, (self.dh,), eps=OUT_EPS) * self.o_norm[:, None]
        if self.on["output_gate"]:
            b, n, _ = x.shape
            o = o * torch.sigmoid(self.ogate(x)).view(b, n, self.heads, self.dh).transpose(1, 2)
        return o


def _shift(t, logit, prev):
    """a_t t_{t-1} + (1 - a_t) t_t, a = sigmoid(logit) [b, n, kv]; t_{-1} = prev (decoding) or 0."""
    a = torch.sigmoid(logit)[..., None]
    before = F.pad(t, (0, 0, 0, 0, 1, 0))[:, :-1] if prev is None else torch.cat((prev, t[:, :-1]), 1)
    return t + a * (before - t)
