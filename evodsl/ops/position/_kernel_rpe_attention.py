"""pos(kernel_rpe) inside mha(linear): the Toeplitz sums by FFT (kernel_rpe.py has the equation)."""
from __future__ import annotations

import torch
from torch import nn

from ._inattention import InAttentionPosition, kernel_inputs
from ._kernel_rpe_cost import kernel_rpe_attention_cost


class KernelRelative(InAttentionPosition):
    """Inside attention: b [h, 2 max_len - 1] (column t + max_len - 1 holds b_t, t = j - i)."""

    attends = True  # mha(linear) hands its forward to attend(), its cost to attention_cost
    attention_cost = staticmethod(kernel_rpe_attention_cost)
    check = staticmethod(lambda p, env: None)

    def __init__(self, p, heads: int, head_dim: int):
        super().__init__()
        self.max_len = p.max_len
        self.b = nn.Parameter(torch.zeros(heads, 2 * p.max_len - 1))

    def toeplitz(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """D_i = sum_j e^(b_(j-i)) x_j (causal: j <= i) over x [b, h, n, c], by FFT of length 2n (distances past
        max_len - 1 read the last bias of their side)."""
        n = x.shape[2]
        L = 2 * n
        # the kernel w_s = c_(-s) of the convolution D_i = sum_j w_(i-j) x_j, laid out circularly over 2n slots:
        # slot s < n holds t = j - i = -s, slot s > n holds t = 2n - s (s - 2n < 0), slot n none (zero); causal,
        # t > 0 is zero too. Indices, not slices: no branch on n (export)
        slot = torch.arange(L, device=x.device)
        t = torch.where(slot < n, -slot, L - slot)
        keep = (slot < n) if causal else (slot != n)
        w = self.b[:, (t + self.max_len - 1).clamp(0, 2 * self.max_len - 2)].exp() * keep  # [h, 2n]
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        wf = torch.fft.rfft(w.to(work)[None, :, :, None], n=L, dim=2)  # [1, h, n + 1, 1], shaped before the transform
        xf = torch.fft.rfft(x.to(work), n=L, dim=2)  # [b, h, n + 1, c]
        return torch.fft.irfft(xf * wf, n=L, dim=2)[:, :, :n].to(x.dtype)

    def attend(self, att, x: torch.Tensor, ctx) -> torch.Tensor:
        from ..attention._kernelized import ones_column
        from ..attention.linear import FEATURE_MAPS
        from ...decode import slot

        decoding, start, q, k, v, key_mask, cached = kernel_inputs(att, x, ctx)
        n = x.shape[1]
        phi = FEATURE_MAPS[att.phi]
        fq, fk = phi(q), phi(k)
        if key_mask is not None:  # padded keys add nothing to the sums
            fk = fk * key_mask[:, None, :, None].to(fk.dtype)
        fk, vv = att.expand_kv(fk), ones_column(att.expand_kv(v))
        if decoding:  # every key seen, against the new queries directly
            if cached is not None:
                fk, vv = torch.cat((cached[0], fk), 2), torch.cat((cached[1], vv), 2)
            ctx.cache.caches[slot(ctx, att)] = (fk, vv)
            i = torch.arange(start, start + n, device=x.device)[:, None]
            j = torch.arange(fk.shape[2], device=x.device)[None, :]
            bias = self.b[:, (j - i).clamp(-self.max_len + 1, self.max_len - 1) + self.max_len - 1]
            weight = (fq @ fk.transpose(-1, -2)) * bias.exp().masked_fill(j > i, 0.0)
            o = weight @ vv
        else:
            B = (fk[..., :, None] * vv[..., None, :]).flatten(-2)  # [b, h, n, F (dv + 1)]
            D = self.toeplitz(B, att.causal).unflatten(-1, (fk.shape[-1], vv.shape[-1]))
            o = (fq[..., None, :] @ D).squeeze(-2)  # phi(q_i)^T D_i
        num, den = o[..., :-1], o[..., -1:]
        o = num / (den + att.eps)
        return att.out(o)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}"
