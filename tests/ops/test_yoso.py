"""mha(yoso) against its defining equation, in float64. Per head, the expectation form's weights are
E_ij = (1 - arccos(q^_i . k^_j) / pi)^tau; the sample form's, over the module's own hyperplanes (the buffer
`planes`, column r tau + t: bit t of round r), are the fraction of the m rounds in which all tau signs of
r . q_i and r . k_j agree, written here as bit vectors compared pair by pair (no codes, no tables). Then
Y_i = l2-normalise(sum_j W_ij v_j), padded keys left out. The sampled weights converge to E (many rounds, several
draws), and the sampled output to the expectation form's; the refusals are EvoErrors."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32
SPECS = Path(__file__).resolve().parents[2] / "specs"


def weights(q, k, mode, tau, planes=None, m=0):
    """q [L, dh], k [n, dh] of one head -> W [L, n], float64."""
    if mode == "expectation":
        qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        return (1 - torch.arccos((qn @ kn.T).clamp(-1, 1)) / math.pi) ** tau
    w = torch.zeros(q.shape[0], k.shape[0], dtype=q.dtype)
    for r in range(m):
        hyper = planes[:, r * tau:(r + 1) * tau]
        bq, bk = q @ hyper > 0, k @ hyper > 0  # [L, tau], [n, tau]
        for i in range(q.shape[0]):
            w[i] += (bq[i][None, :] == bk).all(-1).to(q.dtype)
    return w / m


def reference(mod, x, mode, tau, m, key_mask=None):
    q, k, v = head_projections(mod, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    planes = getattr(mod, "planes", None)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        keep = torch.ones(n, dtype=torch.bool) if key_mask is None else key_mask[bb]
        for hh in range(h):
            w = weights(q[bb, :, hh], k[bb, keep, hh // g], mode, tau, planes, m)
            y = w @ v[bb, keep, hh // g]
            out[bb, :, hh] = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return output_projection(mod, out.reshape(b, n, h * dh))


CASES = [  # mode, n, kv_heads, hashes, tau, extra
    ("sample", 23, None, 8, 4, {}), ("sample", 17, 2, 5, 3, {}), ("sample", 9, 1, 16, 2, {}),
    ("sample", 1, None, 3, 5, {}), ("sample", 40, 2, 2, 8, {"head_dim": 6, "bias": False}),
    ("sample", 12, None, 1, 1, {}),  # one round of one bit: two buckets
    ("expectation", 23, None, 8, 4, {}), ("expectation", 17, 2, 8, 9, {}), ("expectation", 5, 1, 8, 1, {}),
    ("expectation", 1, None, 8, 3, {}), ("expectation", 30, 2, 8, 6, {"head_dim": 6, "bias": False}),
]


@pytest.mark.parametrize("mode, n, kv_heads, hashes, tau, extra", CASES)
def test_yoso_matches_equation(mode, n, kv_heads, hashes, tau, extra):
    mod, _, _ = make_op("mha", "yoso", d=D, heads=4, kv_heads=kv_heads, hashes=hashes, tau=tau, mode=mode, **extra)
    perturb_params(mod)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = mod(x, Ctx()), reference(mod, x, mode, tau, hashes)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("mode", ["sample", "expectation"])
def test_padded_keys_are_left_out(mode):
    """Right and left padding: each row's real keys only (the reference drops the padded ones)."""
    mod, _, _ = make_op("mha", "yoso", d=D, heads=4, kv_heads=2, hashes=6, tau=3, mode=mode)
    perturb_params(mod)
    n = 19
    x = torch.randn(3, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[0, 12:] = False
    mask[1, :5] = False
    with torch.no_grad():
        y, ref = mod(x, Ctx(mask=mask)), reference(mod, x, mode, 3, 6, mask)
    assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


def test_sampled_weights_converge_to_the_collision_probability():
    """The sample form's weights (its tables read with V = I: B itself) averaged over 8 draws of 1024 rounds
    each (8192 Bernoulli samples per pair: standard deviation <= 0.5 / sqrt(8192) = 0.0055) equal E within
    0.03 (5.4 sigma), where E's entries (tau = 1: 1 - theta / pi) average above 0.4 and are all above 0.1."""
    n, dh, tau, draws, m = 24, 8, 1, 8, 1024
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 2, n, dh, generator=g, dtype=torch.float64), torch.randn(1, 2, n, dh, generator=g,
                                                                                      dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64).expand(1, 2, n, n)
    est = torch.zeros(1, 2, 1, n, n, dtype=torch.float64)
    for seed in range(draws):
        mod, _, _ = make_op("mha", "yoso", d=2 * dh, heads=2, hashes=m, tau=tau, seed=seed)
        with torch.no_grad():
            est += mod.sampled(q[:, :, None], k, eye) / draws
    e = torch.stack([weights(q[0, hh], k[0, hh], "expectation", tau) for hh in range(2)])[None, :, None]
    tol = 0.03
    assert e.mean().item() > 0.4 and e.min().item() > 0.1 > tol
    err = (est - e).abs()
    assert err.max().item() < tol and err.mean().item() < 0.01


