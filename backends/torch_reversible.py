"""`repeat(body, N, reversible=true)` in torch: RevNet's reversible residual stack (Gomez et al. 2017; Reformer,
Kitaev et al. 2020, section 3), as trax and HF's Reformer run it.

The repeat's input x enters as the pair (X1, X2) = (x, x); each pair (F, G) of the body's residual sublayers
(their norms included; one pair per layer: a body of 2k sublayers is k layers, as HF's alternating local and LSH
layers) computes Y1 = X1 + F(X2), Y2 = X2 + G(Y1); the output is concat(Y1, Y2), width 2d.

Training keeps no copy's activations: `_Reversible` runs the stack without recording, keeps only the last
copy's output, and in backward rebuilds each copy's inputs from its outputs (X2 = Y2 - G(Y1), X1 = Y1 - F(X2)),
recomputing F and G with the RNG state (dropout) each had in the forward, one copy at a time: activation memory
is flat in the number of copies; the backward does one more forward of every sublayer. Inference, decoding
(each sublayer keeps its own cache) and export run the same wiring as a plain loop.
"""
from __future__ import annotations

import contextlib

import torch

from evodsl.passes.layers import reversible_sublayers


class ReversibleRepeat(torch.nn.ModuleList):
    """The copies of a reversible repeat (one body each, or one shared body); module names as a plain repeat's."""

    recompute = True  # False: plain autograd through the same wiring (what the gradient test compares with)

    def __init__(self, bodies: list, count: int, body_graph):
        super().__init__(bodies)
        self.count = count
        program = {ins[0]: ins for ins in bodies[0]._program}
        self._subs = [_half([program[n.name] for n in calls], add.inputs[0], add.inputs[1])
                      for calls, add in reversible_sublayers(body_graph)]
        self.pairs = len(self._subs) // 2

    def sublayer(self, i: int, which: int, x: torch.Tensor, ctx) -> torch.Tensor:
        """Sublayer `which` of copy i applied to x: F of pair p is 2p, its G 2p + 1."""
        body, (program, source, out) = self[i % len(self)], self._subs[which]
        values = {source: x}
        for name, module, inputs, multi, done in program:
            args = [values[v] for v in inputs]
            for v in done:
                del values[v]
            values[name] = getattr(body, module)(args, ctx) if multi else getattr(body, module)(args[0], ctx)
        return values[out]

    def half_params(self, i: int, which: int) -> list:
        body, (program, _, _) = self[i % len(self)], self._subs[which]
        return [p for _, module, *_ in program for p in getattr(body, module).parameters() if p.requires_grad]

    def forward(self, xs: list, ctx) -> torch.Tensor:
        del xs[1:]  # the list is emptied by run(): no reference to x stays here once its copies are done
        params = [p for p in self.parameters() if p.requires_grad]
        if (self.recompute and torch.is_grad_enabled() and (xs[0].requires_grad or params)
                and not torch.compiler.is_compiling() and (ctx is None or ctx.cache is None)):
            x = xs.pop()
            return _Reversible.apply(x, self, ctx, *params)
        return self.run(xs, ctx)

    def run(self, xs: list, ctx, states: list | None = None) -> torch.Tensor:
        """The stack as a plain loop on xs = [x] (emptied); `states` collects each sublayer's RNG state."""
        shared = len(self) < self.count and ctx is not None and ctx.cache is not None
        outer = ctx.extra.get("copy", ()) if shared else ()
        x1 = x2 = xs.pop()
        for i in range(self.count):
            if shared:  # decoding: each application of the shared body keeps its own state
                ctx.extra["copy"] = (*outer, i)
            for f in range(0, 2 * self.pairs, 2):
                if states is not None:
                    states.append(_rng_state(x2))
                y1 = x1 + self.sublayer(i, f, x2, ctx)
                del x1
                if states is not None:
                    states.append(_rng_state(y1))
                x2, x1 = x2 + self.sublayer(i, f + 1, y1, ctx), y1
                del y1
        if shared:
            ctx.extra["copy"] = outer
        return torch.cat([x1, x2], dim=-1)


def _half(program: list, source: str, out: str) -> tuple:
    """One sublayer's instructions (value, module, inputs, multi, values to drop after it), its input, its output."""
    last = {}
    for k, (name, _, _, inputs, *_) in enumerate(program):
        for v in inputs:
            last[v] = k
    steps = [(name, module, inputs, multi, tuple(v for v in dict.fromkeys(inputs) if last[v] == k and v != out))
             for k, (name, _, module, inputs, multi, _) in enumerate(program)]
    return steps, source, out


def _rng_state(x: torch.Tensor) -> tuple:
    cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    return torch.get_rng_state(), cuda, x.device


@contextlib.contextmanager
def _replay(state: tuple, autocast: tuple):
    """Run with the RNG state a sublayer had in the forward, and the forward's autocast."""
    cpu, cuda, device = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        with (torch.autocast(device.type, enabled=True, dtype=autocast[1]) if autocast[0]
              else contextlib.nullcontext()):
            yield


class _Reversible(torch.autograd.Function):
    """The stack with only its output kept for backward (see the module docstring)."""

    @staticmethod
    def forward(fctx, x, stack, ctx, *params):
        states: list = []
        with torch.no_grad():
            out = stack.run([x.detach()], ctx, states)
        kind = x.device.type
        fctx.stack, fctx.ctx, fctx.states, fctx.params = stack, ctx, states, params
        fctx.autocast = ((torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                         if kind in ("cpu", "cuda") else (False, None))  # meta: no autocast
        fctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(fctx, dout):
        (out,) = fctx.saved_tensors
        stack, ctx, states = fctx.stack, fctx.ctx, fctx.states
        index = {id(p): k for k, p in enumerate(fctx.params)}
        grads: list = [None] * len(fctx.params)
        d = out.shape[-1] // 2
        y1, y2 = out[..., :d].detach(), out[..., d:].detach()
        dy1, dy2 = dout[..., :d], dout[..., d:]
        subs = 2 * stack.pairs
        for k in reversed(range(0, stack.count * subs, 2)):  # each pair (F, G) of each copy, last first
            i, f = divmod(k, subs)
            y1, dy1, g = _step(stack, ctx, i, f + 1, y1, dy2, dy1, states[k + 1], fctx.autocast, index, grads)
            y2 = y2 - g  # X2
            del g
            y2, dy2, out_f = _step(stack, ctx, i, f, y2, dy1, dy2, states[k], fctx.autocast, index, grads)
            y1 = y1 - out_f  # X1
            del out_f
        return (dy1 + dy2, None, None, *grads)


def _step(stack, ctx, i, which, y, dz, dy, state, autocast, index, grads):
    """Recompute sublayer `which` of copy i at y (its input), back-propagate dz (the gradient of the value it was
    added to) through it; returns (y, dy + y's gradient through it, its output)."""
    params = stack.half_params(i, which)
    with torch.enable_grad(), _replay(state, autocast):
        y = y.detach().requires_grad_()
        # a view, so that the sublayer's modules see an input with a grad_fn: module hooks (FlopCounterMode's
        # tracker) may not be handed a leaf inside autograd.grad
        z = stack.sublayer(i, which, y.view_as(y), ctx)
        got = torch.autograd.grad(z, (y, *params), dz, allow_unused=True)
    for p, gp in zip(params, got[1:]):
        k = index[id(p)]
        if gp is not None:
            grads[k] = gp if grads[k] is None else grads[k] + gp
    return y.detach(), dy + got[0], z.detach()
