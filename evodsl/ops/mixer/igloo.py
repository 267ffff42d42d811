"""mixer(igloo, max_len=L): IGLOO (Sourkov 2018, IGLOO: Slicing the Features Space to Represent Sequences,
arXiv:1807.03402), the sequence form (IGLOO-seq) as the authors' code builds it (redna11/lra-igloo,
IGLOO1D_BLOCK then IGLOO1Dseq_KERNEL): convolutional features, and for every position t a fixed set of P random
patches, each a slice of L positions of the feature space, whose weighted sums give the position's P weights:

    H   = LeakyReLU_0.1(Conv1d_k(X))                                   features [n, d] (kernel k)
    C   = H W_c                                                        compressed features [n, c]
    s_tp = sum_l W_B[p, l] . C[j(t, p, l)] + b_p                       patch p of position t (L positions)
    a_t = s_t W_P                                                      the position's weights [P] (W_P: P x P)
    o_t = (sum_p a_tp (H W_v)[j'(t, p)]) W_o                           P gathered values, weighted

The patches j(t, p, l) and the value positions j'(t, p) are drawn once (seed=), as the authors' generator draws
them: around t, Gaussian with spread sigma (spread=; theirs n / 200), and with probability 0.75 (own=) a patch's
first slot and its value are t itself. No softmax: the weights are a linear map of the patches' sums, as in the
authors' sequence kernel. It is not attention-shaped (no heads, no queries and keys; weights unnormalised), hence a
mixer. Linear in n: O(n (k d^2 + P L c + P^2 + P d)); no n x n tensor, the patch sums gathered from C W_B [n, P L],
the values one [n, d] gather per patch.

Choices where the paper and the code are silent or tied to their setting: draws are with replacement over the
offsets within 3 sigma (the code redraws until L distinct positions, which cannot end at t = 0 in a causal model);
the tables are drawn for max_len positions and cut to n, and a drawn position at or past n reads zero (as the
convolution's padding), so that a sequence is the same whatever max_len; widths c (compress=, theirs 5), the
value and output widths d (theirs 256). Causal: the authors' padding_style="causal" convolution and draws from
the past only (offsets -3 sigma .. 0). Padding: padded positions are zeroed before the convolution and read as
zero, which equals the sequence alone when the padding comes after it; left padding moves the positions the
tables are drawn for, and is refused (E409). Decoding keeps what the causal form reads back (_igloo_step.py): the
last k - 1 inputs, and the compressed features and values of the last R = ceil(3 sigma) positions, O(1) per step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...diagnostics import Diagnostic, EvoError
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, require_right_padding, sequence_shape
from ._igloo_cost import igloo_cost
from ._igloo_step import igloo_step, reach


class IglooParams(OpParams):
    max_len: int = Field(..., ge=1, le=1 << 16, description="the longest sequence: positions the patches are drawn for")
    patches: int = Field(16, ge=1, le=1024, description="P: patches (weights) per position")
    patch: int = Field(4, ge=1, le=256, description="L: positions in a patch")
    kernel: int = Field(3, ge=1, le=64, description="k: the convolution's kernel")
    compress: int = Field(5, ge=1, le=4096, description="c: the compressed features the patches read")
    spread: float = Field(4.0, gt=0.0, le=1e4, description="sigma of the positions drawn around t")
    own: float = Field(0.75, ge=0.0, le=1.0, description="probability that a patch starts at t itself")
    seed: int = Field(0, ge=0, description="the draw of the patches")
    bias: bool = Field(True, description="biases on the convolution and the output projection")


def draw_patches(p: IglooParams, causal: bool):
    """(positions [max_len, P, L], value positions [max_len, P]) drawn as the module docstring says."""
    g = torch.Generator().manual_seed(p.seed)
    R = math.ceil(3 * p.spread)
    offs = torch.arange(-R, 1 if causal else R + 1)
    t = torch.arange(p.max_len)[:, None]
    probs = torch.exp(-offs.double() ** 2 / (2 * p.spread ** 2))[None] * ((t + offs >= 0) & (t + offs < p.max_len))
    P, L = p.patches, p.patch
    draw = t + offs[torch.multinomial(probs, P * (L + 1), replacement=True, generator=g)]  # [max_len, P (L + 1)]
    pos, vpos = draw[:, :P * L].view(-1, P, L).clone(), draw[:, P * L:].clone()
    own = torch.rand(p.max_len, P, generator=g) < p.own
    pos[:, :, 0] = torch.where(own, t, pos[:, :, 0])
    vpos = torch.where(own, t, vpos)
    return pos, vpos


def _rows(table: torch.Tensor, n) -> torch.Tensor:
    """The first n rows of a drawn table: a view; gathered when exporting (a graph for every n <= max_len)."""
    if isinstance(n, int) and not torch.compiler.is_exporting():
        return table[:n]
    return table.index_select(0, torch.arange(n, device=table.device))


class IglooMixer(nn.Module):
    def __init__(self, p: IglooParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.causal, self.k, self.P, self.L = env.causal, p.kernel, p.patches, p.patch
        self.conv = nn.Conv1d(d, d, p.kernel, bias=p.bias)
        self.compress = nn.Linear(d, p.compress, bias=False)
        self.w_base = nn.Parameter(torch.randn(p.compress, p.patches * p.patch) / math.sqrt(p.compress * p.patch))
        self.p_bias = nn.Parameter(torch.zeros(p.patches))
        self.mix = nn.Linear(p.patches, p.patches, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=p.bias)
        pos, vpos = draw_patches(p, env.causal)
        self.register_buffer("pos", pos, persistent=False)
        self.register_buffer("vpos", vpos, persistent=False)
        self.reach = reach(p.spread)  # decoding keeps the last R positions' C and values

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:  # decoding: what the taps and draws reach (_igloo_step.py)
            return igloo_step(self, x, ctx)
        mask = None if ctx is None or (self.causal and ctx.right_padded) else ctx.mask
        if mask is not None:
            require_right_padding(mask, "mixer(igloo)", "its patches are drawn for positions counted from each "
                                                        "row's first, and left padding moves the tokens")
            x = x * mask[:, :, None].to(x.dtype)  # padding reads as zero, as past the sequence's end
        return self.run(x, mask)

    def run(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        n = x.shape[1]
        if isinstance(n, int) and n > self.pos.shape[0]:
            raise EvoError([Diagnostic("E410", f"mixer(igloo) has max_len={self.pos.shape[0]}, the input {n} positions",
                                       help=f"its patches are drawn for max_len positions: set max_len >= {n}")])
        h = self.features(x, mask)
        a = self.weights(h, n)
        v = self.value(h)
        del h
        vpos = _rows(self.vpos, n).clamp(max=n - 1)
        o = a[..., 0, None] * v[:, vpos[:, 0]]
        for q in range(1, self.P):  # sum_p a_tp v[j'(t, p)]: one [b, n, d] gather at a time
            o.add_(a[..., q, None] * v[:, vpos[:, q]])
        del v, a
        return self.out(o)

    def features(self, x: torch.Tensor, mask) -> torch.Tensor:
        """H = LeakyReLU(Conv1d(X)) [b, n, d] (causal: the k - 1 positions before; else centred), padding zero."""
        left = self.k - 1 if self.causal else (self.k - 1) // 2
        h = self.conv(F.pad(x.transpose(1, 2), (left, self.k - 1 - left)))
        h = F.leaky_relu(h, 0.1).transpose(1, 2).contiguous()  # [b, n, d], read by two linears
        return h if mask is None else h * mask[:, :, None].to(h.dtype)

    def weights(self, h: torch.Tensor, n) -> torch.Tensor:
        """a [b, n, P]: each patch's sum over its positions of C W_B, plus b_p, mixed by W_P (positions and values
        drawn at or past n read zero)."""
        PL = self.P * self.L
        pos = _rows(self.pos, n)
        e = self.compress(h) @ self.w_base  # [b, n, P L]: C[j] . W_B[p, l] for every j, p, l
        flat = (pos * PL + torch.arange(PL, device=h.device).view(self.P, self.L)).clamp(max=n * PL - 1)
        s = (e.flatten(1)[:, flat] * (pos < n).to(h.dtype)).sum(-1) + self.p_bias  # [b, n, P]
        return self.mix(s) * (_rows(self.vpos, n) < n).to(h.dtype)


def igloo_shape(p: IglooParams, env: OpEnv):
    shape = sequence_shape(p, env)
    if isinstance(shape[1], int) and shape[1] > p.max_len:
        raise ShapeProblem(f"the stream has {shape[1]} positions, more than max_len={p.max_len}", "max_len",
                           f"the patches are drawn for max_len positions: set max_len >= {shape[1]}")
    return shape


OP = register(Op(
    decode="the last k - 1 inputs (the convolution's taps), the compressed features and values of the last "
           "ceil(3 spread) positions (the draws' reach)",
    family="mixer", variant="igloo", params=IglooParams, module=IglooMixer,
    causal="yes", shape=igloo_shape,
    paper="IGLOO: Slicing the Features Space to Represent Sequences, Sourkov 2018, arXiv:1807.03402",
    summary="H = LeakyReLU(Conv1d(X)); each position's P weights from sums over P fixed random patches (L positions "
            "of H W_c, near t), mixed by W_P; o_t = (sum_p a_tp (H W_v)[j'(t, p)]) W_o; causal: patches from the past; "
            "O(n (k d^2 + P L c + P d))",
    cost=igloo_cost, note="MHA/Others/011.md",
))
