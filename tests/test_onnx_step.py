"""One decoding step as an ONNX graph (`evodsl.export(..., step=True)`, `evodsl export SPEC --step`): a greedy
loop in onnxruntime alone, from the empty state, gives `model.generate`'s tokens, its logits are torch's decode's
at every step; the file's inputs and outputs have the documented names and symbolic batch and length axes; the CLI
writes it, and refuses a model that cannot decode (E411) or whose prompt is another graph (E413), leaving no file.

Each case is exported once (a module-scoped cache): an export takes 10 to 15 s here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import evodsl
import evodsl.backends.onnx_step as onnx_step
from evodsl.cli import main
from spechelpers import small

ROOT = Path(__file__).resolve().parents[1]
LM = """
vocab = 61
d_model = 32
heads = 4
model lm(causal=true) = input(tokens) -> embed(token) -> {pos}
    -> repeat(norm -> {mha} -> norm -> ffn, 2) -> norm -> head(lm)
"""
CASES = {  # case -> (position scheme, attention)
    "softmax_gqa_rope": ("pos(rope)", "mha(softmax, kv_heads=2)"),
    "local": ("pos(rope)", "mha(local, window=4, kv_heads=1)"),  # 21 tokens: the cache stops at the window
    "linear": ("pos(learned, max_len=64)", "mha(linear)"),
    "alibi": ("pos(alibi)", "mha(softmax)"),
}
PROMPT, NEW, BATCH = 5, 16, 2
TOL = 1e-4  # max |onnxruntime - torch| <= TOL * max |torch| for the logits, float32


def _spec(case: str) -> str:
    pos, mha = CASES[case]
    return LM.format(pos=pos, mha=mha)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    done = {}

    def get(case: str):
        if case not in done:
            path = tmp_path_factory.mktemp(case) / "step.onnx"
            result = evodsl.export(_spec(case), path, step=True)
            done[case] = (evodsl.compile(_spec(case)), path, result)
        return done[case]

    return get


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def empty_state(session, batch: int) -> dict:
    """The README's rule: `batch` is the batch, every other named axis 0 (no K/V yet), the rest as written."""
    return {i.name: np.zeros([batch if d == "batch" else 0 if isinstance(d, str) else d for d in i.shape],
                             dtype=np.float32) for i in session.get_inputs()[2:]}


@pytest.mark.parametrize("case", CASES)
def test_greedy_loop_in_onnxruntime_is_generate(case, exported):
    """A prompt from the empty state, then one token per call, each call fed the state the last returned: the
    tokens are generate's, and the logits torch's decode's at every step."""
    model, path, _ = exported(case)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    prompt = torch.randint(0, 61, (BATCH, PROMPT), generator=torch.Generator().manual_seed(7))
    want = model.generate(prompt, max_new_tokens=NEW)
    past, ids, out, state, seen = empty_state(session, BATCH), prompt, [prompt], None, 0
    for _ in range(NEW):
        seen += ids.shape[1]
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((BATCH, seen), dtype=np.int64),
                                 **past})
        with torch.no_grad():
            logits, state = model.decode(ids, state)
        err = np.abs(got[0] - logits.numpy()).max()
        assert err <= TOL * np.abs(logits.numpy()).max(), f"logits differ by {err} after {seen} tokens"
        ids = torch.from_numpy(got[0][:, -1].argmax(-1))[:, None]
        out.append(ids)
        past = dict(zip(past, got[1:]))
    assert torch.equal(torch.cat(out, dim=1), want)
    lengths = {name: a.shape[2] for name, a in past.items() if name.endswith((".key", ".value"))}
    if case == "local":  # the window's cache: the last 4 positions of the 20 seen
        assert set(lengths.values()) == {4}
    elif case != "linear":
        assert set(lengths.values()) == {PROMPT + NEW - 1}


