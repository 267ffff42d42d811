"""Initialisation schemes: how a model's weights start, chosen in the spec, `model m(init=gpt2) = ...`.

The torch backend builds every op with its own init (torch's defaults: Linear kaiming-uniform, the ops' tables
N(0, 0.02)); a scheme then redraws, from the same seed, the weights it names, in graph order. Every scheme leaves
norms, scale ops (rezero's alpha, layerscale's lambda, admin's omega) and any parameter an op holds outside an
nn.Linear as built, unless listed below. Biases of the linears a scheme redraws are set to 0.

  default   torch's, as built (the same as writing no init).
  gpt2      (Radford et al. 2019; HF GPT2PreTrainedModel._init_weights): every linear weight, the token embedding,
            learned positions and an untied LM head ~ N(0, 0.02); the linear each residual branch ends with (the
            attention's o_proj, the FFN's down_proj) ~ N(0, 0.02 / sqrt(N)), N the residual additions on the
            model unrolled (2L in a GPT-2 stack of L layers: the paper's 1/sqrt(N) for N residual layers);
            pos(t5_bias)'s table as built.
  t5        (HF T5PreTrainedModel._init_weights, factor 1): token embedding and an untied LM head ~ N(0, 1);
            attention q_proj ~ N(0, (d_in d_head)^-1/2), k_proj, v_proj ~ N(0, d_in^-1/2), o_proj ~ N(0,
            (h d_head)^-1/2); FFN linears ~ N(0, fan_in^-1/2) (d^-1/2 in, d_ff^-1/2 out); the relative-bias table
            (pos(t5_bias)) ~ N(0, d^-1/2); pos(learned) as built. As one rule: every linear ~ N(0, fan_in^-1/2), q_proj also divided by
            sqrt(d_head) (Mesh TensorFlow folds the attention's 1/sqrt(d_head) into q's init). Other linears
            (an op's own projections) take the same fan-in rule.
  deepnorm  (Wang et al. 2022, DeepNet, the paper's pseudocode): every linear weight Xavier-normal, gain beta for
            the FFN linears and the attentions' v_proj and o_proj, gain 1 for q_proj, k_proj and the others.
            beta is the one of the residual(deepnorm) that closes the branch (so that init=deepnorm with
            residual(deepnorm) is the paper's init, where the residual op alone scales torch's init by beta as
            torchscale does); in a branch no residual(deepnorm) closes, beta = (8N)^(-1/4), N = L the layers
            (half the residual additions). It is not applied twice: the residual op's own scaling is replaced.
  ds_init   (Zhang, Titov & Sennrich 2019, 1908.11365, eq. 8: DS-Init): every linear weight of layer l ~
            U(-a, a), a = alpha gamma / sqrt(l), gamma = sqrt(6 / (d_in + d_out)) (Xavier-uniform's bound); alpha
            (the paper's hyperparameter, 1 by default) in (0, 10]. l is the 1-based index of the layer: the copy
            of the repeat(...) holding the weight, counted along its stream (a second repeat in the same stream
            continues the count; an encoder's and a decoder's stacks count from 1 each, as the paper's; nested
            repeats: outer copy j, inner copy i of c -> j c + i + 1); a linear outside any repeat has l = 1.
            Embeddings are kept as built (the paper scales the layers).
  ngpt      (Loshchilov et al. 2024, nGPT): the built weights, every matrix made unit-norm along its d_model axis
            (ngpt_normalize_ below, which a training loop calls after each optimiser step).

With gpt2, t5 and ds_init, a residual(deepnorm) in the model still scales its branch by beta afterwards (its
documented torchscale form, on whatever init the branch has). A shared repeat has one body: its weights are drawn
once, for its first copy (ds_init: l of the first copy). Loading weights afterwards (a checkpoint, an artifact)
overrides any scheme. `evodsl cost` is unaffected (an init changes no shape).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from .ops.registry import OpParams


class NoInitParams(OpParams):
    pass


class DsInitParams(OpParams):
    alpha: float = Field(1.0, gt=0, le=10, description="the paper's alpha: the bound's scale")


SCHEMES = {"default": NoInitParams, "gpt2": NoInitParams, "t5": NoInitParams, "deepnorm": NoInitParams,
           "ds_init": DsInitParams, "ngpt": NoInitParams}

_INTO_D = ("o_proj", "down_proj")  # linears writing the d_model stream: their columns are the vectors in R^d


@torch.no_grad()
def ngpt_normalize_(model: nn.Module) -> nn.Module:
    """nGPT's weight normalisation (2410.01131, section 2.6; the authors' normalize_matrices), to call after each
    optimiser step: every matrix made unit-norm along its d_model axis: a linear reading the stream (q, k, v, the
    FFN's up/gate) row by row (each row a vector in R^d), one writing it (o_proj, down_proj) column by column, every
    other 2-D parameter (the token embedding, the LM head's table) row by row. Vectors (gains, scales, alpha) are
    left as they are. Returns the model."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            w.copy_(torch.nn.functional.normalize(w, dim=0 if name.split(".")[-1] in _INTO_D else 1))
        else:
            for p in m.parameters(recurse=False):
                if p.dim() == 2:
                    p.copy_(torch.nn.functional.normalize(p, dim=-1))
    return model


@dataclass(frozen=True)
class InitChoice:
    """A model's init scheme and its parameters; prints as the spec writes it (`gpt2`, `ds_init(alpha=0.5)`)."""

    name: str
    params: OpParams

    def __str__(self) -> str:
        given = self.params.model_dump(exclude_defaults=True)
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in given.items())})" if given else self.name


