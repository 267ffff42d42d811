"""ONNX export of one decoding step (`evodsl export SPEC --step`): new tokens and the decoding state in, their
logits and the state after them out, so that generation runs in onnxruntime alone, one call per step.

    inputs   input_ids       int64 [batch, seq]             the new tokens (seq >= 1: a prompt, a chunk, one token)
             attention_mask  int64 [batch, past_seq + seq]  all ones: only its length is read (HF's convention:
                                                            it says where the new tokens sit); no padding
             past.{i}.key, past.{i}.value                   K/V of the i-th op that caches (program order)
             past.{i}.state, past.{i}.norm                  or its recurrent state (linear attention's S and z)
    outputs  logits          [batch, seq, vocab], then present.{i}.*: one per past.{i}.*, same order, the next state

A cache's names come from what it holds: tensors with an axis that grows with the tokens seen, or a pair of
one shape, are keys and values; a pair of two shapes is a recurrent state and its normaliser; anything else is
numbered. The first call (the prompt) is a step from the empty state: every axis named other than `batch` at 0
(no K/V yet), every other at its size, all zeros (linear attention's sums start at zero). So one graph serves
the prompt, chunks and single tokens, at every batch size and length.

`StepModule` wraps the model: it rebuilds a DecodeState from the flat tensors (the slot keys and their order
learnt from eager decodes) and runs `model.decode`. Every op reads the positions already seen from `ctx.offset`,
here attention_mask.shape[1] - input_ids.shape[1]: a symbolic int in torch.export, never a constant. torch.export
traces every length as 2 or more (sizes 0 and 1 it would fix), so a branch on `if start:` or `n > 1` takes its
general side (softmax attention's step then builds its causal mask, right at start 0 and for one token too).
The file is therefore checked in onnxruntime where the other sizes bite: a prompt from the empty state (past
0), one token, then a chunk, at another batch size than the traced one, every output against torch's decode.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evodsl.backends.lower_onnx import (OPSET, TWO_GB, ExportResult, check_memory, max_positions, move_into_place,
                                        write_onnx)
from evodsl.decode import DecodeState
from evodsl.diagnostics import Diagnostic, EvoError
from evodsl.ir import Graph

STEP_RTOL = 1e-3  # each output of onnxruntime within this share of its scale of torch's, or the export fails
CHECK_STEPS = (5, 1, 3)  # the check: a prompt of 5 tokens from the empty state, then one token, then a chunk of 3
# ops whose first call differs from the later ones (a prefix joined, or dropped, at the prompt only): two graphs
PROMPT_ONLY = {"cat": "joins its prefix (memory tokens) at the prompt only",
               "slice": "drops its prefix at the prompt only"}


@dataclass(frozen=True)
class CacheSlot:
    """What one op keeps between steps: its key in DecodeState.caches, and per tensor its name, its shape in
    the probe (batch 1) and the axis that grows with the tokens seen (None: a constant size)."""

    key: tuple
    names: tuple
    shapes: tuple
    seq_axes: tuple


@dataclass(frozen=True)
class StepLayout:
    """The decoding state as flat tensors: the caches in program order, each cache's tensors in its order."""

    slots: tuple

    def past_names(self) -> list[str]:
        return [f"past.{i}.{name}" for i, s in enumerate(self.slots) for name in s.names]

    def present_names(self) -> list[str]:
        return [name.replace("past.", "present.", 1) for name in self.past_names()]

    def seq_axes(self) -> list:
        return [axis for s in self.slots for axis in s.seq_axes]

    def state(self, past, seen) -> DecodeState:
        """A DecodeState that has seen `seen` tokens, holding the flat tensors `past`."""
        state, it = DecodeState(seen=seen), iter(past)
        for s in self.slots:
            state.caches[s.key] = tuple(next(it) for _ in s.names)
        return state

    def flat(self, state: DecodeState) -> list:
        return [t for s in self.slots for t in state.caches[s.key]]

    def empty(self, batch: int, dtype) -> list[np.ndarray]:
        """The state before the first token: no K/V (their axis at 0), zero sums."""
        return [np.zeros([batch if a == 0 else 0 if a == axis else n for a, n in enumerate(shape)], dtype=dtype)
                for s in self.slots for shape, axis in zip(s.shapes, s.seq_axes)]


