"""Errors are part of the product: every error class renders exactly as its golden file says.

tests/golden/<name>.evo is a small bad spec, tests/golden/<name>.txt what `evodsl check tests/golden/<name>.evo`
prints on stderr (run from the repository root), compared line by line. After a deliberate change to a message,
regenerate the goldens with

    EVODSL_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_diagnostics.py

and review the diff. The registry is open (adding a variant touches its own file only), so a list of a family's
variants at the end of a line is stored as `{variants:mha}` and expanded from the registry when comparing.
The API tests below check that parse()/compile() raise EvoError, never a Lark, pydantic or
torch exception, with file, line and column on every diagnostic.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import evodsl
from evodsl import EvoError
from evodsl.cli import main
from evodsl.ops import FAMILIES, load_all, variants

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("EVODSL_UPDATE_GOLDEN") == "1"
CASES = sorted(p.stem for p in GOLDEN.glob("*.evo"))

# The error classes the goldens must cover (first E-code in the file's expected output).
REQUIRED = {
    "e101_unexpected_token": ["E101"], "e101_reserved_word": ["E101"], "e101_double_arrow": ["E101"],
    "e102_bad_character": ["E102"], "e103_unexpected_eof": ["E103"],
    "e201_unknown_op": ["E201"], "e202_unknown_variant": ["E202"], "e203_unknown_parameter": ["E203"],
    "e204_bound_heads": ["E204"], "e204_bound_window": ["E204"], "e204_wrong_type": ["E204"],
    "e204_missing_required": ["E204"], "e204_from_binding": ["E204"], "e205_undefined_name": ["E205"],
    "e206_duplicate_definition": ["E206"], "e207_recursive_definition": ["E207"],
    "e208_extra_positional": ["E208"], "e209_op_name": ["E209"], "e212_not_whole": ["E212"],
    "e216_missing_variant": ["E216"], "e300_heads_divide": ["E300"], "e300_heads_divide_binding": ["E300"],
    "e301_causal_fnet": ["E301"], "e302_alibi_linear": ["E302"], "e303_scores_need_softmax": ["E303"],
    "e305_residual_shape": ["E305"], "e308_tied_width": ["E308"],
    "e221_node_limit": ["E221"],
    # streams
    "e224_stream_before_definition": ["E224"], "e222_stream_unused": ["E222"], "e223_xattn_without_streams": ["E223"],
    "e225_unknown_stream": ["E225"], "e309_bidirectional_reads_causal": ["E309"], "e300_cat_widths": ["E300"],
    "e300_slice_too_long": ["E300"], "e206_two_streams_one_name": ["E206"], "e301_causal_stream_fnet": ["E301"],
    # segment memory
    "e226_writes_not_carried": ["E226", "E227"], "e227_memory_never_written": ["E227"],
    "e312_skip_reuse_first": ["E312"],  # mha(skip_reuse) with no earlier attention
    "e310_written_shape": ["E310"], "e311_stream_op_in_pipeline": ["E311"],
    "e313_reversible_body": ["E313"],
    "multiple_errors": ["E212", "E201", "E203", "E204", "E204", "E206"],
}


def check_stderr(rel: str, capsys) -> tuple[int, str, str]:
    """Run `evodsl check REL` in-process from the repository root; (exit code, stdout, stderr)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = main(["check", rel])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    return code, out.out, out.err


def _family_lists() -> dict[str, str]:
    load_all()
    return {fam: ", ".join(variants(fam)) for fam in FAMILIES if variants(fam)}


def expand(text: str) -> str:
    """`{variants:F}` -> the registered variants of family F, as the diagnostics list them."""
    lists = _family_lists()
    return re.sub(r"\{variants:(\w+)\}", lambda m: lists[m.group(1)], text)


def collapse(text: str) -> str:
    """The inverse of expand(), for writing goldens: a line ending in `one of: <a family's variants>`."""
    by_list = {v: k for k, v in _family_lists().items()}

    def one(line: str) -> str:
        m = re.search(r"one of: (.+)$", line)
        if m and m.group(1) in by_list:
            return line[: m.start(1)] + "{variants:" + by_list[m.group(1)] + "}"
        return line

    return "\n".join(one(line) for line in text.split("\n"))


def assert_lines(actual: str, expected: str, name: str) -> None:
    """Line-by-line comparison that names the first differing line (cel-python style)."""
    got, want = actual.rstrip("\n").split("\n"), expected.rstrip("\n").split("\n")
    for i, (g, w) in enumerate(zip(got, want), start=1):
        assert g == w, f"{name}: line {i} differs\n  got:  {g!r}\n  want: {w!r}\n--- full output ---\n{actual}"
    assert len(got) == len(want), f"{name}: {len(got)} lines, expected {len(want)}\n--- full output ---\n{actual}"


