"""Segment recurrence. Transformer-XL (memory(xl) + pos(xl_rel)): the segment-wise outputs of model.run_segments
equal a float64 reference written from the paper's equations on the concatenated segments (query p reads the
keys from M before its segment's start up to itself, scored (q_p + u)·k_j + (q_p + v)·W_R R_{p-j}); it is
causal across segments; its memory carries no gradient and holds exactly what `evodsl cost` declares.
The Recurrent Memory Transformer (memory(rmt)): its memory carries information forward and never backward,
and gradients reach back exactly grad_segments segments."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError

XL = """
vocab = 41
d_model = 24
heads = {heads}
block = norm -> mha(softmax{kv}) -> norm -> ffn(mlp, d_ff=48)
model xl(causal=true) = input(tokens) -> embed(token) -> memory(xl, mem_len={M}) -> pos(xl_rel)
    -> repeat(block, 2) -> norm -> head(lm)
"""


def _sinusoid(t: float, D: int) -> list[float]:
    """R_t: sin(t / 10000^(2k/D)) for k < D/2, then the cosines (Transformer-XL's PositionalEmbedding)."""
    freqs = [10000.0 ** (-2.0 * k / D) for k in range(D // 2)]
    return [math.sin(t * f) for f in freqs] + [math.cos(t * f) for f in freqs]


def _attention_reference(a, att, starts, M):
    """XL attention over the whole sequence a [b, N, d]: query p reads keys j in [start(p) - M, p]."""
    b, N, d = a.shape
    h, dh, kvh = att.heads, att.head_dim, att.kv_heads
    q = (a @ att.q_proj.weight.T + att.q_proj.bias).view(b, N, h, dh)
    k = (a @ att.k_proj.weight.T + att.k_proj.bias).view(b, N, kvh, dh).repeat_interleave(h // kvh, dim=2)
    v = (a @ att.v_proj.weight.T + att.v_proj.bias).view(b, N, kvh, dh).repeat_interleave(h // kvh, dim=2)
    R = torch.tensor([_sinusoid(t, h * dh) for t in range(N)], dtype=a.dtype)
    WR = (R @ att.pos.r_proj.weight.T).view(N, h, dh)  # W_R R_t for every distance t >= 0
    u, vb = att.pos.u, att.pos.v
    out = torch.zeros(b, N, h, dh, dtype=a.dtype)
    for p in range(N):
        js = list(range(max(0, starts[p] - M), p + 1))
        for hh in range(h):
            scores = torch.stack([((q[:, p, hh] + u[hh]) * k[:, j, hh]).sum(-1)
                                  + ((q[:, p, hh] + vb[hh]) * WR[p - j, hh]).sum(-1) for j in js], dim=-1)
            w = (scores / math.sqrt(dh)).softmax(-1)  # [b, len(js)]
            out[:, p, hh] = (w[:, :, None] * v[:, js, hh]).sum(1)
    return out.reshape(b, N, h * dh) @ att.o_proj.weight.T + att.o_proj.bias


def _model_reference(model, ids, seg, M):
    starts = [(p // seg) * seg for p in range(ids.shape[1])]
    x = model.embed.weight[ids]
    for block in model.blocks:
        a = F.layer_norm(x, (x.shape[-1],), block.norm1.weight, block.norm1.bias)
        x = x + _attention_reference(a, block.attn, starts, M)
        f = F.layer_norm(x, (x.shape[-1],), block.norm2.weight, block.norm2.bias)
        x = x + block.ffn.down_proj(torch.relu(block.ffn.up_proj(f)))
    x = F.layer_norm(x, (x.shape[-1],), model.norm.weight, model.norm.bias)
    return x @ model.head.weight.T + (model.head.bias if model.head.bias is not None else 0)


@pytest.mark.parametrize("heads,kv,M,seg", [(4, "", 6, 5), (4, ", kv_heads=2", 3, 4), (2, "", 10, 3)])
def test_xl_segments_equal_the_paper_on_the_concatenation(heads, kv, M, seg):
    """Segments shorter and longer than the memory (M = 6, seg 5: the memory spans two segments back; M = 3,
    seg 4: part of one), grouped K/V heads; random u, v (not their small initial values)."""
    model = evodsl.compile(XL.format(heads=heads, kv=kv, M=M), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.pos.u.copy_(torch.randn(block.attn.pos.u.shape, generator=g, dtype=torch.float64))
            block.attn.pos.v.copy_(torch.randn(block.attn.pos.v.shape, generator=g, dtype=torch.float64))
    ids = torch.randint(0, 41, (2, 17), generator=g)
    with torch.no_grad():
        got, state = model.run_segments(ids, seg)
        want = _model_reference(model, ids, seg, M)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()
    # one segment from scratch is an ordinary forward (a first segment has no memory)
    assert torch.allclose(model(ids[:, :seg]), got[:, :seg], rtol=0, atol=1e-12)
    # the state: every attention's last M inputs, as `evodsl cost` declares (float64: 8 bytes)
    assert state.nbytes() == 2 * evodsl.cost(XL.format(heads=heads, kv=kv, M=M), seq=seg, batch=2)["memory"]["kv_cache"]


def test_xl_is_causal_across_segments():
    """Changing token t changes no output before t, in its segment or in those after (t in the second of four
    segments; the memory carries it into the third and fourth)."""
    src = XL.format(heads=4, kv="", M=6)
    model = evodsl.compile(src, dtype=torch.float64)
    ids = torch.randint(0, 41, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base, _ = model.run_segments(ids, 5)
        for t in (5, 7, 9):
            other = ids.clone()
            other[0, t] = (other[0, t] + 1) % 41
            out, _ = model.run_segments(other, 5)
            assert torch.equal(out[:, :t], base[:, :t])
            assert (out[:, t:] - base[:, t:]).abs().amax(-1).min() > 0  # it reaches every later position


def test_xl_memory_carries_no_gradient():
    """The memory is SG(h): segment 2's output has no gradient path to segment 1's embeddings."""
    model = evodsl.compile(XL.format(heads=4, kv="", M=6))
    ids = torch.randint(0, 41, (2, 10), generator=torch.Generator().manual_seed(2))
    seen = []
    hook = model.embed.register_forward_hook(lambda mod, args, out: seen.append(out))
    _, state = model.recur(ids[:, :5])
    out, _ = model.recur(ids[:, 5:], state)
    hook.remove()
    assert all(not t.requires_grad for t in state.memory.values())
    first, second = torch.autograd.grad(out.sum(), seen, allow_unused=True)
    assert first is None and second is not None


@pytest.mark.parametrize("pipe,needle", [
    ("memory(xl, mem_len=4) -> repeat(norm -> mha(linear), 2)", "mha(linear) cannot keep memory(xl)'s memory"),
    ("memory(xl, mem_len=4) -> pos(rope) -> mha", "memory(xl) cannot be combined with pos(rope)"),
    ("pos(xl_rel) -> residual(mha, scores=true)", "cannot add residual scores on Transformer-XL's path"),
])
def test_xl_refuses_what_it_cannot_do(pipe, needle):
    src = f"model m(causal=true) = input(tokens, vocab=11) -> embed(token, d_model=16) -> {pipe} -> head(lm)\n"
    with pytest.raises(EvoError) as err:
        evodsl.parse(src)
    assert needle in str(err.value) and "E302" in str(err.value)


def test_generate_on_xl_points_to_the_segments():
    model = evodsl.compile(XL.format(heads=4, kv="", M=4))
    with pytest.raises(EvoError, match=r"E411.*memory\(xl\) has no step form"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)


RMT = """
vocab = 41
d_model = 24
heads = 4
n_memory = {m}
block = norm -> mha(softmax) -> norm -> ffn(mlp, d_ff=48)
model rmt(causal=true) {{
    mem  = memory(rmt, length=n_memory)
    body = {inp} -> cat(prefix=mem, suffix=mem) -> pos(xl_rel) -> repeat(block, 2)
    next(writes=mem) = body -> slice(last=n_memory)
    lm   = body -> slice(drop_first=n_memory) -> slice(drop_last=n_memory) -> norm -> head({head})
}}
"""


def _rmt(m=3, inp="input(tokens) -> embed(token)", head="lm", dtype=torch.float64):
    return RMT.format(m=m, inp=inp, head=head), evodsl.compile(RMT.format(m=m, inp=inp, head=head), dtype=dtype)


def _rmt_reference(model, ids, seg, m):
    """The paper's recurrence, on the weights: M_1 = the learned tokens; segment τ runs the blocks over
    Y = [M_τ; E(X_τ); M_τ] (causal, XL-relative positions within Y, no XL cache); M_{τ+1} = H[-m:]; the logits
    are those of H[m:-m]."""
    b = ids.shape[0]
    mem = model.mem_memory.weight[None].expand(b, -1, -1)
    outs = []
    for x in ids.split(seg, dim=1):
        y = torch.cat([mem, model.body_embed.weight[x], mem], dim=1)
        starts = [0] * y.shape[1]
        for block in model.body_blocks:
            a = F.layer_norm(y, (y.shape[-1],), block.norm1.weight, block.norm1.bias)
            y = y + _attention_reference(a, block.attn, starts, 0)
            f = F.layer_norm(y, (y.shape[-1],), block.norm2.weight, block.norm2.bias)
            y = y + block.ffn.down_proj(torch.relu(block.ffn.up_proj(f)))
        mem = y[:, -m:]
        z = F.layer_norm(y[:, m:-m], (y.shape[-1],), model.lm_norm.weight, model.lm_norm.bias)
        outs.append(z @ model.lm_head.weight.T)  # head(lm): no bias
    return torch.cat(outs, dim=1), mem


@pytest.mark.parametrize("m,seg,N", [(3, 4, 14), (5, 2, 7), (1, 6, 12)])
def test_rmt_segments_equal_the_paper(m, seg, N):
    """Segment outputs and the final memory equal the recurrence written from the paper, on random u, v; a first
    segment is an ordinary forward; the state holds what `evodsl cost` declares (the memory, [b, m, d])."""
    src, model = _rmt(m)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.body_blocks:
            block.attn.pos.u.copy_(torch.randn(block.attn.pos.u.shape, generator=g, dtype=torch.float64))
            block.attn.pos.v.copy_(torch.randn(block.attn.pos.v.shape, generator=g, dtype=torch.float64))
        ids = torch.randint(0, 41, (2, N), generator=g)
        got, state = model.run_segments(ids, seg)
        want, mem = _rmt_reference(model, ids, seg, m)
    assert got.shape == want.shape == (2, N, 41)
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()
    assert list(state.memory) == ["mem"] and state.segments == -(-N // seg) and state.seen == N
    assert (state.memory["mem"] - mem).abs().max().item() <= 1e-10 * mem.abs().max().item()
    with torch.no_grad():
        assert torch.allclose(model(ids[:, :seg]), got[:, :seg], rtol=0, atol=1e-12)
    assert state.nbytes() == 2 * 24 * m * 8 == 2 * evodsl.cost(src, seq=seg, batch=2)["memory"]["kv_cache"]


def test_rmt_memory_carries_information_forward_never_backward():
    """Changing token t (in the first of three segments) changes the outputs from t on, in its segment and the
    next two (through the memory only: no attention crosses segments), and nothing before t; changing a token of
    the last segment changes nothing in the first two, nor the memory they leave."""
    _, model = _rmt(3)
    ids = torch.randint(0, 41, (1, 15), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base, _ = model.run_segments(ids, 5)
        _, after_two = model.run_segments(ids[:, :10], 5)
        for t in (1, 3, 12):
            other = ids.clone()
            other[0, t] = (other[0, t] + 1) % 41
            out, _ = model.run_segments(other, 5)
            assert torch.equal(out[:, :t], base[:, :t])
            assert (out[:, t:] - base[:, t:]).abs().amax(-1).min() > 0
            if t >= 10:
                _, state = model.run_segments(other[:, :10], 5)
                assert torch.equal(state.memory["mem"], after_two.memory["mem"])


@pytest.mark.parametrize("k", [1, 2, 4, None])
def test_rmt_gradient_reaches_back_exactly_grad_segments(k):
    """With grad_segments=k, the loss of the last of four segments has a gradient wrt the inputs of the last k
    segments (through the memory) and none wrt earlier ones; None: all of them."""
    _, model = _rmt(2, inp="input(features, d=24)", head="linear, d_out=5", dtype=torch.float32)
    x = torch.randn(2, 12, 24, generator=torch.Generator().manual_seed(5), requires_grad=True)
    out, state = model.run_segments(x, 3, grad_segments=k)
    (grad,) = torch.autograd.grad(out[:, 9:].square().sum(), [x])
    reached = [bool(grad[:, 3 * s:3 * s + 3].abs().sum() > 0) for s in range(4)]
    depth = 4 if k is None else k
    assert reached == [s >= 4 - depth for s in range(4)]
    assert state.memory["mem"].requires_grad


def test_rmt_state_is_continued_with_its_batch_and_refuses_generate():
    _, model = _rmt(2, dtype=torch.float32)
    _, state = model.recur(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(EvoError, match=r"E414.*carries 2 sequences, this segment has 3"):
        model.recur(torch.zeros(3, 4, dtype=torch.long), state)
    with pytest.raises(EvoError, match=r"E411.*memory\(rmt\) has no step form.*model.recur"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize("streams,code,needle", [
    ("next(writes=lm0) = body -> slice(last=2)", "E225", "unknown stream 'lm0'"),
    ("next(writes=body) = body -> slice(last=2)", "E226", "stream 'body' is not carried"),
    ("next(writes=mem) = body -> slice(last=3)", "E310", "writes [b, 3, 16] to memory 'mem' of [b, 2, 16]"),
    ("", "E227", "memory 'mem' is never written"),
    ("next(writes=mem) = body -> slice(last=2)\n other(writes=mem) = body -> slice(first=2)", "E226",
     "written by two streams, 'next' and 'other'"),
])
def test_rmt_writes_are_checked(streams, code, needle):
    src = ("model m(causal=true) {\n mem = memory(rmt, length=2, d_model=16)\n"
           " body = input(tokens, vocab=11) -> embed(token, d_model=16) -> cat(prefix=mem, suffix=mem)\n"
           f" {streams}\n lm = body -> slice(drop_first=2) -> slice(drop_last=2) -> head(lm)\n}}\n")
    with pytest.raises(EvoError) as err:
        evodsl.parse(src)
    assert code in str(err.value) and needle in str(err.value)


def test_a_stream_beginning_op_inside_a_pipeline_is_refused():
    src = ("model m = input(tokens, vocab=11) -> embed(token, d_model=16) -> memory(rmt, length=2, d_model=16) "
           "-> head(lm)\n")
    with pytest.raises(EvoError, match=r"E311.*memory\(rmt\) begins a stream of its own"):
        evodsl.parse(src)
