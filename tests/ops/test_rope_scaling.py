"""pos(rope)'s context extension, scaling=ntk, dynamic_ntk and yarn: the frequencies and YaRN's factor against
HF's rope init functions (transformers.modeling_rope_utils) and against float64 formulas written here from the
papers' definitions; the rotation, decoding past original_max_len (HF's cache semantics), the HF importer's
mapping with logits equal to HF's, and the argument checks."""
from __future__ import annotations

import math

import pytest
import torch
import transformers
from pydantic import ValidationError
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import evodsl
from evodsl.ops import load_all, lookup
from ophelpers import assert_no_leak, decode_in_pieces, exported_parity, make_op, perturb_params

R = 32  # rotated channels (head_dim 32, fraction 1)


def _randn(*shape, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rope_params(**kw):
    load_all()
    return lookup("pos", "rope").params(**kw)


def ntk_thetas(base, rot, s):
    """NTK-aware: the base raised so that the slowest pair turns s times slower: base' = base·s^(r/(r-2))."""
    return [(base * s ** (rot / (rot - 2))) ** (-2 * i / rot) for i in range(rot // 2)]


def dynamic_thetas(base, rot, s, trained, length):
    """HF's dynamic NTK: base' = base·(s·ℓ/L − (s − 1))^(r/(r−2)), ℓ = max(length, L)."""
    ell = max(length, trained)
    grown = base * (s * ell / trained - (s - 1)) ** (rot / (rot - 2))
    return [grown ** (-2 * i / rot) for i in range(rot // 2)]


def yarn_thetas(base, rot, s, trained, fast, slow, truncate=True):
    """YaRN (2309.00071 §3.2): pair i turns ρ_i = L/λ_i times over the trained length, λ_i = 2π base^(2i/r). The
    ramp's ends are the (fractional) pair indices where ρ = fast and ρ = slow, solved from that definition; the
    authors' code ramps linearly in i between them (floored/ceiled), γ = 1 keeps θ_i, γ = 0 takes θ_i / s."""
    def index_where(rho):  # L / (2π base^(2i/r)) = rho
        return rot * math.log(trained / (2 * math.pi * rho)) / (2 * math.log(base))
    lo, hi = index_where(fast), index_where(slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, rot - 1)
    out = []
    for i in range(rot // 2):
        theta = base ** (-2 * i / rot)
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        out.append(ramp * theta / s + (1 - ramp) * theta)
    return out


def ref_turn(x, thetas, scale=1.0, offset=0, bases=None):
    """Interleaved pairs (2i, 2i+1) of x [..., n, dh] at position offset + t turned by (offset + t)·θ_i, one
    scalar at a time, both times `scale`; bases[t] (dynamic decoding): that row's own θ."""
    y = x.clone()
    for t in range(x.shape[-2]):
        th = thetas if bases is None else bases[t]
        for i, theta in enumerate(th):
            c, s = math.cos((offset + t) * theta) * scale, math.sin((offset + t) * theta) * scale
            a, b = x[..., t, 2 * i], x[..., t, 2 * i + 1]
            y[..., t, 2 * i], y[..., t, 2 * i + 1] = a * c - b * s, a * s + b * c
    return y


def hf_init(kind, trained, seq=None, **extra):
    cfg = transformers.LlamaConfig(hidden_size=4 * R, num_attention_heads=4, max_position_embeddings=trained,
                                   rope_parameters={"rope_type": kind, "rope_theta": 10000.0, **extra})
    inv, factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq)
    return inv.double(), factor


def ours(p, length=None):
    from evodsl.ops.position._rope_scaling import attention_factor, frequencies
    return frequencies(p, R, torch.float64, None, length), attention_factor(p)


@pytest.mark.parametrize("seq", [None, 100, 1000])
def test_dynamic_ntk_equals_hf_and_the_formula(seq):
    p = rope_params(scaling="dynamic_ntk", factor=4.0, original_max_len=64)
    theta, factor = ours(p, seq)
    want, hf_factor = hf_init("dynamic", 64, seq, factor=4.0)
    assert factor == hf_factor == 1.0
    assert (theta - want).abs().max() <= 1e-6 * want.max()  # HF's in float32
    ref = torch.tensor(dynamic_thetas(10000.0, R, 4.0, 64, seq or 0), dtype=torch.float64)
    assert torch.allclose(theta, ref, atol=0, rtol=1e-12)
    if seq is None:  # up to the trained length: the plain frequencies
        assert torch.allclose(theta, torch.tensor(ntk_thetas(10000.0, R, 1.0), dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("extra", [dict(factor=4.0, original_max_position_embeddings=64),
                                   dict(factor=8.0, original_max_position_embeddings=512, beta_fast=16, beta_slow=2),
                                   dict(factor=16.0, original_max_position_embeddings=256, truncate=False),
                                   dict(factor=4.0, original_max_position_embeddings=64, attention_factor=1.5)])
def test_yarn_equals_hf_and_the_formula(extra):
    args = dict(scaling="yarn", factor=extra["factor"], original_max_len=extra["original_max_position_embeddings"])
    args.update({k: extra[k] for k in ("beta_fast", "beta_slow", "truncate", "attention_factor") if k in extra})
    p = rope_params(**args)
    theta, factor = ours(p)
    want, hf_factor = hf_init("yarn", 4096, **extra)
    assert (theta - want).abs().max() <= 1e-6 * want.max() and factor == pytest.approx(hf_factor, rel=1e-12)
    ref = yarn_thetas(10000.0, R, p.factor, p.original_max_len, p.beta_fast, p.beta_slow, p.truncate)
    assert torch.allclose(theta, torch.tensor(ref, dtype=torch.float64), atol=0, rtol=1e-12)
    # the temperature: sqrt(1/t) = 0.1 ln s + 1 (the paper's eq. 22), unless given
    assert factor == extra.get("attention_factor", 0.1 * math.log(p.factor) + 1)
    # the parts: the fastest pairs keep θ_i, the slowest are interpolated (θ_i / s), none outside
    plain = torch.tensor(ntk_thetas(10000.0, R, 1.0), dtype=torch.float64)
    assert theta[0] == plain[0] and theta[-1] == pytest.approx(plain[-1].item() / p.factor, rel=1e-12)
    assert ((theta <= plain * (1 + 1e-12)) & (theta >= plain / p.factor * (1 - 1e-12))).all()


def test_ntk_is_the_base_raised():
    p = rope_params(scaling="ntk", factor=8.0)
    theta, factor = ours(p)
    ref = torch.tensor(ntk_thetas(10000.0, R, 8.0), dtype=torch.float64)
    assert torch.allclose(theta, ref, atol=0, rtol=1e-12) and factor == 1.0
    plain = torch.tensor(ntk_thetas(10000.0, R, 1.0), dtype=torch.float64)
    # the fastest pair as before, the slowest exactly s times slower (the paper's NTK-aware design)
    assert theta[0] == plain[0] and theta[-1].item() == pytest.approx(plain[-1].item() / 8.0, rel=1e-12)


@pytest.mark.parametrize("scaling", ["ntk", "yarn", "dynamic_ntk"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rotation_with_the_scaled_frequencies(scaling, fraction):
    """q and k (GQA: fewer k heads) turned by the scaled θ at every position, times YaRN's factor on the rotated
    channels only (the passed ones as they are); n = 40 past original_max_len = 16."""
    rot = int(R * fraction)
    q, k = _randn(2, 4, 40, R, seed=1), _randn(2, 2, 40, R, seed=2)
    rotary = lookup("pos", "rope").attach(rope_params(scaling=scaling, factor=4.0, original_max_len=16,
                                                      fraction=fraction), 4, R)
    thetas = {"ntk": ntk_thetas(10000.0, rot, 4.0), "dynamic_ntk": dynamic_thetas(10000.0, rot, 4.0, 16, 40),
              "yarn": yarn_thetas(10000.0, rot, 4.0, 16, 32.0, 1.0)}[scaling]
    scale = 0.1 * math.log(4.0) + 1 if scaling == "yarn" else 1.0
    q2, k2 = rotary.rotate(q, k)
    for x, got in ((q, q2), (k, k2)):
        want = x.clone()
        want[..., :rot] = ref_turn(x[..., :rot], thetas, scale)
        assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_yarn_scales_the_scores_by_one_over_t():
    """Through mha(softmax): YaRN's attention equals softmax(q'·k' / (t sqrt(dh))) with q', k' turned by the
    scaled frequencies, 1/t = (0.1 ln s + 1)^2."""
    m, _, _ = make_op("mha", "softmax", d=64, heads=2, causal=True,
                      pos=("rope", dict(scaling="yarn", factor=8.0, original_max_len=8)))
    perturb_params(m, scale=0.3)
    x = _randn(2, 21, 64, seed=5)
    b, n, _ = x.shape
    proj = lambda lin: (x @ lin.weight.T + lin.bias).view(b, n, 2, R).transpose(1, 2)
    thetas = yarn_thetas(10000.0, R, 8.0, 8, 32.0, 1.0)
    q, k, v = ref_turn(proj(m.q_proj), thetas), ref_turn(proj(m.k_proj), thetas), proj(m.v_proj)
    inv_t = (0.1 * math.log(8.0) + 1) ** 2
    s = (q @ k.transpose(-1, -2)) * inv_t / math.sqrt(R)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    want = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 64) @ m.o_proj.weight.T + m.o_proj.bias
    assert torch.allclose(m(x, None), want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("scaling", ["ntk", "yarn", "dynamic_ntk"])
def test_decoding_equals_the_forward_within_the_trained_length(scaling):
    """Within original_max_len = 64 every scaling's step form is the forward's."""
    m, _, _ = make_op("mha", "softmax", d=32, heads=4, kv_heads=2, causal=True,
                      pos=("rope", dict(scaling=scaling, factor=4.0, original_max_len=64)))
    perturb_params(m)
    x = _randn(2, 23, 32)
    with torch.no_grad():
        got, _ = decode_in_pieces(m, x, [5, 1, 1, 9, 7])
        assert torch.allclose(got, m(x, None), atol=1e-10, rtol=0)


@pytest.mark.parametrize("variant, args", [("softmax", {}), ("linear", {}), ("local", {"window": 5})])
def test_dynamic_ntk_never_leaks_past_the_trained_length(variant, args):
    """n = 24 past original_max_len = 8: the base reads the length, never a later token."""
    m, _, _ = make_op("mha", variant, d=32, heads=4, kv_heads=2, causal=True,
                      pos=("rope", dict(scaling="dynamic_ntk", factor=4.0, original_max_len=8)), **args)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, None))


def test_dynamic_ntk_decoding_past_the_trained_length_keeps_the_cached_turns():
    """Past original_max_len = 6, each piece's q and new k turn with the base of its own length (offset + n);
    cached keys keep theirs (HF's cache). Reference: every key j turned with the θ of the piece that made it."""
    m, _, _ = make_op("mha", "softmax", d=32, heads=1, causal=True, bias=False,
                      pos=("rope", dict(scaling="dynamic_ntk", factor=2.0, original_max_len=6, fraction=0.25)))
    perturb_params(m)
    x = _randn(1, 14, 32, seed=9)
    sizes = [4, 3, 1, 6]
    with torch.no_grad():
        got, _ = decode_in_pieces(m, x, sizes)
    bases, end = [], 0
    for k in sizes:
        end += k
        bases += [dynamic_thetas(10000.0, 8, 2.0, 6, end)] * k
    proj = lambda lin: (x @ lin.weight.T).view(1, 14, 1, 32).transpose(1, 2)
    q, k, v = proj(m.q_proj), proj(m.k_proj), proj(m.v_proj)
    q[..., :8], k[..., :8] = ref_turn(q[..., :8], None, bases=bases), ref_turn(k[..., :8], None, bases=bases)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(32)
    s = s.masked_fill(torch.ones(14, 14, dtype=torch.bool).triu(1), float("-inf"))
    want = (s.softmax(-1) @ v).transpose(1, 2).reshape(1, 14, 32) @ m.o_proj.weight.T
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    with torch.no_grad():  # the forward turns all 14 with the base of length 14: not the decoded values
        assert (m(x, None) - got)[:, 6:].abs().max() > 1e-4


SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
HF_ROPE = {"dynamic": dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                                                        "rope_theta": 10000.0}),
           "yarn": dict(max_position_embeddings=64, rope_parameters={
               "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16,
               "beta_fast": 16.0})}


@pytest.mark.parametrize("kind", HF_ROPE)
def test_hf_import_maps_the_scaling_and_gives_hf_logits(kind):
    config = transformers.LlamaConfig(**SMALL, **HF_ROPE[kind])
    spec = evodsl.from_hf(config)
    assert {"dynamic": "scaling=dynamic_ntk, factor=4, original_max_len=16",
            "yarn": "scaling=yarn, factor=4, original_max_len=16, beta_fast=16"}[kind] in spec
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    ours_model = evodsl.compile(spec)
    evodsl.load_hf(ours_model, hf.state_dict(), config)
    for n in (7, 40):  # within and past the trained 16
        ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want, got = hf(ids).logits, ours_model(ids)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_hf_import_refuses_deepseek_mscale():
    rope = dict(HF_ROPE["yarn"]["rope_parameters"], mscale=1.0, mscale_all_dim=1.0)
    config = transformers.LlamaConfig(**SMALL, max_position_embeddings=64, rope_parameters=rope).to_dict()
    with pytest.raises(evodsl.EvoError, match="yarn's mscale has no pos"):
        evodsl.from_hf(config)


def test_scaling_arguments_are_checked():
    with pytest.raises(ValidationError, match="beta_fast > beta_slow"):
        rope_params(scaling="yarn", factor=4.0, beta_fast=1.0, beta_slow=2.0)
    with pytest.raises(ValidationError, match="beta_fast only apply with scaling=yarn"):
        rope_params(scaling="ntk", factor=4.0, beta_fast=8.0)
    with pytest.raises(ValidationError, match="factor= scales"):
        rope_params(factor=2.0)
    with pytest.raises(evodsl.EvoError, match="attention_factor"):
        evodsl.compile("d_model = 32\nheads = 4\nmodel m(causal=true) = input(features) -> "
                       "pos(rope, scaling=yarn, factor=4, attention_factor=0) -> mha -> head(linear, d_out=2)")


@pytest.mark.parametrize("scaling", ["dynamic_ntk", pytest.param("yarn", marks=pytest.mark.slow)])
def test_onnx_export_with_a_symbolic_length(scaling, tmp_path):
    """One file at lengths 7, 33, 70 around original_max_len = 16: dynamic NTK's base is computed from the
    symbolic length in the graph."""
    src = ("d_model = 32\nheads = 4\nmodel m(causal=true) = input(features, d=32) -> embed(linear) -> "
           f"pos(rope, scaling={scaling}, factor=4, original_max_len=16) -> mha(kv_heads=2) -> head(linear, d_out=8)")
    assert exported_parity(src, tmp_path) < 1e-5