def _names(tensors: tuple, axes: tuple) -> tuple:
    if len(tensors) == 2 and (any(a is not None for a in axes) or tensors[0].shape == tensors[1].shape):
        return ("key", "value")
    if len(tensors) == 2:
        return ("state", "norm")
    return tuple(str(j) for j in range(len(tensors)))


def step_layout(model) -> StepLayout:
    """Learn the state's layout from two eager decodes (1 and 2 tokens, batch 1): which slots, in which order,
    which tensors, and which of their axes grow with the tokens seen."""
    device = next(model.parameters()).device
    with torch.no_grad():
        one, two = (model.decode(torch.zeros(1, n, dtype=torch.long, device=device))[1].caches for n in (1, 2))
    slots = []
    for key, tensors in one.items():
        axes = tuple(next((a for a in range(t.dim()) if t.shape[a] != u.shape[a]), None)
                     for t, u in zip(tensors, two[key]))
        slots.append(CacheSlot(key, _names(tensors, axes), tuple(tuple(t.shape) for t in tensors), axes))
    return StepLayout(tuple(slots))


class StepModule(nn.Module):
    """forward(input_ids [b, k], attention_mask [b, past + k], *past) -> (logits [b, k, vocab], *present): one
    `model.decode` call over a state rebuilt from flat tensors."""

    def __init__(self, model: nn.Module, layout: StepLayout):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        seen = attention_mask.shape[1] - input_ids.shape[1]  # from the shapes: symbolic when exported
        logits, state = self.model.decode(input_ids, self.layout.state(past, seen))
        return (logits, *self.layout.flat(state))


def refusal(model, graph: Graph) -> EvoError | None:
    """Why this model has no step export (an EvoError to raise), or None. `model` may be on the meta device."""
    why = model.decodable()
    if why is not None:
        return EvoError([Diagnostic("E411", f"'{graph.name}' cannot decode: {why}",
                                    help="a step export needs a causal LM whose every op has a step form (evodsl "
                                         "ops --json lists each op's); export the whole model without --step")])
    if len(graph.inputs) > 1:
        return EvoError([Diagnostic(
            "E413", f"'{graph.name}' is an encoder-decoder: a step export takes a causal LM with one input",
            help="its first call runs the encoder and keeps every cross-attention's source K/V, a graph of its "
                 "own; decode it in torch (model.decode), or export the whole model without --step")])
    for n in graph.calls():
        if n.family in PROMPT_ONLY:
            return EvoError([Diagnostic(
                "E413", f"'{graph.name}' has no one-graph step: {n.op.id} {PROMPT_ONLY[n.family]}, so the prompt "
                        f"and the steps after it are different graphs",
                help="decode it in torch (model.decode, evodsl generate), or export the whole model without "
                     "--step")])
    return None


