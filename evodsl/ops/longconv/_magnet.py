"""FlexConv's own kernel generator, MAGNet (a Multiplicative Anisotropic Gabor Network, Romero et al. 2021,
arXiv:2110.08059, Section 3; a Multiplicative Filter Network, Fathony et al. 2021, with Gabor filters): from a
normalised relative position p (_ck_kernel.SirenKernel.position's layout) to one kernel value per channel,

    g_l(p)    = exp(-gamma_l^2 (p - mu_l)^2 / 2) * sin(w_l p + c_l)        l = 1 .. L, each [H] (one per unit)
    h_1       = g_1(p),   h_{l+1} = (W_l h_l + b_l) * g_{l+1}(p),   k(p) = W_L h_L + b_L

(L = layers linear maps, as SIREN's count: L Gabor filters, L - 1 hidden maps [H, H], the output map [d, H]), times
FlexConv's Gaussian mask exp(-(p - mu)^2 / (2 sigma^2)) as the SIREN form. In one dimension "anisotropic" leaves one
gamma per unit. The Gabor filters of all layers are evaluated at once, [T, L, H] (elementwise: no matmul).
Init (the paper, and the authors' code where it is silent): gamma_l ~ Gamma(alpha / l, beta), alpha = 6, beta = 1
(later layers narrower in frequency, wider in space); w_l = u * input_scale / sqrt(L) * gamma_l with u uniform in
+-1 (the frequency bound to the window's width); c_l uniform in +-pi; the hidden maps uniform in +-sqrt(1 / H),
their biases as nn.Linear. Choices where the paper is silent or differs: mu_l is drawn uniform around the mask's
centre within 1.667 sigma (the authors' init_spatial_value = 1.667 x the mask's width, capped at 1), since here the
causal mask sits on the newest token (p = +1) and not at the grid's centre; the output map is nn.Linear's init
scaled by 1 / sqrt(max_len) (as SIREN's last map here: a sum of max_len taps keeps the input's scale); no steerable
(rotated) windows, which need two dimensions.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._ck_kernel import SirenKernel

ALPHA, BETA = 6.0, 1.0  # the Gamma distribution of the Gabor filters' inverse widths (the authors' defaults)


class MagnetKernel(nn.Module):
    def __init__(self, d: int, hidden: int, layers: int, input_scale: float, max_len: int, causal: bool,
                 mask: float):
        super().__init__()
        self.max_len, self.causal = max_len, causal
        L, H = layers, hidden
        centre = 1.0 if causal else 0.0
        spread = min(1.0, 1.667 * mask)
        shape = (ALPHA / torch.arange(1.0, L + 1))[:, None].expand(L, H)  # Gamma(alpha / l, beta), layer l's row
        gamma = torch.distributions.Gamma(shape, torch.full_like(shape, BETA), validate_args=False).sample()
        self.gamma = nn.Parameter(gamma)  # [L, H]
        self.mu_g = nn.Parameter(centre + spread * (2 * torch.rand(L, H) - 1))  # the Gabor windows' centres
        self.freq = nn.Parameter((2 * torch.rand(L, H) - 1) * input_scale / math.sqrt(L) * gamma)  # w_l
        self.phase = nn.Parameter((2 * torch.rand(L, H) - 1) * math.pi)  # c_l
        self.linears = nn.ModuleList(nn.Linear(H, H) for _ in range(L - 1))
        self.out = nn.Linear(H, d)
        with torch.no_grad():
            for lin in self.linears:
                lin.weight.uniform_(-math.sqrt(1 / H), math.sqrt(1 / H))
            self.out.weight.mul_(1 / math.sqrt(max_len))
            self.out.bias.mul_(1 / math.sqrt(max_len))
        self.mu = nn.Parameter(torch.tensor(centre))  # FlexConv's mask: its centre and width
        self.sigma = nn.Parameter(torch.tensor(float(mask)))

    position = SirenKernel.position

    def forward(self, lag: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Kernel values [T, d] at lags [T] (float), zero where keep [T] (bool) is False."""
        p = self.position(lag)[:, None]  # [T, 1]
        q = p[:, :, None]  # [T, 1, 1]
        g = torch.exp(-0.5 * (self.gamma * (q - self.mu_g)).square()) * torch.sin(self.freq * q + self.phase)
        h = g[:, 0]
        for l, lin in enumerate(self.linears):
            h = lin(h) * g[:, l + 1]
        k = self.out(h) * torch.exp(-0.5 * ((p - self.mu) / self.sigma).square())
        return k * keep[:, None].to(k.dtype)
