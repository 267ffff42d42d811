"""Initialisation schemes (`model m(init=...)`, evodsl/init.py): each scheme's built weights have the statistics
its paper's formula gives, per weight and per layer, seeded. Tolerances come from the sample size: a normal
weight of N entries has its sample std within 6 standard errors (std / sqrt(2N)) and its mean within 6 std/sqrt(N)
of the formula's; a uniform U(-a, a) weight has every entry within a, its largest entry above a(1 - 10/N) (missed
with probability about e^-5), and its std within 6 SE of a / sqrt(3). Every tolerance is a few percent, smaller than
the differences between layers and schemes that the tests check."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError

D, HEADS, LAYERS, VOCAB = 64, 4, 4, 300
TOP = f"d_model = {D}\nheads = {HEADS}\n"


def lm(init: str, block: str = "norm -> mha -> norm -> ffn", extra: str = "") -> str:
    opts = f"causal=true, init={init}" if init else "causal=true"
    return (TOP + f"model m({opts}) = input(tokens, vocab={VOCAB}) -> embed(token) -> pos(learned, max_len=64)"
            f" -> repeat({block}, {LAYERS}){extra} -> norm -> head(lm, tied=false)")


def normal(w: torch.Tensor, std: float) -> None:
    n = w.numel()
    assert abs(w.mean().item()) < 6 * std / math.sqrt(n), (w.mean().item(), std)
    assert abs(w.std().item() - std) < 6 * std / math.sqrt(2 * n), (w.std().item(), std)


def uniform(w: torch.Tensor, bound: float) -> None:
    n = w.numel()
    assert w.abs().max().item() <= bound * (1 + 1e-6)
    assert w.abs().max().item() > bound * (1 - 10 / n)
    std = bound / math.sqrt(3)  # the std of a uniform variable has SE ~ std * 0.45 / sqrt(n) (kurtosis 1.8)
    assert abs(w.std().item() - std) < 6 * std / math.sqrt(2 * n)


def test_gpt2_normal_002_and_residual_projections_over_sqrt_2L():
    sd = evodsl.compile(lm("gpt2")).state_dict()
    res = 0.02 / math.sqrt(2 * LAYERS)  # 2L residual additions
    for i in range(LAYERS):
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "ffn.up_proj"):
            normal(sd[f"blocks.{i}.{name}.weight"], 0.02)
        normal(sd[f"blocks.{i}.attn.o_proj.weight"], res)
        normal(sd[f"blocks.{i}.ffn.down_proj.weight"], res)
        assert not sd[f"blocks.{i}.attn.q_proj.bias"].any() and not sd[f"blocks.{i}.ffn.down_proj.bias"].any()
        assert (sd[f"blocks.{i}.norm1.weight"] == 1).all()
    for table in ("embed.weight", "pos.weight", "head.weight"):
        normal(sd[table], 0.02)


def test_t5_fan_in_rule_and_q_scaled_by_head_dim():
    sd = evodsl.compile(lm("t5", "norm -> mha -> norm -> ffn(mlp, d_ff=512)")).state_dict()
    dh = D // HEADS
    for i in range(LAYERS):
        normal(sd[f"blocks.{i}.attn.q_proj.weight"], (D * dh) ** -0.5)
        normal(sd[f"blocks.{i}.attn.k_proj.weight"], D ** -0.5)
        normal(sd[f"blocks.{i}.attn.v_proj.weight"], D ** -0.5)
        normal(sd[f"blocks.{i}.attn.o_proj.weight"], (HEADS * dh) ** -0.5)
        normal(sd[f"blocks.{i}.ffn.up_proj.weight"], D ** -0.5)
        normal(sd[f"blocks.{i}.ffn.down_proj.weight"], 512 ** -0.5)
    normal(sd["embed.weight"], 1.0)
    normal(sd["head.weight"], 1.0)


def test_t5_relative_bias_table():
    src = (TOP + "model m(init=t5) = input(tokens, vocab=300) -> embed(token) -> pos(t5_bias, buckets=256) "
           "-> repeat(norm -> mha -> norm -> ffn, 2) -> head(lm)")
    normal(evodsl.compile(src).state_dict()["pos.weight"], D ** -0.5)


def test_deepnorm_xavier_normal_with_the_depths_beta():
    sd = evodsl.compile(lm("deepnorm")).state_dict()
    beta = (8 * LAYERS) ** -0.25
    xavier = math.sqrt(2 / (D + D))
    for i in range(LAYERS):
        normal(sd[f"blocks.{i}.attn.q_proj.weight"], xavier)
        normal(sd[f"blocks.{i}.attn.k_proj.weight"], xavier)
        normal(sd[f"blocks.{i}.attn.v_proj.weight"], beta * xavier)
        normal(sd[f"blocks.{i}.attn.o_proj.weight"], beta * xavier)
        normal(sd[f"blocks.{i}.ffn.up_proj.weight"], beta * math.sqrt(2 / (D + 4 * D)))


def test_deepnorm_init_takes_the_beta_of_residual_deepnorm_once():
    """With residual(deepnorm, part=decoder) the init's gain is that residual's beta, applied once (not the
    residual op's beta on top of the init's)."""
    block = "residual(mha, scale=deepnorm, layers=4, part=decoder, norm=post)"
    sd = evodsl.compile(lm("deepnorm", block)).state_dict()
    beta = (12 * 4) ** -0.25
    for i in range(LAYERS):
        normal(sd[f"blocks.{i}.attn.v_proj.weight"], beta * math.sqrt(2 / (D + D)))
        normal(sd[f"blocks.{i}.attn.q_proj.weight"], math.sqrt(2 / (D + D)))
    gpt2 = evodsl.compile(lm("gpt2", block)).state_dict()  # another scheme: the residual op scales it after
    normal(gpt2["blocks.0.attn.v_proj.weight"], beta * 0.02)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_ds_init_bound_shrinks_with_the_layer_depth(alpha):
    init = "ds_init" if alpha == 1.0 else f"ds_init(alpha={alpha})"
    sd = evodsl.compile(lm(init)).state_dict()
    for i in range(LAYERS):
        for name, (fo, fi) in {"attn.q_proj": (D, D), "attn.o_proj": (D, D), "ffn.up_proj": (4 * D, D),
                               "ffn.down_proj": (D, 4 * D)}.items():
            uniform(sd[f"blocks.{i}.{name}.weight"], alpha * math.sqrt(6 / (fi + fo)) / math.sqrt(i + 1))
        assert not sd[f"blocks.{i}.attn.q_proj.bias"].any()
    assert torch.equal(sd["embed.weight"], evodsl.compile(lm("")).state_dict()["embed.weight"])  # kept


def test_ds_init_counts_layers_along_a_stream_and_per_stack():
    """A second repeat in the same stream continues the count; an encoder and a decoder count from 1 each."""
    src = TOP + f"model m(init=ds_init) = input(tokens, vocab={VOCAB}) -> embed(token) -> repeat(mha -> ffn, 2)" \
                " -> repeat(mha -> ffn, 2) -> head(lm)"
    sd = evodsl.compile(src).state_dict()
    for prefix, layer in [("blocks1.0", 1), ("blocks1.1", 2), ("blocks2.0", 3), ("blocks2.1", 4)]:
        uniform(sd[f"{prefix}.attn.k_proj.weight"], math.sqrt(6 / (2 * D)) / math.sqrt(layer))
    seq = TOP + ("model s(init=ds_init) {\n  src = input(tokens, vocab=300) -> embed(token) -> repeat(mha -> ffn, 2)\n"
                 "  tgt(causal=true) = input(tokens, vocab=300) -> embed(token) -> repeat(mha -> "
                 "residual(xattn(softmax, kv=src)) -> ffn, 2) -> head(lm)\n}")
    sd = evodsl.compile(seq).state_dict()
    for stack in ("src_blocks", "tgt_blocks"):
        for layer in (1, 2):
            uniform(sd[f"{stack}.{layer - 1}.attn.v_proj.weight"], math.sqrt(6 / (2 * D)) / math.sqrt(layer))
    uniform(sd["tgt_blocks.1.xattn.q_proj.weight"], math.sqrt(6 / (2 * D)) / math.sqrt(2))


def test_default_is_torchs_and_schemes_are_seeded():
    base = evodsl.compile(lm("")).state_dict()
    assert all(torch.equal(a, b) for a, b in zip(base.values(), evodsl.compile(lm("default")).state_dict().values()))
    a, b = evodsl.compile(lm("gpt2"), seed=1).state_dict(), evodsl.compile(lm("gpt2"), seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = evodsl.compile(lm("gpt2"), seed=2).state_dict()
    assert not torch.equal(a["blocks.0.attn.q_proj.weight"], c["blocks.0.attn.q_proj.weight"])


def test_init_is_in_the_graph_text_and_not_in_the_cost():
    g = evodsl.parse(lm("ds_init(alpha=0.5)"))
    assert str(g).splitlines()[0] == "graph m(causal=true, init=ds_init(alpha=0.5)):"
    assert evodsl.cost(lm("ds_init(alpha=0.5)"), seq=32) == evodsl.cost(lm(""), seq=32)


@pytest.mark.parametrize("init, message", [
    ("gpt3", "unknown init scheme 'gpt3'"),
    ("3", "init= takes a scheme, not this value"),
    ("ds_init(alpha=0)", "invalid value 0 for parameter 'alpha' of init(ds_init)"),
    ("gpt2(alpha=1)", "unknown parameter 'alpha' for init(gpt2)"),
])
def test_bad_init_is_an_error_at_its_place(init, message):
    with pytest.raises(EvoError) as err:
        evodsl.parse(lm(init))
    assert message in str(err.value) and ":3:" in str(err.value)


def test_diff_names_the_init_change_and_graph_draws_it(tmp_path):
    from evodsl.cli import main
    from evodsl.diff import diff, render

    d = diff(lm("gpt2"), lm(""), seq=32)
    assert d["options"] == {"init": ["gpt2", "-"]} and d["ops"] == []
    assert "~ model: init gpt2 -> -" in render(d)
    spec = tmp_path / "m.evo"
    spec.write_text(lm("ds_init(alpha=0.5)"))
    assert main(["graph", str(spec), "-o", str(tmp_path / "m.svg")]) in (0, None)
    assert (tmp_path / "m.svg").stat().st_size > 0