def export_step(model, graph: Graph, path, opset: int = OPSET) -> ExportResult:
    """Export one decoding step of `model` (built from `graph`) to `path`, check it (onnx checker, then
    onnxruntime against torch's decode from the empty state on), and move it into place."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    error = refusal(model, graph)
    if error is not None:
        raise error
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    check_memory(graph, param_bytes)
    cap = max_positions(graph)
    if cap is not None and cap < sum(CHECK_STEPS):
        raise EvoError([Diagnostic("E413", f"pos(learned, max_len={cap}) is too short to check a step export "
                                           f"({sum(CHECK_STEPS)} positions)", help="set max_len higher")])
    model.eval()
    layout = step_layout(model)
    names = ["input_ids", "attention_mask", *layout.past_names()]
    out_names = ["logits", *layout.present_names()]
    vocab = graph.input.params.vocab
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the example: 3 new tokens after a prompt of 5 (no size 0 or 1, which export fixes)
        _, state = model.decode(torch.randint(0, vocab, (2, 5), generator=g))
    args = (torch.randint(0, vocab, (2, 3), generator=g), torch.ones(2, 8, dtype=torch.long), *layout.flat(state))
    # lengths are free for torch.export to relate (a K cache's is the mask's minus seq) and bound (positions:
    # past + seq <= max_len); any that it would fix to one value is an error
    batch, free = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim.DYNAMIC
    dynamic = ({0: batch, 1: free}, {0: batch, 1: free},
               tuple({0: batch, **({axis: free} if axis is not None else {})} for axis in layout.seq_axes()))
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp = tmpdir / path.name
        external = param_bytes >= TWO_GB
        write_onnx(StepModule(model, layout), args, dynamic, names, out_names, tmp, opset, external, graph)
        proto = onnx.load(str(tmp), load_external_data=False)
        dims = _name_dims(proto, layout)
        _check_dynamic(dims, layout, graph)
        onnx.save(proto, str(tmp))  # the weights stay in their external file, if any
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            diff, scale, state_rel = _verify(session, model, layout, names, out_names, vocab)
        except EvoError:
            raise
        except Exception as err:  # noqa: BLE001 - checker and onnxruntime errors: one EvoError, no file
            raise EvoError([Diagnostic("E407", f"the exported ONNX step failed its own check: "
                                               f"{type(err).__name__}: {str(err).strip()[:300]}",
                                       help="no file was written; this is a bug in the ONNX lowering")]) from None
        size = move_into_place(tmpdir, path)
        return ExportResult(path, "input_ids", "logits", diff, scale, external, size, tuple(names),
                            tuple(out_names), dims, state_rel, opset)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _name_dims(proto, layout: StepLayout) -> dict:
    """Give the exporter's size symbols readable names in the file (batch, seq, past_seq; the length of a cache
    that keeps fewer than every token, a window's, past_{i}_seq), and return each input's and output's axes."""
    import sympy as sp

    def expr(dim):
        return sp.sympify(dim.dim_param) if dim.dim_param else sp.Integer(dim.dim_value)

    inputs = {vi.name: list(vi.type.tensor_type.shape.dim) for vi in proto.graph.input}
    b, s = expr(inputs["input_ids"][0]), expr(inputs["input_ids"][1])
    B, S, P = sp.Symbol("batch"), sp.Symbol("seq"), sp.Symbol("past_seq")
    new = {b: B, s: S}
    total = expr(inputs["attention_mask"][1])
    if (total - s).is_Symbol:  # past + seq, a K cache's length related to it
        new[total - s] = P
    elif total.is_Symbol:
        new[total] = P + S
    outputs = {vi.name: list(vi.type.tensor_type.shape.dim) for vi in proto.graph.output}
    names = iter(zip(layout.past_names(), layout.present_names()))
    for i, slot in enumerate(layout.slots):
        pairs = [(expr(inputs[before][axis]), expr(outputs[after][axis]))
                 for axis, (before, after) in zip(slot.seq_axes, names) if axis is not None]
        keeps_all = all(after - s == before for before, after in pairs)  # a K/V cache of every token seen
        name = P if keeps_all else sp.Symbol(f"past_{i}_seq")  # else its own length (a window's: <= w)
        new.update({before: name for before, _ in pairs if before.is_Symbol and before not in new})
    done = {}

    def rename(text: str) -> str:
        if text not in done:
            try:
                done[text] = str(sp.sympify(text).subs(new))
            except Exception:  # noqa: BLE001 - a size the exporter wrote in a form sympy does not read: as it is
                done[text] = text
        return done[text]

    outer = [*proto.graph.input, *proto.graph.output]
    for vi in [*outer, *proto.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = rename(dim.dim_param)
    return {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in outer}


def _check_dynamic(dims: dict, layout: StepLayout, graph: Graph) -> None:
    """Every axis that varies must be a symbol in the file: batch and seq everywhere, the caches' growing axes."""
    axes = {"input_ids": (0, 1), "attention_mask": (0, 1), "logits": (0, 1)}
    for name, axis in zip(layout.past_names(), layout.seq_axes()):
        axes[name] = axes[name.replace("past.", "present.", 1)] = (0,) if axis is None else (0, axis)
    fixed = [f"{name} axis {a} = {dims[name][a]}" for name, want in axes.items() for a in want
             if not isinstance(dims[name][a], str)]
    if fixed:
        raise EvoError([Diagnostic("E406", f"the exported step of '{graph.name}' holds at one size only: "
                                           f"{', '.join(fixed[:3])}",
                                   help="no file was written; report this with the spec, it is a gap in the "
                                        "step lowering")])


def _verify(session, model, layout: StepLayout, names: list, out_names: list, vocab: int):
    """onnxruntime's steps against torch's decode: a prompt from the empty state, then one token, then a chunk,
    each fed the state onnxruntime returned. Returns the logits' max abs difference and scale, and the largest
    difference of a state tensor relative to its own scale; a difference over STEP_RTOL is an error (E407)."""
    g, batch = torch.Generator().manual_seed(1), 3  # the export traced batch 2
    past = layout.empty(batch, torch.zeros(0, dtype=next(model.parameters()).dtype).numpy().dtype)
    state, diff, scale, state_rel = None, 0.0, 0.0, 0.0
    for k in CHECK_STEPS:
        ids = torch.randint(0, vocab, (batch, k), generator=g)
        with torch.no_grad():
            logits, state = model.decode(ids, state)
        feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, state.seen), dtype=np.int64),
                **dict(zip(names[2:], past))}
        got = session.run(None, feed)
        for name, have, want in zip(out_names, got, [logits, *layout.flat(state)]):
            want = want.float().numpy()
            if have.shape != want.shape:
                _differs(name, state.seen - k, k, f"shape {list(have.shape)}, torch's {list(want.shape)}")
            d, s = (float(np.abs(have - want).max()), float(np.abs(want).max())) if want.size else (0.0, 0.0)
            if d > STEP_RTOL * max(s, 1e-6):
                _differs(name, state.seen - k, k, f"max abs difference {d:.3g} at a scale of {s:.3g}")
            if name == "logits":
                diff, scale = max(diff, d), max(scale, s)
            else:
                state_rel = max(state_rel, d / max(s, 1e-30))
        past = got[1:]
    return diff, scale, state_rel


