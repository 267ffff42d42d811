"""mha(skip_reuse): Skip-Attention (SkipAt; Venkataramanan et al., ICLR 2024, arXiv:2301.02240). A layer that
computes no attention: it reuses the output of the previous attention sublayer through a cheap function Phi,

    Z^_l = Phi(Z^MSA_{l-1}) = ECA(FC2(DwC(FC1(Z^MSA_{l-1})))),    Z_l = Z^_l + Z_{l-1},    then the MLP as usual

where Z^MSA_{l-1} is the previous attention sublayer's branch output (before its residual add): the nearest
earlier mha call in the same stream, through repeat copies the previous copy's (a skip_reuse one included, so
that Phi chains as in the paper when consecutive layers skip: the authors' code feeds each Phi the last Phi's
output). The pass evodsl/passes/reuse.py finds it (E312 when there is none) and the torch lowering hands it over
at run time (ctx.extra["attn"]). O(n d^2 + n d k) instead of O(n^2 d).

Phi, from the authors' code (the paper's equation names the layers, not their widths or activations):
    h = GELU(W1 z + b1)                       FC1: d -> E = expand * d (their LeFF: hidden 2 d)
    c_t = GELU(b_c + sum_j w_{:,j} * h_{t-p+j})  DwC: depthwise convolution over positions, kernel k, zero padding
    y = W2 c + b2                             FC2: E -> d
    out_t = y_t * sigmoid(conv_eca(mean_t(y)))   ECA: mean over tokens, a 1-D convolution across channels of
                                                 kernel k_eca (zero 'same' padding, no bias), a sigmoid gate
Choices where the paper is silent (it works on images): sequences, not images, so DwC is 1-D over positions
(the paper's 3 x 3 -> k = 3, the default; the authors' code runs 5 x 5); bidirectional 'same' padding puts
p = (k - 1) // 2 zeros before and the rest after. The class token, which the authors' code passes by from the
last real attention, has no counterpart: every position goes through Phi. Biases on FC1, DwC and FC2 (bias=).
ECA's kernel is a parameter (k_eca, odd; the authors' 3), not ECA-Net's rule from the channel count.
Causal form (our construction): the convolution is causal (p = k - 1: position t reads h_{t-k+1..t}, zeros
before 0), and ECA's mean is the running (prefix) mean of y over positions 0..t, so no position reads the
future. Decoding keeps the last k - 1 FC1 outputs and the running sum of y (the count is the position: decoders
take no padding): O(1) state per sequence.
Padding: padded positions' FC1 outputs are zeroed before the convolution (what its zero padding gives a
sequence alone, on either side) and ECA's mean counts tokens only, so a padded batch is each sequence alone.
Standalone (a module built alone, with no previous attention in its Ctx, as the op harnesses build it), Phi
reads the op's own input. It has no heads and no in-attention positions of its own: heads= is accepted as any
mha call's (a spec's `heads` binding), as is head_dim, and unused; the stream's scheme (rope, ALiBi, T5) reached it
through the attention it reuses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register
from ._skip_reuse_cost import skip_reuse_cost


class SkipReuseParams(OpParams):
    k: int = Field(3, ge=1, le=1024, description="kernel of the depthwise convolution over positions (DwC)")
    k_eca: int = Field(3, ge=1, le=1023, description="kernel of ECA's convolution across channels (odd)")
    expand: int = Field(2, ge=1, le=64, description="FC1's width: expand * d_model (the authors' code: 2)")
    bias: bool = Field(True, description="biases of FC1, DwC and FC2 (ECA's convolution has none)")
    # accepted as any mha call's (a spec's `heads` binding; the shape pass checks the stream's in-attention scheme
    # against them, as for the attention reused), read by nothing here: Phi has no heads
    heads: int = Field(8, ge=1, le=4096, description="unused: Phi has no heads (accepted as any mha call's)")
    head_dim: int | None = Field(None, ge=1, le=4096, description="unused, as heads")


def skip_reuse_shape(p: SkipReuseParams, env: OpEnv):
    if len(env.shape) != 3 or not isinstance(env.d, int):
        raise ShapeProblem(f"mha(skip_reuse) needs a [b, n, d] stream, got [{', '.join(map(str, env.shape))}]")
    if p.k_eca % 2 == 0:
        raise ShapeProblem(f"k_eca={p.k_eca} is even: ECA's convolution keeps the d channels with (k_eca - 1) / 2 "
                           f"zeros on each side", "k_eca", f"use an odd kernel, k_eca={p.k_eca + 1}")
    return env.shape


def reused(x: torch.Tensor, ctx) -> torch.Tensor:
    """The previous attention sublayer's output in this stream (the lowering's record, which the next skip_reuse
    alone reads: it is dropped here), or, for a module run alone, its own input."""
    held = None if ctx is None else ctx.extra.get("attn")
    return x if held is None else held.pop(ctx.extra.get("stream"))  # read once: held no longer than needed


class SkipReuse(nn.Module):
    def __init__(self, p: SkipReuseParams, env: OpEnv):
        super().__init__()
        d, E = env.d, p.expand * env.d
        self.k, self.causal = p.k, env.causal
        self.fc1 = nn.Linear(d, E, bias=p.bias)
        self.dwc = nn.Conv1d(E, E, p.k, groups=E, bias=p.bias)
        self.fc2 = nn.Linear(E, d, bias=p.bias)
        self.eca = nn.Conv1d(1, 1, p.k_eca, padding=(p.k_eca - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        z = reused(x, ctx)
        if ctx is not None and ctx.cache is not None:
            return self._step(z, ctx)
        mask = None if ctx is None else ctx.mask
        h = F.gelu(self.fc1(z))
        if mask is not None:  # padded positions read as the convolution's zero padding
            h = h * mask[..., None].to(h.dtype)
        left = self.k - 1 if self.causal else (self.k - 1) // 2
        h = F.pad(h.transpose(1, 2), (left, self.k - 1 - left))  # [b, E, n + k - 1]: the unpadded h freed
        h = self.dwc(h)  # [b, E, n]: the padded h freed
        h = F.gelu(h)
        h = h.transpose(1, 2).contiguous()  # [b, n, E]: one layout for FC2 at every batch size
        y = self.fc2(h)
        del h
        return y * self.gate(self.mean(y, mask))

    def mean(self, y: torch.Tensor, mask) -> torch.Tensor:
        """ECA's pooled descriptor: the mean of y over tokens, [b, 1, d]; causal, the prefix mean [b, n, d]."""
        n = y.shape[1]
        if mask is not None:
            w = mask[..., None].to(y.dtype)
            if self.causal:
                return (y * w).cumsum(1) / w.cumsum(1).clamp(min=1)  # padding before a row's first token: 0 / 1
            return (y * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
        if self.causal:
            return y.cumsum(1) / torch.arange(1, n + 1, device=y.device, dtype=y.dtype)[:, None]
        return y.mean(1, keepdim=True)

    def gate(self, m: torch.Tensor) -> torch.Tensor:
        """sigmoid(conv_eca(m)) across the d channels of each descriptor."""
        return torch.sigmoid(self.eca(m.reshape(-1, 1, m.shape[-1]))).view(m.shape)

    def _step(self, z: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding (causal): the state is the last k - 1 FC1 outputs [b, k-1, E] (zeros before position 0) and
        the running sum of y [b, 1, d]; the new tokens continue both."""
        b, T, _ = z.shape
        h = F.gelu(self.fc1(z))
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is None:
            tail = h.new_zeros(b, self.k - 1, h.shape[-1])
            total = h.new_zeros(b, 1, self.fc2.out_features)
        else:
            tail, total = old
        hp = torch.cat((tail, h), dim=1)
        y = self.fc2(F.gelu(self.dwc(hp.transpose(1, 2))).transpose(1, 2))
        sums = total + y.cumsum(1)
        count = torch.arange(ctx.offset + 1, ctx.offset + T + 1, device=y.device, dtype=y.dtype)[:, None]
        ctx.cache.caches[slot(ctx, self)] = (hp[:, T:].clone(), sums[:, -1:].clone())
        return y * self.gate(sums / count)


OP = register(Op(
    decode="the last k - 1 FC1 outputs (expand * d wide) and the running sum of FC2's output (d)",
    family="mha", variant="skip_reuse", params=SkipReuseParams, module=SkipReuse, causal="yes",
    shape=skip_reuse_shape, supports=frozenset({"rope", "xpos", "alibi", "t5_bias"}),
    paper="Skip-Attention: Improving Vision Transformers by Paying Less Attention, Venkataramanan et al. ICLR "
          "2024, arXiv:2301.02240",
    summary="no attention: the previous attention sublayer's output through Phi = ECA(FC2(DwC(FC1(.)))); causal: "
            "a causal convolution and ECA over the prefix mean; O(n d^2 + n d k)",
    note="MHA/Others/013.md", cost=skip_reuse_cost,
))
