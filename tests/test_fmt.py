"""`evodsl fmt`: the canonical layout. Idempotent, the same graph after as before, every comment kept; the
fuzzer's programs (with comments, blank lines and line breaks thrown in) as the property test; specs/ kept
formatted."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import evodsl
from evodsl import EvoError
from evodsl.cli import main
from evodsl.fmt import LIMIT, format_source
from test_fuzz import FUZZ, _good_program, _near_valid_program

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").rglob("*.evo"))


def comments(text: str) -> Counter:
    return Counter("#" + line.split("#", 1)[1].rstrip() for line in text.split("\n") if "#" in line)


def outcome(text: str) -> str:
    """The graph as text, or the errors' codes and messages (spans move when the layout does)."""
    try:
        return str(evodsl.parse(text))
    except EvoError as err:
        return "\n".join(re.sub(r"line \d+", "line N", f"{d.code} {d.message}") for d in err.diagnostics)


def check(text: str) -> str:
    out = format_source(text)
    assert format_source(out) == out, "not idempotent"
    assert outcome(out) == outcome(text)
    assert comments(out) == comments(text)
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: str(p.relative_to(ROOT / "specs")))
def test_every_spec_is_formatted(spec):
    text = spec.read_text()
    assert format_source(text, str(spec)) == text, f"run: evodsl fmt {spec.relative_to(ROOT)}"


@st.composite
def decorated(draw, program):
    """A program with comments on their own lines and at line ends, blank lines, spaces and line breaks moved."""
    text = draw(program)
    text = re.sub(r" -> ", lambda m: draw(st.sampled_from([" -> ", "->", " ->  ", "\n    -> ", " ->\n  "])), text)
    text = re.sub(r", ", lambda m: draw(st.sampled_from([", ", ",", " , "])), text)
    out = []
    for i, line in enumerate(text.split("\n")):
        if draw(st.integers(0, 3)) == 0:
            out.append(draw(st.sampled_from(["", f"# own {i}", f"   # own {i}  ", ""])))
        out.append(line + draw(st.sampled_from(["", "", f"  # end {i}", f"# end {i}", "   "])))
    return draw(st.sampled_from(["", "\n", "# head\n"])) + "\n".join(out)


@settings(FUZZ, max_examples=150)
@given(decorated(_good_program()))
def test_valid_programs_keep_their_graph_and_comments(text):
    check(text)


@settings(FUZZ, max_examples=100)
@given(decorated(_near_valid_program()))
def test_near_valid_programs_keep_their_errors_and_comments(text):
    try:
        evodsl.syntax.parse_program(text)
    except EvoError:
        return  # a syntax error: fmt refuses it (tested below)
    check(text)


def test_spacing_alignment_and_continuations():
    text = ("vocab=100\nd_model = 32 # width\nheads    =   4\n\n"
            "block=norm->mha( softmax , heads = heads )->norm -> ffn\n"
            "model m ( causal = true ) =\n      input(tokens)->embed(token)\n  ->repeat(block,2)->head(lm)\n")
    assert check(text) == (
        "vocab   = 100\nd_model = 32  # width\nheads   = 4\n\n"
        "block = norm -> mha(softmax, heads=heads) -> norm -> ffn\n"
        "model m(causal=true) =\n    input(tokens) -> embed(token)\n    -> repeat(block, 2) -> head(lm)\n")


def test_arithmetic_keeps_the_parentheses_it_needs():
    text = "a = (1 + 2) * 3\nb = 1 + 2 * 3\nc = 8 - (2 - 1)\nd = (8 - 2) - 1\ne = -(a + b)\nf = 1e-5\n"
    assert check(text) == ("a = (1 + 2) * 3\nb = 1 + 2 * 3\nc = 8 - (2 - 1)\nd = 8 - 2 - 1\ne = -(a + b)\n"
                           "f = 1e-5\n")