def _differs(name: str, seen: int, k: int, what: str):
    raise EvoError([Diagnostic("E407", f"the exported ONNX step differs from torch's decode in '{name}' ({k} new "
                                       f"tokens after {seen}): {what}",
                               help="no file was written; this is a bug in the step lowering")])


def describe(r: ExportResult) -> list[str]:
    """The CLI's summary: what was written (inputs and outputs, the caches grouped by layer) and the check."""
    data = " (+ external data)" if r.external_data else ""
    ins, outs = _grouped(r.input_names, r.dims), _grouped(r.output_names, r.dims)
    rel = r.max_abs_diff / max(r.output_scale, 1e-30)
    return [f"wrote {r.path}{data}: {r.bytes / 2**20:.1f} MiB, opset {r.opset}, one decoding step: inputs {ins} -> "
            f"outputs {outs}",
            f"checked: onnx.checker (full_check) ok; onnxruntime vs torch's decode, a prompt from the empty state "
            f"then 1 and 3 tokens: logits max abs difference {r.max_abs_diff:.3g} ({rel:.2g} of their scale "
            f"{r.output_scale:.3g}), state within {r.state_rel_diff:.2g} of its scale"]


def _grouped(names, dims: dict) -> str:
    """'past.{i}.key' [batch, 2, past_seq, 8] (i = 0..11): one entry per pattern of name and shape."""
    groups = {}
    for name in names:
        shape = "[" + ", ".join(map(str, dims[name])) + "]"
        m = re.fullmatch(r"(past|present)\.(\d+)\.(.+)", name)
        if m:  # a window's own axis, past_{i}_seq, is one pattern for every i
            shape = shape.replace(f"past_{m[2]}_seq", "past_{i}_seq")
        key = (f"{m[1]}.{{i}}.{m[3]}" if m else name, shape)
        groups.setdefault(key, []).append(int(m[2]) if m else None)
    out = []
    for (pattern, shape), idx in groups.items():
        if idx == [None]:
            out.append(f"'{pattern}' {shape}")
            continue
        run = idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 2
        out.append(f"'{pattern}' {shape} (i = {f'{idx[0]}..{idx[-1]}' if run else ', '.join(map(str, idx))})")
    return ", ".join(out)
