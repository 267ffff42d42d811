"""Training a compiled model on several devices, planned from its IR: DDP, FSDP2, tensor parallelism, and
activation checkpointing per block.

    model = evodsl.compile(spec)                    # or evodsl.compile(spec, checkpoint=True)
    model = evodsl.distributed.ddp(model)           # DistributedDataParallel, as is
    model = evodsl.distributed.fsdp(model, mesh)    # FSDP2: one unit per repeat copy, embedding + tied head
    model = evodsl.distributed.tensor_parallel(model, mesh)   # Megatron-style q/k/v | o, up/gate | down
    evodsl.distributed.checkpoint(model)            # recompute each repeat copy in backward

Each reads the graph the model was compiled from (`evodsl.parse(model.spec, model.overrides)`): the units FSDP
shards are the IR's repeat copies, the layers TP shards are its attention and FFN ops, and an op TP cannot
shard is refused (EvoError E420) naming it, where it is in the spec, and why. A process group must be set up
first (torch.distributed.init_process_group); tests/test_distributed.py proves each against one process.
"""
from __future__ import annotations

from torch import nn

from .diagnostics import Diagnostic, EvoError

# ops tensor parallelism shards: (family, variant) -> (column-parallel linears, row-parallel linears)
TP_ATTENTION = {("mha", "softmax"), ("mha", "local")}
GATED = ("glu", "bilinear", "reglu", "geglu", "geglu_tanh", "swiglu")  # ffn/glu.py's variants: GatedFFN
TP_FFN = {("ffn", "mlp"): (("up_proj",), "down_proj"),
          **{("ffn", v): (("gate_proj", "up_proj"), "down_proj") for v in GATED}}
# families whose ops run replicated under TP (per-position weights of size d, no heads, no hidden width)
TP_REPLICATED = {"input", "embed", "pos", "norm", "head", "dropout", "residual", "slice", "cat", "merge"}
# attention params that change the kernel away from plain SDPA / the band (per-head tensors, explicit scores)
TP_MODIFIERS = ("softcap", "sink_logit", "sinks", "talking", "collab")


def graph_of(model):
    """The validated graph a compiled model was built from."""
    from . import parse

    return parse(model.spec, getattr(model, "overrides", None) or None)


def ops(graph, prefix: str = ""):
    """(module path, node) of every op call, repeat copies unrolled (a shared body once): blocks.0.attn, ..."""
    for node in graph.nodes:
        if node.kind == "call":
            yield prefix + node.module, node
        elif node.kind == "repeat":
            for i in range(1 if node.shared else node.count):
                yield from ops(node.body, f"{prefix}{node.module}.{i}.")


def repeat_units(model) -> list[tuple[str, nn.Module]]:
    """(name, module) of every repeat copy, innermost first (a shared body is not a unit: it runs count times)."""
    from .backends.lower_torch import Repeat

    units = []
    for name, mod in model.named_modules():
        if isinstance(mod, Repeat) and len(mod) == mod.count:
            units += [(f"{name}.{i}", body) for i, body in enumerate(mod)]
    return units[::-1]


def _refuse(code: str, node, message: str, help: str, source: str) -> EvoError:  # noqa: A002
    return EvoError([Diagnostic(code, message, span=getattr(node, "span", None), help=help)], source)


# -------------------------------------------------------------------- DDP


def ddp(model, **kwargs):
    """torch.nn.parallel.DistributedDataParallel over the model (its parameters on this rank's device, as
    DDP requires). The wrapper keeps the model's forward(input_ids, attention_mask=None, ...) and its
    `aux_loss()`; pass find_unused_parameters=True for a model with an op whose weights some forward skips."""
    from torch.nn.parallel import DistributedDataParallel

    class EvoDDP(DistributedDataParallel):
        def aux_loss(self):
            return self.module.aux_loss()

    return EvoDDP(model, **kwargs)


# -------------------------------------------------------------------- FSDP2