def test_inputs_and_outputs_are_named_with_symbolic_axes(exported):
    """input_ids, attention_mask, then past.{i}.key/value (K/V) or past.{i}.state/norm (linear attention's S and
    z) in program order; logits, then present.* in the same order. Batch and lengths are dim_params."""
    expect = {
        "softmax_gqa_rope": {"past.0.key": ["batch", 2, "past_seq", 8], "past.1.value": ["batch", 2, "past_seq", 8],
                             "present.0.key": ["batch", 2, "past_seq + seq", 8]},
        "local": {"past.0.key": ["batch", 1, "past_0_seq", 8], "past.1.value": ["batch", 1, "past_1_seq", 8],
                  "present.1.key": ["batch", 1, "Min(4, past_1_seq + seq)", 8]},
        "linear": {"past.0.state": ["batch", 4, 8, 8], "past.1.norm": ["batch", 4, 8],
                   "present.0.state": ["batch", 4, 8, 8]},
    }
    for case, shapes in expect.items():
        _, path, result = exported(case)
        proto = onnx.load(str(path))
        kind = ("state", "norm") if case == "linear" else ("key", "value")
        caches = [f"{i}.{name}" for i in range(2) for name in kind]
        assert [vi.name for vi in proto.graph.input] == ["input_ids", "attention_mask", *[f"past.{c}" for c in caches]]
        assert [vi.name for vi in proto.graph.output] == ["logits", *[f"present.{c}" for c in caches]]
        assert list(result.input_names) == [vi.name for vi in proto.graph.input]
        dims = {vi.name: _dims(vi) for vi in [*proto.graph.input, *proto.graph.output]}
        assert dims["input_ids"] == ["batch", "seq"]
        assert dims["attention_mask"] == ["batch", "past_seq + seq"]
        assert dims["logits"] == ["batch", "seq", 61]
        for name, dim in shapes.items():
            assert dims[name] == dim, name
        assert result.dims == dims


def test_a_failed_check_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_step, "STEP_RTOL", -1.0)  # no difference passes
    with pytest.raises(evodsl.EvoError, match=r"E407.*differs from torch's decode in 'logits'"):
        evodsl.export(_spec("alibi"), tmp_path / "s.onnx", step=True)
    assert os.listdir(tmp_path) == []


def test_cli_export_step(tmp_path, capsys):
    """GPT-2's spec at a small size (learned positions): the file, and what the command says it wrote."""
    sets = [f"--set={k}={v}" for k, v in small(ROOT / "specs" / "gpt2.evo").items()]
    assert main(["export", str(ROOT / "specs" / "gpt2.evo"), "--step", "-o", str(tmp_path / "s.onnx"), *sets]) == 0
    out = capsys.readouterr().out
    assert "one decoding step: inputs 'input_ids' [batch, seq], 'attention_mask' [batch, past_seq + seq]" in out
    assert "'past.{i}.key' [batch, 4, past_seq, 16] (i = 0, 1)" in out
    assert "'present.{i}.value' [batch, 4, past_seq + seq, 16] (i = 0, 1)" in out and "max abs difference" in out
    assert os.listdir(tmp_path) == ["s.onnx"]


@pytest.mark.parametrize("spec,command,code,why", [
    ("bert", "export", "E411", "not causal"),
    ("fnet", "compile", "E411", "not causal"),
    ("memory_transformer", "export", "E413", "cat(seq) joins its prefix"),
    ("t5_small", "export", "E413", "encoder-decoder"),
])
def test_cli_refuses_a_model_without_a_one_graph_step(spec, command, code, why, tmp_path, capsys):
    path = ROOT / "specs" / f"{spec}.evo"
    args = [command, str(path), "--step", "-o", str(tmp_path / "s.onnx"), *[f"--set={k}={v}" for k, v in
                                                                          small(path).items()]]
    if command == "compile":
        args += ["--backend", "onnx"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"error[{code}]" in err and why in err
    assert os.listdir(tmp_path) == []


def test_step_needs_the_onnx_backend(capsys):
    assert main(["compile", str(ROOT / "specs" / "gpt2.evo"), "--step"]) == 2
    assert "--backend onnx" in capsys.readouterr().err


def test_the_readme_loop_is_generate(exported):
    """The README's greedy loop, run as written on an exported file."""
    readme = (ROOT / "README.md").read_text().split("### One decoding step")[1].split("\n## ")[0]
    code = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    model, path, _ = exported("alibi")
    prompt = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(2))
    env = {"prompt_ids": prompt.numpy()}
    exec(code.replace('"step.onnx"', repr(str(path))), env)  # noqa: S102 - the README's own example
    assert np.array_equal(env["tokens"], model.generate(prompt, max_new_tokens=16).numpy())
