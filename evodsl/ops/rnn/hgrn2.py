"""rnn(hgrn2, heads, expand): HGRN2, gated linear RNNs with state expansion (Qin, Yang, Sun, Shen, Li, Sun, Zhong
2024, arXiv:2404.07904, section 3), as a sublayer wired as fla's HGRN2Attention:

    q_t = swish(x_t W_q) / sqrt(e),  f_t = lb + (1 - lb) sigmoid(x_t W_f)      [H, e] each (e = expand a head)
    i_t = x_t W_i                                                              [H, d / H]
    S_t = diag(f_t) S_(t-1) + (1 - f_t)^T i_t,      o_t = q_t S_t              (S: [e, d / H] a head)
    y_t = RMSNorm(o_t) W_o                                                     (the norm over all d channels)

The input gate is tied to the forget gate (1 - f_t is the key: the outer product expands the state e-fold); the
forget gate's lower bound lb is the op's parameter (the paper learns a bound per layer, cumulative over the depth,
softmax'ed: a spec gives each layer its own, 0 for the first, as fla passes none to layer 0).
It runs as GLA's chunked form with a decay per key channel (_chunked_linear.py, log decay g_t = log f_t), decodes by
the recurrence (the state: e x d / H a head, constant in the tokens seen) and exports in the one-piece parallel form
([n, n, e] decay ratios: a symbolic n only; tests/test_onnx.py OTHER_FORMS).
Choices where the paper is silent, as fla's layer: no biases; q carries fla's scale e^-1/2 (chunk_gla's default);
no output gate (the paper's figure has one, fla's layer has not); no short convolution (fla's default); heads = d /
expand when not given (fla's num_heads), d divisible by the heads. Numerics: any forget gate is exact, down to
f = 0 with no lower bound (a chunk too fast for the vector-decay factorisation takes the decay ratios one lag at a
time, _chunked_linear.DecayScores). Padding: a padded position's key 1 - f is zeroed (nothing enters the state);
under left padding its decay acts on a state that is still zero, so either side pads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..attention._chunked_linear import chunked_decay, parallel_decay, recurrent_decay
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._hgrn2_cost import hgrn2_cost


class HGRN2Params(OpParams):
    heads: int | None = Field(None, ge=1, le=4096, description="H: heads; none: d / expand (fla's num_heads)")
    expand: int = Field(128, ge=1, le=4096, description="e: the state expansion, a head's key width (fla's expand_ratio)")
    lower_bound: float = Field(0.0, ge=0.0, lt=1.0, description="lb: the forget gate's lower bound, f in [lb, 1)")
    chunk: int = Field(16, ge=1, le=4096, description="C: tokens a chunk of the chunked form (the result is the same)")
    eps: float = Field(1e-5, gt=0.0, description="the output RMSNorm's epsilon")


def heads_of(p: HGRN2Params, d: int) -> int:
    return p.heads if p.heads is not None else d // p.expand


def hgrn2_shape(p: HGRN2Params, env: OpEnv):
    shape = sequence_shape(p, env)
    if not env.causal:
        raise ShapeProblem("rnn(hgrn2) is causal only: its state runs forward in time, and the paper gives no "
                           "bidirectional form", None, "use it in a causal model (head(lm))")
    H = heads_of(p, env.d)
    if H < 1:
        raise ShapeProblem(f"heads = d / expand = {env.d} / {p.expand} is below 1", "expand",
                           "give expand <= d_model, or heads=")
    if env.d % H:
        raise ShapeProblem(f"d_model {env.d} is not divisible by heads={H}", "heads",
                           "each head holds d / heads value channels")
    return shape


class HGRN2(nn.Module):
    def __init__(self, p: HGRN2Params, env: OpEnv):
        super().__init__()
        d, H, e = env.d, heads_of(p, env.d), p.expand
        self.H, self.e, self.dv, self.lb, self.chunk, self.eps = H, e, d // H, p.lower_bound, p.chunk, p.eps
        self.q_proj = nn.Linear(d, H * e, bias=False)
        self.f_proj = nn.Linear(d, H * e, bias=False)
        self.i_proj = nn.Linear(d, d, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(d))
        self.o_proj = nn.Linear(d, d, bias=False)

    def features(self, x):
        """q, k [b, H, n, e], v [b, H, n, d / H], the log decay g [b, H, n, e]."""
        b, n, _ = x.shape
        q = F.silu(self.q_proj(x)) * self.e ** -0.5
        f = self.f_proj(x)
        g = F.logsigmoid(f) if self.lb == 0 else torch.log(torch.sigmoid(f) * (1 - self.lb) + self.lb)
        k = -torch.expm1(g)
        heads = lambda t, w: t.view(b, n, self.H, w).transpose(1, 2)  # noqa: E731
        return heads(q, self.e), heads(k, self.e), heads(self.i_proj(x), self.dv).contiguous(), heads(g, self.e)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = None if ctx is None else ctx.cache
        keep = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
        q, k, v, g = self.features(x)
        if keep is not None:  # a padded position writes nothing into the state
            k = k * keep[:, None, :, None].to(k.dtype)
        if cache is not None:
            key = slot(ctx, self)
            old = cache.caches.get(key)
            state = None if old is None else old[0]
            if x.shape[1] == 1:
                o, state = recurrent_decay(q, k, v, g, state)
            else:
                o, state = chunked_decay(q, k, v, g, state, self.chunk)
            cache.caches[key] = (state,)
        elif not isinstance(x.shape[1], int):
            o = parallel_decay(q, k, v, g)
        else:
            o, _ = chunked_decay(q, k, v, g, None, self.chunk)
        b, H, n, dv = o.shape
        o = o.transpose(1, 2).reshape(b, n, H * dv)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        return self.o_proj(o)


OP = register(Op(
    decode="the state S (e x d / H) of every head: constant in the tokens seen",
    family="rnn", variant="hgrn2", params=HGRN2Params, module=HGRN2, causal="yes", shape=hgrn2_shape,
    paper="HGRN2: Gated Linear RNNs with State Expansion, Qin et al. 2024, arXiv:2404.07904",
    summary="f_t = lb + (1 - lb) sigmoid(x W_f); S_t = diag(f_t) S_(t-1) + (1 - f_t)^T (x W_i); "
            "o_t = swish(x W_q) S_t; RMSNorm, W_o; causal only; chunked, O(n C e + n e d)",
    cost=hgrn2_cost,
))
