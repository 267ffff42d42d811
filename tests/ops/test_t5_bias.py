"""pos(t5_bias) against its definition: the buckets from Mesh TensorFlow's rule, written out here per distance
in plain Python (and HF T5's own function, built from nothing but the code), and softmax attention with the
bias in float64; one table serves every layer downstream."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl.ops import Ctx
from evodsl.ops.position.t5_bias import t5_buckets
from ophelpers import make_op, perturb_params


def bucket_reference(r: int, causal: bool, buckets: int, max_distance: int) -> int:
    """The bucket of distance r = j - i, from the rule in the paper's code, one integer at a time."""
    offset = 0
    if causal:
        dist = max(-r, 0)
    else:
        buckets //= 2
        offset = buckets if r > 0 else 0
        dist = abs(r)
    exact = buckets // 2
    if dist < exact:
        return offset + dist
    far = exact + int(math.log(dist / exact) / math.log(max_distance / exact) * (buckets - exact))
    return offset + min(far, buckets - 1)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (10, 64)])
def test_buckets_follow_the_rule(causal, buckets, max_distance):
    rel = torch.arange(-400, 401)
    got = t5_buckets(rel.clone(), causal, buckets, max_distance).tolist()
    assert got == [bucket_reference(r, causal, buckets, max_distance) for r in rel.tolist()]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_buckets_equal_hf_t5(causal):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)
    want = T5Attention._relative_position_bucket(rel, bidirectional=not causal, num_buckets=32, max_distance=128)
    assert torch.equal(t5_buckets(rel.clone(), causal, 32, 128), want)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_attention_with_the_bias_is_the_equation(causal):
    """o = softmax(q k^T / sqrt(dh) + B_h[bucket(j - i)] (+ causal mask)) v per head, then o_proj; float64."""
    buckets, max_distance, heads, d, n = 8, 12, 4, 32, 40
    m, _, _ = make_op("mha", "softmax", d=d, causal=causal, heads=heads, kv_heads=2,
                      pos=("t5_bias", {"heads": heads, "buckets": buckets, "max_distance": max_distance}))
    perturb_params(m)
    table = m.pos_source.weight  # [buckets, heads]
    x = torch.randn(2, n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dh = d // heads
    q = (x @ m.q_proj.weight.T + m.q_proj.bias).view(2, n, heads, dh).transpose(1, 2)
    k = (x @ m.k_proj.weight.T + m.k_proj.bias).view(2, n, 2, dh).transpose(1, 2).repeat_interleave(2, 1)
    v = (x @ m.v_proj.weight.T + m.v_proj.bias).view(2, n, 2, dh).transpose(1, 2).repeat_interleave(2, 1)
    bias = torch.empty(heads, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            bias[:, i, j] = table[bucket_reference(j - i, causal, buckets, max_distance)]
    s = q @ k.transpose(-1, -2) / math.sqrt(dh) + bias
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(2, n, d)
    want = o @ m.o_proj.weight.T + m.o_proj.bias
    with torch.no_grad():
        got = m(x, Ctx())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    without = s - bias  # the bias matters: the same attention without it is far off
    o2 = (without.softmax(-1) @ v).transpose(1, 2).reshape(2, n, d) @ m.o_proj.weight.T + m.o_proj.bias
    assert (o2 - want).abs().max() > 1e-3


SPEC = """d_model = 32
heads = 4
model m(causal={causal}) = input(tokens, vocab=50) -> embed(token) -> pos(t5_bias)
    -> repeat(norm -> mha -> norm -> ffn, 3) -> head(lm)
"""


def test_one_table_serves_every_layer():
    """T5 computes the bias in its first layer and reuses it: one [buckets, heads] parameter, counted once, and
    changing it changes every layer's scores."""
    src = SPEC.format(causal="true")
    model = evodsl.compile(src)
    tables = [name for name, _ in model.named_parameters() if name.startswith("pos.")]
    assert tables == ["pos.weight"] and model.pos.weight.shape == (32, 4)
    assert evodsl.cost(src)["params"] == sum(p.numel() for p in model.parameters())
    assert not any(n.startswith("blocks.") and "pos" in n for n, _ in model.named_parameters())
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        model.pos.weight.mul_(-3.0)
        assert (model(ids) - before).abs().max() > 1e-4
    model.train()
    model(ids).sum().backward()
    assert model.pos.weight.grad is not None and model.pos.weight.grad.abs().sum() > 0


def test_heads_must_match_the_attention():
    with pytest.raises(evodsl.EvoError, match=r"pos\(t5_bias\) has a table for heads=8"):
        evodsl.parse("d_model = 32\nmodel m = input(tokens, vocab=50) -> embed(token) -> pos(t5_bias, heads=8)"
                     " -> mha(heads=4)")


def test_other_attention_refuses_it():
    with pytest.raises(evodsl.EvoError, match=r"cannot apply pos\(t5_bias\)"):
        evodsl.parse("d_model = 32\nheads = 4\nmodel m = input(tokens, vocab=50) -> embed(token) -> pos(t5_bias)"
                     " -> mha(local, window=4)")
