"""Parsing never crashes: whatever the text, evodsl.parse() returns a graph or raises EvoError whose every
diagnostic points inside the source (line >= 1, col >= 1, on a real line). Nothing else may escape. And a
program that validates must build and run: it compiles on the meta device and its forward gives the output
shape the graph declares (no EvoError, no torch error after a successful parse).

Hypothesis runs derandomized (a fixed seed: the same examples every run, no example database), so a failure
here is reproducible; to explore further, raise the max_examples locally.
"""
from __future__ import annotations

import re
import typing
from collections import Counter
from pathlib import Path

import pytest
import sympy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evodsl
from evodsl import EvoError
from evodsl.backends.lower_onnx import min_positions
from evodsl.ops import FAMILIES, REGISTRY, load_all

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.evo"))
SPANLESS = {"E401", "E402", "E403"}  # files and backends: no source text to point into
MAX_MODULES = 2000  # compile a validated program only up to this many submodules (repeat(block, 10**9) is valid)
MAX_FORWARD = 100  # and run its forward on the meta device up to this many (a 32-layer llama: 0.6 s a forward)

load_all()
KEYWORDS = ["model", "residual", "parallel", "repeat", "true", "false"]
OPS = sorted(FAMILIES)
VARIANTS = sorted({v for _, v in REGISTRY})
PARAMS = sorted({f for op in REGISTRY.values() for f in op.params.model_fields}) + [
    "scale", "scores", "merge", "shared", "causal", "vocab", "d"]
SYMBOLS = ["sum", "mean", "concat", "rezero", "none", "tokens", "features", "gelu", "relu", "gelu_tanh", "silu"]
NAMES = ["x", "block", "d_model", "heads", "layers", "vocab", "d_ff", "n_ctx", "_", "a1", "mlp2", "src", "tgt", "mem"]
NUMBERS = ["0", "1", "2", "3", "4", "7", "8", "16", "64", "512", "-1", "2.5", "0.0", "1e-12", "1e400",
           "99999999999999999999", "007", "1.", ".5"]
PUNCT = ["->", "(", ")", ",", "=", "+", "-", "*", "/", "#", "\n", "# comment\n", ">", "-", "--", "=>", "{", "}"]
TOKENS = KEYWORDS + OPS + VARIANTS + PARAMS + SYMBOLS + NAMES + NUMBERS + PUNCT

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


def check_outcome(src: str):
    """parse(src): the graph, or None after an EvoError whose diagnostics are all well located."""
    try:
        return evodsl.parse(src)
    except EvoError as err:
        assert err.diagnostics, "an EvoError without diagnostics"
        lines = src.split("\n")
        for d in err.diagnostics:
            assert d.code != "E100", f"internal parser error: {d.message}"
            if d.span is None:
                assert d.code in SPANLESS, f"{d.code} has no span: {d.message}"
                continue
            s = d.span
            assert 1 <= s.line <= len(lines), f"{d.code}: line {s.line} outside 1..{len(lines)}"
            assert 1 <= s.col <= len(lines[s.line - 1]) + 1, \
                f"{d.code}: col {s.col} outside line {s.line} ({len(lines[s.line - 1])} chars)"
            assert (s.end_line, s.end_col) >= (s.line, s.col), f"{d.code}: span ends before it starts"
        text = err.render()
        assert text.count("error[") == len(err.diagnostics)
        return None


def module_count(graph) -> int:
    n = 0
    for node in graph.nodes:
        if node.kind == "call":
            n += 1
        elif node.kind == "repeat":
            n += (1 if node.shared else node.count) * max(module_count(node.body), 1)
    return n


def compile_on_meta(src: str, graph) -> bool:
    """A validated program builds on the meta device (no weights allocated) and, up to MAX_FORWARD modules,
    its forward returns the shape the graph declares (then True). An EvoError here, after parse() accepted the
    text, is a bug, as is any torch error."""
    import torch

    model = evodsl.compile(src, device="meta")
    if module_count(graph) > MAX_FORWARD:
        return False
    need = min_positions(graph)
    fits = [n for n in range(need, max(need, 4) + 1) if all(  # every table sized by max_len (learned positions,
        # Linformer's projections, AFT's position biases) covers its stream at n
        int(sympy.sympify(str(c.meta["shape"][1])).subs({"n": n, "m": max(1, n - 1)})) <= c.params.max_len
        for c in graph.calls() if getattr(c.params, "max_len", None) is not None)]
    if not fits:
        return False
    for n in reversed(fits):  # the longest length the model takes: a causal xattn's queries, the last positions of
        xs = []               # the stream it reads, are at most that stream's length (E410 at run time otherwise)
        for inp in graph.inputs:  # an encoder-decoder's source of n positions and target of n - 1
            length = n if not xs else max(1, n - 1)
            xs.append(torch.empty(2, length, dtype=torch.long, device="meta") if inp.variant == "tokens"
                      else torch.empty(2, length, inp.params.d, device="meta"))
        try:
            with torch.no_grad():
                y = model(*xs)
            break
        except EvoError as err:
            if "E410" not in str(err) or n == fits[0]:
                raise
    lengths = {"b": 2, "n": n, "m": max(1, n - 1)}
    want = tuple(int(sympy.sympify(str(s)).subs(lengths)) if isinstance(s, str) else s
                 for s in graph.output.meta["shape"])
    assert y.device.type == "meta" and tuple(y.shape) == want, f"output {tuple(y.shape)}, declared {want}"
    return True


