"""PyTorch backend: lowers a validated Graph to an ordinary nn.Module tree, interpreting the nodes in order.

Module names follow the graph (`blocks.0.attn.q_proj.weight`). Weights are initialised deterministically from
`seed`; on the meta device no memory is allocated (inspect a 7B spec's structure and parameter count).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.utils.checkpoint
from torch import nn

from evodsl.backends.torch_reversible import ReversibleRepeat
from evodsl.backends.torch_state import ModelState, Seq2SeqState, _own, _shape_only
from evodsl.decode import DecodeState
from evodsl.init import apply as init_scheme
from evodsl.ir import Graph
from evodsl.ops.registry import Ctx, right_padded
from evodsl.ops.registry import is_symbolic as _symbolic
from evodsl.segments import SegmentState


class GraphModule(nn.Module):
    """Runs one graph scope: each instruction is (value, kind, module name, input values, ...). Its inputs are
    the scope's input nodes: a model's inputs, or a repeat body's input and the streams it reads."""

    def __init__(self, graph: Graph):
        super().__init__()
        self._program: list[tuple] = []
        self._inputs = [n.name for n in graph.inputs]
        nodes = graph.nodes[len(self._inputs):-1]
        for n in nodes:
            if n.kind == "call":
                self.add_module(n.module, n.op.module(n.params, n.meta["env"]))
            elif n.kind == "repeat":
                copies = 1 if n.shared else n.count
                bodies = [GraphModule(n.body) for _ in range(copies)]
                self.add_module(n.module, ReversibleRepeat(bodies, n.count, n.body) if n.reversible
                                else Repeat(bodies, n.count))
        for n in nodes:  # an op that sets up the branch it closes (residual(deepnorm): beta on its init)
            if n.kind == "call" and hasattr(getattr(self, n.module), "init_branch"):
                getattr(self, n.module).init_branch([(b.family, getattr(self, b.module)) for b in _branch(graph, n)])
        self._output = graph.output.inputs[0]
        self._reused = {n.name for n in nodes if n.meta.get("reused")}  # attention outputs a skip_reuse reads
        last_use = {}
        for k, n in enumerate(nodes):
            for i in n.inputs:
                last_use[i] = k
        for k, n in enumerate(nodes):
            multi = n.kind == "call" and n.op.inputs == -1
            done = tuple(i for i in dict.fromkeys(n.inputs) if last_use[i] == k and i != self._output)
            self._program.append((n.name, n.kind, n.module, tuple(n.inputs), multi, done))

    def forward(self, x: torch.Tensor, ctx: Ctx, *streams: torch.Tensor) -> torch.Tensor:
        values = dict(zip(self._inputs, (x, *streams)))
        del x, streams
        for name, kind, module, inputs, multi, done in self._program:
            given = self._enter(name, ctx)
            if given is not None:  # decoding: a stream computed once, at the prompt (its value, or SKIP)
                if given is not SKIP:
                    values[name] = given
                continue
            args = [values[i] for i in inputs]
            for i in done:  # drop each value at its last use, as eager code would
                del values[i]
            if kind == "add":
                values[name] = args[0] + args[1]
            elif multi or kind == "repeat":  # a Repeat takes the list and empties it: no reference stays here
                values[name] = getattr(self, module)(args, ctx)
            elif len(args) > 1:  # an op that reads streams: forward(x, ctx, *streams)
                values[name] = getattr(self, module)(args[0], ctx, *args[1:])
            else:
                values[name] = getattr(self, module)(args[0], ctx)
            self._leave(name, values[name], ctx)
            if name in self._reused:  # for the next mha(skip_reuse) in this stream (evodsl/passes/reuse.py)
                ctx.extra.setdefault("attn", {})[ctx.extra.get("stream")] = values[name]
        return values[self._output]

    def _enter(self, name: str, ctx: Ctx):
        """Before each node: a model with streams switches the padding mask where a stream begins; decoding, a
        stream computed at the prompt gives its value (or SKIP) instead of being run again."""

    def _leave(self, name: str, value: torch.Tensor, ctx: Ctx) -> None:
        """After each node: decoding keeps the value of a stream that is computed once."""


