"""mixer(daft) against the note's equation in float64: W = P1 P2^T from the two tables, then per channel
o_t = sigmoid(q_t) * sum_r exp(k_r + W_tr) v_r / sum_r exp(k_r + W_tr) (r <= t causal) with the [b, n, n, d]
weights written out; padding, the decoding step, causality and the refusals."""
from __future__ import annotations

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, load_all, lookup
from ophelpers import assert_no_leak, decode_in_pieces, make_op, perturb_params


def reference(m, x: torch.Tensor, causal: bool, keep=None) -> torch.Tensor:
    b, n, d = x.shape

    def proj(lin):
        return x @ lin.weight.T + (0 if lin.bias is None else lin.bias)

    q, k, v = proj(m.q_proj), proj(m.k_proj), proj(m.v_proj)
    W = torch.einsum("ti,ri->tr", m.p1[:n], m.p2[:n])  # w_tr = p1_t . p2_r
    logits = k[:, None, :, :] + W[None, :, :, None]  # [b, t, r, d]
    allowed = torch.ones(b, n, n, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    if keep is not None:
        allowed &= keep[:, None, :]
    weights = torch.softmax(logits.masked_fill(~allowed[..., None], float("-inf")), dim=2)
    y = torch.sigmoid(q) * torch.einsum("btrc,brc->btc", weights, v)
    return y @ m.o_proj.weight.T + m.o_proj.bias


def _build(d, causal, **kw):
    m, _, _ = make_op("mixer", "daft", d=d, causal=causal, **{"max_len": 40, "rank": 4, **kw})
    perturb_params(m)
    return m


def _x(b, n, d, seed=3):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("b,n,d,rank", [(2, 17, 16, 4), (1, 1, 8, 1), (3, 33, 12, 7), (1, 40, 8, 40)])
def test_daft_matches_equation(causal, b, n, d, rank):
    m = _build(d, causal, rank=rank)
    x = _x(b, n, d, seed=n)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, causal)
    assert (y - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


def test_daft_is_aft_full_with_the_product_table():
    """With AFT-full's table set to P1 P2^T the two ops are one function."""
    daft = _build(16, True)
    aft, _, _ = make_op("mixer", "aft", d=16, causal=True, mode="full", max_len=40)
    aft.load_state_dict({k: v for k, v in daft.state_dict().items() if not k.startswith("p")}, strict=False)
    with torch.no_grad():
        aft.w.copy_(daft.p1 @ daft.p2.T)
        x = _x(2, 23, 16)
        assert (aft(x, Ctx()) - daft(x, Ctx())).abs().max().item() < 1e-12


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_daft_padding(causal):
    m = _build(16, causal)
    lengths, n = [19, 11, 1], 19
    x = _x(3, n, 16)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    x[~mask] = 5 * torch.randn(int((~mask).sum()), 16, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    with torch.no_grad():
        y = m(x, Ctx(mask=mask, right_padded=True))
        for i in range(3):
            alone = m(x[i:i + 1, mask[i]], Ctx())[0]
            assert (y[i, mask[i]] - alone).abs().max().item() <= 1e-10 * alone.abs().max().item()
        if not causal:
            ref = reference(m, x, causal, keep=mask)
            assert (y[mask] - ref[mask]).abs().max().item() <= 1e-10 * ref.abs().max().item()
    with pytest.raises(EvoError, match="mixer\\(daft\\) needs right padding"):
        m(x, Ctx(mask=mask.flip(1)))


def test_daft_decoding_equals_the_forward():
    m = _build(16, True)
    x = _x(2, 23, 16)
    with torch.no_grad():
        full = m(x, Ctx())
        got, state = decode_in_pieces(m, x, (4, 1, 1, 6, 3, 8))
    assert (got - full).abs().max().item() <= 1e-10 * full.abs().max().item()
    assert state.nbytes() == 2 * 2 * 23 * 16 * 8


def test_daft_causal_never_leaks():
    m = _build(16, True)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=30, d=16)


def test_daft_declaration():
    load_all()
    op = lookup("mixer", "daft")
    with pytest.raises(ShapeProblem, match="max_len"):
        op.shape(op.params(max_len=8), OpEnv(in_shapes=(("b", 9, 16),)))
    m = _build(16, False)
    assert sum(p.numel() for p in m.parameters()) == 4 * (16 * 16 + 16) + 2 * 40 * 4
    with pytest.raises(EvoError, match="E410"):
        m(_x(1, 41, 16), Ctx())
