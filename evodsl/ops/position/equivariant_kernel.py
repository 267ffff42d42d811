"""pos(equivariant_kernel, method=rotation | clipped): translation-equivariant relative positions kept inside
kernelized attention (Horn, Shridhar, Groenewald, Baumann 2021, "Translational Equivariance in Kernelizable
Attention", arXiv:2102.07680, §3), run inside every mha(linear) downstream; on the stream it is the identity.
The paper splits the score of query i and key j into a content term and a position term; either form keeps the
attention linear in n (F = dh features a head, dv = dh), and each weight depends on positions only through j - i,
so shifting every position by s changes no output (tests/ops/test_equivariant_kernel.py checks it at offsets up
to 1000). A parameter of the other method (scales=, max_timescale=, seed= with clipped; clip= with rotation) is
refused (E300).

- method=rotation (the paper's strategy 1): sinusoids u_x = [sin(w_1 x), cos(w_1 x), ..., sin(w_m x), cos(w_m x)]
  (m = scales), the query's projected by R_h = blockdiag([[a_s, b_s], [-b_s, a_s]]) (learned per head), the key's
  by the identity, so that <u_i R_h, u_j> = sum_s a_s cos(w_s (i - j)) + b_s sin(w_s (i - j)) =
  <u_(i-s) R_h, u_(j-s)>. The weight is

      w_ij = phi(q_i)·phi(k_j) + <u_i R_h, u_j> + rho_h,    rho_h = sum_s sqrt(a_s^2 + b_s^2)

  i.e. the features [phi(q_i), u_i R_h, rho_h] · [phi(k_j), u_j, 1]: F + 2m + 1 features, linear attention's
  chunked causal form and its decoding state [(F + 2m + 1) x (dv + 1)] per K/V head, constant.
- method=clipped (the paper's strategy 2): a learned vector r_t per head for each offset t in [-k, k] (k = clip),
  the key term a_ij = r_clip(j-i, k), and

      w_ij = phi(q_i)·phi(k_j) + phi(q_i)·phi(r_clip(j-i, k))

  whose second term is computed as the paper's split: the 2k + 1 inner offsets summed directly (a gather of the
  [v_j 1] rows at i - k .. i + k), the keys beyond ±k sharing phi(q_i)·phi(r_±k) times prefix sums of [v 1].
  O(n (F + k) dv). Causal: t in [-k, 0]; decoding keeps the content state [F x (dv + 1)], the last k tokens'
  [v 1] (a window) and the sum of [v 1] before them: constant in the length.

Output_i = sum_j w_ij v_j / (sum_j w_ij + eps) (causal: j <= i).
Choices where the paper is silent (it runs FAVOR+ softmax features; mha(linear) has elu + 1):
- rotation: the paper's additive score u_i W_q* W_k*^T u_j^T (cross terms dropped) is kept as it is, beside the
  content kernel rather than inside it (phi of the position features would make the product depend on absolute
  positions); it is shifted by rho_h so that every weight stays >= 0 (the denominator positive). w_s start at
  1 / max_timescale^(s/m) and are learned (the authors' LearnableSinusoidEncoding, there one for the model; here
  one per attention layer); a, b start N(0, 1) from torch.Generator(seed) (the authors' init; rho's gradient is
  undefined only at a_s = b_s = 0).
- clipped: the paper's 2k + 1 signed offsets (the authors' image code keeps k + 1 unsigned distances); the content
  and the relative terms are summed in every head (the authors give them to separate halves of the heads); r
  starts at 0 (the authors'), so that the relative term starts uniform.
- mha(linear) only (E302 elsewhere, naming it): in mha(performer) the authors' form (the position features
  concatenated to q and k before FAVOR+) is equivariant only in expectation over the random features, and the
  additive form here would need performer's per-query and per-key stabilisers (exp(-max)) to cancel across two
  terms they do not share; not done.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..cost import Cost
from ..registry import Op, OpParams, ShapeProblem, register, sequence_shape
from ._equivariant_attention import EquivariantRelative
from ._inattention import InAttentionStream


class EquivariantKernelParams(OpParams):
    method: Literal["rotation", "clipped"] = Field("rotation", description="rotation: sinusoids with learned 2x2 "
                                                   "rotation blocks; clipped: learned vectors per offset in [-k, k]")
    scales: int = Field(4, ge=1, le=256, description="rotation: m sin/cos pairs (2m position features a head)")
    max_timescale: float = Field(10000.0, gt=1.0, description="rotation: the frequencies start at "
                                                              "1 / max_timescale^(s/m)")
    clip: int = Field(8, ge=1, le=4096, description="clipped: offsets past ±clip share the last vector")
    seed: int = Field(0, ge=0, le=2 ** 62, description="rotation: the generator the blocks are drawn from")


_ONLY = {"scales": "rotation", "max_timescale": "rotation", "seed": "rotation", "clip": "clipped"}


def equivariant_shape(p: EquivariantKernelParams, env):
    for f in sorted(p.model_fields_set & set(_ONLY)):
        if _ONLY[f] != p.method:
            raise ShapeProblem(f"{f}= is for method={_ONLY[f]}, not method={p.method}", f,
                               f"remove {f}=, or choose method={_ONLY[f]}")
    return sequence_shape(p, env)


OP = register(Op(
    decode="rotation: the state [(F + 2m + 1) x (dv + 1)] per K/V head; clipped: the state [F x (dv + 1)], the last "
           "clip tokens' [v 1] and the sum of those before: constant in the length",
    shape=equivariant_shape, family="pos", variant="equivariant_kernel", params=EquivariantKernelParams,
    module=InAttentionStream, causal="yes", attach=EquivariantRelative,
    attach_cost=lambda p, s, h, kv, dh: Cost(),  # its whole cost is the attention's (_equivariant_cost.py)
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream
    paper="Translational Equivariance in Kernelizable Attention, Horn et al. 2021, arXiv:2102.07680",
    summary="rotation: [phi(q_i) u_i R rho]·[phi(k_j) u_j 1], <u_i R, u_j> a function of i - j; clipped: "
            "phi(q_i)·(phi(k_j) + phi(r_clip(j-i,k))), the far keys by prefix sums",
    note="Pe/010.md",
))
