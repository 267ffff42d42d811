"""pos(equivariant_kernel) inside mha(linear): the rotation-block and the clipped-offset forms (equivariant_kernel.py
has the equations). The attention's feature map gives phi; this runs the rest."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._equivariant_cost import equivariant_attention_cost
from ._inattention import InAttentionPosition, kernel_inputs


def sinusoids(t: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """u_t = [sin(w_1 t), cos(w_1 t), ..., sin(w_m t), cos(w_m t)] for positions t [n]: [n, 2m]."""
    a = t.to(omega.dtype)[:, None] * omega[None, :]
    return torch.stack((a.sin(), a.cos()), -1).flatten(-2)


def clipped_sums(c: torch.Tensor, w: torch.Tensor, k: int, causal: bool, pre: int = 0, far=None):
    """sum_j c_i[clip(j - i, k)] w_j over every key j: c [b, h, n, 2k + 1] (offset t = j - i at column t + k;
    causal: columns 0..k read), w [b, h, pre + n, e] the keys' rows, query a at row pre + a (decoding: the window of
    the `pre` tokens before the new ones in front), far [b, h, e] the sum of the keys before w's first row, or None.
    The 2k + 1 inner offsets (causal: k + 1) gathered and summed directly; the keys past -k / +k share column
    0 / 2k, their sums prefix sums of w. Indices, never slices with n in them (export)."""
    n, L = c.shape[2], w.shape[2]
    cum = F.pad(w.cumsum(2), (0, 0, 1, 0))  # [b, h, L + 1, e]: P_r = the sum of rows before r
    i = torch.arange(n, device=c.device) + pre
    width = k + 1 if causal else 2 * k + 1
    at = i[:, None] + torch.arange(width, device=c.device) - k  # [n, width]: the rows at offsets -k..
    inside = ((at >= 0) & (at < L)).to(c.dtype)
    o = ((c[..., :width] * inside)[..., None, :] @ w[:, :, at.clamp(0, L - 1)]).squeeze(-2)
    left = cum[:, :, (i - k).clamp(min=0)]  # rows before i - k
    o = o + c[..., :1] * (left if far is None else left + far[:, :, None])
    if not causal:  # rows after i + k: all of them less those up to i + k
        o = o + c[..., -1:] * (cum[:, :, -1:] - cum[:, :, (i + k + 1).clamp(max=L)])
    return o


class EquivariantRelative(InAttentionPosition):
    """Inside attention: rotation, the frequencies omega [m] and the blocks alpha, beta [h, m]; clipped, the
    offset vectors r [h, 2k + 1, dh] (row t + k holds r_t)."""

    attends = True  # mha(linear) hands its forward to attend(), its cost to attention_cost
    attention_cost = staticmethod(equivariant_attention_cost)
    check = staticmethod(lambda p, env: None)

    def __init__(self, p, heads: int, head_dim: int):
        super().__init__()
        self.method, self.k, self.heads = p.method, p.clip, heads
        g = torch.Generator().manual_seed(p.seed)
        if p.method == "rotation":
            m = p.scales
            self.omega = nn.Parameter(p.max_timescale ** (-torch.arange(m, dtype=torch.float64) / m).float())
            self.alpha = nn.Parameter(torch.randn(heads, m, generator=g))
            self.beta = nn.Parameter(torch.randn(heads, m, generator=g))
        else:
            self.r = nn.Parameter(torch.zeros(heads, 2 * p.clip + 1, head_dim))

    def position_features(self, start, n, device):
        """The query's u_i R_h [h, n, 2m] and the key's u_j [n, 2m] at positions start..start+n-1, and rho_h [h]."""
        u = sinusoids(torch.arange(n, device=device) + start, self.omega)
        a, b = self.alpha[:, None, :], self.beta[:, None, :]
        s, c = u[None, :, 0::2], u[None, :, 1::2]
        # (s, c) [[a, b], [-b, a]] = (a s - b c, b s + a c): <u_i R, u_j> = sum a cos(w(i - j)) + b sin(w(i - j))
        pq = torch.stack((a * s - b * c, b * s + a * c), -1).flatten(-2)
        return pq, u, (self.alpha.square() + self.beta.square()).sqrt().sum(-1)

    def attend(self, att, x: torch.Tensor, ctx) -> torch.Tensor:
        from ..attention import _kernelized as kern
        from ..attention.linear import FEATURE_MAPS
        from ...decode import slot

        decoding, start, q, k, v, key_mask, state = kernel_inputs(att, x, ctx)
        b, n = x.shape[0], x.shape[1]
        phi = FEATURE_MAPS[att.phi]
        fq, fk = phi(q), phi(k)
        del q, k  # phi's inputs: autograd keeps what it needs
        keep = None if key_mask is None else key_mask[:, None, :, None].to(fk.dtype)
        if self.method == "rotation":  # [phi(q) u_i R rho] . [phi(k) u_j 1]
            pq, u, rho = self.position_features(start, n, x.device)
            fq = torch.cat((fq, pq.to(fq.dtype).expand(b, -1, -1, -1), rho.to(fq.dtype)[None, :, None, None]
                            .expand(b, -1, n, 1)), -1)
            fk = torch.cat((fk, F.pad(u.to(fk.dtype), (0, 1), value=1.0).expand(b, fk.shape[1], -1, -1)), -1)
        if keep is not None:
            fk = fk * keep
        if decoding:
            s0 = fk.new_zeros(b, fk.shape[1], fk.shape[-1], v.shape[-1] + 1) if state is None else state[0]
            o, s = kern.step(fq, fk, v, s0, att.expand_kv)
        elif att.causal:
            o = kern.causal(fq, att.expand_kv(fk), att.expand_kv(v), att.chunk)
        else:
            o = kern.bidirectional(fq, fk, v, att.expand_kv)
        if self.method == "clipped":  # + phi(q_i) . phi(r_clip(j - i, k)) [v_j 1]
            K = self.k
            c = fq @ phi(self.r.to(fq.dtype)).transpose(-1, -2)  # [b, h, n, 2k + 1]
            w = kern.ones_column(v) if keep is None else kern.ones_column(v) * keep
            if decoding:
                window = w.new_zeros(b, w.shape[1], K, w.shape[-1]) if state is None else state[1]
                far = w.new_zeros(b, w.shape[1], w.shape[-1]) if state is None else state[2]
                rows = torch.cat((window, w), 2)
                o = o + clipped_sums(c, att.expand_kv(rows), K, True, K, att.expand_kv(far))
                s = (s, rows[:, :, n:].clone(), far + rows[:, :, :n].sum(2))
            else:
                o = o + clipped_sums(c, att.expand_kv(w), K, att.causal)
        if decoding:
            ctx.cache.caches[slot(ctx, att)] = s if isinstance(s, tuple) else (s,)
        num, den = o[..., :-1], o[..., -1:]
        return att.out(num / (den + att.eps))

    def extra_repr(self) -> str:
        return f"method={self.method}" + (f", clip={self.k}" if self.method == "clipped" else
                                          f", scales={self.omega.numel()}")

