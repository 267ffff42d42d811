"""mixer(aft) against the paper's equation, computed here in float64 with the [b, n, n, d] weights of every
(query, key, channel) written out: Y_t = sigmoid(Q_t) * sum_r exp(K_r + w_tr) V_r / sum_r exp(K_r + w_tr), w
built from its definition per mode (full: the table; simple: 0; local: the band, 0 outside; conv: the kernel
of each head's channels); causal, r <= t. Also: large K (stability), padding (right/left), the decoding step
against the forward, and the declaration's refusals."""
from __future__ import annotations

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, load_all, lookup
from ophelpers import assert_no_leak, decode_in_pieces, make_op, perturb_params

MODES = {"full": {"max_len": 40}, "simple": {}, "local": {"max_len": 40, "window": 3},
         "conv": {"kernel": 5, "heads": 4}}


def position_bias(m, mode: str, n: int, d: int, causal: bool) -> torch.Tensor:
    """w' [n, n, d]: w'_{t,r,c} from the module's parameters, by the paper's definition of each mode."""
    w = torch.zeros(n, n, d, dtype=torch.float64)
    for t in range(n):
        for r in range(n):
            o = r - t
            if mode == "full":
                w[t, r] = m.w[t, r]
            elif mode == "local" and (-m.w.shape[1] < o <= 0 if causal else abs(o) < (m.w.shape[1] + 1) // 2):
                w[t, r] = m.w[t, o + m.w.shape[1] - 1 if causal else o + (m.w.shape[1] - 1) // 2]
            elif mode == "conv":
                k, h = m.w.shape[1], m.w.shape[0]
                lo = -(k - 1) if causal else -(k // 2)
                if lo <= o < lo + k:
                    w[t, r] = m.w[:, o - lo].repeat_interleave(d // h)
    return w


def reference(m, x: torch.Tensor, mode: str, causal: bool, keep=None) -> torch.Tensor:
    b, n, d = x.shape

    def proj(lin):
        return x @ lin.weight.T + (0 if lin.bias is None else lin.bias)

    q, k, v = proj(m.q_proj), proj(m.k_proj), proj(m.v_proj)
    logits = k[:, None, :, :] + position_bias(m, mode, n, d, causal)[None]  # [b, t, r, d]: K_r + w_tr
    allowed = torch.ones(b, n, n, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    if keep is not None:
        allowed &= keep[:, None, :]
    logits = logits.masked_fill(~allowed[..., None], float("-inf"))
    weights = torch.softmax(logits, dim=2)  # exp(K_r + w_tr) / sum_r exp(K_r + w_tr), stable for any scale
    y = torch.sigmoid(q) * torch.einsum("btrc,brc->btc", weights, v)
    return y @ m.o_proj.weight.T + m.o_proj.bias


def _x(b, n, d, seed=3):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _build(mode, d, causal, **extra):
    m, _, _ = make_op("mixer", "aft", d=d, causal=causal, mode=mode, **{**MODES[mode], **extra})
    perturb_params(m)
    return m


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("b,n,d", [(2, 17, 16), (1, 1, 8), (3, 33, 12)])
def test_aft_matches_equation(mode, causal, b, n, d):
    m = _build(mode, d, causal)
    x = _x(b, n, d, seed=n)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, mode, causal)
    assert (y - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("mode,extra", [("local", {"window": 1}), ("local", {"window": 30}),
                                        ("conv", {"kernel": 1, "heads": 1}), ("conv", {"kernel": 9, "heads": 2})])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_aft_band_edges(mode, extra, causal):
    """A band of one position, one wider than the sequence, a kernel wider than it."""
    if mode == "conv" and not causal and extra["kernel"] % 2 == 0:
        pytest.skip("odd kernels only")
    m = _build(mode, 8, causal, **extra)
    x = _x(2, 7, 8)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, mode, causal)
    assert (y - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_aft_is_stable_with_large_keys(mode, causal):
    """K near 1000 (exp overflows at 710 in float64, 89 in float32), spread over tens, and w of order 10: the
    maxima subtracted keep every exponential <= 1; float32 agrees with the float64 equation. (A channel whose keys
    spread over more than the exp range, ~87 in float32, underflows: the reference code's limit too.)"""
    m = _build(mode, 16, causal)
    with torch.no_grad():
        m.k_proj.weight.mul_(4.0)
        m.k_proj.bias.add_(1000.0)
        m.w.mul_(20.0 if mode == "full" else 2.0) if m.w is not None else None
    x = _x(2, 21, 16)
    with torch.no_grad():
        ref = reference(m, x, mode, causal)
        y64 = m(x, Ctx())
        y32 = m.float()(x.float(), Ctx()).double()
    assert torch.isfinite(y64).all() and torch.isfinite(y32).all()
    assert (y64 - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()
    assert (y32 - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_aft_padding(mode, causal, left):
    """A padded batch equals each sequence alone at its real positions, and matches the equation with padded
    keys left out; full and local refuse left padding (their biases read absolute positions)."""
    m = _build(mode, 16, causal)
    lengths, n = [19, 11, 1], 19
    x = _x(3, n, 16)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    if left:
        mask = mask.flip(1)
    x[~mask] = 5 * torch.randn(int((~mask).sum()), 16, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    if left and mode in ("full", "local"):
        with pytest.raises(EvoError, match="E409|right padding"):
            m(x, Ctx(mask=mask))
        return
    with torch.no_grad():
        y = m(x, Ctx(mask=mask, right_padded=not left))
        assert torch.isfinite(y).all()
        for i in range(3):
            alone = m(x[i:i + 1, mask[i]], Ctx())[0]
            assert (y[i, mask[i]] - alone).abs().max().item() <= 1e-10 * alone.abs().max().item()
        if not causal or left:  # the control: without the mask the padding reaches the tokens
            assert (m(x, Ctx())[1, mask[1]] - y[1, mask[1]]).abs().max().item() > 1e-6
        if not causal:
            ref = reference(m, x, mode, causal, keep=mask)
            assert (y[mask] - ref[mask]).abs().max().item() <= 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("mode", list(MODES))
def test_aft_decoding_equals_the_forward(mode):
    """A prefill, then pieces of 1 to 4 tokens: the step's outputs are the forward's (1e-10); simple keeps three
    [b, 1, d] tensors whatever the length, the others K and V."""
    m = _build(mode, 16, True)
    x = _x(2, 23, 16)
    with torch.no_grad():
        full = m(x, Ctx())
        got, state = decode_in_pieces(m, x, (5, 1, 3, 4, 1, 2, 7))
    assert (got - full).abs().max().item() <= 1e-10 * full.abs().max().item()
    assert state.nbytes() == (3 * 2 * 16 * 8 if mode == "simple" else 2 * 2 * 23 * 16 * 8)


@pytest.mark.parametrize("mode", list(MODES))
def test_aft_causal_never_leaks(mode):
    m = _build(mode, 16, True)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=30, d=16)


def test_aft_declaration():
    load_all()
    op = lookup("mixer", "aft")
    env = OpEnv(in_shapes=(("b", "n", 16),))
    with pytest.raises(ShapeProblem, match="needs max_len"):
        op.shape(op.params(mode="full"), env)
    with pytest.raises(ShapeProblem, match="needs window"):
        op.shape(op.params(mode="local", max_len=8), env)
    with pytest.raises(ShapeProblem, match="odd size"):
        op.shape(op.params(mode="conv", kernel=4), env)
    assert op.shape(op.params(mode="conv", kernel=4), OpEnv(in_shapes=(("b", "n", 16),), causal=True))
    with pytest.raises(ShapeProblem, match="divisible"):
        op.shape(op.params(mode="conv", kernel=3, heads=3), env)
    with pytest.raises(ShapeProblem, match="max_len"):
        op.shape(op.params(mode="full", max_len=8), OpEnv(in_shapes=(("b", 9, 16),)))
    m = _build("full", 16, False)
    with pytest.raises(EvoError, match="E410"):
        m(_x(1, 41, 16), Ctx())


@pytest.mark.parametrize("mode,causal", [("full", True), ("simple", False), ("local", True), ("local", False),
                                         ("conv", False), ("conv", True)])
def test_aft_onnx_matches_torch(tmp_path, mode, causal):
    """One exported file (the band in its padded form, for a symbolic length) against torch at three lengths and
    two batch sizes, with perturbed weights (w away from 0, where every mode would be simple)."""
    import evodsl
    import onnxruntime as ort

    args = {"full": "mode=full, max_len=80", "simple": "mode=simple", "local": "mode=local, max_len=80, window=4",
            "conv": "mode=conv, kernel=5, heads=2"}[mode]
    src = (f"d_model = 16\nmodel m(causal={str(causal).lower()}) = input(features, d=16) -> residual(mixer(aft, "
           f"{args})) -> head(linear, d_out=4)\n")
    model = evodsl.compile(src)
    perturb_params(model)
    evodsl.save(model, tmp_path / "w.pt")
    r = evodsl.export(src, tmp_path / "m.onnx", weights=tmp_path / "w.pt")
    session = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for b, n in ((1, 7), (3, 33), (2, 70)):
        x = torch.randn(b, n, 16, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(None, {name: x.numpy(), **{i.name: torch.ones(b, n, dtype=torch.long).numpy()
                                                    for i in session.get_inputs()[1:]}})[0]
        assert abs(got - want).max() <= 1e-4 * abs(want).max(), (b, n)
