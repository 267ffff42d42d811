"""ssm(h3, N=64, shift=64, head_dim=1): the H3 layer (Fu, Dao et al. 2022, "Hungry Hungry Hippos", arXiv:2212.14052,
Sec. 3.1, Alg. 1), as the authors' code (safari src/models/sequence/h3.py), for u [b, n, d], H = d / head_dim heads:

    q, k, v = W_q u, W_k u, W_v u                                  [b, d, n] each
    k~ = SSM_shift(k) = sum_{l < s} C^k_l k_{t-l} + D^k k_t       a fixed shift A, learned C: an s-tap causal conv
    kv[h, i, j] = k~[h, i] v[h, j]                                 per head, the outer product (head_dim^2 channels)
    y[h, i, j] = SSM_diag(kv[h, i, j])                             S4D (_s4d_kernel.py) by FFT, one kernel a head
                                                                   (shared by its head_dim^2 channels), + D_h kv
    o[h, j] = sum_i q[h, i] y[h, i, j],  out = W_o o               (o's channels ordered (j, h), as the code)

Causal: both SSMs are recurrences; the step form keeps the shift register (k's last s - 1 values, [b, d, s - 1])
and the diagonal state [b, head_dim^2, H, N/2] complex, constant in the length. Bidirectional: the layer is the
paper's causal one (both SSMs read only the past) in a bidirectional model too: H3 gives no other form. Choices
where the paper is silent: the shift SSM's taps C^k are N(0, 1/s) (the code's random C), its D^k and D are
N(0, 1), biases on the four linears (the code's). Padding: a padded k is zeroed before the shift SSM and the
padded kv before the diagonal one, so a padded position enters neither state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..longconv._conv_layer import keep_mask, zero_padding
from ..longconv._fftconv import fft_conv
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._h3_cost import h3_cost
from ._s4d_kernel import DiagonalKernel


class H3Params(OpParams):
    N: int = Field(64, ge=2, le=1024, description="the diagonal SSM's real state size (N/2 complex modes; even)")
    shift: int = Field(64, ge=1, le=1024, description="s: the shift SSM's state, its taps on k")
    head_dim: int = Field(1, ge=1, le=64, description="channels a head (d / head_dim heads; the outer product)")


def h3_shape(p: H3Params, env: OpEnv):
    shape = sequence_shape(p, env)
    if p.N % 2:
        raise ShapeProblem(f"N={p.N} is odd: S4D's modes come in conjugate pairs", "N", "give an even N")
    if env.d % p.head_dim:
        raise ShapeProblem(f"head_dim={p.head_dim} does not divide d_model={env.d}", "head_dim", "give a divisor of d")
    return shape


class H3Layer(nn.Module):
    def __init__(self, p: H3Params, env: OpEnv):
        super().__init__()
        d = env.d
        self.d, self.dh, self.H, self.s = d, p.head_dim, d // p.head_dim, p.shift
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.shift_C = nn.Parameter(torch.randn(d, p.shift) * p.shift ** -0.5)  # tap l weighs k_{t-l}
        self.shift_D = nn.Parameter(torch.randn(d))
        self.kernel = DiagonalKernel(self.H, p.N)
        self.D = nn.Parameter(torch.randn(self.H))

    def forward(self, u: torch.Tensor, ctx=None) -> torch.Tensor:
        b, n, dh, H = u.shape[0], u.shape[1], self.dh, self.H
        keep = keep_mask(ctx, True)
        k = zero_padding(self.k(u).transpose(1, 2), keep)  # [b, d, n]
        cache = None if ctx is None else ctx.cache
        key = None if cache is None else slot(ctx, self)
        state = None if cache is None else cache.caches.get(key)
        kc = F.pad(k, (self.s - 1, 0)) if state is None else torch.cat((state[0], k), -1)
        shifted = F.conv1d(kc, self.shift_C.flip(-1)[:, None], groups=self.d) + self.shift_D[:, None] * k
        kv = shifted.reshape(b, H, dh, 1, n) * self.v(u).transpose(1, 2).reshape(b, H, 1, dh, n)
        kv = zero_padding(kv.permute(0, 2, 3, 1, 4).reshape(b * dh * dh, H, n), None if keep is None else keep.repeat_interleave(dh * dh, 0))
        if cache is None:
            y = fft_conv(kv, self.kernel(n)[0])
        else:  # the state h [b dh dh, H, M]: what it adds, then the next one
            h = None if state is None else torch.view_as_complex(state[1])
            y = fft_conv(kv, self.kernel(n)[0])
            if h is not None:
                y = y + self.kernel.from_state(h, n).to(y.dtype)
            cache.caches[key] = (kc[..., kc.shape[-1] - (self.s - 1):].clone(), torch.view_as_real(self.kernel.advance(h, kv)))
        y = (y + self.D[:, None] * kv).reshape(b, dh, dh, H, n)
        q = self.q(u).transpose(1, 2).reshape(b, H, dh, n).transpose(1, 2)  # [b, dh (i), H, n]
        o = (y * q[:, :, None]).sum(1).reshape(b, dh * H, n)  # channels (j, h)
        return self.o(o.transpose(1, 2))


OP = register(Op(
    decode="the shift register [d, s - 1] and the diagonal state [head_dim^2, H, N/2] complex: constant in the length",
    family="ssm", variant="h3", params=H3Params, module=H3Layer, causal="yes", shape=h3_shape,
    paper="Hungry Hungry Hippos: Towards Language Modeling with State Space Models, Fu et al. 2022, arXiv:2212.14052",
    summary="q, k, v = W u; k~ = SSM_shift(k); y = SSM_diag(k~ v^T per head) (S4D by FFT); o = q . y; W_o o; "
            "O(n log n d dh + n N d dh + n d^2)",
    cost=h3_cost, note="LongConv/006.md",
))
