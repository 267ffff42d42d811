"""What an op costs, as formulas over symbols: every op declares `cost(params, env, s) -> Cost` beside its module.

Formulas see shapes only, never data (after torch's register_flop_formula). `s.b` and `s.n` are the batch and
sequence symbols; `s.d` is the op's input width; `s.sym("w", 128)` names another quantity (window, heads, ...)
so that the complexity class can be read off the formula. A multiply-add counts as 2 FLOPs.

Memory fields are bytes; `s.bytes` is the size of one element of the model's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import sympy as sp

B, N, M = sp.symbols("b n m", positive=True, integer=True)  # batch; the lengths of a model's first and second inputs
MEM = sp.Symbol("M", positive=True)  # a segment memory's length (memory(xl, mem_len=M)): a length, as n and m


def length(dim) -> sp.Expr:
    """A shape's dimension as a formula: "n" -> n, "m" -> m, 64 -> 64, "n + 16" -> n + 16."""
    if isinstance(dim, int):
        return sp.Integer(dim)
    return sp.sympify(dim, locals={"b": B, "n": N, "m": M})


@dataclass(frozen=True)
class Cost:
    params: object = 0  # parameter count
    fwd: object = 0  # forward FLOPs in matmuls (what FlopCounterMode counts, incl. SDPA), as autograd records
    fwd_inference: object = None  # the same where autograd records nothing, for an op that runs another form
    #                               then (a chunk-by-chunk loop that keeps no states); None: as `fwd`
    fwd_other: object = 0  # forward FLOPs outside matmuls: softmax, norms, elementwise, FFT
    bwd: object = 0  # backward FLOPs in matmuls
    bwd_other: object = 0  # backward FLOPs outside matmuls
    saved: object = 0  # bytes the op keeps for backward, beyond its input and output tensors
    saves_input: bool = False  # the op keeps its input tensor for backward
    saves_output: bool = False  # the op keeps its output tensor for backward
    peak: object = 0  # bytes alive inside the op at its inference peak, beyond its input and output
    cache: object = 0  # decoding state in bytes for a prefix of n tokens (KV cache, recurrent state)
    bwd_peak: object = None  # bytes at the peak of the op's backward wrt its input (no parameter gradient):
    #                           created (its input's gradient included, the incoming one not) less those of its
    #                           saved tensors already released; None: just the input's gradient
    inplace: bool = False  # the output reuses the input's storage (no new bytes), in an inference forward
    inplace_in_training: bool | None = None  # the same in a training forward (None: as `inplace`; dropout differs)

    def __add__(self, other: "Cost") -> "Cost":
        """Sum of two ops applied one after the other (the boolean flags must be resolved by the caller)."""
        vals = {f.name: (getattr(self, f.name) or 0) + (getattr(other, f.name) or 0) for f in fields(self)
                if f.type not in ("bool", "bool | None")}
        both = self.fwd_inference is None and other.fwd_inference is None
        return Cost(**{**vals, "fwd_inference": None if both else self.inference_fwd + other.inference_fwd})

    @property
    def inference_fwd(self):
        """Forward matmul FLOPs where autograd records nothing."""
        return self.fwd if self.fwd_inference is None else self.fwd_inference

    @property
    def new_output_in_training(self) -> bool:
        return not (self.inplace if self.inplace_in_training is None else self.inplace_in_training)

    def scaled(self, k) -> "Cost":
        vals = {f.name: (getattr(self, f.name) or 0) * k for f in fields(self) if f.type not in ("bool", "bool | None")}
        return Cost(**{**vals, "fwd_inference": None if self.fwd_inference is None else self.fwd_inference * k})


def cost_field(cost: Cost, name: str):
    """One field of `cost`; "fwd_inference" is never None (an op with one form runs it in both modes)."""
    return cost.inference_fwd if name == "fwd_inference" else getattr(cost, name)


def piecewise(pieces) -> Cost:
    """One Cost whose every formula is that of the first (cost, condition) piece whose condition holds: an op
    whose form depends on the sizes (fwd_inference: each piece's inference_fwd; params: the first piece's)."""
    first = pieces[0][0]
    vals = {f.name: sp.Piecewise(*[(cost_field(c, f.name) or 0, cond) for c, cond in pieces])
            for f in fields(Cost) if f.type not in ("bool", "bool | None") and f.name != "params"}
    return replace(first, params=first.params, **vals)


class Symbols:
    """The symbols an op's cost formula uses, with the values they stand for in this graph."""

    def __init__(self, d: int | None, bytes_per: int, n="n"):
        """`n`: the op's sequence length, a shape dimension ("n", "m", 64, "n + 16")."""
        self.b, self.n = B, length(n)
        self.bytes = bytes_per
        self.values: dict = {}
        self.d = self.sym("d", d) if d is not None else None

    @staticmethod
    def length(dim) -> sp.Expr:
        return length(dim)

    def sym(self, name: str, value) -> sp.Symbol:
        s = sp.Symbol(name, positive=True)
        self.values[s] = value
        return s


def linear(s: Symbols, d_in, d_out, bias: bool, tokens=None) -> Cost:
    """nn.Linear on `tokens` rows (default b*n): params, forward/backward FLOPs; it saves its input."""
    t = s.b * s.n if tokens is None else tokens
    return Cost(params=d_in * d_out + (d_out if bias else 0),
                fwd=2 * t * d_in * d_out,
                bwd=4 * t * d_in * d_out,  # grad wrt input and wrt weight
                fwd_other=0, bwd_other=(t * d_out if bias else 0),  # bias grad: a row sum
                saves_input=True)
