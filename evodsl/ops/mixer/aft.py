"""mixer(aft, mode=full|simple|local|conv): the Attention Free Transformer (Zhai et al. 2021), not attention.

Q, K, V = x W_q, x W_k, x W_v (d channels each, no heads), then per channel (the sums in _aft.py)

    Y_t = sigmoid(Q_t) * sum_r exp(K_r + w_{t,r}) V_r / sum_r exp(K_r + w_{t,r}),    out = Y W_o

- full: w a learned [max_len, max_len] table of pairwise position biases: O(n^2 d) time (exp(w) @ exp(K) V as
  matmuls), O(n^2 + n d) memory.
- simple (the default): w = 0: Y_t = sigmoid(Q_t) * sum_r softmax_r(K)_r V_r; causal: running sums (cumsum). O(n d).
- local: w_{t,r} learned for |t - r| < s (causal: 0 <= t - r < s), 0 outside; the paper's definition keeps every
  position in the sums (w = 0 is not -inf), so each row is the simple sum plus a band correction. The band is
  stored as [max_len, 2s - 1] (causal: s) biases. O(n s d) time, O(n d) memory.
- conv: w_{t,r} = w^i_{r - t} for the channels of head i (d / heads each): a depthwise convolution kernel of
  size k per head (bidirectional: centred, k odd; causal: offsets -(k-1)..0), 0 outside. O(n k d).
Causal: r <= t. The paper's reparameterisations of w (AFT-full's factorised u v^T: that is mixer(daft); AFT-conv's
normalised w^i = gamma (w - mean) / std + beta) are parameterisations for training and not part of this op.
Padding: padded keys take no part. full and local read absolute positions, so their masks must be right padding
(left padding would move the tokens to other biases: E409); simple and conv take any.
"""
from __future__ import annotations

from typing import Literal

import sympy as sp
import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ...diagnostics import Diagnostic, EvoError
from ..cost import Cost, Symbols, linear
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, require_right_padding
from ._aft import band_sums, exp_keys, full_sums, global_sums


class AFTParams(OpParams):
    mode: Literal["full", "simple", "local", "conv"] = Field("simple", description="the position bias w: a full "
                                                               "[max_len, max_len] table, none, a band, a kernel")
    max_len: int | None = Field(None, ge=1, le=65536, description="full, local: the longest sequence")
    window: int | None = Field(None, ge=1, le=65536, description="local: s, w learned for |t - r| < s")
    kernel: int | None = Field(None, ge=1, le=4097, description="conv: k, the kernel size (odd if bidirectional)")
    heads: int = Field(1, ge=1, le=4096, description="conv: kernels, one per group of d / heads channels")
    bias: bool = Field(True, description="biases on the q, k, v and output projections")


def aft_shape(p: AFTParams, env: OpEnv):
    shape = env.shape
    if len(shape) != 3 or not isinstance(env.d, int):
        raise ShapeProblem(f"mixer(aft) needs a [b, n, d] stream, got [{', '.join(map(str, shape))}]")
    need = {"full": ("max_len",), "local": ("max_len", "window"), "conv": ("kernel",), "simple": ()}[p.mode]
    for f in need:
        if getattr(p, f) is None:
            raise ShapeProblem(f"mixer(aft, mode={p.mode}) needs {f}=", "mode", f"give {f}=, or use mode=simple")
    if p.mode == "conv":
        if env.d % p.heads:
            raise ShapeProblem(f"d_model {env.d} is not divisible by heads={p.heads}", "heads",
                               "each kernel serves d / heads channels")
        if not env.causal and p.kernel % 2 == 0:
            raise ShapeProblem(f"a centred kernel needs an odd size, not kernel={p.kernel}", "kernel",
                               f"try kernel={p.kernel + 1}")
    n = shape[1]
    if p.max_len is not None and p.mode in ("full", "local") and isinstance(n, int) and n > p.max_len:
        raise ShapeProblem(f"the stream has {n} positions, more than max_len={p.max_len}", "max_len",
                           f"w has max_len rows: set max_len >= {n}")
    return shape