# ---------------------------------------------------------------- (a) random text


@settings(FUZZ, max_examples=3000)
@given(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60))
def test_random_text(src):
    check_outcome(src)


@settings(FUZZ, max_examples=2000)
@given(st.text(st.sampled_from(list("abcdemhafnorm_0123456789 ()=,->*/+.#\n\t\r\x0c")), max_size=80))
def test_random_text_from_the_language_alphabet(src):
    check_outcome(src)


@settings(FUZZ, max_examples=2500)
@given(st.lists(st.sampled_from(TOKENS), max_size=30), st.sampled_from([" ", "", "\n", " \n  "]))
def test_token_soup(tokens, sep):
    check_outcome(sep.join(tokens))


# Near-valid programs: statement shapes from the grammar, filled with arbitrary names and values, so that most
# examples get past the parser and exercise the build and shape passes.

_value = st.one_of(st.sampled_from(NUMBERS + SYMBOLS + NAMES + VARIANTS), st.just("true"), st.just("false"),
                   st.integers(-3, 5000).map(str))


def _values_for(annotation) -> list[str]:
    """Plausible spellings of a value for a params field, from its type."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return list(args)
    kinds = set(args) if args else {annotation}
    out = []
    if int in kinds:
        out += ["1", "2", "4", "8", "16"]
    if float in kinds:
        out += ["0.0", "0.1", "1e-5", "0.5"]
    if bool in kinds:
        out += ["true", "false"]
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            out += list(typing.get_args(a))
    return out or ["1"]


LAYER_OPS = sorted(key for key in REGISTRY if FAMILIES[key[0]].role not in ("input", "internal"))


@st.composite
def _typed_call(draw):
    """family(variant, field=value, ...) with the op's own fields and values of the right type, mostly."""
    op = draw(st.sampled_from(LAYER_OPS).map(lambda k: REGISTRY[k]))
    fields = sorted(op.params.model_fields)
    args = [op.variant]
    for name in draw(st.lists(st.sampled_from(fields), max_size=2, unique=True)) if fields else []:
        args.append(f"{name}={draw(st.sampled_from(_values_for(op.params.model_fields[name].annotation)))}")
    return f"{op.family}({', '.join(args)})"


DEF_NAMES = ["l0", "l1", "l2", "l3"]  # the near-valid programs' definitions, in order


@st.composite
def _wild_call(draw):
    name = draw(st.sampled_from(OPS + NAMES + DEF_NAMES))
    args = []
    if draw(st.booleans()):
        args.append(draw(st.sampled_from(VARIANTS + NAMES)))
    for _ in range(draw(st.integers(0, 3))):
        args.append(f"{draw(st.sampled_from(PARAMS))}={draw(_value)}")
    return name if not args and draw(st.booleans()) else f"{name}({', '.join(args)})"


def _layer(inner):
    def kw(*good):  # mostly the construct's own keywords, sometimes another's
        return st.sampled_from(["", *good, *good, ", scale=nope", ", merge=sum", ", shared=true"])

    return st.one_of(
        st.lists(inner, min_size=2, max_size=4).map(" -> ".join),
        st.tuples(inner, kw(", scale=rezero", ", scores=true", ", norm=post")).map(lambda t: f"residual({t[0]}{t[1]})"),
        st.tuples(st.lists(inner, min_size=2, max_size=3), kw(", merge=concat", ", merge=mean"))
        .map(lambda t: f"parallel({', '.join(t[0])}{t[1]})"),
        st.tuples(inner, st.sampled_from(["1", "2", "3", "0", "layers", "-1", "2.5"]), kw(", shared=true"))
        .map(lambda t: f"repeat({t[0]}, {t[1]}{t[2]})"),
    )


