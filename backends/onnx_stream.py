"""Exporting a model too large to copy: the graph traced without weights, the weights streamed into the file.

torch's ONNX exporter, given the module, holds about three more copies of the weights while it builds, folds and
writes the graph (BENCHMARKS.md). Here the same spec is lowered on the meta device (no storage), torch.export and
the dynamo exporter trace that (without the optimizer's constant folding, which would read the weights), and
each initializer of the traced graph is then given a lazy value that reads the real module's tensor of the same
name only when the file is written: one tensor at a time goes from the module to external data. The export
then holds the module's weights and the graph, nothing more. A weight the graph only transposes (a Linear's W,
read as W^T by MatMul) is written transposed and its Transpose node dropped, as the optimizer's constant folding
would have done: otherwise onnxruntime folds them when it loads the file, holding both layouts at once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evodsl import progress
from evodsl.ir import Graph

STREAM_FROM = 2 * 1024**3  # weights of 2 GiB and more: external data, streamed


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def write_streamed(module: torch.nn.Module, graph: Graph, args: tuple, dynamic, names: list, out_names: list,
                   tmp: Path, opset: int) -> None:
    """Write `module` as `tmp` + `tmp.data` (external data), its weights read one at a time."""
    import onnx_ir as ir

    from evodsl.backends.lower_torch import lower

    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    meta = lower(graph, device="meta", dtype=dtype).eval()
    meta_args = tuple(None if a is None else a.to("meta") for a in args)
    from evodsl.ops.position.rope import fused_rotary

    with fused_rotary(opset >= 23):  # RotaryEmbedding is an op from opset 23
        exported = torch.export.export(meta, meta_args, dynamic_shapes=dynamic, strict=False)
    program = torch.onnx.export(exported, meta_args, dynamo=True, opset_version=opset, input_names=names,
                                output_names=out_names, verbose=False, optimize=False)
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    graph_ir = program.model.graph
    total, written = len(graph_ir.initializers), [0]

    def counted(array):  # each weight read as the file is written: the export's long part, shown on a terminal
        written[0] += 1
        progress.step("writing weights", written[0], total)
        return ir.tensor(array)

    for name, init in list(graph_ir.initializers.items()):
        if name not in tensors:
            raise RuntimeError(f"the traced graph has an initializer {name!r} that the module does not hold")
        meta_value, source = init.const_value, tensors[name]
        if _only_transposed(init):  # a Linear's weight: stored as W^T, the Transpose node dropped
            _store_transposed(ir, graph_ir, init, source, counted)
            continue
        init.const_value = ir.LazyTensor(lambda t=source: counted(_numpy(t)), dtype=meta_value.dtype,
                                         shape=meta_value.shape, name=name)
    ir.save(program.model, str(tmp), external_data=tmp.name + ".data")
    for init in graph_ir.initializers.values():  # the graph's reference cycles would keep the module's tensors
        init.const_value = None  # alive (through the lazy values) until the next garbage collection


def _users(value) -> list:
    """The nodes that read `value` (onnx_ir's uses: Usage records, or (node, index) pairs in older versions)."""
    return [use.node if hasattr(use, "node") else use[0] for use in value.uses()]


def _only_transposed(value) -> bool:
    """Every use of the initializer is a 2-D Transpose (perm 1, 0): what the optimizer's constant folding would
    fold, and onnxruntime would otherwise fold at load, holding both layouts at once."""
    uses = _users(value)
    if not uses or len(value.shape) != 2:
        return False
    for node in uses:
        perm = node.attributes.get("perm")
        if node.op_type != "Transpose" or (perm is not None and list(perm.value) != [1, 0]):
            return False
    return True


def _store_transposed(ir, graph_ir, init, source: torch.Tensor, counted) -> None:
    """Replace each Transpose of `init` by one new initializer holding the transposed tensor (read lazily)."""
    name, meta_value = init.name, init.const_value
    shape = ir.Shape([meta_value.shape[1], meta_value.shape[0]])
    value = ir.Value(name=f"{name}.T", shape=shape, type=init.type)
    value.const_value = ir.LazyTensor(lambda t=source: counted(_numpy(t.t())), dtype=meta_value.dtype,
                                      shape=shape, name=value.name)
    graph_ir.register_initializer(value)
    for node in _users(init):
        node.outputs[0].replace_all_uses_with(value)
        graph_ir.remove(node, safe=True)
    del graph_ir.initializers[name]
