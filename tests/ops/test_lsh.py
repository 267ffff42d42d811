"""mha(lsh) against Reformer's equations, in float64, written here with loops: the keys are the unit queries
(q rsqrt(mean(q^2) + 1e-6) / sqrt(dh)); per head and round the buckets are argmax([qR; -qR]) from the module's
seeded rotations (the hash assignment shared, the hashing itself checked apart); the tokens sorted by (bucket,
position) into chunks of m; query i reads the same-bucket keys of its chunk and the previous one (causal: of its
own bucket, at most m sorted places back), its own key at a 1e5 penalty; the rounds combined by their
logsumexps. With one bucket and a chunk covering the sequence it is shared-QK softmax attention (its own key
penalised). Padding either side keeps the sequence's outputs; decoding and leaks: test_decode.py, test_leaks.py."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import Ctx
from ophelpers import assert_padding_either_side, assert_no_leak, make_op, output_projection, perturb_params, refuses

D = 32


def head_projections(m, x):
    """q [b, n, heads, dh] (the keys' source too) and v [b, n, kv_heads, dh] from the module's weights alone."""
    b, n, _ = x.shape

    def proj(layer, heads):
        return (x @ layer.weight.T + (0 if layer.bias is None else layer.bias)).view(b, n, heads, m.head_dim)

    return proj(m.q_proj, m.heads), None, proj(m.v_proj, m.kv_heads)


def angular_hash(x, rot):
    """x [dh], rot [dh, B/2] -> argmax over [x.R_1 .. x.R_{B/2}, -x.R_1 .. -x.R_{B/2}] (B = 1: bucket 0)."""
    if rot.shape[-1] == 0:
        return 0
    proj = [float(x @ rot[:, c]) for c in range(rot.shape[1])]
    vals = proj + [-p for p in proj]
    return max(range(len(vals)), key=lambda c: vals[c])


def reference(m, x, key_mask=None, causal=False, bucket_mask=True):
    q, _, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    g = h // v.shape[2]
    k = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(dh)
    R, C = m.rotations.shape[1], m.chunk
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for hh in range(h):
            outs, lses = [], []
            for r in range(R):
                bucket = [angular_hash(q[bb, i, hh], m.rotations[hh, r]) for i in range(n)]
                if key_mask is not None:
                    bucket = [bk if key_mask[bb, i] else m.buckets for i, bk in enumerate(bucket)]
                order = sorted(range(n), key=lambda i: (bucket[i], i))
                s = {i: order.index(i) for i in range(n)}
                o_r, l_r = torch.zeros(n, dh, dtype=x.dtype), torch.zeros(n, dtype=x.dtype)
                for i in range(n):
                    if causal:
                        keys = [j for j in range(n) if s[i] - C <= s[j] <= s[i]]
                    else:
                        keys = [j for j in range(n) if s[i] // C - 1 <= s[j] // C <= s[i] // C]
                    keys = [j for j in keys if j == i or bucket[j] == bucket[i] or not bucket_mask]
                    sc = torch.stack([q[bb, i, hh] @ k[bb, j, hh] - (1e5 if j == i else 0.0) for j in keys])
                    l_r[i] = torch.logsumexp(sc, 0)
                    o_r[i] = sum(w * v[bb, j, hh // g] for w, j in zip(sc.softmax(0), keys))
                outs.append(o_r)
                lses.append(l_r)
            weights = torch.stack(lses).softmax(0)  # [R, n]
            out[bb, :, hh] = sum(weights[r][:, None] * outs[r] for r in range(R))
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # causal, buckets, chunk, rounds, n, kv_heads
    (False, 4, 4, 1, 23, None), (True, 4, 4, 1, 23, None),  # n no multiple of the chunk
    (False, 8, 3, 2, 17, 2), (True, 8, 3, 2, 17, 2),  # two rounds, grouped value heads
    (False, 2, 5, 3, 20, 1), (True, 6, 5, 3, 20, 1),  # a multiple of the chunk, one value head
    (False, 4, 8, 2, 5, None), (True, 4, 8, 2, 5, None),  # n smaller than a chunk
    (True, 2, 1, 1, 9, None), (False, 16, 2, 1, 9, 2),  # one-token chunks; more buckets than tokens
]


@pytest.mark.parametrize("causal, buckets, chunk, rounds, n, kv_heads", CASES)
def test_lsh_matches_equation(causal, buckets, chunk, rounds, n, kv_heads):
    m, _, _ = make_op("mha", "lsh", d=D, causal=causal, heads=4, kv_heads=kv_heads, buckets=buckets, chunk=chunk,
                      rounds=rounds, seed=n)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal=causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if n > chunk and buckets > 1:  # the comparison sees the bucket mask
            assert (y - reference(m, x, causal=causal, bucket_mask=False)).abs().max().item() > 1e-6


def test_hashing_is_angular_lsh_of_the_rotations():
    """The module's buckets are argmax([xR; -xR]) of its rotations, per head and round, and do not change with
    the query's length (angular: only the direction counts)."""
    from evodsl.ops.attention.lsh import hash_buckets

    m, _, _ = make_op("mha", "lsh", d=D, heads=4, buckets=8, rounds=3, seed=5)
    x = torch.randn(2, 4, 11, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = hash_buckets(x, m.rotations)
    assert got.shape == (2, 4, 3, 11)
    for bb in range(2):
        for hh in range(4):
            for r in range(3):
                assert [angular_hash(x[bb, hh, i], m.rotations[hh, r]) for i in range(11)] == got[bb, hh, r].tolist()
    assert torch.equal(hash_buckets(x * 7.5, m.rotations), got)
    assert got.unique().numel() > 4  # the rotations spread the tokens


@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_one_chunk_is_shared_qk_softmax(causal):
    """B = 1 and m >= n: every query reads every key (causal: every earlier one), its own at a 1e5 penalty:
    softmax attention with K the unit queries and no self-attention but where there is nothing else (position 0,
    causal). Several rounds then agree, and combine to the same."""
    n = 19
    for rounds, kv_heads in ((1, None), (3, 2)):
        m, _, _ = make_op("mha", "lsh", d=D, causal=causal, heads=4, kv_heads=kv_heads, buckets=1, chunk=32,
                          rounds=rounds)
        perturb_params(m)
        x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        q, _, v = head_projections(m, x)
        k = q / q.norm(dim=-1, keepdim=True)
        s = torch.einsum("bihd,bjhd->bhij", q, k)
        blocked = torch.eye(n, dtype=torch.bool) if not causal else ~torch.ones(n, n).tril(-1).bool()
        blocked[0, 0] = blocked[0, 0] and not causal
        w = s.masked_fill(blocked, float("-inf")).softmax(-1)
        o = torch.einsum("bhij,bjhd->bihd", w, v.repeat_interleave(4 // v.shape[2], dim=2)).reshape(2, n, -1)
        want = output_projection(m, o)
        with torch.no_grad():
            got = m(x, Ctx())
        # the 1e-6 in the keys' normalisation: a relative change of ~1e-6 / mean(q^2) in the scores
        assert (got - want).abs().max().item() < 1e-6 * want.abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_padding_either_side_gets_no_weight(causal):
    """Padded tokens go to a bucket of their own, sorted last: the real tokens' chunks and keys are the sequence
    alone's (left and right padding), as the equation with padded keys masked says."""
    m, _, _ = make_op("mha", "lsh", d=D, causal=causal, heads=4, kv_heads=2, buckets=4, chunk=3, rounds=2)
    perturb_params(m)
    assert_padding_either_side(m, lambda x, mask: reference(m, x, key_mask=mask, causal=causal), d=D)


def test_causal_does_not_leak_through_the_buckets():
    """Few buckets and short chunks: the sorted order mixes earlier and later tokens in every chunk."""
    for rounds, kv_heads in ((1, None), (2, 2)):
        m, _, _ = make_op("mha", "lsh", d=D, causal=True, heads=4, kv_heads=kv_heads, buckets=2, chunk=3,
                          rounds=rounds)
        perturb_params(m)
        with torch.no_grad():
            assert_no_leak(lambda x: m(x, Ctx()), n=25, d=D)


def test_sorting_by_chunk_with_causal_masking_alone_leaks():
    """The paper's "j <= i after sorting" over a chunk and the previous one: a later token in a lower bucket moves
    the chunk boundaries, and so which earlier tokens a query reads. Written in the reference: it leaks."""
    m, _, _ = make_op("mha", "lsh", d=D, causal=True, heads=2, buckets=2, chunk=3)
    perturb_params(m)

    @torch.no_grad()
    def chunked(x):  # the bidirectional chunk window, then j <= i
        q, _, v = head_projections(m, x)
        out = torch.zeros_like(q)
        k = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(q.shape[-1])
        for bb in range(x.shape[0]):
            for hh in range(2):
                bucket = [angular_hash(q[bb, i, hh], m.rotations[hh, 0]) for i in range(x.shape[1])]
                order = sorted(range(x.shape[1]), key=lambda i: (bucket[i], i))
                s = {i: order.index(i) for i in order}
                for i in range(x.shape[1]):
                    keys = [j for j in order
                            if j <= i and bucket[j] == bucket[i] and s[i] // 3 - 1 <= s[j] // 3 <= s[i] // 3]
                    w = torch.stack([q[bb, i, hh] @ k[bb, j, hh] - (1e5 if j == i else 0) for j in keys]).softmax(0)
                    out[bb, i, hh] = sum(wj * v[bb, j, hh] for wj, j in zip(w, keys))
        return out.flatten(2)

    with pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(chunked, n=14, d=D)


def test_bad_buckets_and_dropout_are_refused():
    refuses("lsh", {"buckets=5": "buckets=5 is odd(.|\\n)*buckets=6", "dropout=0.1": "no dropout",
                    "kv_heads=3": "heads=4 is not a multiple of kv_heads=3"}, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_are_the_equations(causal):
    """The gradient through the sorted chunks, the masks and the written-out logsumexp (finite differences)."""
    m, _, _ = make_op("mha", "lsh", d=16, causal=causal, heads=2, kv_heads=1, buckets=4, chunk=3, rounds=2)
    perturb_params(m, scale=0.2)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, Ctx()), (x,))


@pytest.mark.parametrize("causal", [False, True])
def test_hf_reformer_lsh_layer_within_one_chunk(causal):
    """HF's LSHSelfAttention on a sequence within one chunk (its standard-attention path, no hashing) with its
    query_key and value weights: the same outputs as one bucket, one round (HF's conventions: the unit-length keys
    with its 1e-6, unscaled scores, the own key only where nothing else is there). Beyond one chunk HF differs on
    purpose (lsh.py: no bucket mask, chunks wrapping around across rounds, a causal form that leaks)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    cfg = transformers.ReformerConfig(hidden_size=D, num_attention_heads=4, attention_head_size=8, num_hashes=1,
                                      lsh_attn_chunk_length=32, num_buckets=4, is_decoder=causal, attn_layers=["lsh"])
    hf = LSHSelfAttention(cfg).double().eval()
    m, _, _ = make_op("mha", "lsh", d=D, causal=causal, heads=4, buckets=1, chunk=32, bias=False)
    perturb_params(m)
    with torch.no_grad():
        hf.query_key.weight.copy_(m.q_proj.weight)
        hf.value.weight.copy_(m.v_proj.weight)
        m.o_proj.weight.copy_(torch.eye(D, dtype=torch.float64))
        x = torch.randn(2, 19, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        want = hf(x).hidden_states
        got = m(x, Ctx())
    assert (got - want).abs().max().item() < 1e-10 * want.abs().max().item()


def test_float16_keeps_the_own_key_penalty_finite():
    """float16's max is 65504: the penalty is 1e4 there (1e5 would make a row whose only key is its own, position 0
    when causal, all -inf: NaN)."""
    m, _, _ = make_op("mha", "lsh", d=D, causal=True, heads=4, buckets=4, chunk=5, rounds=2)
    perturb_params(m, scale=0.3)
    x = torch.randn(2, 23, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        want = m(x, Ctx())
        got = m.half()(x.half(), Ctx()).double()
    assert torch.isfinite(got).all()
    assert (got[:, 0] - want[:, 0]).abs().max().item() < 1e-2 * want.abs().max().item()