def fsdp(model, mesh=None, **fully_shard_kwargs):
    """FSDP2 (torch.distributed.fsdp.fully_shard) per unit the IR knows (fsdp_units): each copy of every repeat's
    body, the token embedding with the embeddings and head tied to it (one unit, as they share a weight), an
    untied head on its own, and the rest at the root. Returns the model (sharded in place). A model with an auxiliary loss (adaptive
    span) is refused (E422): aux_loss() reads parameters outside the forward."""
    from torch.distributed.fsdp import fully_shard

    graph = graph_of(model)
    aux = [(p, n) for p, n in ops(graph) if hasattr(model.get_submodule(p), "aux_loss")]
    if aux:  # FSDP2 reshards after the forward: aux_loss() would read a shard
        raise EvoError([Diagnostic("E422", f"fsdp() cannot shard {n.op.id} at {p}: its aux_loss() reads its "
                                           "parameters after the forward, when FSDP has resharded them",
                                   span=getattr(n, "span", None), help="train this spec with ddp()")
                        for p, n in aux], graph.source)
    for unit in fsdp_units(model):
        fully_shard([model.get_submodule(p) for p in unit] if len(unit) > 1 else model.get_submodule(unit[0]),
                    mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def fsdp_units(model) -> list[list[str]]:
    """The module paths fsdp() shards together, in the order it shards them (the root last, not listed): each
    repeat copy, innermost first; the first token embedding with every embedding and head that shares its
    weight (tied=true); each other embedding or head with weights of its own."""
    units = [[name] for name, _ in repeat_units(model)]
    top = [(p, n) for p, n in ops(graph_of(model)) if "." not in p and n.family in ("embed", "head")
           and any(True for _ in model.get_submodule(p).parameters())]
    first = next((p for p, n in top if (n.family, n.variant) == ("embed", "token")), None)
    weight = getattr(model.get_submodule(first), "weight", None) if first else None
    tied = [p for p, _ in top if weight is not None and getattr(model.get_submodule(p), "weight", None) is weight]
    return units + ([tied] if tied else []) + [[p] for p, _ in top if p not in tied]


# -------------------------------------------------------------------- tensor parallelism


def tp_plan(model, size: int) -> dict:
    """{module path: ColwiseParallel() | RowwiseParallel()} for the graph's attention and FFN ops, with the
    attention modules' local head counts [(path, heads, kv_heads)], or EvoError (E420) listing every op that
    cannot be split `size` ways."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan, heads, problems = {}, [], []
    graph = graph_of(model)
    for path, node in ops(graph):
        key, p, env = (node.family, node.variant), node.params, node.meta.get("env")
        why = None
        if key in TP_ATTENTION:
            mods = [m for m in TP_MODIFIERS if getattr(p, m, None)]
            kv = p.kv_heads or p.heads
            if mods:
                why = f"its {', '.join(mods)}= option has per-head weights or scores across heads"
            elif env is not None and (env.residual_scores or env.memory):
                why = "it reads another layer's scores or a segment memory (residual scores, memory(xl))"
            elif env is not None and env.pos is not None and env.pos[0].variant not in ("rope", "xpos"):  # per channel
                why = f"its position scheme pos({env.pos[0].variant}) adds per-head terms to the scores"
            elif p.heads % size or kv % size:
                why = f"heads={p.heads} and kv_heads={kv} must both divide by the {size} ranks"
            else:
                plan.update({f"{path}.{k}": ColwiseParallel() for k in ("q_proj", "k_proj", "v_proj")})
                plan[f"{path}.o_proj"] = RowwiseParallel()
                heads.append((path, p.heads // size, kv // size))
        elif key in TP_FFN:
            cols, row = TP_FFN[key]
            width = getattr(model.get_submodule(f"{path}.{row}"), "in_features", 0)
            if width % size:
                why = f"its hidden width {width} must divide by the {size} ranks"
            else:
                plan.update({f"{path}.{c}": ColwiseParallel() for c in cols})
                plan[f"{path}.{row}"] = RowwiseParallel()
        elif node.family not in TP_REPLICATED:
            why = ("tensor parallelism splits only mha(softmax), mha(local), ffn(mlp) and the gated "
                   "FFNs (glu, swiglu, geglu, ...); no plan shards this op's weights")
        if why is not None:
            problems.append(Diagnostic("E420", f"tensor parallelism cannot split {node.op.id} at {path}: {why}",
                                       span=getattr(node, "span", None),
                                       help="train this spec with fsdp() or ddp(), or change the op"))
    if problems:
        raise EvoError(problems, graph.source)
    return {"plan": plan, "heads": heads}


def tensor_parallel(model, mesh):
    """Megatron-style tensor parallelism over a 1-D DeviceMesh, planned from the graph: q/k/v and the FFN's
    up (and gate) projections column-parallel, the attention output and FFN down projections row-parallel
    (one all-reduce per op), each attention module left with heads / size and kv_heads / size local heads;
    everything else (embeddings, norms, head) replicated. Every rank takes the same batch. Returns the model."""
    from torch.distributed.tensor.parallel import parallelize_module

    planned = tp_plan(model, mesh.size())
    for path, heads, kv_heads in planned["heads"]:
        attn = model.get_submodule(path)
        attn.heads, attn.kv_heads = heads, kv_heads
    return parallelize_module(model, mesh, planned["plan"])


# -------------------------------------------------------------------- activation checkpointing


def checkpoint(model, enabled: bool = True):
    """Recompute each repeat copy in backward (torch.utils.checkpoint, use_reentrant=False): a training forward
    keeps each copy's input instead of everything its ops save; backward runs each copy's forward again
    (one more forward of the blocks). Only where grad is recorded; decoding and no-grad forwards run as is.
    The recomputation sees the per-call state (Ctx) as it was at the call. Refused (E421) for a spec whose blocks
    hand their scores to the next (residual(..., scores=true)): those would stay alive for every block."""
    from .backends.lower_torch import Repeat

    if enabled:
        graph = graph_of(model)
        for path, node in ops(graph):
            env = node.meta.get("env")
            if env is not None and getattr(env, "residual_scores", False):
                raise _refuse("E421", node, f"cannot checkpoint the blocks of this spec: {node.op.id} at {path} "
                                            "hands its [b, h, n, n] scores to the next block, so every block's "
                                            "would be kept for the recomputation (no saving)",
                              "train it without checkpoint=", graph.source)
    for mod in model.modules():
        if isinstance(mod, Repeat):
            mod.checkpoint = enabled
    return model
