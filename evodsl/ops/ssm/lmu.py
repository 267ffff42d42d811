"""ssm(lmu, order=q, theta): the Legendre Memory Unit (Voelker, Kajic, Eliasmith 2019, NeurIPS) in its parallel form
(Chilkuri and Eliasmith 2021, Parallelizing Legendre Memory Unit Training, arXiv:2102.11417):

    u_t = W_u x_t                                  [units]  (the paper's e_x; units = 1 is the 2019 cell's scalar)
    m_t = A_bar m_{t-1} + B_bar u_t                [units, q] per unit, A_bar, B_bar the Legendre system by ZOH
    h_t = tanh(W_x x_t + W_m m_t + b)              [d]

A and B are the paper's closed forms, discretised by zero-order hold with theta tokens as the window (_lmu_memory.py);
they are fixed. Training runs the memory as a causal convolution with the impulse response H_k = A_bar^k B_bar by
FFT (O(b n units q log n), no loop over tokens); the step form runs the recurrence from the state m [units, q] (a
flat state): a piece after the first loops over its tokens, the first piece (the prompt) runs the FFT form and
keeps its last memory. Causal only (the memory is a recurrence forward in time).
feedback=true is the 2019 cell with its feedback (Voelker et al. 2019, the equations for u_t and h_t):

    u_t = e_x x_t + e_h h_{t-1} + e_m m_{t-1}      [units]  (e_h [units, d], e_m [units, units q])
    m_t = A_bar m_{t-1} + B_bar u_t,   h_t = tanh(W_x x_t + W_h h_{t-1} + W_m m_t + b),   h_0 = m_0 = 0

A nonlinear recurrence (h_{t-1} through tanh): no parallel form. Training computes the input maps (e_x x, W_x x + b)
for all tokens at once and loops the recurrent core over the tokens (per token two products, h_{t-1} [e_h; W_h]
and m_t [W_m; e_m] (W_m m_t for h_t, e_m m_t for u_{t+1}), and m A_bar^T): O(n (d^2 + d units q + units q^2)), the
state of every token kept for the backward. The export (a symbolic n) runs the same core as one scan (torch's
higher-order scan: an ONNX Scan node; it reads no impulse buffer: no max_len bound). Decoding carries (m, h):
[units q + d], constant in the length.
Choices where the paper is silent: no bias on u (the 2019 e_x has none), a bias on the hidden map, tanh as the
2019 cell's f, e_h, e_m and W_h without biases and with Linear's default init (as every map here); H is a buffer of
max_len taps (extended by doubling past it; the export, whose n is symbolic, reads the buffer: n <= max_len there).
Padding: a padded position's u is zeroed: it enters no memory (left padding leaves m = 0 until the first token,
right padding comes after every real token), so a padded row equals the sequence alone on either side; with the
feedback a padded position is skipped (m and h kept as they were).
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, ShapeProblem, is_symbolic, register, sequence_shape
from ._lmu_cost import lmu_cost
from ._lmu_memory import impulse, memory, zoh


class LMUParams(OpParams):
    order: int = Field(ge=1, le=512, description="q: the Legendre polynomials the memory keeps per unit")
    theta: float = Field(gt=0, le=1e7, description="the window the memory represents, in tokens")
    units: int = Field(1, ge=1, le=4096, description="the input units u_t, each with its own memory")
    max_len: int = Field(1024, ge=1, le=1 << 20, description="taps of the impulse response kept as a buffer")
    feedback: bool = Field(False, description="the 2019 cell's feedback: e_h h_{t-1} + e_m m_{t-1} into u_t, "
                           "W_h h_{t-1} into h_t (nonlinear: a loop over tokens in training)")


def lmu_shape(p: LMUParams, env: OpEnv):
    shape = sequence_shape(p, env)
    if not env.causal:
        raise ShapeProblem("ssm(lmu) is causal only: its memory is a recurrence forward in time", None,
                           "use it in a causal model (head(lm)), or a longconv for a bidirectional one")
    return shape


class LegendreMemoryUnit(nn.Module):
    def __init__(self, p: LMUParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.units, self.q, self.theta = p.units, p.order, p.theta
        Abar, Bbar = zoh(p.order, p.theta)
        self.register_buffer("Abar", Abar.float(), persistent=False)
        self.register_buffer("Bbar", Bbar.float(), persistent=False)
        self.register_buffer("H", impulse(Abar, Bbar, p.max_len).float(), persistent=False)
        self.u_proj = nn.Linear(d, p.units, bias=False)  # e_x
        self.x_proj = nn.Linear(d, d)  # W_x, b
        self.m_proj = nn.Linear(p.units * p.order, d, bias=False)  # W_m
        self.feedback = p.feedback
        if p.feedback:
            self.e_h = nn.Linear(d, p.units, bias=False)
            self.e_m = nn.Linear(p.units * p.order, p.units, bias=False)
            self.h_proj = nn.Linear(d, d, bias=False)  # W_h

    def _apply(self, fn, recurse=True):
        """The buffers follow the module's dtype; cast to float64, they are made again in float64 (not widened)."""
        super()._apply(fn, recurse)
        if self.H.dtype == torch.float64 and not self.H.is_meta:
            Abar, Bbar = zoh(self.q, self.theta)
            dev = self.H.device
            self.Abar, self.Bbar = Abar.to(dev), Bbar.to(dev)
            self.H = impulse(Abar, Bbar, self.H.shape[0]).to(dev)
        return self

    def taps(self, n) -> torch.Tensor:
        """H's first n taps [n, q]: the buffer's, extended past max_len; exported (a symbolic n), gathered from the
        buffer (no slice, whose length would tie the file to n <= max_len; past it the last tap repeats)."""
        if is_symbolic(self.H):
            return self.H.index_select(0, torch.arange(n, device=self.H.device).clamp(max=self.H.shape[0] - 1))
        if n <= self.H.shape[0]:
            return self.H[:n]
        return impulse(self.Abar, self.Bbar, n, self.H)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if self.feedback:
            return self.with_feedback(x, ctx)
        mask = None if ctx is None else ctx.mask
        u = self.u_proj(x)
        if mask is not None and not ctx.right_padded:
            u = u * mask[..., None].to(u.dtype)
        b, n, _ = x.shape
        state = None
        if ctx is not None and ctx.cache is not None:
            key = slot(ctx, self)
            state = ctx.cache.caches.get(key)
        if state is None:
            m = memory(u, self.taps(n))
        else:  # the recurrence from the state, token by token (decoding)
            ms, prev = [], state
            for t in range(n):
                prev = prev @ self.Abar.T + u[:, t, :, None] * self.Bbar
                ms.append(prev)
            m = torch.stack(ms, 1).reshape(b, n, -1)
        if ctx is not None and ctx.cache is not None:
            ctx.cache.caches[key] = m[:, -1].reshape(b, self.units, self.q).clone()
        return torch.tanh(self.x_proj(x) + self.m_proj(m))

    def step(self, carry, xt, Rh, Rm):
        """One token of the 2019 cell: carry (m [b, U q], h [b, d], e_m m [b, U]), xt (e_x x_t [b, U], W_x x_t + b
        [b, d], keep [b] or None), Rh = [e_h; W_h]^T [d, U + d], Rm = [W_m; e_m]^T [U q, d + U] -> the carry after."""
        m, h, em = carry
        ux, xx, keep = xt
        U = ux.shape[-1]
        rh = h @ Rh
        u = ux + rh[:, :U] + em  # u_t
        m_new = (m.view(-1, U, self.q) @ self.Abar.T + u[..., None] * self.Bbar).flatten(1)
        rm = m_new @ Rm  # W_m m_t and e_m m_t (the next token's)
        h_new = torch.tanh(xx + rh[:, U:] + rm[:, :-U])
        if keep is None:
            return m_new, h_new, rm[:, -U:]
        k = keep[:, None] > 0
        return torch.where(k, m_new, m), torch.where(k, h_new, h), torch.where(k, rm[:, -U:], em)

    def with_feedback(self, x: torch.Tensor, ctx) -> torch.Tensor:
        b, n, d = x.shape
        cache = None if ctx is None else ctx.cache
        mask = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
        old = None if cache is None else cache.caches.get(slot(ctx, self))
        m = x.new_zeros(b, self.units * self.q) if old is None else old[0].flatten(1)
        h = x.new_zeros(b, d) if old is None else old[1]
        Rh = torch.cat((self.e_h.weight, self.h_proj.weight)).T
        Rm = torch.cat((self.m_proj.weight, self.e_m.weight)).T
        carry = (m, h, x.new_zeros(b, self.units) if old is None else m @ Rm[:, -self.units:])  # e_m m_{t-1}
        ux, xx = self.u_proj(x), self.x_proj(x)  # every input map at once
        keep = None if mask is None else mask.to(x.dtype)
        if not isinstance(n, int) or torch.compiler.is_exporting():
            from torch._higher_order_ops.scan import scan

            def combine(carry, xt):
                carry = self.step(carry, (*xt, None) if keep is None else xt, Rh, Rm)
                return carry, carry[1].clone()

            xs = (ux, xx) if keep is None else (ux, xx, keep)
            carry, hs = scan(combine, carry, tuple(t.transpose(0, 1) for t in xs))
            out = hs.transpose(0, 1)
        else:
            outs = []
            keeps = [None] * n if keep is None else keep.unbind(1)  # unbound, not indexed (see sru's light_recurrence)
            for xt in zip(ux.unbind(1), xx.unbind(1), keeps):  # the recurrent core: a loop over the tokens
                carry = self.step(carry, xt, Rh, Rm)
                outs.append(carry[1])
            out = torch.stack(outs, 1)
        if cache is not None:
            cache.caches[slot(ctx, self)] = (carry[0].view(b, self.units, self.q), carry[1])
        return out


OP = register(Op(
    decode="the memory m [units, q] (feedback: and h [d]): constant in the length",
    family="ssm", variant="lmu", params=LMUParams, module=LegendreMemoryUnit, causal="yes", shape=lmu_shape,
    paper="Legendre Memory Units: Continuous-Time Representation in Recurrent Neural Networks, Voelker et al. 2019, "
          "NeurIPS; Parallelizing Legendre Memory Unit Training, Chilkuri and Eliasmith 2021, arXiv:2102.11417",
    summary="u_t = W_u x_t; m_t = A_bar m_{t-1} + B_bar u_t (Legendre A, B by ZOH over theta), by FFT with "
            "H_k = A_bar^k B_bar; h_t = tanh(W_x x_t + W_m m_t + b); O(n units q log n); feedback: the 2019 cell, "
            "e_h h_{t-1} + e_m m_{t-1} added to u_t and W_h h_{t-1} inside h_t's tanh, a loop over tokens, "
            "O(n (d^2 + d units q + units q^2))",
    cost=lmu_cost, note="LongConv/002.md",
))
