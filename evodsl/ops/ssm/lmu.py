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
Left out, as the parallel paper does: the 2019 cell's feedback e_h h_{t-1} + e_m m_{t-1} into u_t and W_h h_{t-1}
into h_t: a nonlinear recurrence that has no parallel form (its training would loop over tokens).
Choices where the paper is silent: no bias on u (the 2019 e_x has none), a bias on the hidden map, tanh as the
2019 cell's f; H is a buffer of max_len taps (extended by doubling past it; the export, whose n is symbolic, reads
the buffer: n <= max_len there).
Padding: a padded position's u is zeroed: it enters no memory (left padding leaves m = 0 until the first token,
right padding comes after every real token), so a padded row equals the sequence alone on either side.
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


OP = register(Op(
    decode="the memory m [units, q]: constant in the length",
    family="ssm", variant="lmu", params=LMUParams, module=LegendreMemoryUnit, causal="yes", shape=lmu_shape,
    paper="Legendre Memory Units: Continuous-Time Representation in Recurrent Neural Networks, Voelker et al. 2019, "
          "NeurIPS; Parallelizing Legendre Memory Unit Training, Chilkuri and Eliasmith 2021, arXiv:2102.11417",
    summary="u_t = W_u x_t; m_t = A_bar m_{t-1} + B_bar u_t (Legendre A, B by ZOH over theta), by FFT with "
            "H_k = A_bar^k B_bar; h_t = tanh(W_x x_t + W_m m_t + b); O(n units q log n)",
    cost=lmu_cost, note="LongConv/002.md",
))
