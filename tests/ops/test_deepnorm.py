"""residual(deepnorm) against DeepNet's equations in float64: x_{l+1} = LN(alpha x_l + G(x_l)) with the paper's alpha
for encoder-only / decoder-only / encoder-decoder stacks, and its init: beta on the FFN, v and output projections
(torchscale's form: the init kept and scaled), q and k left alone."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl.diagnostics import EvoError
from evodsl.ops import Ctx
from ophelpers import make_op, perturb_params

TOP = "d_model = 16\nheads = 2\n"
D = 16


def _t(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# DeepNet, Wang et al. 2022, the table of alpha and beta (N encoder layers, M decoder layers)
PAPER = [
    ({"layers": 6}, (2 * 6) ** (1 / 4), (8 * 6) ** (-1 / 4)),  # encoder-only N = 6 (decoder-only: the same in M)
    ({"layers": 100}, 200 ** (1 / 4), 800 ** (-1 / 4)),
    ({"layers": 12, "part": "encoder", "decoder_layers": 6}, 0.81 * (12 ** 4 * 6) ** (1 / 16),
     0.87 * (12 ** 4 * 6) ** (-1 / 16)),
    ({"layers": 6, "part": "decoder"}, (3 * 6) ** (1 / 4), (12 * 6) ** (-1 / 4)),
]


@pytest.mark.parametrize("params,alpha,beta", PAPER)
def test_deepnorm_matches_equation(params, alpha, beta):
    m, _, _ = make_op("residual", "deepnorm", d=D, in_shapes=(("b", "n", D),) * 2, **params)
    assert list(m.parameters()) == []
    assert m.alpha == pytest.approx(alpha, rel=1e-14) and m.beta == pytest.approx(beta, rel=1e-14)
    for shape in [(2, 7, D), (1, 1, D), (3, 5, D)]:
        x, gx = _t(1, shape), _t(2, shape)
        ref = torch.empty_like(x)
        for i in range(shape[0]):
            for t in range(shape[1]):
                ref[i, t] = alpha * x[i, t] + gx[i, t]
        torch.testing.assert_close(m(gx, Ctx(), x), ref, rtol=1e-12, atol=1e-12)


def _ln(z, w, b, eps=1e-5):
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(var + eps) * w + b


def test_deepnorm_block_is_post_ln_of_alpha_x_plus_g():
    """The block as the paper writes it, G = the model's own attention (perturbed), LN written out."""
    src = TOP + "layers = 6\nmodel m = input(features, d=16) -> residual(mha, scale=deepnorm, layers=layers) -> norm\n"
    m = evodsl.compile(src).double()
    perturb_params(m)
    x = _t(3, (2, 9, D))
    g = m.attn(x, Ctx())
    want = _ln(12 ** 0.25 * x + g, m.norm.weight, m.norm.bias)
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)


def test_deepnorm_init_scales_ffn_v_and_out_by_beta():
    body = "residual(mha(softmax, kv_heads=1){s}) -> norm -> residual(ffn{s}) -> norm"
    plain = TOP + f"model m = input(features, d=16) -> repeat({body.format(s='')}, 3) -> head(linear, d_out=4)\n"
    deep = TOP + f"layers = 3\nmodel m = input(features, d=16) -> repeat({body.format(s=', scale=deepnorm')}, 3)" \
                 " -> head(linear, d_out=4)\n"
    a = dict(evodsl.compile(plain, seed=5).named_parameters())
    b = dict(evodsl.compile(deep, seed=5).named_parameters())  # deepnorm has no parameters: the same draws
    beta = 24 ** -0.25
    assert set(a) == set(b)
    for name, w in a.items():
        scaled = ".ffn." in name or ".attn.v_proj." in name or ".attn.o_proj." in name
        torch.testing.assert_close(b[name], w * beta if scaled else w, rtol=1e-6, atol=0, msg=name)
    assert sum(".v_proj." in k or ".o_proj." in k or ".ffn." in k for k in a) == 3 * 8  # weights and biases, 3 copies


def test_deepnorm_scales_only_its_own_branch():
    src = TOP + "model m = input(features, d=16) -> residual(norm -> ffn) -> residual(mha, scale=deepnorm, layers=2)\n"
    ref = TOP + "model m = input(features, d=16) -> residual(norm -> ffn) -> residual(mha)\n"
    a, b = dict(evodsl.compile(ref).named_parameters()), dict(evodsl.compile(src).named_parameters())
    for name, w in a.items():
        factor = 16 ** -0.25 if name.startswith(("attn.v_proj", "attn.o_proj")) else 1.0
        torch.testing.assert_close(b[name], w * factor, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("call,message", [
    ("residual(ffn, scale=deepnorm)", r"residual\(deepnorm\) needs parameter 'layers'"),
    ("residual(ffn, scale=deepnorm, layers=0)", r"invalid value 0 for parameter 'layers'"),
    ("residual(ffn, scale=deepnorm, layers=6, part=encoder)", r"needs the decoder's layer count"),
    ("residual(ffn, scale=deepnorm, layers=6, decoder_layers=6)", r"decoder_layers is read only with part=encoder"),
    ("residual(ffn, scale=deepnorm, layers=6, part=middle)", r"part"),
])
def test_deepnorm_errors(call, message):
    with pytest.raises(EvoError, match=message):
        evodsl.parse(TOP + f"model m = input(features, d=16) -> {call}\n")
