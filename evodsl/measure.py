"""Measured costs, to hold `evodsl cost` to account: FLOPs by torch's FlopCounterMode and activation memory by a
storage-level tracker (a TorchDispatchMode that sees every tensor an op creates, forward and backward).

FlopCounterMode (torch 2.13) has no formula for the CPU flash-attention kernel that
F.scaled_dot_product_attention runs on CPU; `register_cpu_sdpa_flops()` adds
aten._scaled_dot_product_flash_attention_for_cpu and its backward, with torch's own SDPA counting.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
CPU_SDPA = aten._scaled_dot_product_flash_attention_for_cpu
CPU_SDPA_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward


def register_cpu_sdpa_flops() -> None:
    """Teach FlopCounterMode the CPU SDPA kernels (idempotent)."""
    if CPU_SDPA in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(CPU_SDPA)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(CPU_SDPA_BACKWARD)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


class SavedStorages:
    """A saved-tensor pack hook that records the storages autograd keeps for backward. It holds a weak
    reference to each, so a storage freed during the forward (a saved tensor of a graph branch the forward
    dropped) cannot have its address reused by a later tensor and be taken for a saved one; `live()` is what
    is still kept when the forward ends."""

    def __init__(self):
        self._refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        self._refs[ref.cdata] = (ref, storage.nbytes())
        return t

    def live(self) -> dict[int, int]:
        """Storage key (cdata) -> bytes, for the saved storages still alive."""
        return {key: nbytes for key, (ref, nbytes) in self._refs.items() if not ref.expired()}


def _ones_like_output(out: torch.Tensor) -> torch.Tensor:
    """A stride-0 gradient of ones: backward starts without a full-size gradient buffer."""
    return torch.ones((), dtype=out.dtype, device=out.device).expand_as(out)


def _args(x) -> list:
    """A model's inputs: one tensor, or a list (an encoder-decoder's source and target)."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def count_flops(model: torch.nn.Module, x, train: bool = False) -> dict:
    """{"forward": FLOPs, "backward": FLOPs} of one call, as FlopCounterMode counts them."""
    register_cpu_sdpa_flops()
    with flop_counter.FlopCounterMode(display=False) as fwd:
        with torch.set_grad_enabled(train):
            out = model(*_args(x))
    result = {"forward": fwd.get_total_flops(), "backward": 0}
    if train:
        with flop_counter.FlopCounterMode(display=False) as bwd:
            out.backward(_ones_like_output(out))
        result["backward"] = bwd.get_total_flops()
    return result


class StorageTracker(TorchDispatchMode):
    """Records when each new storage is created and when it dies; params and inputs are not counted.

    A storage's death is recorded when it happens, by a weak reference's callback on its Python object (torch keeps
    that object alive as long as the storage itself, views and autograd's saved tensors included): the cost of
    tracking is constant per storage. Polling every live storage at every op instead costs the number alive per op,
    quadratic in the length for a loop over tokens whose outputs all stay alive (rnn(rfwp), rnn(sru)'s light form)."""

    def __init__(self, exclude=()):
        super().__init__()
        self.excluded = {StorageWeakRef(t.untyped_storage()).cdata for t in exclude}
        self.live: dict[int, tuple] = {}  # cdata -> (weakref with the callback, nbytes)
        self.events: list[tuple[int, int]] = []  # (cdata, +nbytes | -nbytes)
        self.marks: dict[str, int] = {}

    def _died(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.events.append((key, -entry[1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = StorageWeakRef(st).cdata
                if key not in self.excluded and key not in self.live:
                    self.live[key] = (weakref.ref(st, lambda _, key=key: self._died(key)), st.nbytes())
                    self.events.append((key, st.nbytes()))
        return out

    def mark(self, name: str) -> None:
        self.marks[name] = len(self.events)

    def peak(self, start: int = 0, end: int | None = None, ignore=frozenset()) -> int:
        """Largest live total within events[start:end], not counting storages in `ignore`."""
        cur = best = 0
        for i, (key, delta) in enumerate(self.events[: end if end is not None else len(self.events)]):
            if key in ignore:
                continue
            cur += delta
            if i >= start:
                best = max(best, cur)
        return best

    def live_at(self, mark: str, ignore=frozenset()) -> int:
        return sum(d for k, d in self.events[: self.marks[mark]] if k not in ignore)


@dataclass
class MemoryMeasurement:
    inference_peak: int  # bytes: peak of new tensors during a no-grad forward (output included)
    training_saved: int  # bytes alive at the end of a grad-recording forward: kept for backward, plus output
    training_peak: int  # bytes: peak over forward + backward through the activations (no parameter gradients)


def measure_memory(model: torch.nn.Module, x) -> MemoryMeasurement:
    """x: the model's input, or a list of them. The backward is taken with respect to the outputs of the
    modules that read the inputs (model.input_modules(), else the first child): through every activation. Where
    those modules have no parameters (mixer(fnet) first), their outputs need no grad: the backward is then taken
    with respect to the floating inputs, which stand for the upstream layers' outputs in a real model."""
    xs = _args(x)
    firsts = model.input_modules() if hasattr(model, "input_modules") else [next(iter(model.children()))]
    if not any(p.requires_grad for m in firsts for p in m.parameters()):
        xs = [t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t for t in xs]
    exclude = [*model.parameters(), *model.buffers(), *xs]
    was_training = model.training
    model.eval()  # inference: dropout off, as deployed
    with torch.no_grad(), StorageTracker(exclude) as tr:
        out = model(*xs)
        del out
        tr.mark("end")
    inference = tr.peak()
    model.train()  # training: dropout on, as in a training step

    # Backward with respect to activations only: the forward saves exactly what training saves (the parameters
    # require grad), but no parameter gradient is computed, so what is measured is activation memory alone.
    captured, pack = [], SavedStorages()
    hooks = [m.register_forward_hook(lambda mod, args, out: captured.append(out)) for m in firsts]
    try:
        with StorageTracker(exclude) as tr:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(*xs)
            tr.mark("forward")
            saved = pack.live().keys()
            # the anchors we differentiate against are alive only because we hold them, unless autograd keeps them
            anchors = {StorageWeakRef(t.untyped_storage()).cdata for t in captured}
            pinned = anchors - saved
            wrt = [t for t in captured if t.requires_grad] or [t for t in xs if torch.is_tensor(t) and t.requires_grad]
            torch.autograd.grad(out, wrt, grad_outputs=_ones_like_output(out), allow_unused=True)
            del out
            captured.clear()
            tr.mark("end")
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return MemoryMeasurement(inference, tr.live_at("forward", pinned), tr.peak(ignore=pinned))
