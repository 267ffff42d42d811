"""mha(combiner) against Combiner's equation, in float64: per query i and head, one softmax over the direct keys
of its block Omega_i^0 (causal: j <= i) and one summary key k_Omega per other block (causal: earlier blocks),
whose value is v_Omega = sum_j softmax_j(q_Omega . k_j / sqrt(dh)) v_j; q_Omega, k_Omega the elementwise max of the
block's queries (over the query heads of a K/V head too) and keys; all written here as explicit loops over the
blocks' token lists. Right padding equals each sequence alone, left padding is refused; decoding equals the forward
(test_decode.py), the causal form does not leak (test_leaks.py)."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params, spec_onnx_parity

D = 32


def summary(q, k, v, toks, c, g):
    """Block `toks` of one row, K/V head c: (k_Omega, v_Omega)."""
    dh = q.shape[-1]
    q_om = torch.stack([q[t, c * g + e] for t in toks for e in range(g)]).amax(0)
    k_om = torch.stack([k[t, c] for t in toks]).amax(0)
    w = torch.stack([q_om @ k[t, c] for t in toks]) / math.sqrt(dh)
    v_om = torch.einsum("j,jd->d", w.softmax(0), torch.stack([v[t, c] for t in toks]))
    return k_om, v_om


def reference(m, x, s, causal, lengths=None):
    q, k, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        L = n if lengths is None else lengths[bb]
        blocks = [list(range(r * s, min(r * s + s, L))) for r in range(-(-L // s))]
        for t in range(L):
            u = t // s
            others = range(u) if causal else [r for r in range(len(blocks)) if r != u]
            for hh in range(h):
                c = hh // g
                keys = [k[bb, j, c] for j in blocks[u] if not causal or j <= t]
                vals = [v[bb, j, c] for j in blocks[u] if not causal or j <= t]
                for r in others:
                    ko, vo = summary(q[bb], k[bb], v[bb], blocks[r], c, g)
                    keys.append(ko)
                    vals.append(vo)
                sc = torch.stack(keys) @ q[bb, t, hh] / math.sqrt(dh)
                out[bb, t, hh] = torch.einsum("j,jd->d", sc.softmax(0), torch.stack(vals))
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # causal, s, n, kv_heads
    (False, 4, 16, None), (True, 4, 16, None),  # s divides n
    (False, 3, 17, 2), (True, 3, 17, 2),  # a partial last block, grouped K/V heads
    (True, 5, 23, 1), (False, 5, 23, 1),
    (True, 1, 7, None), (False, 1, 6, 2),  # one-token blocks: summaries are the tokens themselves
    (True, 8, 5, 2), (False, 8, 5, None),  # n < s: one block, direct attention alone
    (False, 4, 9, 2), (True, 6, 12, None),
]


@pytest.mark.parametrize("causal, s, n, kv_heads", CASES)
def test_combiner_matches_equation(causal, s, n, kv_heads):
    m, _, _ = make_op("mha", "combiner", d=D, causal=causal, heads=4, kv_heads=kv_heads, block=s)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, s, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        # the control: softmax attention differs wherever a block is summarised
        if 1 < s < n:
            sm, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=kv_heads)
            sm.load_state_dict(m.state_dict())
            assert (y - sm(x, Ctx())).abs().max().item() > 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_one_token_blocks_and_one_block_are_softmax_attention(causal):
    """s = 1: each summary is its token (k_Omega = k_j, v_Omega = v_j); s >= n: the query's block is every key.
    Both are exactly softmax attention."""
    sm, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2)
    perturb_params(sm)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    for s in (1, 13, 40):
        m, _, _ = make_op("mha", "combiner", d=D, causal=causal, heads=4, kv_heads=2, block=s)
        m.load_state_dict(sm.state_dict())
        with torch.no_grad():
            assert (m(x, Ctx()) - sm(x, Ctx())).abs().max().item() < 1e-12


@pytest.mark.parametrize("mode", ["fixed", "axial", "logsparse"])
def test_right_padding_is_each_sequence_alone(mode):
    """Bidirectional, right-padded rows: the real positions equal each sequence run alone (its own last, shorter
    block; padded blocks never read)."""
    m, _, _ = make_op("mha", "combiner", d=D, heads=4, kv_heads=2, block=4, mode=mode)
    perturb_params(m)
    n, lengths = 14, [14, 9, 3, 4]
    x = torch.randn(len(lengths), n, D, dtype=torch.float64)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        ref = (logsparse_reference(m, x, False, lengths) if mode == "logsparse" else
               (reference if mode == "fixed" else axial_reference)(m, x, 4, False, lengths))
        for i, L in enumerate(lengths):
            alone = m(x[i:i + 1, :L], Ctx())
            assert (y[i, :L] - alone[0]).abs().max().item() < 1e-12
            assert (y[i, :L] - ref[i, :L]).abs().max().item() < 1e-10
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("mode", ["fixed", "axial", "logsparse"])
@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_is_refused(causal, mode):
    m, _, _ = make_op("mha", "combiner", d=D, causal=causal, heads=4, block=3, mode=mode)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(x, Ctx(mask=left))


@pytest.mark.parametrize("mode", ["fixed", "axial", "logsparse"])
def test_causal_does_not_leak_and_bidirectional_does(mode):
    m, _, _ = make_op("mha", "combiner", d=D, causal=True, heads=4, kv_heads=2, block=4, mode=mode)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=26, d=D)
    m, _, _ = make_op("mha", "combiner", d=D, causal=False, heads=4, block=4, mode=mode)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=12, d=D)


@pytest.mark.parametrize("bad, match", [
    ({"block": 0}, "block"), ({"mode": "tree"}, "mode"), ({"dropout": 0.1}, "dropout"),
])
def test_bad_params_are_refused(bad, match):
    import evodsl

    with pytest.raises(EvoError, match=match):
        evodsl.parse(f"model m(causal=true) = input(features, d=32) -> mha(combiner, heads=4, "
                     f"{', '.join(f'{k}={v}' for k, v in bad.items())}) -> head(linear, d_out=2)")


def axial_reference(m, x, s, causal, lengths=None):
    """Combiner-Axial: query (a, l) reads its row's keys directly (causal: columns <= l) and, for every other row r
    (causal: r < a) holding column l, the key k_(r,l) with the value u_(r,l) = sum_{j in row r} softmax_j(q_(r,l).k_j
    / sqrt(dh)) v_j, one softmax over all of them."""
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        L = n if lengths is None else lengths[bb]
        rows = [list(range(r * s, min(r * s + s, L))) for r in range(-(-L // s))]
        for t in range(L):
            a, l = divmod(t, s)
            others = range(a) if causal else [r for r in range(len(rows)) if r != a and r * s + l < L]
            for hh in range(h):
                c = hh // g
                direct = [j for j in rows[a] if not causal or j <= t]
                keys = [k[bb, j, c] for j in direct]
                vals = [v[bb, j, c] for j in direct]
                for r in others:
                    p = r * s + l  # the column's token in row r
                    w = torch.stack([q[bb, p, hh] @ k[bb, j, c] for j in rows[r]]) / math.sqrt(dh)
                    keys.append(k[bb, p, c])
                    vals.append(torch.einsum("j,jd->d", w.softmax(0), torch.stack([v[bb, j, c] for j in rows[r]])))
                sc = torch.stack(keys) @ q[bb, t, hh] / math.sqrt(dh)
                out[bb, t, hh] = torch.einsum("j,jd->d", sc.softmax(0), torch.stack(vals))
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("causal, s, n, kv_heads", CASES)
def test_axial_matches_equation(causal, s, n, kv_heads):
    m, _, _ = make_op("mha", "combiner", d=D, causal=causal, heads=4, kv_heads=kv_heads, block=s, mode="axial")
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = axial_reference(m, x, s, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if 1 < s < n:  # the control: fixed mode (block summaries) differs
            f, _, _ = make_op("mha", "combiner", d=D, causal=causal, heads=4, kv_heads=kv_heads, block=s)
            f.load_state_dict(m.state_dict())
            assert (y - f(x, Ctx())).abs().max().item() > 1e-6


@pytest.mark.parametrize("mode", ["axial", pytest.param("logsparse", marks=pytest.mark.slow)])
@pytest.mark.parametrize("causal", [True, False])
def test_axial_onnx_matches_torch(causal, mode, tmp_path):
    """mode=axial exports (a symbolic n: _combiner_axial.dense, every key twice under an [n, 2n] mask) to one file
    that onnxruntime runs at 3 lengths and 2 batch sizes as torch does; bidirectional, with a right-padded row.
    mode=logsparse likewise (its export runs 16 levels, floor(n / 2^l) + 2 blocks each: ~100 s an export here)."""
    block = "block=3, " if mode == "axial" else ""
    src = (f"model m(causal={str(causal).lower()}) = input(features, d=32) -> norm -> "
           f"mha(combiner, mode={mode}, {block}heads=4, kv_heads=2) -> head(linear, d_out=8)")
    worst = spec_onnx_parity(src, tmp_path, lengths=(7, 16, 31), pad=0 if causal else 3)
    print(f"{mode} ONNX parity, causal={causal}: max |ORT - torch| / scale = {worst:.2e}")


@pytest.mark.parametrize("causal", [True, False])
def test_axial_grows_as_declared(causal):
    """tests/growth.py's harness for mode=axial (test_growth.py keys its row by variant: fixed mode there), rows of
    256: n (s + n / s) scores, the row part leading over n = 1k..8k."""
    from costhelpers import declared
    from growth import NS, check_growth, declared_growth, measure_growth

    args = dict(dtype=torch.float32, d=64, causal=causal, heads=2, mode="axial", block=256)
    module, _, _, _ = declared("mha", "combiner", 1, NS[0], **args)
    module.train()
    got = measure_growth(lambda x: module(x, Ctx()), lambda n: torch.randn(1, n, 64, generator=torch.Generator().manual_seed(n)),
                         exclude=[module], train=True)

    def at(n):
        _, _, cost, ev = declared("mha", "combiner", 1, n, **args)
        return ev(cost.fwd), ev(cost.peak) + n * 64 * 4, ev(cost.bwd)

    flops, peak, bwd = declared_growth(at)
    check_growth(f"mha(combiner, mode=axial) {'causal' if causal else 'bidirectional'}", got, flops, peak, bwd)


@pytest.mark.parametrize("mode", ["fixed", "axial"])
def test_sqrt_n_blocks_cost_n_sqrt_n(mode):
    """The paper's O(n sqrt(n) d): with s = sqrt(n), the declared attention FLOPs (all but the four n d^2
    projections) grow 8-fold when n grows 4-fold, against 16-fold for softmax attention's."""
    from costhelpers import declared

    def attention_flops(variant, n, **build):
        _, _, cost, ev = declared("mha", variant, 1, n, d=64, heads=2, **build)
        return ev(cost.fwd) - 8 * n * 64 * 64  # less the q, k, v, o projections

    for n in (4 ** 6, 4 ** 8):
        s = int(math.isqrt(n))
        grow = attention_flops("combiner", 4 * n, mode=mode, block=2 * s) / attention_flops("combiner", n, mode=mode, block=s)
        assert grow == pytest.approx(8, rel=0.02), (n, grow)
        assert attention_flops("softmax", 4 * n) / attention_flops("softmax", n) == pytest.approx(16, rel=0.02)


