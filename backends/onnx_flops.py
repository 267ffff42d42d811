"""The matmul FLOPs of an exported ONNX file, read off its graph after ONNX shape inference at a fixed input
size: what tests/test_onnx.py holds against `evodsl cost` (the export runs the FLOPs the cost declares, or its own
form where the two differ, as each op's case says)."""
from __future__ import annotations

import ast
import operator

import numpy as np


def matmul_flops(path, batch: int, seq: int, decoder_seq: int | None = None) -> tuple[int, int]:
    """FLOPs of the MatMul and Gemm nodes of an exported model, read off the graph after ONNX shape inference
    with the input fixed at [batch, seq(, d)] (an encoder-decoder's decoder inputs at [batch, decoder_seq]) (2 per
    multiply-add, as FlopCounterMode). Returns (flops,
    number of matmuls whose shapes could not be inferred)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path), load_external_data=False)
    symbols = {}
    for inp in model.graph.input:  # input_ids (or features), attention_mask, token_type_ids: [batch, seq, ...]
        length = (decoder_seq or seq) if inp.name.startswith("decoder") else seq  # decoder_*: [batch, decoder_seq]
        for dim, value in zip(inp.type.tensor_type.shape.dim, (batch, length)):
            if dim.dim_param:
                symbols[dim.dim_param] = value
            dim.Clear()
            dim.dim_value = value
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output, *model.graph.initializer]:
        if isinstance(vi, onnx.TensorProto):
            shapes[vi.name] = list(vi.dims)
        else:
            dims = vi.type.tensor_type.shape.dim
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else _dim_value(d.dim_param, symbols)
                               for d in dims]
    total, unknown = 0, 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not a or not b or None in a or None in b:
            unknown += 1
            continue
        if node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            trans_b = any(at.name == "transB" and at.i for at in node.attribute)
            m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
            n = b[0] if trans_b else b[1]
            total += 2 * m * k * n
            continue
        a2, b2 = (a if len(a) > 1 else [1, *a]), (b if len(b) > 1 else [*b, 1])
        lead = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
        total += 2 * int(np.prod(lead, dtype=np.int64)) * a2[-2] * a2[-1] * b2[-1]
    return total, unknown


_DIM_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
            ast.Mod: operator.mod}
_DIM_FUNCS = {"Min": min, "Max": max, "PythonMod": operator.mod, "Mod": operator.mod,
              "FloorDiv": operator.floordiv}


def _dim_value(text: str, symbols: dict) -> int | None:
    """A dimension that the exporter wrote as torch's symbolic expression in the input's dims (e.g.
    '((seq + (PythonMod(-seq, Min(64, seq))))//Min(64, seq))', the chunks of causal linear attention, or 'seq'
    itself where ONNX shape inference cannot follow a Gather), evaluated at `symbols`; None if it is not one."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            return symbols[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _DIM_OPS:
            return _DIM_OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in _DIM_FUNCS and not node.keywords:
            return _DIM_FUNCS[node.func.id](*map(value, node.args))
        raise ValueError(text)

    if not text:
        return None
    try:
        return value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, KeyError, TypeError, ZeroDivisionError, RecursionError):
        return None