_call = st.one_of(_typed_call(), _typed_call(), _typed_call(), _typed_call(), _wild_call(),
                  st.sampled_from(DEF_NAMES + ["norm", "mha", "ffn"]))
_layers = st.recursive(_call, _layer, max_leaves=6)
_small = st.sampled_from(["1", "2", "4", "8", "2 * 2", "16 / 4", "heads * 2"])
_binding = st.tuples(st.sampled_from(NAMES + PARAMS), st.one_of(
    _small, _small, _value, st.tuples(_value, st.sampled_from(["+", "-", "*", "/"]), _value).map(" ".join)))
_model = st.tuples(st.sampled_from(["", "(causal=true)", "(causal=false)", "(causal=3)", "(init=gpt2)",
                                    "(causal=true, init=ds_init(alpha=0.5))", "(init=gpt3)", "(init=t5(x=1))"]),
                   st.sampled_from(["input(tokens, vocab=100)", "input(tokens)", "input(features, d=16)", "norm"]),
                   _layers, st.sampled_from(["", " -> head(lm)", " -> head(lm, tied=false)", " -> head(pooler)"])
                   ).map(lambda t: f"model m{t[0]} = {t[1]} -> embed(token, d_model=16) -> {t[2]}{t[3]}")
_stream_model = st.tuples(
    st.sampled_from(["", "(causal=true)", "(causal=false)"]),
    st.sampled_from(["src", "mem", "x"]), st.sampled_from(["input(tokens, vocab=100)", "latent(array, length=3)",
                                                           "input(features, d=16)", "tgt", "norm"]),
    _layers, st.sampled_from(["tgt", "tgt(causal=true)", "src", "out(causal=false)", "x"]),
    st.sampled_from(["input(tokens, vocab=100) -> embed(token, d_model=16)", "src", "latent(array, length=2)"]),
    st.sampled_from(["xattn(softmax, kv=src)", "cat(prefix=mem)", "cat(suffix=src)", "xattn(kv=tgt)",
                     "slice(last=2)", "slice(drop_first=3)", "xattn(softmax)"]),
    st.sampled_from(["", " -> head(lm)", " -> head(linear, d_out=2)"]),
).map(lambda t: f"model m{t[0]} {{\n  {t[1]} = {t[2]} -> {t[3]}\n  {t[4]} = {t[5]} -> {t[6]}{t[7]}\n}}")


@st.composite
def _near_valid_program(draw):
    """Statement shapes from the grammar filled with arbitrary names and values: most examples get past the
    parser and fail in the build and shape passes, each with its own error."""
    bindings = draw(st.lists(_binding, max_size=3, unique_by=lambda b: b[0]))
    layers = draw(st.lists(_layers, min_size=1, max_size=4))
    model = draw(st.one_of(st.none(), _model, _stream_model))
    stmts = [f"{k} = {v}" for k, v in bindings if k not in ("d_model", "heads")]
    stmts += [f"{name} = {layer}" for name, layer in zip(DEF_NAMES, layers)]
    return "\n".join(["d_model = 16", "heads = 2", *stmts] + ([model] if model else []))


# Well-formed programs: every call with its op's own fields and values within their bounds, every construct
# with its own keywords, so that most validate and the build path (compile, forward) is fuzzed, not only the
# parser. Some still fail on what only the whole graph shows (kv_heads not dividing heads, fnet in a causal
# model, a residual around a width change): those are checked like any other error.

def _fits(field, spelling: str) -> bool:
    """Whether a value spelled as in _values_for is within the field's ge/gt/le/lt bounds."""
    if spelling in ("true", "false") or not spelling[0].isdigit():
        return True
    v = float(spelling)
    for m in field.metadata:
        for attr, ok in (("ge", v.__ge__), ("gt", v.__gt__), ("le", v.__le__), ("lt", v.__lt__)):
            if getattr(m, attr, None) is not None and not ok(getattr(m, attr)):
                return False
    return True


# ops that read or make streams (xattn, cat, latent, slice) need a model with streams: the well-formed programs
# write them in the models with streams below
STREAM_OPS = {"xattn", "cat", "latent", "slice"}
GOOD_OPS = [key for key in LAYER_OPS if key[0] not in STREAM_OPS]
GOOD_OPS.remove(("mha", "skip_reuse"))  # it reads an earlier attention, which a drawn program may lack (E312)


