"""The layer that ssm(lru) and ssm(s5) share: a complex diagonal linear recurrence read out to real features,

    x_t = lam . x_{t-1} + Bbar u_t,      y_t = Re(C x_t) + D . u_t          lam [N] complex, |lam| < 1

u [b, n, d] real; Bbar [N, d] and C [d, N] complex, held as (re, im) pairs of real tensors; each variant gives lam
and Bbar from its own parameters (decay(), input_matrix()). Bbar u is one real matmul against [Bbar_re; Bbar_im];
Re(C x) two, C_re x_re - C_im x_im. The recurrence is rnn/_diag_scan.py's (chunked doubling, complex pairs), its
export the whole-sequence doubling (a symbolic n). Causal only: the recurrence runs forward in time. Decoding keeps
x_t, [N] complex (2 N reals), whatever the length. Padding: a padded position's input Bbar u is zeroed, so a state
that starts at 0 stays 0 through left padding (right padding comes after every real token).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...decode import slot
from ..registry import OpEnv, ShapeProblem, sequence_shape
from ..rnn._diag_scan import diag_scan, exported_scan


def causal_only_shape(name: str):
    def shape(p, env: OpEnv):
        out = sequence_shape(p, env)
        if not env.causal:
            raise ShapeProblem(f"ssm({name}) is causal only: its recurrence runs forward in time", None,
                               "use it in a causal model (head(lm)), or a mixer for a bidirectional one")
        return out
    return shape


class ComplexDiagonalSSM(nn.Module):
    """The shared forward; a subclass sets N, chunk, B_re, B_im, C_re, C_im, D and defines decay() -> (re, im) [N]
    and input_matrix() -> (re, im) [N, d]."""

    def forward(self, u: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = None if ctx is None else ctx.cache
        keep = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
        lr, li = self.decay()
        x = F.linear(u, torch.cat(self.input_matrix(), 0))  # [b, n, 2N]
        if keep is not None:
            x = x * keep[:, :, None].to(x.dtype)
        xr, xi = x.split(self.N, -1)
        key = None if cache is None else slot(ctx, self)
        state = None if cache is None else cache.caches.get(key)
        if not isinstance(u.shape[1], int) or torch.compiler.is_exporting():
            hr, hi = exported_scan(lr, li, xr, xi)
        else:
            hr, hi = diag_scan(lr, li, xr, xi, h0=state, chunk=self.chunk)
        del x, xr, xi
        if cache is not None:
            cache.caches[key] = (hr[:, -1].clone(), hi[:, -1].clone())
        return F.linear(hr, self.C_re).sub_(F.linear(hi, self.C_im)).addcmul_(u, self.D)
