"""evodsl.distributed: DDP, FSDP2 and tensor parallelism on 2 gloo processes (CPU) take the same AdamW step as one
process; the TP plan from the graph and its refusals; activation checkpointing per block (gradients unchanged,
the saved bytes `evodsl cost --train` gives, measured).

The 2-rank run is one subprocess (tests/_distributed_worker.py, torch.multiprocessing spawn, a free port, a
timeout so that a hang fails): each rank checks a small gpt2-like and a small llama-like spec under all three."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evodsl
import evodsl.distributed as ed
from evodsl.measure import measure_memory
from evodsl.report import build_report, cost_data

WORKER = Path(__file__).with_name("_distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from _distributed_worker import GPT2, LLAMA, SPAN  # noqa: E402

TOL = 1e-5  # float32: the loss and every updated parameter, against one process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist") / "results.json"
    tries = []
    for _ in range(2):  # a second try only where a rank died by a signal (torch's gloo teardown, seen once in CI)
        run = subprocess.run([sys.executable, str(WORKER), str(_free_port()), str(out)], capture_output=True,
                             text=True, timeout=300)
        tries.append(run.stderr[-3000:])
        if run.returncode == 0 or "terminated with signal" not in run.stderr:
            break
    assert run.returncode == 0, "\n---- next try ----\n".join(tries)
    return json.loads(out.read_text())


@pytest.mark.xdist_group("distributed")  # one xdist worker, so the 2-rank run happens once
@pytest.mark.parametrize("spec, kind", [(s, k) for s in ("gpt2", "llama") for k in ("ddp", "fsdp", "tp")]
                         + [("span", "ddp"),  # an aux loss added after the forward (model.aux_loss())
                            ("local", "tp"),  # mha(local): the band kernel on the local heads
                            ("xpos", "tp"),  # pos(xpos) inside the local heads (the same factors in every head)
                            ("llama", "fsdp_ckpt")])  # FSDP2 over compile(checkpoint=True)
def test_one_step_equals_one_process(two_ranks, spec, kind):
    r = two_ranks[spec][kind]
    assert r["all_params"], "the wrapped model's parameters are not the model's"
    assert r["loss"] < TOL and r["params"] < TOL, r
    if kind.startswith("fsdp"):  # every parameter sharded, one unit per block copy, the embedding (+ tied head), the root
        assert r["sharded"] == len(dict(evodsl.compile(GPT2 if spec == "gpt2" else LLAMA).named_parameters()))
        assert r["units"] == (["", "blocks.0", "blocks.1", "embed+head"] if spec == "gpt2" else
                              ["", "blocks.0", "blocks.1", "embed", "head"])
    elif kind == "tp":  # q, k, v, o and the FFN's linears (weights, and biases where the spec has them)
        assert r["sharded"] == {"gpt2": 24, "local": 24, "llama": 14, "xpos": 14}[spec]


def test_tp_plan_from_the_graph():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    planned = ed.tp_plan(evodsl.compile(LLAMA, device="meta"), 2)
    plan = planned["plan"]
    assert {k for k, v in plan.items() if isinstance(v, ColwiseParallel)} == {
        f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                     "ffn.gate_proj", "ffn.up_proj")}
    assert {k for k, v in plan.items() if isinstance(v, RowwiseParallel)} == {
        f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.o_proj", "ffn.down_proj")}
    assert planned["heads"] == [("blocks.0.attn", 2, 1), ("blocks.1.attn", 2, 1)]  # heads 4, kv_heads 2 over 2
    assert len(ed.tp_plan(evodsl.compile(GPT2.replace("mha(softmax", "mha(local, window=4"), device="meta"),
                          4)["heads"]) == 2


@pytest.mark.parametrize("change, words", [
    (("kv_heads=2", "kv_heads=1"), r"mha\(softmax\) at blocks\.0\.attn: heads=4 and kv_heads=1 must both divide"),
    (("kv_heads=2, bias=false", "kv_heads=2, bias=false, softcap=30.0"), r"softcap= option has per-head"),
    (("pos(rope)", "pos(alibi)"), r"position scheme pos\(alibi\) adds per-head terms"),
    (("mha(softmax, heads=4, kv_heads=2", "mha(linear, heads=4"), r"cannot split mha\(linear\) at blocks\.0\.attn"),
    (("d_ff=48", "d_ff=47"), r"ffn\(swiglu\) at blocks\.1\.ffn: its hidden width 47 must divide by the 2 ranks"),
])
def test_tp_refuses_what_it_cannot_split(change, words):
    model = evodsl.compile(LLAMA.replace(*change), device="meta")
    with pytest.raises(evodsl.EvoError, match=words) as err:
        ed.tp_plan(model, 2)
    assert all(d.code == "E420" and d.span is not None for d in err.value.diagnostics)
    assert len(err.value.diagnostics) == 2  # every op refused, both blocks at once
    assert str(err.value).startswith("<string>:") and "^^^" in str(err.value)  # file:line:col and the caret


def test_fsdp_refuses_aux_losses():
    with pytest.raises(evodsl.EvoError, match=r"fsdp\(\) cannot shard mha\(adaptive_span\) at blocks\.0\.attn: its "
                                              r"aux_loss\(\) reads") as err:
        ed.fsdp(evodsl.compile(SPAN, device="meta"))
    assert [d.code for d in err.value.diagnostics] == ["E422", "E422"]


def test_fsdp_units_from_the_graph():
    assert ed.fsdp_units(evodsl.compile(GPT2, device="meta")) == [["blocks.1"], ["blocks.0"], ["embed", "head"]]
    t5 = ed.fsdp_units(evodsl.compile(WORKER.parents[1] / "specs" / "t5_small.evo", device="meta"))
    assert t5[-1] == ["encoder_embed", "decoder_embed", "decoder_head"]  # one weight: the source's, tied twice
    assert sorted(u[0] for u in t5[:-1]) == sorted(f"{s}_blocks.{i}" for s in ("encoder", "decoder") for i in range(6))


def _grads(model, ids):
    logits = model.train()(ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("spec", [GPT2, LLAMA])
def test_checkpoint_gives_the_same_gradients(spec):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    plain, ckpt = _grads(evodsl.compile(spec), ids), _grads(evodsl.compile(spec, checkpoint=True), ids)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6, msg=name)
    model = evodsl.compile(spec, checkpoint=True)
    with torch.no_grad():  # no grad (inference, decoding): the blocks run as they are
        torch.testing.assert_close(model(ids), evodsl.compile(spec)(ids), rtol=0, atol=0)


def test_checkpoint_recomputes_with_the_state_of_the_call():
    """T5: two streams, each with its own pos(t5_bias) table bound in the forward's state (the decoder's is bound
    last), and dropout: the encoder's blocks are recomputed with the encoder's table and the same dropout masks."""
    from spechelpers import small

    spec = WORKER.parents[1] / "specs" / "t5_small.evo"
    ids = [torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(k)) for k in (0, 1)]
    grads = []
    for checkpoint in (False, True):
        model = evodsl.compile(spec, overrides=small(spec), checkpoint=checkpoint).train()
        torch.manual_seed(0)
        model(*ids).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("spec", ["specs/gpt2.evo", "specs/llama.evo"])
def test_checkpoint_saves_what_the_cost_says(spec):
    overrides = {"vocab": 256, "d_model": 64, "heads": 4, "layers": 4,
                 **({"n_ctx": 64} if "gpt2" in spec else {"d_ff": 128})}
    memory = cost_data(build_report(evodsl.parse(spec, overrides)), 64, 2, "float32")["memory"]
    model = evodsl.compile(spec, overrides=overrides, checkpoint=True)
    measured = measure_memory(model, torch.randint(0, 256, (2, 64)))
    assert memory["activations_training_checkpointed"] == pytest.approx(measured.training_saved, rel=0.10)
    assert memory["activations_training_checkpointed_peak"] == pytest.approx(measured.training_peak, rel=0.10)
    assert memory["activations_training_checkpointed"] < memory["activations_training"] / 4
    assert memory["activations_training_checkpointed_peak"] < memory["activations_training_peak"] / 2


def test_checkpoint_refuses_blocks_that_pass_scores_on():
    spec = ("model m(causal=true) = input(features, d=32) -> repeat(residual(mha(softmax, heads=4), scores=true) "
            "-> norm, 2) -> head(linear, d_out=2)")
    with pytest.raises(evodsl.EvoError, match=r"hands its \[b, h, n, n\] scores to the next block") as err:
        evodsl.compile(spec, checkpoint=True)
    assert err.value.diagnostics[0].code == "E421"


def test_cost_train_shows_checkpointing(capsys):
    from evodsl.cli import main

    main(["cost", "specs/gpt2.evo", "--train", "--seq", "128"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("activations (ckpt)"))
    assert "checkpoint=True" in line