def test_sampled_output_approaches_the_expectation_form():
    """Same weights, rounds of 3 bits: the outputs (after N and o_proj) approach the expectation form's as
    1 / sqrt(m): within 3% (relative Frobenius error) at m = 4096, and 64x the rounds cut the error 4 to 16 fold."""
    x = torch.randn(2, 20, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact, _, _ = make_op("mha", "yoso", d=D, heads=4, kv_heads=2, tau=3, mode="expectation")
    perturb_params(exact)
    errs = []
    for m in (64, 4096):
        mod, _, _ = make_op("mha", "yoso", d=D, heads=4, kv_heads=2, tau=3, hashes=m)
        mod.load_state_dict(exact.state_dict(), strict=False)
        with torch.no_grad():
            want = exact(x, Ctx())
            errs.append(((mod(x, Ctx()) - want).norm() / want.norm()).item())
    assert errs[1] < 0.03 and 4 < errs[0] / errs[1] < 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_codes_are_exact_in_16_bit_dtypes(dtype):
    """Round r's code of a row is sum_t 2^t [r_t . x > 0] + r 2^tau, integers up to 2^16 that bfloat16 and float16
    cannot hold: the module sums its bits in float32. Checked against integer arithmetic on the same signs."""
    mod, _, _ = make_op("mha", "yoso", d=D, heads=4, hashes=5, tau=13, dtype=dtype)
    t = torch.randn(2, 4, 30, D // 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    signs = (t @ mod.planes > 0).long().unflatten(-1, (5, 13))  # [.., m, tau]
    want = (signs * 2 ** torch.arange(13)).sum(-1) + torch.arange(5) * 2 ** 13
    assert torch.equal(mod.codes(t), want) and want.max() > 2 ** 12


def test_backward():
    """expectation: every projection gets a gradient, finite even where q^ . k^ = 1 (q = k); sample: V's and
    o_proj's only (the codes are piecewise constant), V's being B^T of the incoming gradient."""
    x = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mod, _, _ = make_op("mha", "yoso", d=D, heads=4, mode="expectation", tau=4)
    perturb_params(mod)
    mod.k_proj.load_state_dict(mod.q_proj.state_dict())  # q_i = k_i: arccos at 1 on the diagonal
    mod(x, Ctx()).square().sum().backward()
    for lin in (mod.q_proj, mod.k_proj, mod.v_proj, mod.o_proj):
        assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0
    mod, _, _ = make_op("mha", "yoso", d=D, heads=4, hashes=8, tau=3)
    perturb_params(mod)
    mod(x, Ctx()).square().sum().backward()
    assert mod.q_proj.weight.grad is None and mod.k_proj.weight.grad is None
    assert mod.v_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("model, args, message", [
    ("false", "dropout=0.1", "no dropout"),
    ("false", "tau=0", "tau"), ("false", "tau=17", "tau"), ("false", "hashes=0", "hashes"),
    ("false", "mode=exact", "mode"),
    ("true", "", "yoso"),  # no causal form
])
def test_refusals(model, args, message):
    with pytest.raises(EvoError, match=message):
        evodsl.parse(f"model m(causal={model}) = input(features, d=32) -> mha(yoso{', ' + args if args else ''}) "
                     f"-> head(linear, d_out=2)")


# ---------------------------------------------------------------- HF YosoModel: parameters, the importer, outputs

def test_yoso_base_parameter_count_equals_hf():
    import transformers

    with torch.device("meta"):
        hf = transformers.YosoModel(transformers.YosoConfig())
    evo = evodsl.compile(SPECS / "yoso_base.evo", device="meta")
    assert sum(p.numel() for p in evo.parameters()) == sum(p.numel() for p in hf.parameters()) == 126_807_552


def test_importer_writes_the_spec_of_yoso_base():
    """from_hf(YosoConfig()) builds the same model as specs/yoso_base.evo (the graph printed alike); a config
    with the convolution of V is refused."""
    import transformers

    imported = evodsl.parse(evodsl.from_hf(transformers.YosoConfig().to_dict()))
    assert str(imported).split("\n", 1)[1] == str(evodsl.parse(SPECS / "yoso_base.evo")).split("\n", 1)[1]
    assert "mode=sample" in evodsl.from_hf(transformers.YosoConfig(use_expectation=False).to_dict())
    with pytest.raises(EvoError, match="conv_window"):
        evodsl.from_hf(transformers.YosoConfig(conv_window=65).to_dict())


TINY = dict(vocab=97, n_ctx=62, d_model=64, heads=4, d_ff=128, layers=2, tau=5)


def tiny_yoso_spec() -> str:
    text = (SPECS / "yoso_base.evo").read_text(encoding="utf-8")
    for key, value in TINY.items():
        text, k = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, flags=re.M)
        assert k == 1, f"yoso_base.evo has no binding line for {key}"
    return text


@pytest.mark.parametrize("source", ["spec", "from_hf"])
def test_last_hidden_state_matches_hf_with_copied_weights(source):
    """A small YosoConfig (expectation form, deterministic), HF's weights loaded with evodsl.load_hf into
    specs/yoso_base.evo made small and into the importer's spec: HF's last hidden state, in float64. Queries and
    keys scaled 10x and LayerNorms and biases moved off 1 / 0, so that E and N are far from uniform."""
    import transformers

    t = TINY
    config = transformers.YosoConfig(
        vocab_size=t["vocab"], hidden_size=t["d_model"], num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
        intermediate_size=t["d_ff"], max_position_embeddings=t["n_ctx"], hash_code_len=t["tau"],
        use_expectation=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(4)
    hf = transformers.YosoModel(config).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "self.query" in name or "self.key" in name:
                p.mul_(10.0)
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    spec = tiny_yoso_spec() if source == "spec" else evodsl.from_hf(config.to_dict())
    evo = evodsl.compile(spec, dtype=torch.float64).eval()
    evodsl.load_hf(evo, hf.state_dict(), config.to_dict())
    ids = torch.randint(0, t["vocab"], (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(ids).last_hidden_state
        got = evo(ids)
    assert got.shape == want.shape == (2, 40, t["d_model"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