def test_comments_stay_with_their_stage():
    text = ("d_model = 32\n# the block\nblock = norm  # pre-norm\n    -> mha\n    # the feed-forward\n    -> ffn\n"
            "model m {\n  # source\n  src = input(tokens, vocab=9) -> embed(token)  # tokens\n}  # end\n")
    assert check(text) == ("d_model = 32\n# the block\nblock = norm  # pre-norm\n    -> mha\n"
                           "    # the feed-forward\n    -> ffn\n"
                           "model m {\n    # source\n    src = input(tokens, vocab=9) -> embed(token)  # tokens\n"
                           "}  # end\n")


def test_long_pipelines_are_broken_before_the_stage_that_passes_the_limit():
    stages = " -> ".join(f"ffn(mlp, d_ff={64 + i})" for i in range(12))
    out = check(f"d_model = 16\nblock = {stages}\n")
    lines = out.split("\n")[1:-1]
    assert len(lines) > 1 and all(len(line) <= LIMIT for line in lines)
    assert all(line.startswith("    -> ") for line in lines[1:])


def test_cli_check_rewrite_and_refusal(tmp_path, capsys):
    good, messy, bad = tmp_path / "good.evo", tmp_path / "messy.evo", tmp_path / "bad.evo"
    good.write_text("d_model = 16\nblock   = norm -> mha\n")
    messy.write_text("d_model=16\nblock=norm->mha\n")
    bad.write_text("d_model = 16\nblock = norm -> mha(\n")
    assert main(["fmt", "--check", str(good)]) == 0
    assert main(["fmt", "--check", str(good), str(messy)]) == 1
    out, err = capsys.readouterr()
    assert "-block=norm->mha" in out and "+block   = norm -> mha" in out and "1 of 2 file(s) not formatted" in err
    assert messy.read_text() == "d_model=16\nblock=norm->mha\n"  # --check writes nothing
    assert main(["fmt", str(messy)]) == 0
    assert messy.read_text() == good.read_text()
    assert main(["fmt", str(bad)]) == 1
    assert f"{bad}:2:" in capsys.readouterr().err
    assert bad.read_text() == "d_model = 16\nblock = norm -> mha(\n"  # left as it was
    assert main(["fmt", str(tmp_path / "missing.evo")]) == 1


def test_a_stage_too_long_alone_is_broken_inside():
    """A residual's body, a call's arguments, parallel branches: one level deeper, `)` back on its own line; the
    body on one line where it fits, a stage a line where not; the next stage on the next line."""
    args = ", ".join(f"k{i}={i}" for i in range(30))
    body = "norm(layernorm, eps=1e-5) -> mha(softmax, heads=4, bias=false, dropout=0.1) -> dropout(p=0.1)"
    text = (f"d_model = 16\nblock = residual({body} -> ffn(mlp, d_ff=64)) -> norm\n"
            f"wide = norm -> ffn(mlp, {args})  # end\n"
            f"two = parallel({body}, {body}, merge=sum) -> norm\n"
            f"deep = residual(norm -> ffn(mlp, {args}) -> {body})\n")
    out = check(text)
    assert all(len(line) <= LIMIT for line in out.split("\n"))
    assert out.split("\n")[1:9] == [
        "block =", "    residual(", "        norm(layernorm, eps=1e-5)", "        -> mha(softmax, heads=4, bias=false, "
        "dropout=0.1)", "        -> dropout(p=0.1)", "        -> ffn(mlp, d_ff=64)", "    )", "    -> norm"]
    wide = out[out.index("wide ="):out.index("two =")].split("\n")
    assert wide[0] == "wide = norm" and wide[1] == "    -> ffn(" and wide[2].startswith("        mlp, k0=0, k1=1,")
    assert wide[-2] == "    )  # end"
    two = out[out.index("two ="):out.index("deep =")].split("\n")
    assert two[1:6] == ["    parallel(", f"        {body},", f"        {body},", "        merge=sum", "    )"]
    deep = out[out.index("deep ="):].split("\n")
    assert deep[1:4] == ["    residual(", "        norm", "        -> ffn("] and deep[4].startswith("            mlp, k0=0")
