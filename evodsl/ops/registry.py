"""The op registry: every variant is declared once, as an `Op`, in its own file under evodsl/ops/<family>/.

An `Op` carries everything about a variant: its pydantic params model, shape rule, causal claim, paper
reference and torch module factory. Validation, `evodsl ops` and every backend read that one declaration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Union

from pydantic import BaseModel, ConfigDict

from ..diagnostics import Diagnostic, EvoError

Dim = Union[int, str]  # an int, or a symbol such as "b" (batch), "n" (sequence length), "m" (a model's second
#                       input's length), or a sum of them ("n + 16": a stream with 16 tokens concatenated)
Shape = tuple  # tuple[Dim, ...]
Causal = Literal["yes", "no", "n.a."]  # yes: has a causal form (and a bidirectional one); n.a.: per-token op


class OpParams(BaseModel):
    """Base of every op's params model: frozen, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class NoParams(OpParams):
    pass


class ShapeProblem(Exception):
    """Raised by a shape rule; becomes a diagnostic pointing at `field`'s argument (or the call), with `code` (E300,
    a shape, unless the op's task gave it its own)."""

    def __init__(self, message: str, field: str | None = None, hint: str = "", code: str = "E300"):
        super().__init__(message)
        self.message, self.field, self.hint, self.code = message, field, hint, code


@dataclass(frozen=True)
class OpEnv:
    """What an op sees when its shape is inferred and its module built: shapes only, never data."""

    in_shapes: tuple  # tuple[Shape, ...], one per input
    causal: bool = False  # the model is autoregressive: token mixers must not look ahead
    pos: tuple | None = None  # (Op, params) of the position scheme applied inside attention (rope, alibi)
    vocab: int | None = None  # the model's token vocabulary, when its input is input(tokens, vocab=V)
    residual_scores: bool = False  # RealFormer: add the previous layer's raw scores (residual(..., scores=true))
    in_causal: tuple = ()  # per input: its stream is causal (time-ordered; xattn over it reads only its past)
    memory: tuple | None = None  # (Op, params) of the segment memory the attention keeps (memory(xl, mem_len=M))
    stream: str | None = None  # the stream the op is in (a model with streams), else None
    in_grad: bool = True  # training: the (first) input carries a gradient (False: it is a model input itself)

    @property
    def shape(self) -> Shape:
        return self.in_shapes[0]

    @property
    def d(self) -> int:
        """Width of the (first) input's last dimension."""
        return self.in_shapes[0][-1]


def same_shape(params: OpParams, env: OpEnv) -> Shape:
    """The default rule: the stream's shape, which must end in features (not token ids [b, n])."""
    if not env.shape or not isinstance(env.shape[-1], int):
        raise ShapeProblem(f"this op needs features [..., d], got [{', '.join(map(str, env.shape))}] (token ids)",
                           hint="put embed(token) first")
    return env.shape


def sequence_shape(params: OpParams, env: OpEnv) -> Shape:
    """The shape rule of an op on positions: a [b, n, d] stream in, the same out (not token ids, not a pooled
    [b, d])."""
    if len(env.shape) != 3 or not isinstance(env.shape[-1], int):
        raise ShapeProblem(f"positions need a [b, n, d] stream, got [{', '.join(map(str, env.shape))}]",
                           hint="put pos(...) after the embedding and before any pooling head")
    return env.shape