@st.composite
def _good_call(draw):
    op = REGISTRY[draw(st.sampled_from(GOOD_OPS))]
    fields = op.params.model_fields
    given = {}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)) if fields else []:
        values = [v for v in _values_for(fields[name].annotation) if _fits(fields[name], v)]
        if values:  # rope's base > 1 has none among _values_for's: left at its default
            given[name] = draw(st.sampled_from(values))
    for name, f in fields.items():  # a required field not drawn: the stream's width, a stream, or a small count
        if f.is_required() and name not in given:
            given[name] = "16" if name in ("d_model", "max_len") else "src" if name in op.streams else "3"
    for name in op.streams:  # a stream a well-formed model with streams has
        if name in given:
            given[name] = "src"
    return f"{op.family}({', '.join([op.variant, *(f'{k}={v}' for k, v in given.items())])})"


def _good_layer(inner):
    return st.one_of(
        st.lists(inner, min_size=2, max_size=4).map(" -> ".join),
        st.tuples(inner, st.sampled_from(["", ", scale=rezero", ", norm=pre", ", norm=post, scale=rezero"]))
        .map(lambda t: f"residual({t[0]}{t[1]})"),
        st.tuples(st.lists(inner, min_size=2, max_size=3), st.sampled_from(["", ", merge=mean", ", merge=concat"]))
        .map(lambda t: f"parallel({', '.join(t[0])}{t[1]})"),
        st.tuples(inner, st.sampled_from(["1", "2", "3", "layers"]), st.sampled_from(["", ", shared=true"]))
        .map(lambda t: f"repeat({t[0]}, {t[1]}{t[2]})"),
    )


_good_layers = st.recursive(st.one_of(_good_call(), st.sampled_from(["norm", "mha", "ffn", "norm -> mha"])),
                            _good_layer, max_leaves=5)
_STARTS = {"tokens": "input(tokens, vocab=100) -> embed(token, d_model=16)",
           "features": "input(features, d=8) -> embed(linear, d_model=16)"}
_ENDS = {"tokens": ["", " -> norm -> head(lm)", " -> head(lm, tied=false)", " -> head(pooler)"],
         "features": ["", " -> head(linear, d_out=3)", " -> head(pooler)"]}


@st.composite
def _good_program(draw):
    layers = draw(st.lists(_good_layers, min_size=1, max_size=3))
    stmts = ["d_model = 16", "heads = 2", "layers = 2"]
    stmts += [f"{name} = {layer}" for name, layer in zip(DEF_NAMES, layers)]
    # a model of one stream, a model with streams (whose layers validate less often: drawn as often), or none
    shape = draw(st.sampled_from(["model", "model", "streams", "streams", "none"]))
    if shape == "model":
        kind = draw(st.sampled_from(sorted(_STARTS)))
        body = " -> ".join(draw(st.lists(st.sampled_from(DEF_NAMES[:len(layers)]), min_size=1, max_size=3)))
        opts = draw(st.sampled_from(["", "(causal=true)", "(causal=false)", "(init=gpt2)",
                                     "(causal=true, init=ds_init(alpha=0.5))"]))
        stmts.append(f"model m{opts} = {_STARTS[kind]} -> {body}{draw(st.sampled_from(_ENDS[kind]))}")
    elif shape == "streams":  # an encoder-decoder, memory tokens or latents
        enc = " -> ".join(draw(st.lists(st.sampled_from(DEF_NAMES[:len(layers)]), min_size=1, max_size=2)))
        dec = " -> ".join(draw(st.lists(st.sampled_from(DEF_NAMES[:len(layers)]), min_size=1, max_size=2)))
        opts = draw(st.sampled_from(["", "(causal=true)", "(init=t5)"]))
        kind = draw(st.sampled_from(["seq2seq", "memory", "latents"]))
        if kind == "seq2seq":
            tgt = f"{_STARTS['tokens']} -> {dec} -> residual(xattn(softmax, kv=src)) -> head(lm)"
            stmts.append(f"model m{opts} {{\n  src = {_STARTS['tokens']} -> {enc}\n  tgt(causal=true) = {tgt}\n}}")
        elif kind == "memory":
            body = f"{_STARTS['tokens']} -> cat(prefix=mem) -> {dec} -> slice(drop_first=2) -> head(lm)"
            stmts.append(f"model m{opts} {{\n  mem = latent(array, length=2)\n  src = {body}\n}}")
        else:
            lat = f"latent(array, length=3) -> residual(xattn(softmax, kv=src)) -> {dec} -> head(linear, d_out=2)"
            stmts.append(f"model m {{\n  src = {_STARTS['features']} -> {enc}\n  lat = {lat}\n}}")
    return "\n".join(stmts)


