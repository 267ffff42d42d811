"""PyTorch backend: lowers a validated Graph to an ordinary nn.Module tree, interpreting the nodes in order.

Module names follow the graph (`blocks.0.attn.q_proj.weight`). Weights are initialised deterministically from
`seed`; on the meta device no memory is allocated (inspect a 7B spec's structure and parameter count).
"""
from __future__ import annotations

import torch
from torch import nn

from evodsl.ir import Graph
from evodsl.ops.registry import Ctx


class GraphModule(nn.Module):
    """Runs one graph scope: each instruction is (value, kind, module name, input values)."""

    def __init__(self, graph: Graph):
        super().__init__()
        self._program: list[tuple] = []
        self._input = graph.input.name
        for n in graph.nodes[1:]:
            if n.kind == "call":
                self.add_module(n.module, n.op.module(n.params, n.meta["env"]))
            elif n.kind == "repeat":
                copies = 1 if n.shared else n.count
                self.add_module(n.module, Repeat([GraphModule(n.body) for _ in range(copies)], n.count))
        self._output = graph.output.inputs[0]
        last_use = {}
        for k, n in enumerate(graph.nodes[1:-1]):
            for i in n.inputs:
                last_use[i] = k
        for k, n in enumerate(graph.nodes[1:-1]):
            multi = n.kind == "call" and n.op.inputs == -1
            done = tuple(i for i in dict.fromkeys(n.inputs) if last_use[i] == k and i != self._output)
            self._program.append((n.name, n.kind, n.module, tuple(n.inputs), multi, done))

    def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        values = {self._input: x}
        for name, kind, module, inputs, multi, done in self._program:
            args = [values[i] for i in inputs]
            for i in done:  # drop each value at its last use, as eager code would
                del values[i]
            if kind == "add":
                values[name] = args[0] + args[1]
            elif multi or kind == "repeat":  # a Repeat takes the list and empties it: no reference stays here
                values[name] = getattr(self, module)(args, ctx)
            else:
                values[name] = getattr(self, module)(args[0], ctx)
        return values[self._output]


class Repeat(nn.ModuleList):
    """`count` applications of its bodies: one body per application, or a single shared body."""

    def __init__(self, bodies: list, count: int):
        super().__init__(bodies)
        self.count = count

    def forward(self, xs: list, ctx: Ctx) -> torch.Tensor:
        x = xs.pop()  # own the only reference: each copy's input is freed once the next copy has run
        for i in range(self.count):
            x = self[i % len(self)](x, ctx)
        return x


class EvoModel(GraphModule):
    """The compiled model. forward(input_ids [b, n]) -> logits [b, n, vocab] for LMs; features [b, n, d] in,
    the last op's output out otherwise. `aux_loss()` sums the ops' auxiliary losses (e.g. adaptive span)."""

    def __init__(self, graph: Graph, spec: str = "", file: str = ""):
        super().__init__(graph)
        self.spec, self.spec_file, self.graph_name = spec, file, graph.name
        self.input_kind = graph.input.variant
        self.input_shape, self.output_shape = tuple(graph.input.meta["shape"]), tuple(graph.output.meta["shape"])
        self.extra_inputs = extra_inputs(graph)  # the optional arguments it honours, after its input
        calls = [n for n in graph.nodes if n.kind == "call"]
        embed = next((n for n in calls if (n.family, n.variant) == ("embed", "token")), None)
        for n in calls:  # ops with tied=true share the token embedding's weight (validated by the shape pass)
            if getattr(n.params, "tied", False):
                getattr(self, n.module).tie(getattr(self, embed.module))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, n] (token ids, or features [b, n, d]); attention_mask [b, n], 1 for a token and 0 for
        padding, as HF models take it (all ones, or None: nothing is masked and the fused kernels run);
        token_type_ids [b, n] for embed(token, segments=k)."""
        mask = key_padding(attention_mask)
        return super().forward(input_ids, Ctx(mask=mask, right_padded=right_padded(mask),
                                              token_type_ids=token_type_ids))

    def aux_loss(self) -> torch.Tensor:
        losses = [m.aux_loss() for m in self.modules() if m is not self and hasattr(m, "aux_loss")]
        return torch.stack(losses).sum() if losses else torch.zeros(())


FORWARD_ARGS = ("input_ids", "attention_mask", "token_type_ids")  # EvoModel.forward's arguments, in order


def extra_inputs(graph: Graph) -> list[str]:
    """What the model takes after its input: attention_mask when every op honours padding (fnet refuses it),
    token_type_ids when an embed(token) has segments."""
    calls = list(graph.calls())
    names = ["attention_mask"] if all(c.op.padding for c in calls) else []
    if any((c.family, c.variant) == ("embed", "token") and c.params.segments for c in calls):
        names.append("token_type_ids")
    return names


def key_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """HF's attention_mask (1 = token, 0 = padding, any integer or bool dtype) as a bool [b, n] key mask, or
    None when nothing is padded (checked eagerly; while tracing or exporting the mask is always applied)."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
    return mask if _symbolic(mask) or not bool(mask.all()) else None


def right_padded(mask: torch.Tensor | None) -> bool:
    """Every row is tokens, then padding (checked eagerly; never assumed while tracing or exporting)."""
    if mask is None or _symbolic(mask):
        return False
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _symbolic(t: torch.Tensor) -> bool:
    """No values to read: tracing, compiling or exporting (the graph must hold for every mask), or meta."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting() or t.is_meta


def lower(graph: Graph, seed: int = 0, device=None, dtype=None, spec: str = "", file: str = "") -> EvoModel:
    device = torch.device(device) if device is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device is not None and device.type == "meta":
            with torch.device("meta"):
                model = EvoModel(graph, spec, file)
        else:
            model = EvoModel(graph, spec, file)
    if device is not None and device.type != "meta":
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
