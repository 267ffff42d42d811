"""rnn(rfwp): the Recurrent Delta Net, a recurrent fast weight programmer (Irie, Schlag, Csordas, Schmidhuber 2021,
"Going Beyond Linear Transformers with Recurrent Fast Weight Programmers", arXiv:2106.06295, section 3, eq. 13-18).

Per head (H heads of width dh), the slow net reads the input and the previous output y_(t-1) (tanh-squashed)
through recurrent weights R_q, R_k, R_v [dh, dh] and r_b [dh]:

    h_t = tanh(y_(t-1))                       (y_0 = 0)
    q_t = softmax(x_t W_Q + h_t R_q),  k_t = softmax(x_t W_K + h_t R_k),  v_t = x_t W_V + h_t R_v
    beta_t = sigmoid(x_t W_beta + h_t . r_b)
    W_t = W_(t-1) + beta_t (v_t - W_(t-1) k_t) (x) k_t,      y_t = W_t q_t
    out_t = [y_t of every head] W_O

A nonlinear recurrence: q_t, k_t, v_t and beta_t depend on y_(t-1) through tanh and softmax, so there is no parallel
or chunked form. The training path computes every input projection (x W_Q, x W_K, x W_V, x W_beta) for all tokens at
once, then loops the recurrent core over the tokens (O(n H dh^2) time, linear in n; the fast weights of every step
kept for the backward: O(n H dh^2) bytes). Decoding is the same core from the cached (W, y): constant in the tokens
seen. The export (a symbolic n) runs the core as one scan (torch's higher-order scan: an ONNX Scan node).
Choices where the paper is silent or leaves it to its code (IDSIA/recurrent-fwp's rec_update_fwm_tanh): R_q, R_k,
R_v and r_b per head, initialised N(0, 1 / dh) and kept side by side ([H, dh, 3 dh + 1]: one product batched
over the heads a token, no copy of them per batch row); the values as wide as the keys (dh); biases on the input
projections and W_O only (bias=). Padding: a padded position leaves W and y as they were (it is skipped), so each
sequence's outputs are its own under left or right padding.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._rfwp_cost import rfwp_cost


class RFWPParams(OpParams):
    heads: int = Field(8, ge=1, le=4096, description="H fast weight memories")
    head_dim: int | None = Field(None, ge=1, le=4096, description="dh: a head's key and value width; default d / H")
    bias: bool = Field(True, description="biases on the input projections and the output projection")


def rfwp_shape(p: RFWPParams, env: OpEnv):
    shape = sequence_shape(p, env)
    if not env.causal:
        raise ShapeProblem("rnn(rfwp) is causal only: its fast weights are written forward in time", None,
                           "use it in a causal model (causal=true)")
    if p.head_dim is None and env.d % p.heads:
        raise ShapeProblem(f"d_model {env.d} is not divisible by heads={p.heads}", "heads", "set head_dim, or heads "
                           "dividing d_model")
    return shape


def core_step(S, y, x, R, keep=None):
    """One token of the recurrent core: S [b, H, dh, dh] (W^T: keys by values), y [b, H, dh], x = (the input's q, k,
    v, beta projections [b, H, dh] x 3, [b, H]), R [H, dh, 3 dh + 1] (R_q, R_k, R_v, r_b side by side: one product
    batched over the heads), keep [b] (0: padding) or None -> (S, y) after it."""
    xq, xk, xv, xb = x
    dh = S.shape[-1]
    hr = (torch.tanh(y).transpose(0, 1) @ R).transpose(0, 1)  # [b, H, 3 dh + 1]
    rq, rk, rv, rb = hr.split((dh, dh, dh, 1), -1)
    q = (xq + rq).softmax(-1)[:, :, None, :]  # [b, H, 1, dh]
    k = (xk + rk).softmax(-1)[:, :, None, :]
    beta = torch.sigmoid(xb + rb[..., 0])  # [b, H]
    if keep is not None:
        beta = beta * keep[:, None]
    delta = beta[..., None, None] * ((xv + rv)[:, :, None, :] - k @ S)  # [b, H, 1, dh]
    S = S + k.transpose(-1, -2) * delta
    y_new = (q @ S)[:, :, 0]
    return S, (y_new if keep is None else torch.where(keep[:, None, None] > 0, y_new, y))


class RecurrentDeltaNet(nn.Module):
    def __init__(self, p: RFWPParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.heads = p.heads
        self.dh = dh = p.head_dim or d // p.heads
        self.in_proj = nn.Linear(d, 3 * p.heads * dh + p.heads, bias=p.bias)  # q, k, v, beta side by side
        self.R = nn.Parameter(torch.randn(p.heads, dh, 3 * dh + 1) * dh ** -0.5)  # [R_q R_k R_v r_b] per head
        self.o_proj = nn.Linear(p.heads * dh, d, bias=p.bias)

    def inputs(self, x):
        """Every input projection at once: ([b, n, H, dh] x 3, beta's [b, n, H])."""
        b, n, _ = x.shape
        H, dh = self.heads, self.dh
        z = self.in_proj(x)
        xq, xk, xv = (t.view(b, n, H, dh) for t in z[..., :3 * H * dh].split(H * dh, -1))
        return xq, xk, xv, z[..., 3 * H * dh:]

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        b, n, _ = x.shape
        cache = None if ctx is None else ctx.cache
        mask = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
        old = None if cache is None else cache.caches.get(slot(ctx, self))
        S = x.new_zeros(b, self.heads, self.dh, self.dh) if old is None else old[0]
        y = x.new_zeros(b, self.heads, self.dh) if old is None else old[1]
        xs = self.inputs(x)
        if not isinstance(n, int) or torch.compiler.is_exporting():
            from torch._higher_order_ops.scan import scan

            def combine(carry, t):
                S, y = core_step(*carry, t, self.R)
                return (S, y), y.clone()

            _, ys = scan(combine, (S, y), tuple(t.transpose(0, 1) for t in xs))
            out = ys.transpose(0, 1)  # [b, n, H, dh]
        else:
            keep = None if mask is None else mask.to(x.dtype)
            outs = []
            keeps = [None] * n if keep is None else keep.unbind(1)  # unbound, not indexed: see sru's light_recurrence
            for xt, kt in zip(zip(*(u.unbind(1) for u in xs)), keeps):  # the recurrent core: a loop over tokens
                S, y = core_step(S, y, xt, self.R, kt)
                outs.append(y)
            out = torch.stack(outs, 1)
        if cache is not None:
            cache.caches[slot(ctx, self)] = (S, y)
        return self.o_proj(out.reshape(b, n, self.heads * self.dh))


OP = register(Op(
    decode="the fast weights W (dh x dh) and the last output y (dh) of every head: constant in the tokens seen",
    family="rnn", variant="rfwp", params=RFWPParams, module=RecurrentDeltaNet, causal="yes", shape=rfwp_shape,
    paper="Going Beyond Linear Transformers with Recurrent Fast Weight Programmers, Irie et al. 2021, "
          "arXiv:2106.06295",
    summary="Recurrent Delta Net: q, k = softmax(x W + tanh(y_(t-1)) R), v, beta likewise; W_t = W_(t-1) + beta_t (v_t "
            "- W_(t-1) k_t) (x) k_t, y_t = W_t q_t; nonlinear: input projections at once, a loop over tokens; O(n H dh^2)",
    cost=rfwp_cost,
))
