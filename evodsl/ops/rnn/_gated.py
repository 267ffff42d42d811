"""What the gated elementwise RNNs (rnn(qrnn), rnn(sru), rnn(gilr)) share: the causal-only shape rule, padding as
a kept state (decay 1, no input), and the scan c_t = a_t c_{t-1} + u_t from a cached state (rnn/_diag_scan.py), or
the export's whole-sequence form when n is symbolic."""
from __future__ import annotations

import torch

from ..registry import OpEnv, ShapeProblem, sequence_shape
from ._diag_scan import diag_scan, exported_scan


def causal_rnn_shape(name: str):
    def shape(p, env: OpEnv):
        out = sequence_shape(p, env)
        if not env.causal:
            raise ShapeProblem(f"rnn({name}) is causal only: its recurrence runs forward in time", None,
                               "use it in a causal model (head(lm)), or a mixer for a bidirectional one")
        return out
    return shape


def gate_padding(a, u, ctx):
    """A padded position keeps the state: decay 1, no input (left padding; a causal op ignores right padding)."""
    keep = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
    if keep is None:
        return a, u
    k = keep[:, :, None]
    return torch.where(k, a, torch.ones_like(a)), u * k.to(u.dtype)


def run_scan(owner, a, u, ctx, state):
    """c [b, n, d] of c_t = a_t c_{t-1} + u_t: the chunked scan from the cached state, or the export's form."""
    if not isinstance(u.shape[1], int) or torch.compiler.is_exporting():
        return exported_scan(a, None, u, None)[0]
    return diag_scan(a, None, u, None, h0=None if state is None else (state, None), chunk=owner.chunk)[0]
