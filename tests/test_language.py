"""The language does what the README says: each construct's wiring, checked numerically in float64 on tiny
models against torch code written out here from the built submodules' weights.

Every reference below is independent of the ops' forward(): attention, layer norm and the MLP are spelled out
from their weights, so a test fails if the compiler wires a pipeline differently from its stated meaning.
"""
from __future__ import annotations

import math

import pytest
import torch

import evodsl

D = 16
HEADS = 4
TOP = f"d_model = {D}\nheads = {HEADS}\n"


def build(src: str, seed: int = 0, perturb: bool = True):
    """Compile `src` in float64; with `perturb`, give every parameter random values (norm gains are not 1)."""
    model = evodsl.compile(src, seed=seed).double().eval()
    if perturb:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def features(b: int = 2, n: int = 7, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- references, from the weights


def ln(m, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias


def linear(lin, x):
    y = x @ lin.weight.T
    return y if lin.bias is None else y + lin.bias


def mha(m, x, prev_scores=None, causal=False):
    """softmax(Q K^T / sqrt(dh) + prev) V per head, then the output projection. Returns (out, raw scores)."""
    b, n, _ = x.shape
    h, dh = m.heads, m.head_dim

    def split(t):
        return t.view(b, n, h, dh).transpose(1, 2)

    q, k, v = split(linear(m.q_proj, x)), split(linear(m.k_proj, x)), split(linear(m.v_proj, x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if prev_scores is not None:
        scores = scores + prev_scores
    s = scores
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(s, dim=-1) @ v
    return linear(m.o_proj, o.transpose(1, 2).reshape(b, n, h * dh)), scores


def attn(m, x):
    return mha(m, x)[0]


def mlp(m, x):  # ffn(mlp) with its default act=relu
    return linear(m.down_proj, torch.relu(linear(m.up_proj, x)))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- the sublayer rule


def test_prenorm_block():
    """`norm -> mha -> ffn`: x1 = x + attn(norm1(x)); y = x1 + ffn(norm2(x1)) (the norm repeats, fresh weights)."""
    m = build(TOP + "block = norm -> mha -> ffn")
    assert [name for name, _ in m.named_children()] == ["norm1", "attn", "norm2", "ffn"]
    assert not torch.equal(m.norm1.weight, m.norm2.weight)
    x = features()
    x1 = x + attn(m.attn, ln(m.norm1, x))
    y = x1 + mlp(m.ffn, ln(m.norm2, x1))
    close(m(x), y)


def test_prenorm_block_written_out_is_the_same_graph():
    short = evodsl.parse(TOP + "block = norm -> mha -> ffn")
    long = evodsl.parse(TOP + "block = norm -> mha -> norm -> ffn")
    assert str(short) == str(long)


def test_postnorm_block():
    """`residual(mha) -> norm -> residual(ffn) -> norm`: x1 = norm1(x + attn(x)); y = norm2(x1 + ffn(x1))."""
    m = build(TOP + "block = residual(mha) -> norm -> residual(ffn) -> norm")
    assert [name for name, _ in m.named_children()] == ["attn", "norm1", "ffn", "norm2"]
    x = features()
    x1 = ln(m.norm1, x + attn(m.attn, x))
    close(m(x), ln(m.norm2, x1 + mlp(m.ffn, x1)))


def test_sandwich_norm():
    """`residual(norm -> mha -> norm)`: x + norm2(attn(norm1(x))); no sublayer sugar inside residual()."""
    m = build(TOP + "block = residual(norm -> mha -> norm)")
    assert [name for name, _ in m.named_children()] == ["norm1", "attn", "norm2"]
    x = features()
    close(m(x), x + ln(m.norm2, attn(m.attn, ln(m.norm1, x))))


@pytest.mark.parametrize("named, written", [
    ("residual(mha, norm=pre) -> residual(ffn, norm=pre)", "norm -> mha -> norm -> ffn"),  # the sugar's pre-LN
    ("residual(mha, norm=pre) -> residual(ffn, norm=pre)", "residual(norm -> mha) -> residual(norm -> ffn)"),
    ("residual(mha, norm=post) -> residual(ffn, norm=post)", "residual(mha) -> norm -> residual(ffn) -> norm"),
    ("residual(mha, norm=sandwich)", "residual(norm -> mha -> norm)"),
    ("residual(mha, scale=deepnorm, layers=3, norm=post)", "residual(mha, scale=deepnorm, layers=3) -> norm"),
    ("residual(mha, scale=layerscale, init=0.1, norm=pre)", "residual(norm -> mha, scale=layerscale, init=0.1)"),
])
def test_named_wirings_are_the_written_forms(named, written):
    """`residual(f, norm=pre|post|sandwich)` names the wirings the README writes out: the same graph (str(graph),
    module names, every node) and, with the same seed, the same weights and outputs."""
    model = "model m = input(tokens, vocab=50) -> embed(token) -> repeat({}, 2) -> head(lm)"
    a, b = (TOP + model.format(w) for w in (named, written))
    assert str(evodsl.parse(a)) == str(evodsl.parse(b))
    ma, mb = evodsl.compile(a), evodsl.compile(b)
    assert all(torch.equal(p, q) for p, q in zip(ma.state_dict().values(), mb.state_dict().values()))
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ma(ids), mb(ids))


def test_named_wiring_post_numerically():
    """`residual(mha, norm=post)`: norm(x + attn(x)), the norm after the add (post-LN), checked from the weights."""
    m = build(TOP + "block = residual(mha, norm=post)")
    x = features()
    close(m(x), ln(m.norm, x + attn(m.attn, x)))


def test_named_wiring_refuses_an_unknown_one():
    with pytest.raises(evodsl.EvoError) as err:
        evodsl.parse(TOP + "block = residual(mha, norm=postt)")
    assert "E204" in str(err.value) and "expected one of: none, pre, post, sandwich" in str(err.value)
    assert "did you mean 'post'?" in str(err.value)


def test_bare_sublayers_get_residuals_other_ops_do_not():
    m = build(TOP + "block = mha -> dropout -> ffn")
    x = features()
    x1 = x + attn(m.attn, x)  # dropout is the identity in eval mode
    close(m(x), x1 + mlp(m.ffn, x1))


def test_rezero_is_identity_at_init_then_x_plus_alpha_f():
    src = TOP + "block = residual(mha, scale=rezero) -> residual(ffn, scale=rezero)"
    m = build(src, perturb=False)
    x = features()
    assert m.scale1.alpha.item() == 0.0 and m.scale2.alpha.item() == 0.0
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)
    with torch.no_grad():
        m.scale1.alpha.fill_(0.7)
        m.scale2.alpha.fill_(-0.3)
    x1 = x + 0.7 * attn(m.attn, x)
    close(m(x), x1 + -0.3 * mlp(m.ffn, x1))


def test_realformer_adds_the_previous_layers_raw_scores():
    """residual(norm -> mha, scores=true) in a 2-layer stack: layer 2's scores are its own plus layer 1's."""
    src = TOP + ("block = residual(norm -> mha, scores=true) -> residual(norm -> ffn)\n"
                 "model m = input(features, d=16) -> repeat(block, 2)")
    m = build(src)
    x = features()
    h, prev = x, None
    for i in range(2):
        blk = m.blocks[i]
        a, prev = mha(blk.attn, ln(blk.norm1, h), prev_scores=prev)
        h = h + a
        h = h + mlp(blk.ffn, ln(blk.norm2, h))
    close(m(x), h)
    close(m(x), h)  # the carried scores start afresh on every call
    # and without scores=true the same weights give a different function
    plain = build(src.replace(", scores=true", ""))
    plain.load_state_dict(m.state_dict())
    assert not torch.allclose(plain(x), m(x))


def test_realformer_causal():
    src = "vocab = 31\n" + TOP + ("block = residual(norm -> mha, scores=true) -> residual(norm -> ffn)\n"
                                 "model m(causal=true) = input(tokens) -> embed(token) -> repeat(block, 2) "
                                 "-> head(lm, tied=false)")
    m = build(src)
    ids = torch.randint(0, 31, (2, 6), generator=torch.Generator().manual_seed(1))
    h, prev = m.embed.weight[ids], None
    for i in range(2):
        blk = m.blocks[i]
        a, prev = mha(blk.attn, ln(blk.norm1, h), prev_scores=prev, causal=True)
        h = h + a
        h = h + mlp(blk.ffn, ln(blk.norm2, h))
    close(m(ids), h @ m.head.weight.T)


# ---------------------------------------------------------------- parallel


@pytest.mark.parametrize("merge", ["sum", "mean", "concat"])
def test_parallel_merges(merge):
    m = build(TOP + f"block = parallel(mha, ffn, merge={merge})")
    x = features()
    a, f = attn(m.attn, x), mlp(m.ffn, x)
    want = {"sum": lambda: a + f, "mean": lambda: (a + f) / 2,
            "concat": lambda: linear(m.merge.proj, torch.cat([a, f], dim=-1))}[merge]()
    close(m(x), want)
    if merge == "concat":
        assert m.merge.proj.weight.shape == (D, 2 * D)


def test_parallel_default_merge_is_sum_and_branches_are_pipelines():
    m = build(TOP + "block = parallel(norm -> mha, ffn, mha)")
    x = features()
    close(m(x), attn(m.attn1, ln(m.norm, x)) + mlp(m.ffn, x) + attn(m.attn2, x))


# ---------------------------------------------------------------- repeat


BLOCK = TOP + "block = norm -> mha -> ffn\n"


def ref_block(blk, x):
    x1 = x + attn(blk.attn, ln(blk.norm1, x))
    return x1 + mlp(blk.ffn, ln(blk.norm2, x1))


def test_repeat_separate_weights():
    m = build(BLOCK + "model m = input(features, d=16) -> repeat(block, 12)")
    keys = list(m.state_dict())
    assert {k.split(".")[1] for k in keys} == {str(i) for i in range(12)}
    assert keys[0].startswith("blocks.0.") and "blocks.11.ffn.down_proj.bias" in keys
    one = sum(p.numel() for p in m.blocks[0].parameters())
    assert sum(p.numel() for p in m.parameters()) == 12 * one
    q = [m.blocks[i].attn.q_proj.weight for i in range(12)]
    assert all(not torch.equal(q[i], q[j]) for i in range(12) for j in range(i))
    fresh = evodsl.compile(BLOCK + "model m = input(features, d=16) -> repeat(block, 12)")
    fq = [fresh.blocks[i].attn.q_proj.weight for i in range(12)]
    assert all(not torch.equal(fq[i], fq[j]) for i in range(12) for j in range(i)), "each copy is initialised anew"
    x = h = features()
    for i in range(12):
        h = ref_block(m.blocks[i], h)
    close(m(x), h)


def test_repeat_shared_weights():
    m = build(BLOCK + "model m = input(features, d=16) -> repeat(block, 5, shared=true)")
    assert len(m.blocks) == 1
    assert {k.split(".")[1] for k in m.state_dict()} == {"0"}
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in m.blocks[0].parameters())
    x = h = features()
    for _ in range(5):
        h = ref_block(m.blocks[0], h)
    close(m(x), h)


def test_repeat_count_from_a_binding_and_arithmetic():
    g = evodsl.parse(BLOCK + "layers = 3\nmodel m = input(features, d=16) -> repeat(block, layers * 2 - 1)")
    (rep,) = [n for n in g.nodes if n.kind == "repeat"]
    assert rep.count == 5 and not rep.shared


# ---------------------------------------------------------------- bindings, arithmetic, definitions


def _calls(graph, family):
    return [n for n in graph.calls() if n.family == family]


def test_bindings_are_defaults():
    g = evodsl.parse("d_model = 32\nheads = 4\nblock = norm -> mha -> ffn(mlp, act=gelu)")
    (a,) = _calls(g, "mha")
    assert a.params.heads == 4
    m = evodsl.compile("d_model = 32\nheads = 4\nblock = norm -> mha -> ffn(mlp, act=gelu)")
    assert m.attn.heads == 4 and m.attn.head_dim == 8
    g2 = evodsl.parse("d_model = 32\nheads = 4\nblock = mha(softmax, heads=2) -> mha")
    assert [n.params.heads for n in _calls(g2, "mha")] == [2, 4], "an explicit argument wins over the binding"


def test_arithmetic():
    src = ("d_model = 16\nheads = 2\nd_ff = 4 * d_model\nhead_dim = d_model / heads + 2 - 1\n"
           "block = mha(softmax, head_dim=head_dim) -> ffn(mlp, d_ff=d_ff)")
    g = evodsl.parse(src)
    assert _calls(g, "ffn")[0].params.d_ff == 64
    assert _calls(g, "mha")[0].params.head_dim == 9
    m = evodsl.compile(src)
    assert m.ffn.up_proj.weight.shape == (64, 16)
    assert m.attn.q_proj.weight.shape == (2 * 9, 16)
    g2 = evodsl.parse("d_model = (8 + 8) * 2\nx = -(-3)\nblock = ffn(mlp, d_ff=d_model * x)")
    assert _calls(g2, "ffn")[0].params.d_ff == 96
    assert g2.input.params.d == 32


def test_definitions_are_reused_by_name():
    named = evodsl.parse(TOP + "attend = norm -> mha\nmix = norm -> ffn\nblock = attend -> mix")
    inline = evodsl.parse(TOP + "block = norm -> mha -> norm -> ffn")
    assert str(named) == str(inline)
    m = build(TOP + "layer = norm -> mha\nblock = layer -> layer")
    assert [name for name, _ in m.named_children()] == ["norm1", "attn1", "norm2", "attn2"]
    assert not torch.equal(m.attn1.q_proj.weight, m.attn2.q_proj.weight), "each use has its own weights"
    x = features()
    x1 = x + attn(m.attn1, ln(m.norm1, x))
    close(m(x), x1 + attn(m.attn2, ln(m.norm2, x1)))


# ---------------------------------------------------------------- the card's line, verbatim

CARD = "block = norm -> mha(adaptive_span, R=32) -> ffn(glu)"
CARD_GRAPH = """\
graph block(causal=false):
  %x = input[features](d=512)                                     # [b, n, 512]
  %h1 = call[norm](%x, layernorm)                                 # [b, n, 512]  norm1
  %h2 = call[mha](%h1, adaptive_span, R=32)                       # [b, n, 512]  attn
  %h3 = add(%x, %h2)                                              # [b, n, 512]
  %h4 = call[norm](%h3, layernorm)                                # [b, n, 512]  norm2
  %h5 = call[ffn](%h4, glu)                                       # [b, n, 512]  ffn
  %h6 = add(%h3, %h5)                                             # [b, n, 512]
  %out = output(%h6)                                              # [b, n, 512]"""


def test_card_line_parses_verbatim_and_builds():
    g = evodsl.parse(CARD)
    assert str(g) == CARD_GRAPH
    m = evodsl.compile(CARD)
    x = torch.randn(1, 6, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert m.attn.q_proj.in_features == 512


def test_standalone_layer_width():
    assert evodsl.parse("block = norm -> mha -> ffn").input.params.d == 512  # no d_model: 512
    assert evodsl.parse("d_model = 48\nblock = norm -> mha(softmax, heads=4) -> ffn").input.params.d == 48
    g = evodsl.parse("d_model = 48\nfirst = norm\nblock = ffn(glu)")
    assert [n.family for n in g.calls()] == ["ffn"], "the last definition is the one compiled"


# ---------------------------------------------------------------- determinism


def test_same_seed_same_weights_other_seed_other_weights():
    src = BLOCK + "model m = input(features, d=16) -> repeat(block, 2)"
    a, b, c = (evodsl.compile(src, seed=s).state_dict() for s in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    random_init = [k for k in a if a[k].unique().numel() > 1]  # not the ones/zeros of norms and biases
    assert random_init and all(not torch.equal(a[k], c[k]) for k in random_init)


# ---------------------------------------------------------------- validation work is linear in the spec


def _chain(k: int, uses: int) -> str:
    """k definitions, each using the previous one `uses` times, and a model using the last."""
    lines = ["d_model = 16", "heads = 2", "l0 = norm -> mha -> ffn"]
    lines += [f"l{i} = " + " -> ".join([f"l{i - 1}"] * uses) + (" -> ffn" if uses == 1 else "") for i in range(1, k + 1)]
    return "\n".join(lines + [f"model m = input(tokens, vocab=10) -> embed(token) -> l{k} -> head(lm)"])


def _nodes_built(src: str, monkeypatch) -> int:
    """Graph nodes created while parsing `src` (every scratch graph included): the build's work."""
    from evodsl.ir import Graph

    added = []
    original = Graph.add
    monkeypatch.setattr(Graph, "add", lambda self, node: added.append(1) or original(self, node))
    try:
        evodsl.parse(src)
    except evodsl.EvoError:
        pass
    monkeypatch.setattr(Graph, "add", original)
    return len(added)


def test_validation_work_grows_linearly_with_a_chain_of_definitions(monkeypatch):
    """Each definition is validated once, at its statement, with the definitions it uses left unexpanded:
    doubling a chain of definitions doubles the nodes built (expanding every use, it would quadruple)."""
    small, big = _nodes_built(_chain(100, 1), monkeypatch), _nodes_built(_chain(200, 1), monkeypatch)
    assert 1.9 < big / small < 2.1, (small, big)


def test_a_chain_that_doubles_is_refused_at_the_node_limit_without_expanding_it(monkeypatch):
    """200 definitions each using the previous one twice would expand to 2^200 blocks: E221 names the first
    definition past the limit, once, and the work done stays under the limit's size."""
    from evodsl.passes.layers import MAX_NODES

    with pytest.raises(evodsl.EvoError) as err:
        evodsl.parse(_chain(200, 2))
    assert [d.code for d in err.value.diagnostics] == ["E221"]
    assert f"limit of {MAX_NODES:,}" in err.value.diagnostics[0].message
    assert _nodes_built(_chain(200, 2), monkeypatch) < 2 * MAX_NODES


def test_the_node_limit_counts_a_repeated_body_once():
    """repeat(block, 10000) is one body: far under the limit, however large the count."""
    g = evodsl.parse("d_model = 16\nheads = 2\nblock = norm -> mha -> norm -> ffn\nstack = repeat(block, 10000)")
    assert g.nodes[1].count == 10000
