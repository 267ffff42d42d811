"""mha(fourier_integral, R): FourierFormer's generalized Fourier integral attention (Nguyen, Pham, Nguyen,
Nguyen, Osher & Ho 2022, "FourierFormer: Transformer Meets Generalized Fourier Integral Theorem").

Attention read as nonparametric kernel regression of v on k (Nadaraya-Watson), the dot-product (Gaussian) kernel
replaced by the generalized Fourier integral kernel, a product over the dh coordinates (the FourierFormer head):

    h_i = sum_j v_j prod_l phi(sin(R (q_il - k_jl)) / (R (q_il - k_jl))) / sum_j prod_l phi(sin(..) / (..))

phi(z) = z^p. p = 1 is the plain Fourier integral theorem; the authors' code (ImageNet and WikiText-103 alike)
raises the product of sincs to the 4th power, phi(z) = z^4, the default here (power=4). Odd powers are refused:
the kernel then takes negative values and the row sum, the estimator's denominator, can vanish (the theorem
allows any such phi; the authors' code runs z^4). With an even p every weight is >= 0 and the row sum is the
paper's normalisation, as is: the authors' code adds 1e-6 to it, which is dropped here (with dh factors below 1
the product of a far key underflows, and 1e-6 would swamp a whole row), and the product is evaluated in the log
domain, s_ij = p sum_l log|sinc(R (q_il - k_jl))|, a_ij = exp(s_ij - max_j s_ij) / sum_j exp(..): the same
weights, without the underflow. sinc(0) = 1. No softmax is approximated: the kernel replaces it.

R: one learnable scalar per layer, shared by the heads, initialised at R (the authors' code: nn.Parameter, 2.0
for language modelling, 1.0 for ImageNet); learn_R=false keeps it fixed. The kernel is a function of q - k only:
no 1/sqrt(dh) scale.

Cost O(n^2 dh) per head, no fast kernel: run tiled (_fourier_integral_kernel.py), query blocks x key blocks of
`block` positions with an online normalisation and a backward that recomputes each tile, so memory is O(n d +
b h block^2 dh). Causal: j <= i (the authors' WikiText-103 language model zeroes the masked weights before the row
sum: the same), decoding keeps every key and value. Padding: padded keys get no weight, either side (a query left
with no key, under left padding, outputs 0 in the kernel and reads its own key in the export's form; no token
reads it). The export (a symbolic n) runs the plain form, _plain: the [b, h, n, n, dh] differences at once, one
graph for every n. No position scheme inside (a rotation of q and k has no meaning for a kernel of q - k), no
dropout (the tiled kernel keeps no weights to drop out).
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import AttentionBase, AttentionParams
from ._fourier_integral_cost import fourier_integral_cost
from ._fourier_integral_kernel import FourierIntegral, fourier_forward
from .isab import no_dropout_shape


class FourierIntegralParams(AttentionParams):
    R: float = Field(2.0, ge=-1e4, le=1e4, description="R: the kernel's bandwidth, sinc(R (q - k)) (its initial "
                                                        "value when learned)")
    power: int = Field(4, ge=1, le=16, description="p: phi(z) = z^p on each sinc (the authors' code: 4); even")
    learn_R: bool = Field(True, description="R is a learned scalar (the authors' code), else fixed")
    block: int = Field(64, ge=1, le=4096, description="positions per query and key block of the tiled kernel")


def fourier_integral_shape(p: FourierIntegralParams, env: OpEnv):
    if p.power % 2:
        raise ShapeProblem(f"power={p.power} is odd: phi(z) = z^{p.power} gives negative weights, and their row "
                           f"sum, the estimator's denominator, can vanish", "power",
                           "use an even power (the authors' code uses power=4)")
    return no_dropout_shape("mha(fourier_integral)")(p, env)


class FourierIntegralAttention(AttentionBase):
    def __init__(self, p: FourierIntegralParams, env: OpEnv):
        super().__init__(p, env)
        r = torch.tensor(float(p.R))
        if p.learn_R:
            self.R = nn.Parameter(r)
        else:
            self.register_buffer("R", r)
        self.power, self.block = p.power, p.block

    def _heads(self, x):
        """q [b, n, kv, g, dh], k, v [b, n, kv, dh]: views of the projections (query head = K/V head x group)."""
        b, n, _ = x.shape
        kv, dh = self.kv_heads, self.head_dim
        return (self.q_proj(x).view(b, n, kv, self.heads // kv, dh), self.k_proj(x).view(b, n, kv, dh),
                self.v_proj(x).view(b, n, kv, dh))

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        b, n, _ = x.shape
        q, k, v = self._heads(x)
        key_mask = self.key_mask(ctx)
        if not isinstance(n, int):  # export: one graph for every n
            return self._plain(q, k, v, ctx)
        pad = None if key_mask is None else ~key_mask
        o = FourierIntegral.apply(q, k, v, self.R, self.power, self.block, self.causal, 0, pad)
        return self.o_proj(o.view(b, n, -1))

    def _plain(self, q, k, v, ctx):
        """The export's form: every score at once, [b, h, n, n, dh] differences, softmax over the keys."""
        b, n = q.shape[:2]
        q = q.flatten(2, 3).transpose(1, 2)  # [b, h, n, dh]
        k, v = (self.expand_kv(t.transpose(1, 2)) for t in (k, v))
        x = (q[..., :, None, :] - k[..., None, :, :]) * self.R
        sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(x) / x)
        s = sinc.abs().log().sum(-1) * self.power
        keep = self.allowed(ctx, n, q.device)
        if keep is None and self.causal:
            idx = torch.arange(n, device=q.device)
            keep = idx[None, :] <= idx[:, None]
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        o = s.softmax(-1) @ v
        return self.out(o)

    def _step(self, x, ctx):
        """Decoding (causal): the new queries against every cached key and value (the kernel, offset by the
        positions already seen); the cache keeps K and V [b, n, kv, dh]."""
        b, T, _ = x.shape
        q, k, v = self._heads(x)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            k, v = torch.cat((old[0], k), dim=1), torch.cat((old[1], v), dim=1)
        ctx.cache.caches[slot(ctx, self)] = (k, v)
        o, _ = fourier_forward(q, k, v, self.R, self.power, self.block, True, k.shape[1] - T)
        return self.o_proj(o.view(b, T, -1))


OP = register(Op(
    decode="every key and value (kv_heads heads)",
    family="mha", variant="fourier_integral", params=FourierIntegralParams, module=FourierIntegralAttention,
    causal="yes", shape=fourier_integral_shape, supports=frozenset(),
    paper="FourierFormer: Transformer Meets Generalized Fourier Integral Theorem, Nguyen et al. 2022, "
          "arXiv:2206.00206",
    summary="a_ij proportional to prod_l phi(sin(R (q_il - k_jl)) / (R (q_il - k_jl))), phi(z) = z^p (p = 4), "
            "normalised over j, times v; learned scalar R; tiled, O(n^2 dh) time, O(n d) memory",
    note="MHA/RightProduct/003.md", cost=fourier_integral_cost,
))