def choice(name: str, kwargs: dict) -> InitChoice:
    """The scheme `name` with `kwargs`; KeyError for an unknown scheme, ValidationError for bad parameters."""
    return InitChoice(name, SCHEMES[name](**kwargs))


@dataclass
class _Unit:
    """One op's module in the unrolled model: its graph node, module, layer (None outside a repeat), and the
    beta of the residual(deepnorm) closing its branch (None where none does)."""

    node: object
    module: nn.Module
    layer: int | None
    beta: float | None


def _units(gm, graph, layer, offsets, out):
    betas = {}
    for n in graph.nodes:
        if n.kind == "call" and n.op.id == "residual(deepnorm)":
            from .backends.lower_torch import _branch

            beta = getattr(gm, n.module).beta
            betas.update({b.name: beta for b in _branch(graph, n)})
    for n in graph.nodes:
        if n.kind == "call":
            out.append(_Unit(n, getattr(gm, n.module), layer, betas.get(n.name)))
        elif n.kind == "repeat":
            rep, key = getattr(gm, n.module), n.meta.get("stream")
            base = offsets.get(key, 0) if layer is None else (layer - 1) * n.count
            for i, body in enumerate(rep):  # a shared repeat: one body, the first copy's layer
                _units(body, n.body, base + i + 1, {}, out)
            if layer is None:
                offsets[key] = base + n.count


def _residual_adds(graph) -> int:
    own = sum(n.kind == "add" or (n.kind == "call" and n.family == "residual" and n.op.inputs == 2)
              for n in graph.nodes)
    return own + sum(n.count * _residual_adds(n.body) for n in graph.nodes if n.kind == "repeat")


def _linears(m: nn.Module):
    return [(name, lin) for name, lin in m.named_modules() if isinstance(lin, nn.Linear)]


def _zero_bias(lin: nn.Linear) -> None:
    if lin.bias is not None:
        lin.bias.zero_()


def _table(u: _Unit):
    """An op's embedding-like table (embed(token)'s, an untied head(lm)'s, pos(learned)'s, pos(t5_bias)'s), or
    None."""
    if u.node.op.id in ("embed(token)", "head(lm)", "pos(learned)", "pos(t5_bias)"):
        w = getattr(u.module, "weight", None)
        return w if isinstance(w, nn.Parameter) else None
    return None


@torch.no_grad()
def apply(model: nn.Module, graph, init: InitChoice) -> None:
    """Redraw `model`'s weights (built from `graph`) by the scheme `init`."""
    if init.name == "default":
        return
    if init.name == "ngpt":  # the built weights, each matrix on the unit sphere along its d_model axis
        ngpt_normalize_(model)
        return
    units: list[_Unit] = []
    _units(model, graph, None, {}, units)
    n_res = max(1, _residual_adds(graph))
    for u in units:
        fam = u.node.family
        for name, lin in _linears(u.module):
            w, last = lin.weight, name.split(".")[-1]
            fan_out, fan_in = w.shape
            if init.name == "gpt2":
                w.normal_(0.0, 0.02 / math.sqrt(n_res) if last in ("o_proj", "down_proj") else 0.02)
            elif init.name == "t5":
                head_dim = getattr(u.module, "head_dim", 1) if last == "q_proj" else 1
                w.normal_(0.0, (fan_in * head_dim) ** -0.5)
            elif init.name == "deepnorm":
                beta = u.beta if u.beta is not None else (8 * max(1, n_res // 2)) ** -0.25
                scaled = fam == "ffn" or (fam in ("mha", "xattn") and last in ("v_proj", "o_proj"))
                nn.init.xavier_normal_(w, gain=beta if scaled else 1.0)
            else:  # ds_init
                bound = init.params.alpha * math.sqrt(6 / (fan_in + fan_out)) / math.sqrt(u.layer or 1)
                w.uniform_(-bound, bound)
            _zero_bias(lin)
        table = _table(u) if init.name in ("gpt2", "t5") else None
        if table is not None and init.name == "gpt2" and u.node.op.id != "pos(t5_bias)":
            table.normal_(0.0, 0.02)
        elif table is not None and init.name == "t5" and u.node.op.id != "pos(learned)":
            table.normal_(0.0, u.node.meta["env"].d ** -0.5 if u.node.op.id == "pos(t5_bias)" else 1.0)
    if init.name != "deepnorm":
        _rescale_deepnorm(model, graph)


def _rescale_deepnorm(gm, graph) -> None:
    """residual(deepnorm)'s beta on its branch again, on top of the scheme (as the backend does on torch's init)."""
    from .backends.lower_torch import _branch

    for n in graph.nodes:
        if n.kind == "call" and hasattr(getattr(gm, n.module), "init_branch"):
            getattr(gm, n.module).init_branch([(b.family, getattr(gm, b.module)) for b in _branch(graph, n)])
        elif n.kind == "repeat":
            for body in getattr(gm, n.module):
                _rescale_deepnorm(body, n.body)
