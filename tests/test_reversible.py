"""repeat(body, N, reversible=true): RevNet's reversible residual stack (Reformer, section 3).

The body's two residual sublayers F and G act on the pair (X1, X2) = (x, x): Y1 = X1 + F(X2), Y2 = X2 + G(Y1);
the output is concat(Y1, Y2) (width 2d). Checked: the wiring against the equation written out with the body's
own modules; gradients (inputs and parameters, float64, dropout on) equal plain autograd of the same wiring;
only the output is kept for backward, flat in the number of copies (measured at 2, 4, 8), and `evodsl cost`
holds to measurement (params exact, FLOPs 1% with the backward's recomputation, memory 10%); decoding equals the
forward; the ONNX export equals onnxruntime; a body that is not two residual sublayers is refused (E313).
"""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.backends.torch_reversible import ReversibleRepeat
from evodsl.cli import main
from evodsl.measure import count_flops, measure_memory
from evodsl.ops.registry import Ctx

SPEC = """d_model = 16
heads = 2
model m(causal=true) = input(tokens, vocab=53) -> embed(token) -> {pos}
    -> repeat({body}, {layers}, reversible=true{shared}) -> norm -> head(lm, tied=false)
"""
BODY = "norm -> mha -> norm -> ffn"
DROPPED = "residual(norm -> mha(dropout=0.1)) -> residual(norm -> ffn(mlp) -> dropout(p=0.2))"


def spec(body=BODY, layers=3, shared=False, pos="pos(rope)"):
    return SPEC.format(body=body, layers=layers, shared=", shared=true" if shared else "", pos=pos)


def test_graph_prints_reversible_and_the_doubled_width(tmp_path, capsys):
    path = tmp_path / "rev.evo"
    path.write_text(spec())
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "%h3 = repeat[3, reversible=true](%h2)" in out
    line = next(x for x in out.splitlines() if "reversible=true" in x)
    assert "# [b, n, 32]  blocks" in line  # concat(Y1, Y2); the norm and the head after it read 2d
    model = evodsl.compile(spec(), device="meta")
    assert tuple(model.norm.weight.shape) == (32,) and tuple(model.head.weight.shape)[1] == 32


def test_forward_is_the_revnet_equation():
    """Written out with the body's modules: (X1, X2) = (x, x); Y1 = X1 + attn(norm1(X2)),
    Y2 = X2 + ffn(norm2(Y1)) per pair of sublayers (two pairs a copy here); the stack gives concat(Y1, Y2)."""
    model = evodsl.compile(spec(TWO_LAYERS, pos="pos(learned, max_len=64)"), dtype=torch.float64)
    ids = torch.randint(0, 53, (2, 11), generator=torch.Generator().manual_seed(0))
    ctx = Ctx()
    with torch.no_grad():
        x = model.pos(model.embed(ids, ctx), ctx)
        x1 = x2 = x
        for body in model.blocks:
            for attn, ffn, k in ((body.attn1, body.ffn1, 1), (body.attn2, body.ffn2, 3)):
                y1 = x1 + attn(getattr(body, f"norm{k}")(x2, ctx), ctx)
                y2 = x2 + ffn(getattr(body, f"norm{k + 1}")(y1, ctx), ctx)
                x1, x2 = y1, y2
        want = model.head(model.norm(torch.cat([x1, x2], -1), ctx), ctx)
        got = model(ids)
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()


TWO_LAYERS = "norm -> mha(dropout=0.1) -> norm -> ffn -> norm -> mha(local, window=3) -> norm -> ffn"  # 2 pairs