@dataclass(frozen=True)
class Op:
    family: str  # "mha", "ffn", "norm", ...
    variant: str  # "softmax", "glu", ...
    params: type[OpParams]
    module: Callable  # (params, env) -> torch.nn.Module with forward(x, ctx) (merge: forward(xs, ctx))
    causal: Causal
    paper: str  # "Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762"
    summary: str  # the defining equation in one line
    shape: Callable = same_shape  # (params, env) -> Shape, raises ShapeProblem
    note: str = ""  # path under ../shared/reference/transformer-evolution/, if any
    inputs: int = 1  # number of inputs; -1 = two or more (merge)
    supports: frozenset = frozenset()  # attention: "rope", "alibi" (applied inside), "residual_scores" (RealFormer),
    #                                     "memory" (memory(xl))
    attach: Callable | None = None  # pos ops applied inside attention: (params, heads, head_dim) -> nn.Module
    cost: Callable | None = None  # (params, env, symbols) -> evodsl.ops.cost.Cost, formulas over shapes only
    attach_cost: Callable | None = None  # in-attention pos ops: (params, symbols, heads, kv_heads, head_dim) -> Cost
    padding: bool = True  # honours a padding mask (attention_mask); False: its forward refuses one (E409)
    pad_alone: bool = True  # a right-padded sequence's outputs are the sequence's alone; False: padded keys get no
    #                      weight, but the op's layout follows the padded length (BigBird's last global block)
    streams: tuple = ()  # params that name a stream of the model (xattn's kv): each given one is an input
    #                      after the first, in this order; the module's forward(x, ctx, *those streams)
    sets: str | None = None  # an op that configures the attention ops after it in its stream: the OpEnv field
    #                      its (op, params) fills there ("memory"); position schemes use `attach` instead
    starts: bool = False  # it begins a stream of its own, reading only its input's batch size (latent(array),
    #                      memory(rmt)): `name = latent(array, length=L) -> ...`
    carried: bool = False  # its stream's value is carried from one segment to the next: a stream declared with
    #                      writes=NAME gives the value the next segment reads (memory(rmt))
    decode: object = "per token"  # how it runs incrementally (ctx.cache, ctx.offset): what it keeps between
    #                      calls, in words; None: no step form (generate refuses it); a callable(params) -> either

    @property
    def id(self) -> str:
        return f"{self.family}({self.variant})"

    def decode_form(self, params) -> str | None:
        """How this call decodes (what it keeps between steps), or None if it cannot."""
        return self.decode(params) if callable(self.decode) else self.decode

    def arity(self, params) -> int:
        """Inputs of a call with these params: op.inputs, plus one per stream it names."""
        return self.inputs + sum(getattr(params, f, None) is not None for f in self.streams)


@dataclass(frozen=True)
class Family:
    name: str
    default: str | None  # the variant used when a call names none (`norm` = `norm(layernorm)`)
    role: str  # "sublayer" (mha, ffn, mixer: residual sugar applies), "norm", "input", "stream", "internal"
    module_name: str  # prefix of the module's name in the built model (`attn` -> blocks.0.attn.q_proj)
    doc: str


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("input", None, "input", "input", "model input: tokens(vocab) ids [b, n] or features(d) [b, n, d]"),
    Family("embed", "token", "stream", "embed", "token or feature embedding into d_model"),
    Family("pos", None, "stream", "pos", "positions: added to the stream, or applied inside attention"),
    Family("norm", "layernorm", "norm", "norm", "per-token normalization"),
    Family("mha", "softmax", "sublayer", "attn", "multi-head attention (token mixing)"),
    Family("mixer", None, "sublayer", "mixer", "token mixing without attention"),
    Family("ssm", None, "sublayer", "ssm", "state-space models: a linear recurrence over the sequence, trained in "
                                        "its parallel form (a scan or an FFT convolution), decoded by its step"),
    Family("rnn", None, "sublayer", "rnn", "linear recurrent layers (RWKV, HGRN, xLSTM, QRNN, SRU): a chunked "
                                        "or scanned form for training, the recurrent step for decoding"),
    Family("longconv", None, "sublayer", "longconv", "long convolutions over the sequence (explicit, implicit or "
                                                  "continuous kernels), computed by FFT or a prefix sum"),
    Family("xattn", "softmax", "sublayer", "xattn", "cross-attention: queries from the stream, keys and values "
                                                    "from a named stream (kv=NAME)"),
    Family("ffn", "mlp", "sublayer", "ffn", "position-wise feed-forward (channel mixing)"),
    Family("head", "lm", "stream", "head", "output head"),
    Family("residual", None, "internal", "scale", "residual branch scaling, used as residual(..., scale=V)"),
    Family("merge", "sum", "internal", "merge", "merge of parallel branches, used as parallel(..., merge=V)"),
    Family("dropout", "standard", "stream", "dropout", "dropout on the stream (training only)"),
    Family("latent", "array", "stream", "latent", "a learned array of vectors [b, length, d]: a stream of its "
                                                  "own (Perceiver latents, inducing points, memory tokens)"),
    Family("memory", None, "stream", "memory", "state carried from one segment to the next: xl (each "
                                               "attention's previous inputs as extra keys), rmt (memory tokens)"),
    Family("cat", "seq", "stream", "cat", "concatenation along the sequence: named streams before (prefix=) or "
                                          "after (suffix=) this one"),
    Family("slice", "seq", "stream", "slice", "positions kept along the sequence: first=k, last=k, drop_first=k "
                                              "or drop_last=k"),
]}