def test_golden_set_is_complete():
    missing = sorted(set(REQUIRED) - set(CASES))
    assert not missing, f"golden specs missing: {missing}"
    without_txt = [c for c in CASES if not (GOLDEN / f"{c}.txt").exists() and not UPDATE]
    assert not without_txt, f"no expected output for {without_txt}: run with EVODSL_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("name", CASES)
def test_golden(name, capsys):
    code, out, err = check_stderr(f"tests/golden/{name}.evo", capsys)
    assert code == 1, f"{name}: `evodsl check` should fail with exit 1, got {code}\n{out}{err}"
    assert out == "", "a failing check prints nothing on stdout"
    assert "Traceback" not in err and "internal error" not in err
    txt = GOLDEN / f"{name}.txt"
    if UPDATE:
        txt.write_text(collapse(err), encoding="utf-8")
    assert_lines(err, expand(txt.read_text(encoding="utf-8")), name)
    if name in REQUIRED:
        codes = re.findall(r"error\[(E\d+)\]", err)
        assert codes == REQUIRED[name], f"{name}: codes {codes}, expected {REQUIRED[name]}"


def test_style_md_example_renders_verbatim():
    """The example in STYLE.md, "Errors are part of the product", with the registered variants listed."""
    load_all()
    listed = ", ".join(variants("mha"))
    expected = (
        "specs/block.evo:1:21: error[E202]: unknown variant 'adaptive_spam' for op 'mha'\n"
        "  |\n"
        "1 | block = norm -> mha(adaptive_spam, R=32) -> ffn(glu)\n"
        f"  |                     ^^^^^^^^^^^^^ expected one of: {listed}\n"
        "  = help: did you mean 'adaptive_span'?"
    )
    src = "block = norm -> mha(adaptive_spam, R=32) -> ffn(glu)\n"
    from evodsl.passes.build import build
    from evodsl.syntax import parse_program

    _, collector = build(parse_program(src, "specs/block.evo"))
    with pytest.raises(EvoError) as info:
        collector.raise_if_any()
    assert_lines(info.value.render(), expected, "STYLE.md example")
    assert str(info.value) == expected  # str(err) is the rendered text


def test_multiple_errors_are_collected_and_counted():
    src = (GOLDEN / "multiple_errors.evo").read_text()
    with pytest.raises(EvoError) as info:
        evodsl.parse(src)
    err = info.value
    assert len(err.diagnostics) == 6
    assert err.render().endswith("\n\n6 errors")
    positions = [(d.span.line, d.span.col) for d in err.diagnostics]
    assert positions == sorted(positions), "diagnostics come in source order"


def test_no_cascade_from_a_failed_binding():
    """A binding whose value had an error is not reported again where it is used."""
    src = "vocab = 10 / 3\nd_ff = 4 * d_modle\nd_model = 16\nblock = ffn(mlp, d_ff=d_ff)\n" \
          "model m = input(tokens) -> embed(token) -> block -> head(lm)\n"
    with pytest.raises(EvoError) as info:
        evodsl.parse(src)
    assert info.value.codes == ["E212", "E205"]


# ---------------------------------------------------------------- the Python API


BAD = "d_model = 64\nblock = norm -> mha(softmax, heads=0) -> ffn(glu)\n"


def _assert_located(err: EvoError, file: str, line: int, col: int) -> None:
    assert type(err) is EvoError
    assert err.diagnostics, "an EvoError carries at least one diagnostic"
    d = err.diagnostics[0]
    assert (d.span.file, d.span.line, d.span.col) == (file, line, col)
    assert err.__cause__ is None and (err.__suppress_context__ or err.__context__ is None)


@pytest.mark.parametrize("fn", [evodsl.parse, lambda s: evodsl.compile(s, device="meta")], ids=["parse", "compile"])
def test_api_text_input_raises_evoerror_with_location(fn):
    with pytest.raises(EvoError) as info:
        fn(BAD)
    _assert_located(info.value, "<string>", 2, 36)
    assert info.value.codes == ["E204"]


@pytest.mark.parametrize("kind", ["str", "Path"])
@pytest.mark.parametrize("fn", [evodsl.parse, lambda s: evodsl.compile(s, device="meta")], ids=["parse", "compile"])
def test_api_path_input_raises_evoerror_with_location(fn, kind, tmp_path):
    path = tmp_path / "bad.evo"
    path.write_text(BAD)
    arg = str(path) if kind == "str" else path
    with pytest.raises(EvoError) as info:
        fn(arg)
    _assert_located(info.value, str(path), 2, 36)
    assert info.value.render().startswith(f"{path}:2:36: error[E204]")


