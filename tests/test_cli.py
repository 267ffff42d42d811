"""The `evodsl` command: exit codes (0 ok, 1 spec error, 2 usage error), what each command prints, artifacts.

Run in-process through evodsl.cli.main (argparse's usage errors arrive as SystemExit), and once for real through
the installed console script.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.cli import _parser, main
from evodsl.ops import REGISTRY, load_all

ROOT = Path(__file__).resolve().parent.parent
GPT2 = ROOT / "specs" / "gpt2.evo"

TINY = """\
vocab   = 50
d_model = 16
heads   = 2
block = norm -> mha -> norm -> ffn(glu)
model tiny(causal=true) =
    input(tokens) -> embed(token) -> pos(learned, max_len=32) -> repeat(block, 2) -> norm -> head(lm, tied=true)
"""
# embed 50*16 + pos 32*16 + 2 * (norm 32 + attn 4*(16*16+16) + norm 32 + glu 3*16*64) + norm 32; the head is tied
TINY_PARAMS = 800 + 512 + 2 * (32 + 1088 + 32 + 3072) + 32

BAD = "d_model = 16\nblock = norm -> mha(softmax, heads=3) -> ffn(glu)\n"


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.evo"
    path.write_text(TINY)
    return path


@pytest.fixture
def bad(tmp_path) -> Path:
    path = tmp_path / "bad.evo"
    path.write_text(BAD)
    return path


def run(argv, capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's SystemExit counts as the exit code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- check


def test_check_prints_the_graph(capsys):
    code, out, err = run(["check", GPT2], capsys)
    assert code == 0 and err == ""
    assert out == str(evodsl.parse(GPT2)) + "\n"
    assert out.startswith("graph gpt2(causal=true):\n")
    assert "repeat[12](%h2)" in out and "call[head](%h4, lm" in out


def test_check_bad_spec_exits_1_with_the_rendered_error(bad, capsys):
    code, out, err = run(["check", bad], capsys)
    assert code == 1 and out == ""
    with pytest.raises(EvoError) as info:
        evodsl.parse(bad)
    assert err == info.value.render() + "\n"
    assert err.startswith(f"{bad}:2:36: error[E300]: d_model 16 is not divisible by heads=3")
    assert "Traceback" not in err


def test_check_missing_file_exits_1_with_e401(tmp_path, capsys):
    code, out, err = run(["check", tmp_path / "nope.evo"], capsys)
    assert code == 1 and out == ""
    assert err.startswith("error[E401]: cannot read spec") and "Traceback" not in err


# ---------------------------------------------------------------- usage errors


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["check"], ["compile"], ["compile", "GPT2", "--backend", "tensorflow"],
    ["compile", "GPT2", "--seed", "x"], ["ops", "--json", "--bogus"],
], ids=["no-args", "unknown-command", "check-no-file", "compile-no-file", "bad-backend", "bad-seed", "bad-flag"])
def test_usage_errors_exit_2(argv, capsys):
    argv = [GPT2 if a == "GPT2" else a for a in argv]
    code, out, err = run(argv, capsys)
    assert code == 2, (argv, code, out, err)
    assert "usage: evodsl" in err and "Traceback" not in err + out


def _commands() -> list[str]:
    sub = next(a for a in _parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", [None, *_commands()])
def test_help_on_every_command(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    code, out, err = run(argv, capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: evodsl" + ("" if command is None else f" {command}"))


def test_the_commands_are_there():
    assert {"check", "compile", "ops"} <= set(_commands())


# ---------------------------------------------------------------- compile


def test_compile_prints_the_exact_parameter_count(tiny, capsys):
    code, out, err = run(["compile", tiny], capsys)
    assert code == 0 and err == ""
    model = evodsl.compile(tiny)
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMS
    assert out.startswith(f"tiny: {type(model).__name__} from {tiny} (backend torch, seed 0)\n")
    assert f"parameters: {TINY_PARAMS:,d} ({TINY_PARAMS / 1e3:.2f}K)\n" in out
    for name, _ in model.named_children():
        assert f"\n  {name} " in out, f"submodule {name} missing from the summary"


def test_compile_meta_gpt2_parameter_count(capsys):
    code, out, err = run(["compile", GPT2, "--meta"], capsys)
    assert code == 0 and err == ""
    assert "parameters: 124,439,808 (124.44M)" in out  # HF GPT2LMHeadModel


def test_compile_output_roundtrips_through_load(tiny, tmp_path, capsys):
    out_file = tmp_path / "tiny.pt"
    code, out, err = run(["compile", tiny, "--seed", "3", "-o", out_file], capsys)
    assert code == 0 and err == ""
    assert out_file.is_file() and f"wrote {out_file}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.evo", "tiny.pt"], "no temporary file left behind"
    loaded = evodsl.load(out_file)
    compiled = evodsl.compile(tiny, seed=3)
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), compiled(ids))
    assert loaded.state_dict().keys() == compiled.state_dict().keys()
    other = evodsl.compile(tiny, seed=4)
    with torch.no_grad():
        assert not torch.equal(other(ids), compiled(ids)), "the seed reaches the weights"


def test_failing_compile_writes_nothing(bad, tmp_path, capsys):
    out_file = tmp_path / "bad.pt"
    code, out, err = run(["compile", bad, "-o", out_file], capsys)
    assert code == 1 and "error[E300]" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.evo"], "a failed compile leaves no file"


def test_compile_output_usage_errors_write_nothing(tiny, tmp_path, capsys):
    meta_file = tmp_path / "meta.pt"
    code, _, err = run(["compile", tiny, "--meta", "-o", meta_file], capsys)
    assert code == 2 and "drop --meta" in err and not meta_file.exists()
    code, _, err = run(["compile", tiny, "-o", tmp_path / "no" / "such" / "dir.pt"], capsys)
    assert code == 2 and "output folder does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.evo"]


# ---------------------------------------------------------------- ops


def test_ops_lists_every_registered_op(capsys):
    load_all()
    code, out, err = run(["ops"], capsys)
    assert code == 0 and err == ""
    for op in REGISTRY.values():
        assert f"{op.id} " in out, f"{op.id} missing from `evodsl ops`"
        assert op.paper in out


def test_ops_json(capsys):
    load_all()
    code, out, err = run(["ops", "--json"], capsys)
    assert code == 0 and err == ""
    rows = json.loads(out)
    assert {(r["family"], r["variant"]) for r in rows} == set(REGISTRY)
    assert len(rows) == len(REGISTRY)
    for r in rows:
        op = REGISTRY[(r["family"], r["variant"])]
        assert r["op"] == op.id and r["paper"] == op.paper and r["paper"]
        assert r["causal"] == op.causal and r["summary"] == op.summary
        fields = op.params.model_fields
        assert [p["name"] for p in r["params"]] == list(fields)
        for p in r["params"]:
            f = fields[p["name"]]
            assert p["required"] == f.is_required()
            want = None if f.is_required() else json.loads(json.dumps(f.default, default=str))
            assert p["default"] == want, f"{op.id}.{p['name']}: default {p['default']!r}, expected {want!r}"


# ---------------------------------------------------------------- the real console script


def test_console_script(bad):
    script = Path(sys.executable).with_name("evodsl")
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("EVODSL_TRACEBACK", None)
    ok = subprocess.run([script, "check", "specs/gpt2.evo"], cwd=ROOT, capture_output=True, text=True, env=env,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("graph gpt2(causal=true):\n") and ok.stderr == ""
    fail = subprocess.run([script, "check", str(bad)], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert fail.returncode == 1 and fail.stdout == ""
    assert fail.stderr.startswith(f"{bad}:2:36: error[E300]") and "Traceback" not in fail.stderr


@pytest.mark.parametrize("spec,line", [
    ("gpt2", "inputs: input_ids [b, n], attention_mask [b, n] (optional) -> [b, n, 50257]"),
    ("bert", "inputs: input_ids [b, n], attention_mask [b, n] (optional), token_type_ids [b, n] (optional) "
             "-> [b, 768]"),
    ("fnet", "inputs: input_ids [b, n], token_type_ids [b, n] (optional) -> [b, 768]"),  # fnet refuses padding
])
def test_compile_summarises_what_the_model_takes(spec, line, capsys):
    assert main(["compile", "--meta", str(ROOT / "specs" / f"{spec}.evo")]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == line


# ---------------------------------------------------------------- models with streams

T5 = ROOT / "specs" / "t5_small.evo"


def test_check_lists_the_streams(capsys):
    code, out, _ = run(["check", T5], capsys)
    assert code == 0
    assert "  # stream encoder = %" in out and "(bidirectional, [b, n, 512])" in out
    lines = out.splitlines()
    assert lines[-2:] == ["stream encoder: [b, n, 512], bidirectional, from input input_ids",
                          "stream decoder: [b, m, 32128], causal, from input decoder_input_ids, reads encoder"]


def test_compile_prints_both_inputs_and_the_streams(capsys):
    code, out, _ = run(["compile", T5, "--meta"], capsys)
    assert code == 0
    assert ("inputs: input_ids [b, n], decoder_input_ids [b, m], attention_mask [b, n] (optional), "
            "decoder_attention_mask [b, m] (optional) -> [b, m, 32128]") in out
    assert "stream encoder: bidirectional\nstream decoder: causal" in out


def test_cost_takes_the_target_length(capsys):
    code, out, _ = run(["cost", T5, "--seq", "512", "--decoder-seq", "64", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert (data["seq"], data["decoder_seq"]) == (512, 64)
    assert data == evodsl.cost(T5, seq=512, decoder_seq=64)
    assert data["flops"]["forward"] != evodsl.cost(T5, seq=512)["flops"]["forward"]  # m = n by default
    code, out, _ = run(["cost", T5, "--seq", "512", "--decoder-seq", "64"], capsys)
    assert "batch 1, seq 512, decoder seq 64, float32" in out
    assert "time O(n^2 d + m^2 d + n m d)" in out


# ---------------------------------------------------------------- generate

CHAR_LM = ("vocab = 256\nd_model = 32\nheads = 4\n"
           "model char(causal=true) = input(tokens) -> embed(token) -> pos(rope) -> repeat(norm -> mha -> norm -> ffn, 2)"
           " -> norm -> head(lm)\n")


def test_generate_continues_a_text_prompt_with_saved_weights(tmp_path, capsys):
    spec = tmp_path / "char.evo"
    spec.write_text(CHAR_LM)
    assert run(["compile", spec, "--seed", "4", "-o", tmp_path / "w.pt"], capsys)[0] == 0
    code, out, err = run(["generate", spec, "--weights", tmp_path / "w.pt", "--prompt", "abc", "--max-new-tokens",
                          "7"], capsys)
    assert code == 0, err
    model = evodsl.load(tmp_path / "w.pt")
    want = model.generate(torch.tensor([list(b"abc")]), max_new_tokens=7)[0].tolist()
    assert out == bytes(want).decode("utf-8", errors="replace") + "\n"
    code, out, _ = run(["generate", spec, "--ids", "97,98,99", "--max-new-tokens", "7", "--seed", "4"], capsys)
    assert code == 0 and out.strip() == ",".join(map(str, want))  # the same seed's weights, as token ids


def test_generate_says_what_it_cannot_do(tmp_path, capsys):
    code, _, err = run(["generate", GPT2, "--prompt", "hi", "--set", "layers=1"], capsys)
    assert code == 1 and "E412" in err and "byte-level" in err
    code, _, err = run(["generate", ROOT / "specs" / "bert.evo", "--ids", "1,2", "--set", "layers=1"], capsys)
    assert code == 1 and "E411" in err and "not causal" in err