def band_offsets(p: AFTParams, causal: bool) -> list:
    """The offsets o = r - t of the band (local) or the kernel (conv)."""
    s = p.window if p.mode == "local" else p.kernel
    if causal:
        return list(range(-(s - 1), 1))
    return list(range(-(s - 1), s)) if p.mode == "local" else list(range(-(s // 2), s // 2 + 1))


class AttentionFreeMixer(nn.Module):
    def __init__(self, p: AFTParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.mode, self.causal, self.max_len, self.heads = p.mode, env.causal, p.max_len, p.heads
        self.label = f"mixer(aft, mode={p.mode})"
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=p.bias) for _ in range(4))
        self.offsets = band_offsets(p, env.causal) if p.mode in ("local", "conv") else []
        rows = {"full": (p.max_len, p.max_len), "local": (p.max_len, len(self.offsets)),
                "conv": (p.heads, len(self.offsets))}.get(p.mode)
        self.w = nn.Parameter(torch.zeros(rows)) if rows else None  # 0: AFT-simple at initialisation

    def rows(self, p0: int, T) -> torch.Tensor:
        """The rows of w of the queries p0..T-1: a view; gathered when exporting (a view's layout would depend on
        whether T is max_len, which a graph for every T cannot know). full: against the keys 0..T-1."""
        if isinstance(T, int) and not torch.compiler.is_exporting():
            return self.w[p0:T, :T] if self.mode == "full" else self.w[p0:T]
        idx = torch.arange(T, device=self.w.device)
        w = self.w.index_select(0, idx[p0:])
        return w.index_select(1, idx) if self.mode == "full" else w

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        n = x.shape[1]
        if self.max_len is not None and isinstance(n, int) and n > self.max_len:
            raise EvoError([Diagnostic("E410", f"{self.label} has max_len={self.max_len}, the "
                                               f"input {n} positions", help="set max_len to the longest sequence")])
        keep = None if ctx is None or ctx.mask is None or (self.causal and ctx.right_padded) else ctx.mask
        if self.mode in ("full", "local"):
            require_right_padding(keep, self.label, "its position biases read absolute positions, and left padding "
                                                    "moves the tokens")
        num, den = self.sums(self.k_proj(x), self.v_proj(x), keep)
        if keep is not None:  # a query before every token (causal, left padding) has no key: finite, unread
            den = den.clamp_min(torch.finfo(den.dtype).tiny)
        ratio = num / den
        del num, den
        return self.o_proj(torch.sigmoid(self.q_proj(x)) * ratio)

    def sums(self, k, v, keep=None, p0: int = 0):
        """N and D of the query rows p0..T-1 (see _aft.py). K and V die here once exponentiated (the caller
        hands them over)."""
        T = k.shape[1]
        e, ev = exp_keys(k, v, keep)
        del k, v
        if self.mode == "simple":
            return global_sums(e, ev, self.causal, p0)
        if self.mode == "full":
            return full_sums(self.rows(p0, T), e, ev, self.causal, p0)
        if self.mode == "local":
            w = self.rows(p0, T)
            mu = w.detach().amax(-1, keepdim=True).clamp_min(0.0)
            scale = (-mu).exp()
            return band_sums((w - mu).exp() - scale, scale, self.offsets, e, ev, self.causal, p0)
        mu = self.w.detach().amax(-1, keepdim=True).clamp_min(0.0)  # conv: per head, then per channel
        scale = (-mu).exp()
        g = e.shape[-1] // self.heads
        coef = ((self.w - mu).exp() - scale).repeat_interleave(g, 0).T
        return band_sums(coef, scale[:, 0].repeat_interleave(g), self.offsets, e, ev,
                         self.causal, p0, per_row=False)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding (causal). simple: the running sums S = sum exp(K - m) V, Z = sum exp(K - m) and their
        running maximum m, per channel; the new tokens read them and each other. The others: the cache of K and
        V, which the new queries read with their own rows of w."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        cache, key = ctx.cache.caches, slot(ctx, self)
        if self.mode == "simple":
            m, s, z = cache.get(key, (torch.full_like(k[:, :1], float("-inf")), torch.zeros_like(k[:, :1]),
                                      torch.zeros_like(k[:, :1])))
            m2 = torch.maximum(m, k.amax(1, keepdim=True))
            decay, e = (m - m2).exp(), (k - m2).exp()
            num, den = torch.cumsum(e * v, 1).add_(s * decay), torch.cumsum(e, 1).add_(z * decay)
            cache[key] = (m2, num[:, -1:].clone(), den[:, -1:].clone())
        else:
            if key in cache:
                k, v = torch.cat((cache[key][0], k), 1), torch.cat((cache[key][1], v), 1)
            cache[key] = (k, v)
            num, den = self.sums(k, v, p0=ctx.offset)
        return self.o_proj(torch.sigmoid(q) * (num / den))


def aft_cost(p: AFTParams, env: OpEnv, s: Symbols) -> Cost:
    """The four projections, then (u = b n d elements, one [b, n, d] tensor; E = exp(w) [n, n]):
    full: E (exp(K) V) and E exp(K), two [n, n] @ [n, d] matmuls per sequence (E's gradient too), O(n^2 d);
    simple: sums or running sums, O(n d); local, conv: one multiply-add per offset of the band (S offsets: 2s - 1,
    causal s; the kernel's k) on [b, n, d], twice (N and D), O(n S d), elementwise. Kept for backward: exp(K),
    V (and exp(K) V where a matmul or the band reads it), N, D, sigmoid(Q), N / D, o_proj's input (simple: N and D
    are [b, 1, d] bidirectional, and exp(K) V is summed, not kept); full: E (causal: the bool mask of the future);
    local: the band's exp(w) and coefficients [n, S], and its scale; conv: the coefficients per channel [S, d].
    Inference: K, V, K - max and exp(K) V at once (4u, the first phase), then exp(K), exp(K) V, N and D (full:
    with E; causal: first E and the masked w beside exp(K), exp(K) V). Backward: three [b, n, d] gradients at
    once (simple bidirectional: two)."""
    d, b, n, by = s.d, s.b, s.n, s.bytes
    u, row = b * n * d * by, b * d * by  # one [b, n, d] tensor, one [b, 1, d]
    L = s.sym("L", p.max_len) if p.max_len is not None else None
    proj = linear(s, d, d, p.bias).scaled(4)
    fwd = bwd = 0
    other = 6 * b * n * d  # K - max, exp, exp(K) V; N / D, sigmoid, the product
    cache = 2 * u
    if p.mode == "simple":
        other += 2 * b * n * d
        saved = 7 * u if env.causal else 4 * u + 3 * row
        phases = [4 * u + row, 4 * u if env.causal else 2 * u]
        params, bwd_peak, cache = 0, 3 * u if env.causal else 2 * u, 3 * row
    elif p.mode == "full":
        E = n * n * by
        fwd, bwd = 4 * b * n * n * d, 8 * b * n * n * d
        other += 2 * n * n
        saved = 8 * u + E + (n * n if env.causal else 0)
        phases = [4 * u + row, 4 * u + E] + ([2 * u + 2 * E] if env.causal else [])
        params, bwd_peak = L * L, 3 * u
    else:
        S = s.sym("s", p.window) if p.mode == "local" else s.sym("k", p.kernel)
        S = (2 * S - 1 if not env.causal else S) if p.mode == "local" else S
        other += 4 * b * n * d * S
        if p.mode == "local":
            params = L * S
            saved = 8 * u + (2 * n * S + n) * by
            phases = [4 * u + row, 4 * u + n * S * by]
        else:
            h = s.sym("h", p.heads)
            params = h * S
            saved = 8 * u + (S * d + h * S + d) * by
            # N and D beside the coefficients per channel [S, d] (bidirectional: and their transpose)
            phases = [4 * u + row, 4 * u + (1 if env.causal else 2) * S * d * by]
        bwd_peak = 3 * u
    core = Cost(params=params, fwd=fwd, bwd=bwd, fwd_other=other, bwd_other=2 * other)
    total = proj + core
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=saved, saves_input=True, peak=sp.Max(*phases) - u,
                cache=cache, bwd_peak=bwd_peak)


def aft_decode(p: AFTParams) -> str:
    if p.mode == "simple":
        return "the running sums sum exp(K - m) V, sum exp(K - m) and their maximum m, per channel: constant"
    return "the cache of K and V, [n, d] each"


OP = register(Op(
    decode=aft_decode,
    family="mixer", variant="aft", params=AFTParams, module=AttentionFreeMixer, causal="yes", shape=aft_shape,
    paper="An Attention Free Transformer, Zhai et al. 2021, arXiv:2105.14103",
    summary="sigmoid(Q_t) * sum_r exp(K_r + w_tr) V_r / sum_r exp(K_r + w_tr), per channel; w: a learned table "
            "(full), 0 (simple), a band (local), a kernel per head (conv)",
    cost=aft_cost, note="MHA/RightProduct/002.md",
))