@pytest.mark.parametrize("src,code,line,col", [
    ("block = norm -> mha(", "E103", 1, 21),  # Lark UnexpectedEOF
    ("block = norm -> mha @ ffn", "E102", 1, 21),  # Lark UnexpectedCharacters
    ("block = norm mha -> ffn", "E101", 1, 18),  # Lark UnexpectedToken
    ("block = mha(softmax, dropout=2)", "E204", 1, 30),  # pydantic ValidationError
    ("block = mha(softmax, heads=1e400)", "E204", 1, 28),  # a float where an int is needed
    ("d_model = 30\nblock = mha(softmax, heads=4)", "E300", 2, 28),  # shape rule
    # a pooled [b, d] vector is not token ids [b, n] (found by the fuzzer: it reached torch's embedding)
    ("d_model = 16\nmodel m = input(tokens, vocab=9) -> embed(token) -> head(pooler) -> embed(token)",
     "E300", 2, 69),
], ids=["eof", "char", "token", "pydantic", "float", "shape", "pooled-ids"])
def test_no_raw_library_exception(src, code, line, col):
    with pytest.raises(EvoError) as info:
        evodsl.compile(src, device="meta")
    assert info.value.codes[0] == code
    _assert_located(info.value, "<string>", line, col)


def test_missing_file_is_e401(tmp_path):
    missing = tmp_path / "nope.evo"
    for arg in (str(missing), missing):
        with pytest.raises(EvoError) as info:
            evodsl.parse(arg)
        (d,) = info.value.diagnostics
        assert d.code == "E401" and d.span is None  # no source to point into
        assert str(missing) in d.message
        assert info.value.render().startswith("error[E401]: cannot read spec")


def test_unreadable_spec_is_e401(tmp_path):
    folder = tmp_path / "dir.evo"
    folder.mkdir()
    binary = tmp_path / "latin1.evo"
    binary.write_bytes(b"block = norm \xff\xfe\n")
    for arg in (folder, binary):
        with pytest.raises(EvoError) as info:
            evodsl.parse(arg)
        assert info.value.codes == ["E401"]


def test_unknown_backend_is_e402():
    with pytest.raises(EvoError) as info:
        evodsl.compile("block = norm", backend="jax")
    assert info.value.codes == ["E402"]


# ---------------------------------------------------------------- pathological specs (found by tests/test_fuzz.py)


@pytest.mark.parametrize("src,codes", [
    ("d_model = 16\nb = " + "residual(" * 300 + "mha" + ")" * 300, ["E104"]),
    ("d = " + "-" * 3000 + "1\nb = mha", ["E104"]),
    ("d = " + " + ".join(["1"] * 3000) + "\nb = mha", ["E104"]),
    ("d_model = 16\nb = " + "residual(" * 60 + "mha" + ")" * 60, None),  # deep, but within the limit
    ("d_model = 16\nx = norm -> residual(x)", ["E207"]),
    ("d_model = 16\na = parallel(mha, b)\nb = repeat(a, 2)\nmodel m = input(features, d=16) -> b",
     ["E201", "E207"]),
    ("a = a\nmodel m = a", ["E207", "E217"]),
], ids=["deep-residual", "deep-neg", "long-sum", "deep-ok", "recursive-residual", "recursive-pair", "self"])
def test_pathological_specs(src, codes):
    if codes is None:
        evodsl.parse(src)
        return
    with pytest.raises(EvoError) as info:
        evodsl.parse(src)
    assert info.value.codes == codes
    lines = src.split("\n")
    for d in info.value.diagnostics:
        assert 1 <= d.span.line <= len(lines) and 1 <= d.span.col <= len(lines[d.span.line - 1]) + 1


def test_locations_count_lines_as_the_parser_does():
    """Only '\\n' ends a line: a form feed or U+2028 inside a line does not shift the line shown."""
    with pytest.raises(EvoError) as info:
        evodsl.parse("d_model = 16\x0cblock = mhaa -> ffn")
    (d,) = info.value.diagnostics
    assert (d.code, d.span.line, d.span.col) == ("E201", 1, 22)
    assert info.value.render().split("\n")[3] == "  |                      ^^^^"
    with pytest.raises(EvoError) as info:
        evodsl.parse("d_model = 16\x0cblock = mha\u2028 -> ffn")
    (d,) = info.value.diagnostics
    assert (d.code, d.span.line, d.span.col) == ("E102", 1, 25)
    assert info.value.render().split("\n")[3] == "  |" + " " * 25 + "^"
    with pytest.raises(EvoError) as info:
        evodsl.parse("d_model = 16\r\nblock = norm -> mha(softmax, heads=0)\r\n")
    assert info.value.render().split("\n")[2] == "2 | block = norm -> mha(softmax, heads=0)"
    with pytest.raises(EvoError) as info:
        evodsl.parse("block = norm -> mha(\x0c\n\n")
    (d,) = info.value.diagnostics
    assert (d.code, d.span.line) == ("E103", 1)


def test_keyword_arguments_given_twice():
    for src in ("block = residual(mha, scale=rezero, scale=rezero)", "block = parallel(mha, ffn, merge=sum, merge=mean)",
                "block = repeat(mha, 2, shared=true, shared=false)", "block = mha(softmax, heads=4, heads=2)"):
        with pytest.raises(EvoError) as info:
            evodsl.parse(src)
        assert info.value.codes == ["E206"], src
        assert "is given twice" in info.value.diagnostics[0].message