REGISTRY: dict[tuple[str, str], Op] = {}


def register(op: Op) -> Op:
    """Add an op; a duplicate (family, variant) or an unknown family is an error."""
    if op.family not in FAMILIES:
        raise ValueError(f"unknown op family {op.family!r} for {op.id}; known: {sorted(FAMILIES)}")
    if (op.family, op.variant) in REGISTRY:
        raise ValueError(f"op {op.id} is registered twice")
    cfg = op.params.model_config
    if not (cfg.get("frozen") and cfg.get("extra") == "forbid"):
        raise ValueError(f"{op.id}: params model must be frozen with extra='forbid' (derive from OpParams)")
    REGISTRY[(op.family, op.variant)] = op
    return op


def _loaded() -> dict:
    """REGISTRY with every op file imported (evodsl.ops.load_all: a lookup before any parse or build, e.g. a test
    run alone, would otherwise miss the ops not imported yet)."""
    from . import load_all

    return load_all()


def variants(family: str) -> list[str]:
    return sorted(v for f, v in _loaded() if f == family)


def lookup(family: str, variant: str) -> Op | None:
    return _loaded().get((family, variant))


@dataclass
class Ctx:
    """Per-forward state shared by the modules of one model call (torch backend).

    scores: the previous layer's raw attention scores, for RealFormer-style residual attention.
    mask: key padding, bool [b, n] (True = a token, False = padding), or None when nothing is padded. Every
        attention op gives padded keys no weight; an op that cannot keep padding out refuses it (E409).
    right_padded: every row of the mask is tokens then padding (HF's default), so a causal op's real queries
        never reach a padded key and it may ignore the mask (its fast path; padded positions stay finite).
    token_type_ids: segment ids [b, n] for embed(token, segments=k), or None (segment 0 everywhere).
    mask and right_padded are those of the stream being computed (cat and slice change them with it);
    streams holds each finished stream's (mask, right_padded), read by the ops that name a stream (xattn).

    cache: decoding state (evodsl.decode.DecodeState) when the model runs incrementally, else None; offset:
        the positions of the current stream already seen (in the cache), where the new ones start.
    """

    scores: object = None
    cache: object = None
    offset: int = 0
    mask: object = None
    right_padded: bool = False
    token_type_ids: object = None
    extra: dict = field(default_factory=dict)
    streams: dict = field(default_factory=dict)


def is_symbolic(t) -> bool:
    """No values to read: tracing, compiling or exporting (the graph must hold for every mask), or meta."""
    import torch

    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting() or t.is_meta


def right_padded(mask) -> bool:
    """Every row is tokens, then padding (checked eagerly; never assumed while tracing or exporting)."""
    if mask is None or is_symbolic(mask):
        return False
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


PAD_RIGHT = "pad after the tokens (tokenizer padding_side='right')"


def require_right_padding(mask, who: str, why: str, hint: str = PAD_RIGHT) -> None:
    """E409 for an op that counts positions from each row's first token (blocks, segments, global or sink tokens,
    position-indexed weights), given a mask that is not right padding: left padding would move the tokens. A
    symbolic mask passes (an export holds for every mask; right padding is what it assumes)."""
    if mask is not None and not is_symbolic(mask) and not right_padded(mask):
        raise EvoError([Diagnostic("E409", f"{who} needs right padding: {why}", help=hint)])


def seq_len(shape) -> Dim:
    """The sequence length of a [b, n, ...] shape."""
    return shape[1]


def add_len(*dims) -> Dim:
    """The sum of sequence lengths: an int when every one is, else a normalized symbolic sum ("n + 16")."""
    if all(isinstance(d, int) for d in dims):
        return sum(dims)
    import sympy as sp

    return str(sp.expand(sum(sp.sympify(str(d)) for d in dims)))