SKIP = object()  # _enter's answer for a node whose value is not needed again


def _branch(graph: Graph, n) -> list:
    """The call nodes between a residual op's skip (its second input) and its branch (its first), in order."""
    seen, todo = {n.inputs[1]}, [n.inputs[0]]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.node(name).inputs)
    return [m for m in graph.nodes if m.name in seen and m.kind == "call" and m.name != n.inputs[1]]


class Repeat(nn.ModuleList):
    """`count` applications of its bodies: one body per application, or a single shared body. Its inputs are
    the stream it transforms and the streams its body reads (the same for every copy)."""

    def __init__(self, bodies: list, count: int):
        super().__init__(bodies)
        self.count = count
        for i, body in enumerate(bodies):  # an op whose init depends on its layer (residual(admin)): its copy's index
            for m in body.children():
                if hasattr(m, "init_copy"):
                    m.init_copy(i)
        self.checkpoint = False  # evodsl.distributed.checkpoint: recompute each copy in backward

    def _body(self, i: int, x, ctx, streams):
        body = self[i % len(self)]
        if (self.checkpoint and torch.is_grad_enabled() and (ctx is None or ctx.cache is None)
                and not torch.jit.is_tracing() and not torch.compiler.is_exporting()):  # export: the plain graph
            return torch.utils.checkpoint.checkpoint(_replay(body, ctx), x, *streams, use_reentrant=False)
        return body(x, ctx, *streams)

    def forward(self, xs: list, ctx: Ctx) -> torch.Tensor:
        x, streams = xs[0], xs[1:]
        xs.clear()  # own the only reference: each copy's input is freed once the next copy has run
        shared = len(self) < self.count and ctx is not None and ctx.cache is not None
        outer = ctx.extra.get("copy", ()) if shared else ()
        for i in range(self.count):
            if shared:  # decoding: each application of the shared body keeps its own state
                ctx.extra["copy"] = (*outer, i)
            x = self._body(i, x, ctx, streams)
        if shared:
            ctx.extra["copy"] = outer
        return x


def _replay(body, ctx):
    """body(x, ctx, *streams) for checkpoint: the forward with ctx itself; the recomputation in backward with a
    copy of ctx as it was at the call (the ops after it have changed ctx since: the stream, the position table
    bound, the previous layer's scores)."""
    def snapshot(c):
        return replace(c, extra=dict(c.extra), streams=dict(c.streams))

    saved, calls = (None if ctx is None else snapshot(ctx)), []

    def run(x, *streams):
        now = ctx if not calls or saved is None else snapshot(saved)
        calls.append(1)
        return body(x, now, *streams)
    return run


