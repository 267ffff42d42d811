"""The torch backend: readable names, deterministic init, meta device, torch.compile and torch.export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evodsl

ROOT = Path(__file__).resolve().parent.parent

SMALL_LM = """
vocab = 97
d_model = 32
heads = 4
block = norm -> mha(softmax) -> norm -> ffn(mlp, act=gelu)
model tiny(causal=true) = input(tokens) -> embed(token) -> pos(learned, max_len=64)
    -> repeat(block, 2) -> norm -> head(lm, tied=true)
"""


def test_state_dict_names_are_readable():
    names = list(evodsl.compile(SMALL_LM).state_dict())
    assert "blocks.0.attn.q_proj.weight" in names
    assert "blocks.1.ffn.up_proj.weight" in names
    assert "blocks.0.norm1.weight" in names and "blocks.0.norm2.weight" in names


def test_tied_head_shares_the_embedding():
    m = evodsl.compile(SMALL_LM)
    assert m.head.weight is m.embed.weight
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def test_init_is_deterministic_from_the_seed():
    a, b, c = (evodsl.compile(SMALL_LM, seed=s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    evodsl.compile(SMALL_LM, seed=0)
    assert torch.equal(torch.rand(1), before), "compile must not disturb the global RNG"


def test_meta_device_allocates_nothing():
    m = evodsl.compile(SMALL_LM, device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())
    out = m(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert out.shape == (2, 8, 97)


def test_torch_compile_matches_eager():
    m = evodsl.compile(SMALL_LM)
    ids = torch.randint(0, 97, (2, 12))
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids), m(ids))


def test_torch_export_with_dynamic_sequence():
    m = evodsl.compile(SMALL_LM)
    ids = torch.randint(0, 97, (2, 12))
    n = torch.export.Dim("n", min=2, max=64)
    prog = torch.export.export(m, (ids,), dynamic_shapes={"input_ids": {1: n}})
    for length in (5, 12, 40):
        x = torch.randint(0, 97, (2, length))
        torch.testing.assert_close(prog.module()(x), m(x))


def test_aux_loss_sums_the_ops_losses():
    spec = "d_model = 32\nblock = norm -> mha(adaptive_span, heads=4, R=4, max_span=16) -> ffn"
    m = evodsl.compile(spec)
    assert m.aux_loss().requires_grad
    assert torch.allclose(m.aux_loss(), m.attn.aux_loss())
    assert evodsl.compile("d_model = 32\nblock = norm -> ffn").aux_loss().item() == 0.0


def test_load_reports_bad_artifacts_as_evo_errors(tmp_path):
    import pytest

    with pytest.raises(evodsl.EvoError) as missing:
        evodsl.load(tmp_path / "missing.pt")
    assert missing.value.codes == ["E401"]
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(evodsl.EvoError) as bad:
        evodsl.load(junk)
    assert bad.value.codes == ["E403"]
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(evodsl.EvoError) as other:
        evodsl.load(tmp_path / "other.pt")
    assert other.value.codes == ["E403"]


def test_nested_repeat_and_count_bound():
    import pytest

    spec = "d_model = 16\nheads = 2\nblock = norm -> mha -> norm -> ffn\nstack = repeat(repeat(block, 3), 2)"
    m = evodsl.compile(spec)
    assert "blocks.1.blocks.2.attn.q_proj.weight" in m.state_dict()
    with pytest.raises(evodsl.EvoError) as err:
        evodsl.parse("d_model = 16\nstack = repeat(norm, 100000000)")
    assert err.value.codes == ["E204"]


INDUCTOR_SPECS = {"gpt2": {"layers": 2, "d_model": 64, "heads": 4, "vocab": 97, "n_ctx": 64},
                  "llama": {"layers": 2, "d_model": 64, "heads": 4, "vocab": 97, "d_ff": 128}}


@pytest.mark.parametrize("name", [pytest.param("gpt2"), pytest.param("llama", marks=pytest.mark.slow)])
def test_torch_compile_inductor_generates_code_equal_to_eager(name):
    """The inductor backend (C++ code generation on CPU; the tests above capture with backend="eager", which
    generates nothing): the compiled forward equals eager within 1e-5 of the logits' scale in eval; llama (slow,
    a second compile) also in a training forward and backward, the gradients within 1e-4 of their scale. gpt2 in the
    default run (~45 s on a quiet machine with a cold cache)."""
    torch.manual_seed(0)
    m = evodsl.compile(ROOT / "specs" / f"{name}.evo", overrides=INDUCTOR_SPECS[name])
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(m, backend="inductor", fullgraph=True)
    with torch.no_grad():
        want, got = m.eval()(ids), compiled(ids)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    if name == "gpt2":
        return
    m.train()
    target = torch.randint(0, 97, (2 * 20,), generator=torch.Generator().manual_seed(2))
    loss_eager = torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), target)
    grads_eager = torch.autograd.grad(loss_eager, list(m.parameters()))
    loss = torch.nn.functional.cross_entropy(compiled(ids).flatten(0, 1), target)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    assert abs(loss.item() - loss_eager.item()) <= 1e-5 * abs(loss_eager.item())
    scale = max(w.abs().max().item() for w in grads_eager)
    assert max((g - w).abs().max().item() for g, w in zip(grads, grads_eager)) <= 1e-4 * scale


def test_torch_compile_on_spec_files():
    """torch.compile (fullgraph) on real spec files at small sizes: llama (RoPE, RMSNorm, SwiGLU) and adaptive span."""
    for spec, over in [("specs/llama.evo", {"d_model": 64, "heads": 4, "layers": 2, "vocab": 97, "d_ff": 128}),
                       ("specs/adaptive_span.evo", {"d_model": 64, "heads": 4, "layers": 2, "vocab": 97,
                                                    "max_span": 48})]:
        m = evodsl.compile(spec, overrides=over)
        ids = torch.randint(0, 97, (2, 20))
        torch.testing.assert_close(torch.compile(m, backend="eager", fullgraph=True)(ids), m(ids))
