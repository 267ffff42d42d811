"""nGPT (2410.01131): residual(ngpt) and mha(ngpt) against their equations in float64 (written from the paper with
loops and einsum, not the modules' helpers), GQA and the causal mask, the eigen learning rate's parametrisation,
the weight normalisation (evodsl.ngpt_normalize_, init=ngpt), refusals. The costs are rows of test_cost_ops.py
(residual) and test_cost_attention.py (mha)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from ophelpers import make_op, perturb_params
from evodsl.ops import Ctx

B, N, D = 2, 11, 24


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_residual_ngpt_equation_and_alpha_parametrisation():
    mod, _, _ = make_op("residual", "ngpt", d=D, in_shapes=(("b", "n", D),) * 2, alpha_init=0.05)
    assert torch.allclose(mod.alpha * mod.gain, torch.full((D,), 0.05, dtype=torch.float64))  # alpha(0) = alpha_init
    assert torch.allclose(mod.alpha, torch.full((D,), D ** -0.5, dtype=torch.float64))  # stored at 1/sqrt(d)
    perturb_params(mod)
    g = torch.Generator().manual_seed(0)
    h = _unit(torch.randn(B, N, D, generator=g, dtype=torch.float64))
    fh = torch.randn(B, N, D, generator=g, dtype=torch.float64) * 3
    alpha = (mod.alpha * mod.gain).detach()
    want = torch.empty(B, N, D, dtype=torch.float64)
    for b in range(B):
        for t in range(N):
            step = fh[b, t] / math.sqrt(float(fh[b, t] @ fh[b, t])) - h[b, t]
            y = h[b, t] + alpha * step
            want[b, t] = y / math.sqrt(float(y @ y))
    got = mod(fh, Ctx(), h)
    assert (got - want).abs().max().item() < 1e-12
    assert (got.norm(dim=-1) - 1).abs().max().item() < 1e-12  # on the unit sphere


def _attention_reference(mod, x, causal):
    h, kvh, dh = mod.heads, mod.kv_heads, mod.head_dim
    lin = lambda t, layer: t @ layer.weight.T + (layer.bias if layer.bias is not None else 0)  # noqa: E731
    q = lin(x, mod.q_proj).reshape(B, N, h, dh)
    k = lin(x, mod.k_proj).reshape(B, N, kvh, dh)
    v = lin(x, mod.v_proj).reshape(B, N, kvh, dh)
    s = mod.sqk * mod.sqk_gain  # [h, dh]
    out = torch.zeros(B, N, h, dh, dtype=torch.float64)
    for b in range(B):
        for hi in range(h):
            g = hi // (h // kvh)
            qn = s[hi] * _unit(q[b, :, hi])
            kn = s[g * (h // kvh)] * _unit(k[b, :, g])  # a key head: the s_qk of its group's first query head
            scores = torch.einsum("id,jd->ij", qn, kn) * math.sqrt(dh)
            if causal:
                scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
            out[b, :, hi] = scores.softmax(-1) @ v[b, :, g]
    return lin(out.reshape(B, N, h * dh), mod.o_proj)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kw", [{"heads": 4}, {"heads": 4, "kv_heads": 2},
                                {"heads": 2, "kv_heads": 1, "head_dim": 5, "bias": True}])
def test_mha_ngpt_equation(causal, kw):
    mod, _, _ = make_op("mha", "ngpt", d=D, causal=causal, **kw)
    perturb_params(mod)
    x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert (mod(x, Ctx()) - _attention_reference(mod, x, causal)).abs().max().item() < 1e-10


def test_mha_ngpt_sqk_starts_at_sqk_init():
    mod, _, _ = make_op("mha", "ngpt", d=D, heads=4, sqk_init=2.0)
    assert torch.allclose(mod.sqk * mod.sqk_gain, torch.full((4, D // 4), 2.0, dtype=torch.float64))
    assert mod.q_proj.bias is None  # nGPT: no biases


def test_mha_ngpt_refusals():
    with pytest.raises(Exception, match="takes no softcap"):
        make_op("mha", "ngpt", d=D, heads=4, softcap=30.0)
    with pytest.raises(evodsl.EvoError, match="takes no scale"):
        evodsl.parse("d_model = 24\nheads = 4\nb = mha(ngpt, scale=0.5)")


def test_mha_ngpt_with_rope_refuses_left_padding():
    mod, _, _ = make_op("mha", "ngpt", d=D, heads=4, causal=True, pos=("rope", {}))
    x = torch.randn(B, N, D, dtype=torch.float64)
    left = torch.ones(B, N, dtype=torch.bool)
    left[1, :3] = False
    with pytest.raises(evodsl.EvoError, match="E409.*mha\\(ngpt\\) with a rotation"):
        mod(x, Ctx(mask=left))
    right = left.flip(1)
    assert torch.isfinite(mod(x, Ctx(mask=right))).all()


SPEC = """vocab = 50
d_model = 32
heads = 4
block = residual(mha(ngpt), scale=ngpt) -> residual(ffn(swiglu, bias=false), scale=ngpt)
model m(causal=true, init=ngpt) = input(tokens) -> embed(token) -> pos(rope) -> repeat(block, 2) -> head(lm, tied=false)
"""


def test_ngpt_normalize_puts_every_matrix_on_the_sphere_along_d():
    model = evodsl.compile(SPEC)
    sd = model.state_dict()
    one = lambda w, dim: (w.norm(dim=dim) - 1).abs().max().item() < 1e-5  # noqa: E731
    assert one(sd["embed.weight"], 1) and one(sd["head.weight"], 1)
    for i in range(2):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert one(sd[f"blocks.{i}.attn.{name}.weight"], 1)  # rows: vectors in R^d
        assert one(sd[f"blocks.{i}.attn.o_proj.weight"], 0)  # columns
        assert one(sd[f"blocks.{i}.ffn.up_proj.weight"], 1) and one(sd[f"blocks.{i}.ffn.down_proj.weight"], 0)
    with torch.no_grad():  # an optimiser step moves them off; ngpt_normalize_ puts them back
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert not one(model.state_dict()["blocks.0.attn.q_proj.weight"], 1)
    evodsl.ngpt_normalize_(model)
    assert one(model.state_dict()["blocks.0.attn.q_proj.weight"], 1)
    assert one(model.state_dict()["blocks.1.attn.o_proj.weight"], 0)


def test_hidden_states_stay_on_the_sphere():
    model = evodsl.compile(SPEC.replace("-> head(lm, tied=false)", ""), dtype=torch.float64)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = model(ids)
    assert (h.norm(dim=-1) - 1).abs().max().item() < 1e-12


def test_ffn_ngpt_equation():
    """out = W_o ((s_u W_u h) * SiLU(s_v sqrt(d) W_v h)), the paper's eq. (the scales at their parametrisation)."""
    mod, _, _ = make_op("ffn", "ngpt", d=D, d_ff=40, s_init=2.0, s_scale=0.5)
    assert torch.allclose(mod.su * mod.gain, torch.full((40,), 2.0, dtype=torch.float64))
    perturb_params(mod)
    h = torch.randn(B, N, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    su, sv = (mod.su * mod.gain).detach(), (mod.sv * mod.gain).detach()
    want = torch.empty(B, N, D, dtype=torch.float64)
    for b in range(B):
        for t in range(N):
            u = su * (mod.up_proj.weight @ h[b, t])
            v = sv * math.sqrt(D) * (mod.gate_proj.weight @ h[b, t])
            want[b, t] = mod.down_proj.weight @ (u * v / (1 + torch.exp(-v)))
    assert (mod(h) - want).abs().max().item() < 1e-10


def test_head_ngpt_equation():
    mod, _, _ = make_op("head", "ngpt", d=D, vocab=30, sz_init=3.0)
    assert torch.allclose(mod.sz * mod.gain, torch.full((30,), 3.0, dtype=torch.float64))
    perturb_params(mod)
    h = torch.randn(B, N, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = torch.einsum("vd,bnd->bnv", mod.weight, h) * (mod.sz * mod.gain)
    assert (mod(h) - want).abs().max().item() < 1e-12