class EvoModel(ModelState, GraphModule):
    """The compiled model. forward(input_ids [b, n]) -> logits [b, n, vocab] for LMs; features [b, n, d] in,
    the last op's output out otherwise. `aux_loss()` sums the ops' auxiliary losses (e.g. adaptive span)."""

    def __init__(self, graph: Graph, spec: str = "", file: str = ""):
        super().__init__(graph)
        self.spec, self.spec_file, self.graph_name = spec, file, graph.name
        first = graph.inputs[0]
        self.input_kind = first.variant
        self.input_shape, self.output_shape = tuple(first.meta["shape"]), tuple(graph.output.meta["shape"])
        self.input_shapes = {n.name: tuple(n.meta["shape"]) for n in graph.inputs}
        self.extra_inputs = extra_inputs(graph)  # the optional arguments it honours, after its input
        self.streams = [(st.name, st.causal) for st in graph.streams]
        self._causal_output = graph.streams[-1].causal if graph.streams else bool(graph.options.get("causal"))
        self._forms = [(n.op.id, n.op.decode_form(n.params)) for n in graph.calls()]
        # output lengths that end at the last token (the queries of slice(last=k): Perceiver AR)
        self._last_slices = {n.params.last for n in graph.calls() if n.op.id == "slice(seq)" and n.params.last}
        # decoding an encoder-decoder: the streams that do not read the target (the encoder) run once, at the
        # prompt; their last values are kept in the state (and their nodes skipped at every step)
        static = self._static = graph.static_streams()
        self._static_nodes = {n.name for n in graph.nodes if n.kind != "input" and n.meta.get("stream") in static}
        self._static_values = {st.value: st.name for st in graph.streams if st.name in static}
        self._writes = {st.value: st.writes for st in graph.streams if st.writes}  # value -> the memory it gives
        self._static_reads = [(n.op.id, n.params.kv) for n in graph.calls() if n.family == "xattn"
                              and n.params.kv not in static]
        # where each stream begins: (stream, where its mask comes from: ("input", arg) / ("stream", name) / None)
        masks = dict(zip([n.name for n in graph.inputs], MASK_ARGS))
        self._switch = {}
        # a stream with no op of its own (`x = input(...)`, `y = x`) has the mask of what it starts from: its
        # input's (set up front), or that of the stream it starts from (set as that stream ends)
        self._input_streams, self._same_mask = [], {}
        for st in graph.streams:
            begin = next((n.name for n in graph.nodes if n.kind != "input" and n.meta.get("stream") == st.name), None)
            src = (("input", masks[st.source[1]]) if st.source[0] == "input" else
                   ("stream", st.source[1]) if st.source[0] == "stream" else None)
            if begin is not None:
                self._switch[begin] = (st.name, src)
            elif src is not None and src[0] == "input":
                self._input_streams.append((st.name, src[1]))
            elif src is not None:
                self._same_mask.setdefault(src[1], []).append(st.name)
        calls = [n for n in graph.nodes if n.kind == "call"]
        embed = next((n for n in calls if (n.family, n.variant) == ("embed", "token")), None)
        for n in calls:  # ops with tied=true share the first token embedding's weight (checked by the shape pass)
            if getattr(n.params, "tied", False):
                getattr(self, n.module).tie(getattr(self, embed.module))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, n] (token ids, or features [b, n, d]); attention_mask [b, n], 1 for a token and 0 for
        padding, as HF models take it (all ones, or None: nothing is masked and the fused kernels run);
        token_type_ids [b, n] for embed(token, segments=k)."""
        return self._run([input_ids], {"attention_mask": attention_mask}, token_type_ids)

    def _run(self, inputs: list, masks: dict, token_type_ids=None, state: DecodeState | None = None,
             segments: SegmentState | None = None) -> torch.Tensor:
        masks = {k: key_padding(v) for k, v in masks.items()}
        first = masks.get("attention_mask")
        ctx = Ctx(mask=first, right_padded=right_padded(first), token_type_ids=token_type_ids, cache=state,
                  offset=state.seen if state is not None else 0)
        ctx.extra["masks"], ctx.extra["cache"], ctx.extra["segments"] = masks, state, segments
        for name, arg in self._input_streams:
            self._finish(ctx, name, masks.get(arg))
        if state is not None and state.seen:  # the masks of the streams computed at the prompt
            for key, value in state.kept.items():
                if isinstance(key, tuple) and key[0] == "mask":
                    ctx.streams[key[1]] = value
        return GraphModule.forward(self, inputs[0], ctx, *inputs[1:])

    def _finish(self, ctx: Ctx, stream: str, mask) -> None:
        """Record a finished stream's mask (for the ops that read it), and that of the streams that are it."""
        ctx.streams[stream] = (mask, right_padded(mask))
        for same in self._same_mask.get(stream, ()):
            self._finish(ctx, same, mask)

    def _enter(self, name: str, ctx: Ctx):
        if ctx.cache is not None and ctx.offset and name in self._static_nodes:  # computed at the prompt
            return ctx.cache.kept.get(name, SKIP)
        switch = self._switch.get(name)
        if switch is None:
            return None
        stream, src = switch
        prev = ctx.extra.get("stream")
        if prev is not None:
            self._finish(ctx, prev, ctx.mask)
        mask = (ctx.extra["masks"].get(src[1]) if src[0] == "input" else ctx.streams[src[1]][0]) if src else None
        if src is not None and src[0] == "input" and src[1] != "attention_mask":
            ctx.token_type_ids = None  # segments belong to the first input's tokens
        ctx.mask, ctx.right_padded = mask, right_padded(mask)
        ctx.extra["stream"] = stream
        ctx.cache = None if stream in self._static else ctx.extra.get("cache")  # an encoder runs as a forward
        return None

    def _leave(self, name: str, value: torch.Tensor, ctx: Ctx) -> None:
        segments = ctx.extra.get("segments")
        if segments is not None and name in self._writes:  # the next segment's value of a memory(rmt) stream
            segments.memory[self._writes[name]] = _own(value)
        state = ctx.extra.get("cache")
        if state is not None and not ctx.offset and name in self._static_values:  # the prompt: keep it, and its
            state.kept[name] = _shape_only(value)  # mask, for the steps after: the value itself is read again by
            # no op (cross-attention keeps its K/V), only its shape (cat)
            state.kept[("mask", self._static_values[name])] = (ctx.mask, ctx.right_padded)

    def input_modules(self) -> list[nn.Module]:
        """The modules that read the model's inputs (its embeddings; a latent array reads the batch size)."""
        inputs = set(self._inputs)
        return [getattr(self, module) for _, kind, module, args, *_ in self._program
                if kind == "call" and inputs & set(args)]

    def aux_loss(self) -> torch.Tensor:
        losses = [m.aux_loss() for m in self.modules() if m is not self and hasattr(m, "aux_loss")]
        return torch.stack(losses).sum() if losses else torch.zeros(())


