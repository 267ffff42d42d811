"""mha(mla) against DeepSeek-V2's equations (section 2.1), in float64, written here from the weights alone:
c_t = RMSNorm(W_dkv x_t), k_t^R = RoPE(W_kr x_t), [k_ti^C; v_ti] = W_ukv,i c_t, q_t = W_q x_t (or W_uq RMSNorm(W_dq
x_t)) split per head into q^C and RoPE(q^R), o_ti = sum_j softmax_j((q_ti^C.k_ji^C + q_ti^R.k_j^R) /
sqrt(nope + rope)) v_ji, u_t = W_o [o_t1; ..; o_th]; the rotation by its own loop over channel pairs (interleaved
(2i, 2i+1) or halves (i, i + r/2)). The absorbed decoding form equals the forward; the decoding state holds the
latent and k^R only, fewer bytes than grouped-query softmax attention's K/V at the same width; kv_heads and
head_dim are refused."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, decode_in_pieces, make_op, perturb_params

D = 32


def rms(x, g, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def rotate(x, t, rot, pairs, base=10000.0):
    """x [..., R] at position t: channel pairs (a, b) of the first `rot` turned by t base^(-2i/rot)."""
    y = x.clone()
    for i in range(rot // 2):
        a, b = (2 * i, 2 * i + 1) if pairs == "interleaved" else (i, i + rot // 2)
        ang = t * base ** (-2 * i / rot)
        y[..., a] = x[..., a] * math.cos(ang) - x[..., b] * math.sin(ang)
        y[..., b] = x[..., a] * math.sin(ang) + x[..., b] * math.cos(ang)
    return y


def linear(lin, x):
    return x @ lin.weight.T + (0 if lin.bias is None else lin.bias)


def reference(m, x, causal, rope=None, mask=None):
    """rope: (rotated channels, pairs) or None; mask: [b, n] True for tokens (padded keys get no weight)."""
    b, n, _ = x.shape
    h, r, R, c, dv = m.heads, m.rank, m.rope, m.nope, m.v_dim
    if hasattr(m, "q_down"):
        q = linear(m.q_up, rms(linear(m.q_down, x), m.q_norm.weight))
    else:
        q = linear(m.q_proj, x)
    q = q.view(b, n, h, c + R)
    down = linear(m.kv_down, x)
    lat, kr = rms(down[..., :r], m.kv_norm.weight), down[..., r:]  # [b, n, r], [b, n, R]
    kv = linear(m.kv_up, lat).view(b, n, h, c + dv)
    kc, v = kv[..., :c], kv[..., c:]
    qc, qr = q[..., :c], q[..., c:].clone()
    if rope is not None:
        for t in range(n):
            qr[:, t] = rotate(qr[:, t], t, *rope)
            kr[:, t] = rotate(kr[:, t], t, *rope)
    out = torch.zeros(b, n, h, dv, dtype=x.dtype)
    for t in range(n):
        keys = range(t + 1) if causal else range(n)
        for i in range(h):
            s = torch.stack([(qc[:, t, i] * kc[:, j, i]).sum(-1) + (qr[:, t, i] * kr[:, j]).sum(-1) for j in keys], -1)
            s = s / math.sqrt(c + R)
            if mask is not None:
                s = s.masked_fill(~mask[:, list(keys)], float("-inf"))
            w = s.softmax(-1)
            out[:, t, i] = sum(w[:, jj, None] * v[:, j, i] for jj, j in enumerate(keys))
    return linear(m.o_proj, out.reshape(b, n, h * dv))


DIMS = {  # kv_rank, q_rank, rope_dim, nope_dim, v_dim, heads
    "v-narrower": dict(kv_rank=12, q_rank=0, rope_dim=4, nope_dim=6, v_dim=5, heads=4),  # v padded to 10
    "v-wider": dict(kv_rank=8, q_rank=10, rope_dim=4, nope_dim=4, v_dim=9, heads=2),  # q, k padded to 9
    "v-equal": dict(kv_rank=16, q_rank=6, rope_dim=4, nope_dim=4, v_dim=8, heads=3, bias=False),
}
ROPES = [None, ("rope", {}), ("rope", {"pairs": "halves", "base": 500.0}), ("rope", {"fraction": 0.5})]


@pytest.mark.parametrize("dims", list(DIMS))
@pytest.mark.parametrize("pos", range(len(ROPES)), ids=["nopos", "rope", "rope-halves", "rope-half"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_mla_matches_equation(dims, pos, causal):
    p = ROPES[pos]
    m, _, _ = make_op("mha", "mla", d=D, causal=causal, pos=p, **DIMS[dims])
    perturb_params(m)
    rope = None
    if p is not None:
        rope = (int(DIMS[dims]["rope_dim"] * p[1].get("fraction", 1.0)), p[1].get("pairs", "interleaved"))
        if "base" in p[1]:
            rope = (*rope, p[1]["base"])
    for n in (1, 5, 13):
        x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        with torch.no_grad():
            y, ref = m(x, Ctx()), reference(m, x, causal, rope)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0), (dims, n)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_masked_as_the_equation(causal):
    m, _, _ = make_op("mha", "mla", d=D, causal=causal, pos=("rope", {}), **DIMS["v-narrower"])
    perturb_params(m)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, 7:] = False
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference(m, x, causal, (4, "interleaved"), mask)
    real = mask[..., None] & torch.ones_like(y, dtype=torch.bool)
    if causal:  # a left-padded query before any token reads its own key (AttentionBase.allowed): not compared
        assert (y - ref)[real].abs().max().item() < 1e-10 * ref[real].abs().max().item()
    else:
        assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("dims", list(DIMS))
def test_absorbed_steps_equal_the_forward(dims):
    """A prefill, then chunks and single tokens through the absorbed form (q^C W_uk against the cached latent,
    W_uv after the sum) give the forward's outputs; the cache is [c; k^R] per token, nothing else."""
    m, _, _ = make_op("mha", "mla", d=D, causal=True, pos=("rope", {}), **DIMS[dims])
    perturb_params(m)
    x = torch.randn(2, 17, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        full = m(x, Ctx())
        got, state = decode_in_pieces(m, x, (4, 1, 3, 1, 1, 7))
    assert (got - full).abs().max().item() < 1e-10 * full.abs().max().item()
    (cache,) = state.caches.values()
    assert cache[0].shape == (2, 17, DIMS[dims]["kv_rank"] + DIMS[dims]["rope_dim"])


def test_causal_does_not_leak_and_bidirectional_does():
    m, _, _ = make_op("mha", "mla", d=D, causal=True, pos=("rope", {}), **DIMS["v-wider"])
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=20, d=D)
    m, _, _ = make_op("mha", "mla", d=D, causal=False, **DIMS["v-wider"])
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=12, d=D)


