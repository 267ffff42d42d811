"""mha(tglobal) against its defining equation in float64 (one softmax per query over the keys |i - j| <= r and
the floor(n / l) transient global tokens, RMSNorm of each block's input sums, the tail joining the last block;
T5's bias by distance on the local part, a bias by block distance on the global part, buckets from HF's own
function), and against HF's LongT5TransientGlobalAttention with the same weights; no causal form."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def bucket(rel: int, buckets: int, max_distance: int) -> int:
    from transformers.models.longt5.modeling_longt5 import LongT5TransientGlobalAttention as HF

    return int(HF._relative_position_bucket(torch.tensor(rel), True, buckets, max_distance))


def reference_tglobal(m, x, table=None):
    """The equation, one query at a time. table: pos(t5_bias)'s [buckets, heads] (None: no local bias)."""
    b, n, d = x.shape
    h, dh, group = m.heads, m.head_dim, m.heads // m.kv_heads
    r, l, scale = m.radius, m.block, (m.scale or 1 / math.sqrt(m.head_dim))
    q, k, v = head_projections(m, x)
    g = n // l
    sums = torch.zeros(b, g, d, dtype=x.dtype)
    for j in range(n if g else 0):
        sums[:, min(j // l, g - 1)] += x[:, j]
    G = sums / torch.sqrt((sums ** 2).mean(-1, keepdim=True) + m.eps) * m.global_norm
    _, kg, vg = head_projections(m, G)  # [b, g, kv, dh]: the layer's own k and v projections
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for i in range(n):
        near = [j for j in range(n) if abs(i - j) <= r]
        for hh in range(h):
            kh = hh // group
            s = [torch.einsum("bd,bd->b", q[:, i, hh], k[:, j, kh]) * scale
                 + (0 if table is None else table[bucket(j - i, table.shape[0], 128), hh]) for j in near]
            bi = min(i // l, g - 1)
            s += [torch.einsum("bd,bd->b", q[:, i, hh], kg[:, a, kh]) * scale
                  + m.global_bias[bucket(a - bi, m.buckets, m.max_distance), hh] for a in range(g)]
            w = torch.stack(s, -1).softmax(-1)
            vals = torch.stack([v[:, j, kh] for j in near] + [vg[:, a, kh] for a in range(g)], 1)
            out[:, i, hh] = torch.einsum("bk,bkd->bd", w, vals)
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # n, radius, block, kv_heads, t5 table, scale
    (40, 3, 4, None, True, 1.0), (70, 5, 8, 2, True, None), (33, 0, 5, 1, False, None), (19, 40, 3, None, True, 1.0),
    (97, 12, 16, 2, False, 0.5), (6, 2, 8, None, True, 1.0),  # g = 0: the band alone
]


@pytest.mark.parametrize("n,radius,block,kv_heads,t5,scale", CASES)
def test_tglobal_matches_equation(n, radius, block, kv_heads, t5, scale):
    pos = ("t5_bias", {"heads": 4, "buckets": 32, "max_distance": 128}) if t5 else None
    m, _, _ = make_op("mha", "tglobal", d=D, heads=4, kv_heads=kv_heads, radius=radius, block=block, scale=scale,
                      pos=pos)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    table = m.pos_source.weight if t5 else None
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_tglobal(m, x, table)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if n >= block:  # the global part is read: its bias table and its norm change the output
            for p in (m.global_bias, m.global_norm):
                p[0] += 1.0
                assert (m(x, Ctx()) - y).abs().max().item() > 1e-6
                p[0] -= 1.0


def _hf_pair(radius, block, kv_heads=None):
    from transformers import LongT5Config
    from transformers.models.longt5.modeling_longt5 import LongT5TransientGlobalAttention

    cfg = LongT5Config(d_model=D, d_kv=8, num_heads=4, local_radius=radius, global_block_size=block,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                       encoder_attention_type="transient-global", is_decoder=False)
    hf = LongT5TransientGlobalAttention(cfg, has_relative_attention_bias=True).double().eval()
    m, _, _ = make_op("mha", "tglobal", d=D, heads=4, radius=radius, block=block, scale=1.0, bias=False,
                      pos=("t5_bias", {"heads": 4, "buckets": 32, "max_distance": 128}))
    perturb_params(m)
    with torch.no_grad():
        for ours, theirs in [(m.q_proj, hf.q), (m.k_proj, hf.k), (m.v_proj, hf.v), (m.o_proj, hf.o)]:
            theirs.weight.copy_(ours.weight)
        hf.global_input_layer_norm.weight.copy_(m.global_norm)
        hf.global_relative_attention_bias.weight.copy_(m.global_bias)
        hf.relative_attention_bias.weight.copy_(m.pos_source.weight)
    return m, hf


@pytest.mark.parametrize("n,radius,block", [(40, 3, 4), (70, 7, 8), (130, 20, 16), (50, 127, 16), (12, 4, 16)])
def test_tglobal_matches_hf_longt5(n, radius, block):
    """HF's layer with LongT5Stack's all-ones mask (without one its local part reads the zero padding)."""
    m, hf = _hf_pair(radius, block)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, want = m(x, Ctx()), hf(x, mask=torch.ones(2, n, dtype=torch.float64))[0]
    # HF's global RMSNorm takes its variance in float32 even in float64: ~1e-7 relative
    assert (y - want).abs().max().item() < 1e-6 * want.abs().max().item()


def test_tglobal_right_padding_matches_hf():
    """Right padding: HF's batch, ours, and each sequence alone agree (HF counts blocks from position 0, which
    with left padding would move the tokens to other blocks: ours counts tokens, test_padding.py)."""
    n, lengths = 45, [45, 30]
    m, hf = _hf_pair(5, 8)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        y = m(x, Ctx(mask=mask, right_padded=True))
        want = hf(x, mask=mask.double())[0]
        alone = m(x[1:, :30], Ctx())
    assert (y - want)[mask].abs().max().item() < 1e-6 * want.abs().max().item()
    assert (y[1, :30] - alone[0]).abs().max().item() < 1e-10


def test_tglobal_has_no_causal_form_and_checks_its_buckets():
    src = ("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(tglobal, radius=4, "
           "block=4) -> head(lm)\n")
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
    op = lookup("mha", "tglobal")
    with pytest.raises(ShapeProblem, match="max_distance=8"):
        op.shape(op.params(buckets=32, max_distance=8), OpEnv(in_shapes=(("b", "n", D),)))


def test_tglobal_spec_builds_and_trains():
    src = ("d_model = 32\nheads = 4\nmodel m = input(tokens, vocab=11) -> embed(token) -> pos(t5_bias, heads=4) "
           "-> mha(tglobal, radius=4, block=4, scale=1.0) -> head(lm)\n")
    model = evodsl.compile(src)
    ids = torch.randint(0, 11, (2, 23))
    model.train()
    model(ids).sum().backward()
    grads = dict(model.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in grads.items()
               if "global" in name or name.startswith("pos"))


@pytest.mark.parametrize("padded", [False, True], ids=["whole", "padded"])
def test_tglobal_export_form_is_the_same_attention(padded, monkeypatch):
    """The form a symbolic n runs (export: each query gathers its band, the global keys read directly) equals the
    blocked form, with padding too, and with g = 0 (a sequence shorter than a block)."""
    m, _, _ = make_op("mha", "tglobal", d=D, heads=4, kv_heads=2, radius=3, block=8,
                      pos=("t5_bias", {"heads": 4, "buckets": 32, "max_distance": 128}))
    perturb_params(m)
    for n in (45, 6):
        x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        mask = (torch.arange(n)[None] < torch.tensor([n, n - 4])[:, None]) if padded else None
        with torch.no_grad():
            want = m(x, Ctx(mask=mask))
            with monkeypatch.context() as patch:
                patch.setattr(torch.jit, "is_tracing", lambda: True)
                got = m(x, Ctx(mask=mask))
        assert (got - want).abs().max().item() < 1e-10 * want.abs().max().item()