class EvoSeq2SeqModel(Seq2SeqState, EvoModel):
    """A model with two inputs (an encoder-decoder): forward(input_ids [b, n], decoder_input_ids [b, m])
    -> the output of its last stream, logits [b, m, vocab] for an LM."""

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,  # noqa: D417
                attention_mask: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, n] the source, decoder_input_ids [b, m] the target; attention_mask [b, n] and
        decoder_attention_mask [b, m]: 1 for a token, 0 for padding (None: nothing padded)."""
        return self._run([input_ids, decoder_input_ids],
                         {"attention_mask": attention_mask, "decoder_attention_mask": decoder_attention_mask})


MASK_ARGS = ("attention_mask", "decoder_attention_mask")  # the padding mask of each input, in order


def forward_args(graph: Graph) -> tuple[str, ...]:
    """The model's forward arguments, in order."""
    if len(graph.inputs) > 1:
        return ("input_ids", "decoder_input_ids", "attention_mask", "decoder_attention_mask")
    return FORWARD_ARGS


FORWARD_ARGS = ("input_ids", "attention_mask", "token_type_ids")  # a one-input model's forward arguments


def extra_inputs(graph: Graph) -> list[str]:
    """What the model takes after its input: (decoder_input_ids,) attention_mask (decoder_attention_mask) when
    every op honours padding (fnet refuses it), token_type_ids when an embed(token) has segments."""
    calls = list(graph.calls())
    padding = all(c.op.padding for c in calls)
    if len(graph.inputs) > 1:
        return ["decoder_input_ids", *(MASK_ARGS if padding else ())]
    names = ["attention_mask"] if padding else []
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


def lower(graph: Graph, seed: int = 0, device=None, dtype=None, spec: str = "", file: str = "") -> EvoModel:
    """The graph's module, weights drawn from `seed`. A float16 or bfloat16 model draws them in that dtype, so
    that no float32 copy of the weights is ever held (a 7B model in float16: 13.5 GB, not 27 GB on the way)."""
    device = torch.device(device) if device is not None else None
    cls = EvoSeq2SeqModel if len(graph.inputs) > 1 else EvoModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device is not None and device.type == "meta":
            with torch.device("meta"):
                model = cls(graph, spec, file)
        elif dtype in (torch.float16, torch.bfloat16):
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                model = cls(graph, spec, file)
            finally:
                torch.set_default_dtype(default)
        else:
            model = cls(graph, spec, file)
        if "init" in graph.options and not (device is not None and device.type == "meta"):
            init_scheme(model, graph, graph.options["init"])  # the spec's init=: evodsl/init.py, same seed
    if device is not None and device.type != "meta":
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
