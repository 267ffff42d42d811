"""Models with streams: how they are built (input nodes, streams captured by repeat bodies, per-stream causality
and module names), and what they compute: memory tokens and latents honour padding masks as the positions move
(cat, slice), a stream with no op of its own keeps its input's mask, and causality holds per stream."""
from __future__ import annotations

import pytest
import torch

import evodsl

MEMORY = """
vocab = 50
d_model = 32
heads = 4
model memory_lm(causal=true) {
    mem = latent(array, length=3)
    lm = input(tokens) -> embed(token) -> cat(prefix=mem) -> repeat(norm -> mha -> norm -> ffn, 2)
        -> slice(drop_first=3) -> head(lm)
}
"""

PERCEIVER = """
d_model = 32
heads = 4
model perceiver {
    x = input(features, d=32)
    lat = latent(array, length=4) -> repeat(residual(xattn(softmax, kv=x)) -> norm -> mha -> norm -> ffn, 2)
        -> head(linear, d_out=3)
}
"""

SEQ2SEQ = """
vocab = 40
d_model = 32
heads = 4
dec = norm -> mha -> norm -> xattn(softmax, kv=src) -> norm -> ffn
model s2s {
    src = input(tokens) -> embed(token) -> repeat(norm -> mha -> norm -> ffn, 2) -> norm
    tgt(causal=true) = input(tokens) -> embed(token, tied=true) -> repeat(dec, 2) -> norm -> head(lm)
}
"""


def test_an_encoder_decoder_is_one_graph_of_the_usual_node_kinds():
    g = evodsl.parse(SEQ2SEQ)
    assert [n.name for n in g.inputs] == ["input_ids", "decoder_input_ids"]
    assert [n.meta["shape"] for n in g.inputs] == [("b", "n"), ("b", "m")]
    assert [(s.name, s.causal, s.source[0]) for s in g.streams] == [("src", False, "input"), ("tgt", True, "input")]
    repeat = next(n for n in g.nodes if n.kind == "repeat" and n.meta["stream"] == "tgt")
    assert repeat.inputs[1] == g.stream("src").value  # the body captures the encoder's output
    assert [n.name for n in repeat.body.inputs] == ["x", "src"]
    xattn = next(n for n in repeat.body.calls() if n.family == "xattn")
    assert xattn.inputs[1] == "src" and xattn.meta["env"].in_causal == (True, False)
    assert {n.kind for n in g.nodes} <= {"input", "call", "add", "repeat", "output"}
    model = evodsl.compile(SEQ2SEQ)
    names = dict(model.named_parameters())
    assert "tgt_blocks.0.xattn.k_proj.weight" in names and "src_blocks.1.attn.q_proj.weight" in names
    assert model.tgt_embed.weight is model.src_embed.weight  # tied=true: one table


@pytest.mark.parametrize("side", ["right", "left"])
def test_memory_tokens_honour_padding(side):
    """cat joins the memory's (all real) mask to the tokens', slice drops it again. Right padding: each
    sequence's own outputs at its real positions (the causal attention skips the mask: every padded key comes
    after every token). Left padding: the mask is applied; changing the padded tokens changes nothing real, and
    unmasked it does (positions move with left padding, so there is no run alone to compare with)."""
    model = evodsl.compile(MEMORY, dtype=torch.float64)
    n, lengths = 11, [11, 7, 4]
    ids = torch.randint(0, 50, (3, n), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        if side == "right":
            y = model(ids, attention_mask=mask)
            for i, L in enumerate(lengths):
                alone = model(ids[i:i + 1, :L])[0]
                assert (y[i, :L] - alone).abs().max().item() <= 1e-10 * alone.abs().max().item(), f"sequence {i}"
            return
        mask = mask.flip(1)
        real, pad = mask.bool(), mask == 0
        other = ids.clone()
        other[pad] = (other[pad] + 1) % 50
        y = model(ids, attention_mask=mask)
        assert (model(other, attention_mask=mask) - y)[real].abs().max().item() <= 1e-10
        assert (model(other)[real] - model(ids)[real]).abs().max().item() > 1e-6


def test_latents_read_a_padded_input_stream_with_no_op_of_its_own():
    """`x = input(features)` has no op: its mask is the input's; the latents' cross-attention gives its padded
    positions no weight, so a padded batch gives each sequence's own outputs."""
    model = evodsl.compile(PERCEIVER, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    n, lengths = 9, [9, 5, 2]
    x = torch.randn(3, n, 32, generator=g, dtype=torch.float64)
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        y = model(x, attention_mask=mask)
        for i, L in enumerate(lengths):
            alone = model(x[i:i + 1, :L])[0]
            assert (y[i] - alone).abs().max().item() <= 1e-10 * alone.abs().max().item()
        assert (model(x)[2] - y[2]).abs().max().item() > 1e-6  # unmasked, the padding is read


def test_causality_is_per_stream():
    """The decoder is causal (changing target tokens after t changes no logit up to t), the encoder is not
    (its outputs at 0 change with its last token), and cross-attention reads the whole source."""
    model = evodsl.compile(SEQ2SEQ, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    src, tgt = torch.randint(0, 40, (1, 9), generator=g), torch.randint(0, 40, (1, 7), generator=g)
    with torch.no_grad():
        y = model(src, tgt)
        for t in range(6):
            tgt2 = tgt.clone()
            tgt2[0, t + 1:] = (tgt2[0, t + 1:] + 1) % 40
            y2 = model(src, tgt2)
            assert (y2[0, :t + 1] - y[0, :t + 1]).abs().max().item() <= 1e-12
            assert (y2[0, t + 1] - y[0, t + 1]).abs().max().item() > 1e-6
        src2 = src.clone()
        src2[0, -1] = (src2[0, -1] + 1) % 40
        assert (model(src2, tgt)[0, 0] - y[0, 0]).abs().max().item() > 1e-6  # the last source token, at t = 0


def _stream_lookups(count: int, monkeypatch) -> int:
    """Graph.stream lookups while validating `count` streams, each starting from the one before and reading
    the first (a lookup per stream walked back through its sources made this quadratic once)."""
    from evodsl.ir import Graph

    calls = []
    lookup = Graph.stream
    monkeypatch.setattr(Graph, "stream", lambda self, name: calls.append(name) or lookup(self, name))
    streams = ["s0 = input(tokens) -> embed(token)"] + [
        f"s{i} = s{i - 1} -> residual(xattn(softmax, kv=s0))" for i in range(1, count)]
    evodsl.parse("\n".join(["vocab = 10", "d_model = 8", "heads = 2", "model m {", *streams, "}"]))
    return len(calls)


def test_many_streams_validate_in_linear_time(monkeypatch):
    """Validation work grows linearly with the number of streams: twice the streams, twice the lookups."""
    small, big = _stream_lookups(250, monkeypatch), _stream_lookups(500, monkeypatch)
    assert big <= 2.1 * small, (small, big)
