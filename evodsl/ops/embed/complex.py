"""embed(complex, base=10000): complex-valued word-order embeddings (Wang et al. 2019, "Encoding word order in
complex embeddings", arXiv:1912.12333, §3): the embedding and the position in one function of the word and
its position.

Word j at position p has, in each of its d/2 complex dimensions k,

    f(j, p)_k = r_jk e^{i (ω_jk p + θ_jk)}          (amplitude r, frequency ω, initial phase θ: learned per word)

so that f(j, p + t) = e^{i ω_j t} ⊙ f(j, p): a shift by t is one fixed, word-dependent rotation (the paper's
"position-free offset transformation"), and |f(j, p)| = |r_j| is bounded (r_1 = 1 in the paper's
z_2 z_1^p, as the paper's final form).
The stream is real: d = 2 · (d/2) channels hold [Re f | Im f] concatenated, the real parts first
([r cos(ω p + θ), r sin(ω p + θ)]); the layers after it are the real Transformer's (the paper's "real-valued"
variant; a complex stream would need complex layers everywhere downstream, which the backends do not have).
Why an embed and not a pos: f needs the word, not only the position, so it takes token ids from
input(tokens) where embed(token) would, and replaces embed(token) -> pos(...). 3 · V · d/2 parameters.
Choices where the paper is silent (the authors' code, TRANSLATION/transformer/Models.py, initialises the
frequencies from a sinusoid table and sets no phase):
- r ~ N(0, 0.02²) as embed(token); ω_jk = base^(−2k/d) for every word, the k-th frequency of pos(sinusoidal)
  (at init the positions turn as the sinusoidal table's); θ = 0. All three are learned.
- Positions start at 0 at each row's first token (as pos(learned) and pos(sinusoidal)); decoding continues at
  the positions after those seen (ctx.offset). The angle ω p + θ is computed in at least float32.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class ComplexEmbeddingParams(OpParams):
    d_model: int = Field(ge=2, le=1 << 20, description="stream width: d/2 complex dimensions as [Re | Im] "
                                                      "(default: the binding d_model)")
    base: float = Field(10000.0, gt=1.0, description="initial frequencies ω_k = base^(-2k/d), as pos(sinusoidal)")


def _shape(p: ComplexEmbeddingParams, env: OpEnv):
    if env.vocab is None or len(env.shape) != 2 or isinstance(env.shape[1], int):
        raise ShapeProblem("embed(complex) needs token ids [b, n] from input(tokens, vocab=V)",
                           hint="each word has its own amplitude, frequency and phase: it reads the token ids")
    if p.d_model % 2:
        raise ShapeProblem(f"embed(complex) carries d/2 complex dimensions as [Re | Im], but d_model={p.d_model} "
                           "is odd", "d_model", f"use an even width: d_model={p.d_model - 1} or {p.d_model + 1}")
    return (*env.shape, p.d_model)


class ComplexEmbedding(nn.Module):
    def __init__(self, p: ComplexEmbeddingParams, env: OpEnv):
        super().__init__()
        half = p.d_model // 2
        self.amplitude = nn.Parameter(torch.empty(env.vocab, half).normal_(0.0, 0.02))  # r
        freq = p.base ** (-torch.arange(half, dtype=torch.float64) * 2 / p.d_model)
        self.frequency = nn.Parameter(freq.to(torch.get_default_dtype()).expand(env.vocab, half).clone())  # ω
        self.phase = nn.Parameter(torch.zeros(env.vocab, half))  # θ

    def forward(self, ids: torch.Tensor, ctx=None) -> torch.Tensor:
        start = ctx.offset if ctx is not None else 0  # decoding: the positions after those seen
        dtype = self.amplitude.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        p = torch.arange(start, start + ids.shape[1], device=ids.device, dtype=work)[:, None]  # [n, 1]
        angle = nn.functional.embedding(ids, self.frequency) * p + nn.functional.embedding(ids, self.phase)
        r = nn.functional.embedding(ids, self.amplitude)
        return torch.cat((r * angle.cos().to(dtype), r * angle.sin().to(dtype)), dim=-1)

    def extra_repr(self) -> str:
        return f"vocab={self.amplitude.shape[0]}, complex_dims={self.amplitude.shape[1]}"


def cost(p: ComplexEmbeddingParams, env: OpEnv, s) -> Cost:
    """3 V d/2 parameters. Per complex dimension: ω p + θ (2), cos and sin (1 each), r times each (1 each): 6,
    3 b n d in all; the lookups and the concatenation are no FLOPs. Backward: the three tables' gradients
    scattered (1 per element each) and the chain through the products and cos/sin (2 per element each): 12 per
    complex dimension. Kept for backward: the ids (saves_input), the positions p [n], the angle, r, cos and sin
    (4 [b, n, d/2]). The inference peak, at the concatenation: the angle, r, r cos and r sin (4 [b, n, d/2])
    and p beside the output. Token ids have no gradient (bwd_peak 0)."""
    d, V = s.sym("d", p.d_model), s.sym("V", env.vocab)
    half = s.b * s.n * d / 2
    work = 8 if s.bytes == 8 else 4
    return Cost(params=3 * V * d / 2, fwd_other=6 * half, bwd_other=12 * half, saves_input=True,
                saved=4 * half * s.bytes + s.n * work, peak=4 * half * s.bytes + s.n * work, bwd_peak=0)


OP = register(Op(
    decode="the positions after those seen (offset)",
    family="embed", variant="complex", params=ComplexEmbeddingParams, module=ComplexEmbedding, causal="n.a.",
    shape=_shape,
    paper="Encoding word order in complex embeddings, Wang et al. 2019, arXiv:1912.12333",
    summary="word j at position p: r_j e^{i(ω_j p + θ_j)} per complex dimension (r, ω, θ learned per word), "
            "carried as [Re | Im]",
    cost=cost, note="Pe/004.md",
))
