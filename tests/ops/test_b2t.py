"""The B2T connection (Takase, Kiyono, Kobayashi, Suzuki 2022, "B2T Connection: Serving Stability and Performance in
Deep Transformers", arXiv:2206.00330) is a wiring, not an op: a post-LN layer plus a skip from the layer's input to
its last LayerNorm,

    x_att = LN_1(x + Attn(x)),   x_out = LN_2(x_att + FFN(x_att) + x)

which residual(...) writes as it is (README, "Residual wiring"):

    b2t_block = residual(residual(mha) -> norm -> residual(ffn)) -> norm

Checked here against that equation in float64, with the model's own sublayers as Attn, FFN and LN (perturbed)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import evodsl
from evodsl.ops import Ctx
from ophelpers import perturb_params

TOP = "d_model = 16\nheads = 2\n"


def _ln(z, norm):
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias


def test_b2t_wiring_is_the_papers_equation():
    src = TOP + ("b2t_block = residual(residual(mha) -> norm -> residual(ffn)) -> norm\n"
                 "model m = input(features, d=16) -> b2t_block -> b2t_block\n")
    m = evodsl.compile(src).double()
    perturb_params(m, scale=0.3)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = x
    for k in (1, 2):  # module names in order: attn1, norm1, ffn1, norm2 (first layer), attn2, norm3, ...
        attn, ffn = getattr(m, f"attn{k}"), getattr(m, f"ffn{k}")
        ln1, ln2 = getattr(m, f"norm{2 * k - 1}"), getattr(m, f"norm{2 * k}")
        x_att = _ln(h + attn(h, Ctx()), ln1)
        h = _ln(x_att + ffn(x_att, Ctx()) + h, ln2)
    torch.testing.assert_close(m(x), h, rtol=1e-10, atol=1e-10)


def test_b2t_differs_from_post_ln_by_the_long_skip():
    post = TOP + "model m = input(features, d=16) -> residual(mha) -> norm -> residual(ffn) -> norm\n"
    b2t = TOP + "model m = input(features, d=16) -> residual(residual(mha) -> norm -> residual(ffn)) -> norm\n"
    a, b = evodsl.compile(post).double(), evodsl.compile(b2t).double()
    b.load_state_dict(a.state_dict())  # the same parameters: only the wiring differs
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_att = a.norm1(x + a.attn(x, Ctx()), Ctx())
    z = x_att + a.ffn(x_att, Ctx())
    torch.testing.assert_close(a(x), F.layer_norm(z, (16,), a.norm2.weight, a.norm2.bias, 1e-5))
    torch.testing.assert_close(b(x), F.layer_norm(z + x, (16,), a.norm2.weight, a.norm2.bias, 1e-5))