VALID_SHARE = 1 / 3  # the floor on programs that validate, so that building and running them is fuzzed


def _fuzz_programs(examples: int):
    stats = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(st.one_of(_near_valid_program(), _good_program(), _good_program()))  # 2 in 3 well-formed
    def run(src):
        graph = check_outcome(src)
        stats["examples"] += 1
        if graph is not None:
            stats["valid"] += 1
            if module_count(graph) <= MAX_MODULES:
                ran = compile_on_meta(src, graph)
                stats["ran"] += ran
                stats["ran with streams"] += ran and bool(graph.streams)

    run()
    assert stats["valid"] >= VALID_SHARE * stats["examples"], f"too few programs validate: {dict(stats)}"
    assert stats["ran"] >= 0.9 * stats["valid"], f"too few validated programs were built and run: {dict(stats)}"
    assert stats["ran with streams"] >= 0.05 * stats["examples"], f"too few models with streams ran: {dict(stats)}"
    print(dict(stats))


def test_programs_validate_build_and_run():
    _fuzz_programs(1000)


@pytest.mark.slow
def test_programs_validate_build_and_run_long():
    _fuzz_programs(5000)


# ---------------------------------------------------------------- (b) mutations of every spec in specs/

_LEX = re.compile(r"\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\w+|->|\s+|#[^\n]*|\S")
_NEW_NUMBERS = ["0", "-1", "1", "3", "99999999999", "10**9", "2.5", "0.5", "1e-12", "1e400", "1.0"]


def _typo(word: str, draw) -> str:
    if len(word) < 2:
        return word + "x"
    i = draw(st.integers(0, len(word) - 2))
    return draw(st.sampled_from([word[:i] + word[i + 1:], word[:i] + word[i + 1] + word[i] + word[i + 2:],
                                 word + word[-1], word.upper()]))


@st.composite
def mutated(draw, text: str):
    toks = _LEX.findall(text)
    assert "".join(toks) == text
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "number", "number", "rename",
                                     "rename", "char"]))
        j = draw(st.integers(0, len(toks) - 1))
        if kind == "delete":
            del toks[j]
        elif kind == "duplicate":
            toks.insert(j, toks[j])
        elif kind == "swap":
            k = draw(st.integers(0, len(toks) - 1))
            toks[j], toks[k] = toks[k], toks[j]
        elif kind == "insert":
            toks.insert(j, draw(st.sampled_from(TOKENS)))
        elif kind == "number":
            nums = [i for i, t in enumerate(toks) if t[0].isdigit()]
            if nums:
                toks[draw(st.sampled_from(nums))] = draw(st.sampled_from(_NEW_NUMBERS))
        elif kind == "rename":
            # a keyword argument's or binding's name: the word before '='
            named = [i for i, t in enumerate(toks) if t.isidentifier() and i + 1 < len(toks) and toks[i + 1] == "="
                     or t.isidentifier() and i + 2 < len(toks) and toks[i + 1].isspace() and toks[i + 2] == "="]
            if named:
                i = draw(st.sampled_from(named))
                toks[i] = draw(st.one_of(st.sampled_from(PARAMS + NAMES), st.just(_typo(toks[i], draw))))
        else:  # one character deleted, replaced or inserted
            flat = "".join(toks)
            if not flat:
                continue
            c = draw(st.integers(0, len(flat) - 1))
            ch = draw(st.sampled_from(list("()=,->#\n \t;@$x9.")))
            op = draw(st.sampled_from(["del", "rep", "ins"]))
            flat = flat[:c] + ("" if op == "del" else ch) + flat[c + (op != "ins"):]
            toks = _LEX.findall(flat)
        if not toks:
            break
    return "".join(toks)


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_spec_mutations(spec):
    text = spec.read_text(encoding="utf-8")
    assert check_outcome(text) is not None, f"{spec.name} itself must validate"
    stats = Counter()

    @settings(FUZZ, max_examples=220)
    @given(mutated(text))
    def run(src):
        graph = check_outcome(src)
        stats["valid" if graph is not None else "error"] += 1
        # compile a sample of the mutations that validate (every third one), on the meta device: a mutated
        # llama may be huge, meta allocates nothing; only the module count bounds the work
        if graph is not None and stats["valid"] % 3 == 1 and module_count(graph) <= MAX_MODULES:
            stats["ran"] += compile_on_meta(src, graph)
            stats["compiled"] += 1

    run()
    assert stats["valid"] and stats["error"], f"the mutations should both pass and fail: {dict(stats)}"
    assert stats["compiled"], dict(stats)
