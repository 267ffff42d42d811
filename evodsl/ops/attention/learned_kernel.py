"""mha(learned_kernel, components=C, features=M): a learned spectral distribution for the softmax kernel's
positive random features, GMM-PRF of "On Learning the Transformer Kernel" (Chowdhury et al. 2021).

Performer estimates exp(q'^T k') (x' = x / dh^{1/4}) with w ~ N(0, I); here w is drawn from a learned Gaussian
mixture p(w) = sum_c pi_c N(mu_c, diag(sigma_c^2)), by reparameterisation w_cm = mu_c + sigma_c * eps_cm with a
fixed draw eps (the buffer `eps`, [C, M, dh], from torch's generator at construction, shared by the heads):

    phi_cm(x) = sqrt(pi_c / M) exp(w_cm^T x' - |x'|^2 / 2),     c = 1..C, m = 1..M    (C M features)
    E[phi(q)^T phi(k)] = exp(-(|q'|^2 + |k'|^2) / 2) sum_c pi_c exp(mu_c^T (q' + k') + |sigma_c (q' + k')|^2 / 2)
    bidirectional:  out = D^{-1} phi(Q) (phi(K)^T V),    causal: the sums over j <= i (in chunks: _kernelized.py)

mu, log sigma and the mixture's logits (pi = softmax) are learned; at their initial values (mu = 0, sigma = 1,
pi uniform) the kernel is softmax's exp(q^T k / sqrt(dh)), as Performer's (with i.i.d., not orthogonal, w). The
features are positive, so D > 0: no clamp beyond a query with no key. Everything else is mha(performer)'s (its
max-subtraction, padding, the causal chunks, decoding, rope): this op is Performer with a learned draw; the
mixture weights enter on the keys' side (sqrt(pi_c) on both sides gives the same products). Diagonal
covariances: this implementation's choice. The paper's other learned kernels (GMM-RKS with random Fourier
features, FastFood-RKS, the generative kernel) are not here.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams, head_symbols, weightless_shape
from .performer import PerformerAttention, PerformerParams, favor_logits, performer_cost


class LearnedKernelParams(AttentionParams):
    components: int = Field(4, ge=1, le=1 << 10, description="C: Gaussians in the learned spectral mixture")
    features: int = Field(64, ge=1, le=1 << 14, description="M: random features per component (C M in all)")


class LearnedKernelAttention(PerformerAttention):
    def __init__(self, p: LearnedKernelParams, env: OpEnv):
        AttentionBase.__init__(self, p, env)  # Performer's projections, not its fixed draw
        C, M, dh = p.components, p.features, self.head_dim
        self.register_buffer("eps", torch.randn(C, M, dh))
        self.mu = nn.Parameter(torch.zeros(C, dh))
        self.log_sigma = nn.Parameter(torch.zeros(C, dh))
        self.mix = nn.Parameter(torch.zeros(C))  # pi = softmax(mix)

    @property
    def w(self) -> torch.Tensor:
        """The features' frequencies w_cm = mu_c + sigma_c eps_cm, [C M, dh]."""
        return torch.addcmul(self.mu[:, None], self.log_sigma.exp()[:, None], self.eps).flatten(0, 1)

    def _key_logits(self, k):
        """log phi(k) with the mixture's weight: log(pi_c / M) in all (favor_logits has -log(C M) / 2, the
        queries' side the other half)."""
        C = self.mix.shape[0]
        log_pi = self.mix.log_softmax(0).add(torch.log(torch.tensor(float(C)))).repeat_interleave(self.eps.shape[1])
        return favor_logits(k, self.w).add_(log_pi)


def learned_kernel_cost(p: LearnedKernelParams, env: OpEnv, s: Symbols) -> Cost:
    """mha(performer)'s cost with C M features, plus the mixture's parameters, the frequencies built per use
    (once for q, once for k; their logits' matmul now has a gradient with respect to W), and the keys' log
    weights (an add on phi(k)'s logits, kept: none)."""
    h, kv, dh = head_symbols(p, s)
    b, n = s.b, s.n
    C, M = s.sym("C", p.components), s.sym("M", p.features)
    base = performer_cost(PerformerParams(**p.model_dump(exclude={"components", "features"}),
                                          features=p.components * p.features), env, s)
    m = C * M
    logits = 2 * b * n * (h + kv) * dh * m
    extra = Cost(params=2 * C * dh + C, bwd=logits, fwd_other=2 * (2 * m * dh) + b * kv * n * m,
                 bwd_other=2 * (2 * m * dh) + 2 * b * kv * n * m)
    return replace(base + extra, saved=base.saved, peak=base.peak, cache=base.cache, bwd_peak=base.bwd_peak,
                   saves_input=True, saves_output=False)


OP = register(Op(
    decode="the running sums S [C M x dh] and z [C M] per K/V head and their scale: constant in the tokens seen",
    family="mha", variant="learned_kernel", params=LearnedKernelParams, module=LearnedKernelAttention,
    causal="yes", shape=weightless_shape("mha(learned_kernel)"), supports=frozenset({"rope"}),
    paper="On Learning the Transformer Kernel, Chowdhury et al. 2021, arXiv:2110.08323",
    summary="Performer's positive random features with w from a learned Gaussian mixture (GMM-PRF): phi_cm(x) = "
            "sqrt(pi_c/M) exp(w_cm^T x' - |x'|^2/2), w_cm = mu_c + sigma_c eps_cm; causal: prefix sums; O(n C M dh)",
    note="MHA/RightProduct/009.md",
    cost=learned_kernel_cost,
))
