"""Hold one op's declared Cost to measurement: params exact; matmul FLOPs against FlopCounterMode (with the CPU
SDPA formulas registered); bytes kept for backward against torch's saved-tensor hooks; the inference peak and
the backward's peak (bwd_peak) against the storage tracker."""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.flop_counter import FlopCounterMode

from evodsl.measure import SavedStorages, StorageTracker, register_cpu_sdpa_flops
from evodsl.ops import lookup
from evodsl.ops.cost import Symbols, cost_field
from evodsl.ops.merge.merges import ConcatMerge, SumMerge
from evodsl.passes.cost import _num
from ophelpers import make_op


def _key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def declared(family, variant, b, n, dtype=torch.float32, **build):
    module, params, env = make_op(family, variant, dtype=dtype, **build)
    s = Symbols(env.d if isinstance(env.d, int) else None, torch.finfo(dtype).bits // 8)
    cost = lookup(family, variant).cost(params, env, s)
    return module, env, cost, (lambda e: _num(e, s.values, b, n))


def make_input(env, b, n, dtype, vocab=None, grad: bool = True):
    """The op's input: token ids, or features that require grad (a layer inside a network) unless `grad` is False
    (a model's own input: embed(linear)'s features need no gradient)."""
    g = torch.Generator().manual_seed(0)
    if len(env.in_shapes[0]) == 2:  # token ids
        return torch.randint(0, env.vocab, (b, n), generator=g)
    xs = [torch.randn(b, s[1] if isinstance(s[1], int) else n, s[-1], generator=g, dtype=dtype).requires_grad_(grad)
          for s in env.in_shapes]  # a stream of fixed length (xattn's keys) keeps it
    return xs if len(xs) > 1 else xs[0]


def _net_peak(tr: StorageTracker, start: str, end: str) -> int:
    """Peak, over events[start:end], of the bytes created after `start` less those of older storages freed
    since (the op's saved tensors, which autograd releases as each node of its backward has run)."""
    cur = best = 0
    for _, delta in tr.events[tr.marks[start]: tr.marks[end]]:
        cur += delta
        best = max(best, cur)
    return best


def measure_op(module, x, train_mode: bool = True, make_ctx=None) -> dict:
    """FLOPs (fwd/bwd), bytes kept for backward (by saved-tensor hooks), the inference peak of one op, and its
    backward's peak (bwd_peak): torch.autograd.grad(out, inputs) under a real, full-size incoming gradient
    made before it starts (not counted; the input and the output are held, as in a network), with respect to
    the inputs only (no parameter gradient; the parameters still require grad, so the forward saves what
    training saves): the peak of the bytes it creates less those of the op's saved tensors it has released
    by then, which the cost pass counts as kept up to that op. 0 for token ids, which have no gradient."""
    register_cpu_sdpa_flops()
    from evodsl.ops import Ctx

    inputs = x if isinstance(x, list) else [x]
    upstream = module.__dict__.get("pos_source")  # a position scheme's parameters upstream (make_op): parameters
    known = [*module.parameters(), *module.buffers(), *(upstream.parameters() if upstream is not None else ())]
    params = {_key(p) for p in known}
    in_keys = {_key(t) for t in inputs}
    streams = isinstance(x, list) and not isinstance(module, (SumMerge, ConcatMerge))  # reads streams (xattn)
    make_ctx = make_ctx or Ctx  # a Ctx per call (a segment memory's, say)
    call = (lambda: module(x[0], make_ctx(), *x[1:])) if streams else (lambda: module(x, make_ctx()))
    detached = [t.detach() for t in inputs]  # no view made under no_grad requires grad (FlopCounterMode's hooks)
    infer = (lambda: module(detached[0], make_ctx(), *detached[1:])) if streams else \
        (lambda: module(detached if isinstance(x, list) else detached[0], make_ctx()))

    module.eval()
    with torch.no_grad(), StorageTracker([*known, *inputs]) as tr:
        with FlopCounterMode(display=False) as fwd_inference:
            out = infer()
        out_key, out_bytes = _key(out), out.untyped_storage().nbytes()
        inplace = out_key in in_keys
    peak = tr.peak() - (0 if inplace else out_bytes)
    del out

    module.train(train_mode)
    pack = SavedStorages()
    # The training forward runs under the tracker too, so that what exists before the backward (the saved
    # tensors, the output) is known to it and views of them are not taken for new storages.
    with StorageTracker([*known, *inputs]) as tr:
        with FlopCounterMode(display=False) as fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = call()
        out_key, saved = _key(out), pack.live()
        result = {"fwd": fwd.get_total_flops(), "fwd_inference": fwd_inference.get_total_flops(), "peak": peak,
                  "inplace": inplace,
                  "inplace_in_training": out_key in in_keys,
                  "saves_input": bool(in_keys & saved.keys()), "saves_output": out_key in saved,
                  "saved": sum(v for k, v in saved.items() if k not in params | in_keys | {out_key}),
                  "params": sum(p.numel() for p in module.parameters()), "bwd": 0, "bwd_peak": 0}
        wrt = [t for t in inputs if t.requires_grad]
        if out.requires_grad:
            with FlopCounterMode(display=False) as bwd:
                out.backward(torch.ones((), dtype=out.dtype).expand_as(out), retain_graph=bool(wrt))
            result["bwd"] = bwd.get_total_flops()
            module.zero_grad(set_to_none=True)
            for t in inputs:
                t.grad = None
        if out.requires_grad and wrt:
            grad_out = torch.ones_like(out)  # a real, full-size incoming gradient, as inside a network
            tr.mark("backward")
            torch.autograd.grad(out, wrt, grad_outputs=grad_out, allow_unused=True)  # latent: unused; freed here
            tr.mark("end")
            result["bwd_peak"] = _net_peak(tr, "backward", "end")
    module.eval()
    return result


def check_op_cost(family, variant, b=2, n=64, dtype=torch.float32, mem_rtol=0.10,
                  flop_rtol=0.01, train_mode=True, **build):
    """Assert that op `family(variant)` built with `build` (make_op's arguments) costs what it declares. With
    mem_len (memory(xl)), it runs in steady state: a full memory of mem_len earlier inputs."""
    module, env, cost, ev = declared(family, variant, b, n, dtype=dtype, **build)
    x = make_input(env, b, n, dtype, grad=env.in_grad)  # in_grad=False: the model's own input
    m = measure_op(module, x, train_mode=train_mode, make_ctx=_memory_ctx(module, b, env, build, dtype))
    label = f"{family}({variant}) b={b} n={n} {build}"
    assert ev(cost.params) == m["params"], f"{label}: params {ev(cost.params)} != {m['params']}"
    for key in ("fwd", "fwd_inference", "bwd"):
        want, got = ev(cost_field(cost, key)), m[key]
        assert abs(want - got) <= flop_rtol * max(got, 1), f"{label}: {key} FLOPs declared {want}, measured {got}"
    assert cost.saves_input == m["saves_input"], f"{label}: saves_input declared {cost.saves_input}"
    assert cost.saves_output == m["saves_output"], f"{label}: saves_output declared {cost.saves_output}"
    assert cost.inplace == m["inplace"], f"{label}: inplace declared {cost.inplace}"
    assert cost.new_output_in_training != m["inplace_in_training"], f"{label}: inplace_in_training declared wrong"
    in_bytes = sum(t.untyped_storage().nbytes() for t in (x if isinstance(x, list) else [x]) if t.requires_grad)
    # bwd_peak defaults to the input's gradient; an op that is the identity in training passes its gradient on
    bwd_default = in_bytes if cost.new_output_in_training else 0
    for key in ("saved", "peak", "bwd_peak"):
        want = ev(getattr(cost, key)) if getattr(cost, key) is not None else bwd_default
        got = m[key]
        assert abs(want - got) <= mem_rtol * got, f"{label}: {key} bytes declared {want}, measured {got}"
    return m


def _memory_ctx(module, b, env, build, dtype):
    """A Ctx factory whose segment state holds a full memory (mem_len earlier inputs) for the module, or None."""
    if not build.get("mem_len"):
        return None
    from evodsl.ops import Ctx
    from evodsl.segments import SegmentState

    state = SegmentState()
    g = torch.Generator().manual_seed(5)
    state.memory[(id(module), ())] = torch.randn(b, build["mem_len"], env.d, generator=g, dtype=dtype)

    def make():
        ctx = Ctx()
        ctx.extra["segments"] = state
        return ctx

    return make