def logsparse_spans(t, L, causal):
    """Combiner-Logsparse's partition of the keys of query t in a row of L tokens, from the binary representations:
    [(direct key, span)], the span the 2^l - 1 other keys of an aligned block of 2^l (maybe empty, or cut at L)."""
    parts, m = [], t + 1
    for l in range(L.bit_length() + 1):
        B = 2 ** l
        if (m >> l) & 1:  # the prefix block of bit l of t + 1: its last key direct
            c = (m >> l) - 1
            parts.append(((c + 1) * B - 1, list(range(c * B, (c + 1) * B - 1))))
        if not causal and not (t >> l) & 1 and ((t >> l) + 1) * B < L:  # the suffix block of a 0 bit of t
            c = (t >> l) + 1
            parts.append((c * B, list(range(c * B + 1, min((c + 1) * B, L)))))
    return parts


def logsparse_reference(m, x, causal, lengths=None, log_size=False):
    """Combiner-Logsparse: one softmax over the direct keys k_j and the spans' summary keys k_Omega (values v_j and
    v_Omega), the summaries as Combiner-Fixed's (summary() above); log_size: log |Omega| added to a summary's logit."""
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        L = n if lengths is None else lengths[bb]
        for t in range(L):
            parts = logsparse_spans(t, L, causal)
            assert sorted([p for p, _ in parts] + [j for _, s in parts for j in s]) == list(range(t + 1 if causal else L))
            for hh in range(h):
                c = hh // g
                keys = [k[bb, p, c] for p, _ in parts]
                vals = [v[bb, p, c] for p, _ in parts]
                bias = [0.0] * len(parts)
                for _, span in parts:
                    if span:
                        ko, vo = summary(q[bb], k[bb], v[bb], span, c, g)
                        keys.append(ko)
                        vals.append(vo)
                        bias.append(math.log(len(span)) if log_size else 0.0)
                sc = torch.stack(keys) @ q[bb, t, hh] / math.sqrt(dh) + torch.tensor(bias, dtype=x.dtype)
                out[bb, t, hh] = torch.einsum("j,jd->d", sc.softmax(0), torch.stack(vals))
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("causal", [False, True])
def test_logsparse_log_size(causal):
    """log_size=true: log |Omega| on each summary's logit (right padding cuts a suffix span, and its count), decoding
    included; refused outside mode=logsparse."""
    import evodsl
    from ophelpers import decode_in_pieces

    m, _, _ = make_op("mha", "combiner", d=D, causal=causal, heads=4, kv_heads=2, mode="logsparse", log_size=True)
    perturb_params(m)
    n, lengths = 21, [21, 13, 6]
    x = torch.randn(len(lengths), n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        ref = logsparse_reference(m, x, causal, lengths, log_size=True)
        for i, L in enumerate(lengths):
            assert (y[i, :L] - ref[i, :L]).abs().max().item() < 1e-10
        if causal:
            stepped, _ = decode_in_pieces(m, x, [7, 1, 1, 5, 1, 6])
            assert (stepped - m(x, Ctx())).abs().max().item() < 1e-10
    with pytest.raises(EvoError, match="log_size"):
        evodsl.parse("model m(causal=true) = input(features, d=32) -> mha(combiner, heads=4, log_size=true) -> "
                     "head(linear, d_out=2)")


LOGSPARSE_CASES = [  # causal, n, kv_heads
    (True, 16, None), (False, 16, None),  # a power of 2
    (True, 23, 2), (False, 23, 2), (True, 37, 1), (False, 37, 1),  # none, grouped K/V heads
    (True, 1, None), (False, 2, 2), (True, 3, None), (False, 5, None),  # a few tokens: spans of 0 or 1 keys
]


@pytest.mark.parametrize("causal, n, kv_heads", LOGSPARSE_CASES)
def test_logsparse_matches_equation(causal, n, kv_heads):
    m, _, _ = make_op("mha", "combiner", d=D, causal=causal, heads=4, kv_heads=kv_heads, mode="logsparse")
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = logsparse_reference(m, x, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        # the control: softmax attention differs where a span of 3 keys or more is summarised, and is equal at
        # n <= 4, where every span holds at most one key (its summary is that key and value)
        sm, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=kv_heads)
        sm.load_state_dict(m.state_dict())
        diff = (y - sm(x, Ctx())).abs().max().item()
        assert diff > 1e-6 if n > 4 else diff < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_logsparse_grows_as_declared(causal):
    """tests/growth.py's harness for mode=logsparse (test_growth.py keys its row by variant: fixed mode there) over
    n = 1k..8k: n log n FLOPs and bytes (the spans of every level, each query's 2 log2 n keys), no hidden n x n."""
    from growth import NS, check_growth, declared_growth, mha_growth

    got, flops, peak, bwd = mha_growth("combiner", causal, d=16, mode="logsparse")  # d 16: the attention leads
    # the attention's FLOPs (less the n d^2 projections) and the peak bytes are n log n
    attention = declared_growth(lambda n: (flops.values[NS.index(n)] - 8 * n * 16 * 16,))[0]
    assert attention.cls == "n log n" and peak.cls == "n log n", (attention, peak)
    check_growth(f"mha(combiner, mode=logsparse) {'causal' if causal else 'bidirectional'}", got, flops, peak, bwd)
    print(f"logsparse causal={causal}: FLOPs {got.flops}; peak {got.peak}; backward FLOPs {got.bwd_flops}")