MODEL = """
vocab = 53
d_model = 64
heads = 4
model m(causal=true) = input(tokens) -> embed(token) -> pos(rope)
    -> repeat(norm(rmsnorm) -> {mha} -> norm(rmsnorm) -> ffn(swiglu), 2) -> norm(rmsnorm) -> head(lm)
"""
MLA = "mha(mla, kv_rank=16, rope_dim=8, nope_dim=16, v_dim=16, bias=false)"  # heads 4 x (16 + 8): 24 numbers a token
GQA = "mha(softmax, kv_heads=2, bias=false)"  # K and V of 2 heads of 16 (d / heads): 64 numbers a token


def test_decoding_state_is_the_latent_and_smaller_than_gqa():
    """`evodsl cost`'s kv_cache counts kv_rank + rope_dim numbers per token and layer, the live state holds exactly
    that, and it is 24 / 64 of grouped-query softmax attention's (2 K/V heads) at the same width."""
    b, n = 2, 21
    ids = torch.randint(0, 53, (b, n), generator=torch.Generator().manual_seed(0))
    held = {}
    for name, mha in (("mla", MLA), ("gqa", GQA)):
        src = MODEL.format(mha=mha)
        model = evodsl.compile(src, dtype=torch.float64)
        with torch.no_grad():
            full = model(ids)
            _, state = model.decode(ids[:, :n - 3])
            logits, state = model.decode(ids[:, n - 3:], state)
        assert (logits - full[:, n - 3:]).abs().max().item() < 1e-10 * full.abs().max().item()
        declared = evodsl.cost(src, seq=n, batch=b)["memory"]["kv_cache"]  # float32: 4 bytes a number
        assert state.nbytes() == 2 * declared
        held[name] = declared
    assert held["mla"] == 2 * b * n * (16 + 8) * 4  # 2 layers
    assert held["gqa"] == 2 * b * n * 2 * 2 * 16 * 4
    assert held["mla"] * 64 == held["gqa"] * 24


@pytest.mark.parametrize("arg, message", [("kv_heads=2", "unknown parameter 'kv_heads' for mha\\(mla\\)"),
                                          ("head_dim=8", "unknown parameter 'head_dim' for mha\\(mla\\)"),
                                          ("rope_dim=5", "rotates 5 of rope_dim=5 channels"),
                                          ("q_rank=-1", "invalid value -1 for parameter 'q_rank'")])
def test_bad_arguments_are_refused(arg, message):
    src = MODEL.format(mha=f"mha(mla, kv_rank=8, nope_dim=8, v_dim=8, {arg})".replace("rope_dim=8, rope_dim", "rope_dim"))
    with pytest.raises(EvoError, match=message):
        evodsl.compile(src)


def test_other_position_schemes_inside_are_refused():
    with pytest.raises(EvoError, match="mha\\(mla\\) cannot apply pos\\(alibi\\)"):
        evodsl.compile(MODEL.replace("pos(rope)", "pos(alibi)").format(mha=MLA))


def test_decoding_step_exports_to_onnx(tmp_path):
    """`evodsl.export(..., step=True)`: the step graph's state is the latent cache [batch, past_seq, kv_rank + rope]
    per layer, and a greedy loop in onnxruntime from the empty state gives generate's tokens."""
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    src = MODEL.format(mha="mha(mla, kv_rank=16, rope_dim=4, nope_dim=6, v_dim=8)").replace("d_model = 64", "d_model = 32")
    result = evodsl.export(src, tmp_path / "step.onnx", step=True)
    assert list(result.input_names) == ["input_ids", "attention_mask", "past.0.0", "past.1.0"]
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()][2:] == [["batch", "past_seq", 20]] * 2
    model = evodsl.compile(src)
    prompt = torch.randint(0, 53, (2, 5), generator=torch.Generator().manual_seed(7))
    want = model.generate(prompt, max_new_tokens=12)
    past = {i.name: np.zeros((2, 0, 20), dtype=np.float32) for i in session.get_inputs()[2:]}
    ids, out, seen = prompt, [prompt], 0
    for _ in range(12):
        seen += ids.shape[1]
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((2, seen), dtype=np.int64), **past})
        ids = torch.from_numpy(got[0][:, -1].argmax(-1))[:, None]
        out.append(ids)
        past = dict(zip(past, got[1:]))
    assert torch.equal(torch.cat(out, dim=1), want)
    assert {a.shape for a in past.values()} == {(2, 16, 20)}
