"""FFNs against their defining equations, computed here in float64 from the modules' own weights."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import OpEnv, load_all, lookup
from ophelpers import make_op, perturb_params

D = 40
GLU_VARIANTS = ["glu", "bilinear", "reglu", "geglu", "geglu_tanh", "swiglu"]

# activations written out from their definitions, not taken from torch.nn.functional
REF_ACT = {
    "sigmoid": lambda z: 1 / (1 + torch.exp(-z)),
    "identity": lambda z: z,
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: z * 0.5 * (1 + torch.erf(z / math.sqrt(2))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3))),
    "silu": lambda z: z / (1 + torch.exp(-z)),
}
GLU_ACT = {"glu": "sigmoid", "bilinear": "identity", "reglu": "relu", "geglu": "gelu", "geglu_tanh": "gelu_tanh",
           "swiglu": "silu"}


def _x(seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, D, generator=g, dtype=torch.float64)


def _affine(x, linear):  # x W (+ b), with nn.Linear's weight stored as W^T
    y = x @ linear.weight.T
    return y if linear.bias is None else y + linear.bias


def _meta(variant: str, d: int, **kwargs):
    """Build on the meta device: shapes and parameter counts without allocating the weights."""
    load_all()
    op = lookup("ffn", variant)
    p, env = op.params(**kwargs), OpEnv(in_shapes=(("b", "n", d),))
    with torch.device("meta"):
        return op.module(p, env), p, env


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("variant", GLU_VARIANTS)
def test_glu_variant_matches_equation(variant, bias):
    m, _, _ = make_op("ffn", variant, d=D, d_ff=24, bias=bias)
    perturb_params(m, scale=0.7)
    x = _x()
    act = REF_ACT[GLU_ACT[variant]]
    ref = _affine(act(_affine(x, m.gate_proj)) * _affine(x, m.up_proj), m.down_proj)  # (act(xW) ⊙ xV) W2
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


def test_glu_variants_differ():
    # the five table rows really are five different functions on the same weights
    x, outs = _x(), []
    for v in GLU_VARIANTS:
        m, _, _ = make_op("ffn", v, d=D, d_ff=24)
        perturb_params(m)
        outs.append(m(x))
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert (outs[i] - outs[j]).abs().max() > 1e-3, (GLU_VARIANTS[i], GLU_VARIANTS[j])


@pytest.mark.parametrize("d, d_ff", [(512, 1408), (4096, 10944), (48, 128), (96, 256), (100, 320), (1, 64)])
def test_glu_default_d_ff_is_8d_over_3_rounded_up_to_64(d, d_ff):
    m, p, _ = _meta("swiglu", d)
    assert p.d_ff is None
    assert m.gate_proj.out_features == m.up_proj.out_features == m.down_proj.in_features == d_ff
    assert d_ff % 64 == 0 and d_ff >= 8 * d / 3 > d_ff - 64


def test_glu_user_d_ff_wins_and_no_bias_by_default():
    m, p, _ = make_op("ffn", "geglu", d=D, d_ff=100)
    assert p.bias is False
    assert {n: tuple(t.shape) for n, t in m.named_parameters()} == {
        "gate_proj.weight": (100, D), "up_proj.weight": (100, D), "down_proj.weight": (D, 100)}


def test_swiglu_parameter_count_matches_llama_mlp():
    m, _, _ = _meta("swiglu", 4096, d_ff=11008, bias=False)
    assert sum(t.numel() for t in m.parameters()) == 3 * 4096 * 11008  # HF LlamaMLP, LLaMA-7B


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu"])
def test_mlp_matches_equation(act):
    m, _, _ = make_op("ffn", "mlp", d=D, act=act, d_ff=56)
    perturb_params(m)
    x = _x()
    ref = _affine(REF_ACT[act](_affine(x, m.up_proj)), m.down_proj)  # W2 act(W1 x + b1) + b2
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


def test_mlp_defaults():
    m, p, _ = make_op("ffn", "mlp", d=D)
    assert p.act == "relu" and m.up_proj.out_features == 4 * D
    assert m.up_proj.bias is not None and m.down_proj.bias is not None