@pytest.mark.parametrize("body,shared", [(DROPPED, False), (DROPPED, True), (TWO_LAYERS, False)])
def test_gradients_equal_plain_autograd(body, shared, monkeypatch):
    """float64, training mode (dropout replayed per sublayer): outputs and the gradients of the input and of
    every parameter equal those of autograd through the same wiring, which keeps every copy's activations. A body
    of four sublayers is two reversible layers per copy (HF's alternating local and LSH layers)."""
    model = evodsl.compile(spec(body, shared=shared), dtype=torch.float64).train()
    ids = torch.randint(0, 53, (2, 13), generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())

    def run(recompute: bool):
        monkeypatch.setattr(ReversibleRepeat, "recompute", recompute)
        torch.manual_seed(5)
        out = model(ids)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        return out.detach(), torch.autograd.grad((out * w).sum(), params)

    (out, grads), (ref, ref_grads) = run(True), run(False)
    assert (out - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()  # kernels may differ with no grad
    for p, a, b in zip(model.named_parameters(), grads, ref_grads):
        assert (a - b).abs().max().item() <= 1e-10 * (b.abs().max().item() + 1e-30), p[0]
    # and with respect to the stack's input
    x = torch.randn(2, 13, 16, dtype=torch.float64, requires_grad=True)
    seen = []
    for recompute in (True, False):
        monkeypatch.setattr(ReversibleRepeat, "recompute", recompute)
        torch.manual_seed(6)
        out = model.blocks([x], Ctx())
        seen.append(torch.autograd.grad(out.square().sum(), x)[0])
    assert (seen[0] - seen[1]).abs().max().item() <= 1e-10 * seen[1].abs().max().item()


COST_SPEC = """d_model = 32
heads = 4
model m(causal=true) = input(tokens, vocab=50) -> embed(token)
    -> repeat(norm -> mha -> norm -> ffn, {layers}, reversible={rev}) -> norm -> head(lm, tied=false)
"""


def test_cost_holds_to_measurement_and_training_memory_is_flat():
    """At 2, 4, 8 copies: params exact, training forward/backward matmul FLOPs within 1% (the backward
    recomputes every sublayer once), inference peak, training saved and training peak within 10%; what
    training keeps is the same at every depth (the plain stack's grows with it)."""
    b, n, kept = 2, 24, {}
    for layers in (2, 4, 8):
        for rev in ("true", "false"):
            src = COST_SPEC.format(layers=layers, rev=rev)
            model = evodsl.compile(src).train()
            ids = torch.randint(0, 50, (b, n), generator=torch.Generator().manual_seed(layers))
            c = evodsl.cost(src, seq=n, batch=b)
            assert c["params"] == sum(p.numel() for p in model.parameters())
            if rev == "true":
                flops = count_flops(model, ids, train=True)
                assert c["flops"]["training_forward_matmul"] == pytest.approx(flops["forward"], rel=0.01)
                assert c["flops"]["backward_matmul"] == pytest.approx(flops["backward"], rel=0.01)
            mem = measure_memory(model, ids)
            assert c["memory"]["activations_inference"] == pytest.approx(mem.inference_peak, rel=0.10)
            assert c["memory"]["activations_training"] == pytest.approx(mem.training_saved, rel=0.10)
            assert c["memory"]["activations_training_peak"] == pytest.approx(mem.training_peak, rel=0.10)
            kept[layers, rev] = mem.training_saved
    assert kept[2, "true"] == kept[4, "true"] == kept[8, "true"]
    assert kept[2, "true"] * 4 < kept[8, "false"]


@pytest.mark.parametrize("shared", [False, True])
def test_decoding_equals_the_forward(shared):
    """Each sublayer keeps its own cache (a shared body: one per application); prefill then chunks equal the
    forward, and the state holds what `evodsl cost` declares."""
    src = spec(shared=shared)
    model = evodsl.compile(src, dtype=torch.float64)
    ids = torch.randint(0, 53, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        state, pieces = None, []
        for a, z in ((0, 5), (5, 6), (6, 9), (9, 19)):
            logits, state = model.decode(ids[:, a:z], state)
            pieces.append(logits)
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-10 * full.abs().max().item()
    assert len(state.caches) == 3
    assert state.nbytes() == 2 * evodsl.cost(src, seq=19, batch=2)["memory"]["kv_cache"]


def test_onnx_export_equals_onnxruntime(tmp_path):
    """One file, symbolic batch and length: onnxruntime equals torch at three lengths (float32, 1e-4 of scale)."""
    import numpy as np
    import onnxruntime as ort

    src = spec(layers=2)
    path = tmp_path / "rev.onnx"
    evodsl.export(src, path)
    model = evodsl.compile(src)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (7, 33, 70):
        ids = torch.randint(0, 53, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = model(ids).numpy()
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, n), dtype=np.int64)}
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
        got = session.run(None, feeds)[0]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("body,why", [
    ("norm -> mha", "its body has 1 residual sublayer, an odd number"),
    ("norm -> mha -> norm -> ffn -> norm -> ffn", "its body has 3 residual sublayers, an odd number"),
    ("norm -> mha -> norm -> ffn -> norm", "its body ends with an op after its last residual sublayer"),
    ("norm -> mha -> dropout -> norm -> ffn", "its body has an op outside its residual sublayers"),
    ("residual(norm -> mha, scores=true) -> norm -> ffn", "residual scores pass from layer to layer"),
])
def test_a_body_that_is_not_two_sublayers_is_refused(body, why):
    with pytest.raises(EvoError) as e:
        evodsl.parse(spec(body))
    text = str(e.value)
    assert "error[E313]: repeat(..., reversible=true) needs a body of residual sublayers in pairs" in text
    assert why in text and "^^^" in text
    assert "help: e.g. repeat(norm -> mha -> norm -> ffn, N, reversible=true): each pair (F, G)" in text
