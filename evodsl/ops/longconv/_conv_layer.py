"""The layer around a long convolution, as S4D's (state-spaces/s4 models/s4/s4d.py) and the long-convolution
papers use it: per channel c of x = u^T [b, d, n],

    y = GELU(K_c * x_c + D_c x_c),   out = GLU(W y + w)  (W: d -> 2d; glu=false: W: d -> d, no GLU)

`kernels(n)` gives the causal taps [d, n] and, bidirectional, the anticausal ones (or None). Padding: a padded
position's input is zeroed before the convolution, and the convolution is shift-invariant with kernels that do not
depend on n, so a padded row equals the sequence alone on either side. Decoding (causal): by default the history
of the convolution's inputs [b, d, t], which grows with t (an explicit kernel of length n has no finite state);
each step is the direct sum over it (causal_tail). ssm(s4d) replaces the history by its diagonal state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...decode import slot
from ...diagnostics import Diagnostic, EvoError
from ._fftconv import causal_tail, fft_conv


def keep_mask(ctx, causal: bool):
    """The positions to keep [b, n] (True = a token), or None where padding cannot reach a real output (none, or a
    causal op's right padding)."""
    if ctx is None or ctx.mask is None or (causal and ctx.right_padded):
        return None
    return ctx.mask


def zero_padding(x: torch.Tensor, keep, dim: int = -1) -> torch.Tensor:
    """x with its padded positions (along dim, the sequence) zeroed."""
    if keep is None:
        return x
    shape = [1] * x.dim()
    shape[0], shape[dim] = keep.shape[0], keep.shape[1]
    return x * keep.reshape(shape).to(x.dtype)


def check_length(label: str, n, max_len: int) -> None:
    if isinstance(n, int) and not torch.compiler.is_exporting() and n > max_len:
        raise EvoError([Diagnostic("E410", f"{label} has max_len={max_len}, the input {n} positions",
                                   help="set max_len to the longest sequence")])


def first(k: torch.Tensor, n) -> torch.Tensor:
    """k [..., L] cut to its first n taps (zeros past L, if n > L); by
    index_select when n is symbolic (an export for every n; a slice would specialise on n < L)."""
    L = k.shape[-1]
    if isinstance(n, int) and not torch.compiler.is_exporting():
        return k[..., :n] if n <= L else F.pad(k, (0, n - L))
    idx = torch.arange(n, device=k.device)
    return k.index_select(-1, idx.clamp(max=L - 1)) * (idx < L).to(k.dtype)


def history_step(owner: nn.Module, x: torch.Tensor, ctx, kernel) -> torch.Tensor:
    """Decoding by the history of inputs x [b, c, m]: the cache keeps every input so far [b, c, t] (it grows with
    t); the outputs at the m new positions, kernel(t) giving the causal taps [c, t]."""
    key = slot(ctx, owner)
    past = ctx.cache.caches.get(key)
    hist = x.clone(memory_format=torch.contiguous_format) if past is None else torch.cat((past[0], x), -1)
    ctx.cache.caches[key] = (hist,)
    return causal_tail(hist, kernel(hist.shape[-1]), x.shape[-1])


class ConvLayer(nn.Module):
    def __init__(self, d: int, causal: bool, glu: bool):
        super().__init__()
        self.causal, self.glu = causal, glu
        self.D = nn.Parameter(torch.randn(d))
        self.out = nn.Linear(d, 2 * d if glu else d)

    def kernels(self, n):
        raise NotImplementedError

    def step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return history_step(self, x, ctx, lambda t: self.kernels(t)[0])

    def forward(self, u: torch.Tensor, ctx=None) -> torch.Tensor:
        x = zero_padding(u.transpose(1, 2), keep_mask(ctx, self.causal))  # [b, d, n]
        if ctx is not None and ctx.cache is not None:
            y = self.step(x, ctx)
        else:
            y = fft_conv(x, *self.kernels(x.shape[-1]))
        y = self.out(F.gelu(y + x * self.D[:, None]).transpose(1, 2))
        return F.glu(y, -1) if self.glu else y
