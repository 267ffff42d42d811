"""The Legendre memory of ssm(lmu) (lmu.py): the LTI system theta m'(t) = A m(t) + B u(t) of Voelker et al. 2019,

    A_ij = (2 i + 1) * (-1 if i < j else (-1)^(i - j + 1)),    B_i = (2 i + 1) (-1)^i,     i, j < q

discretised by zero-order hold over one token (dt = 1): A_bar = expm(A / theta), B_bar = A^-1 (A_bar - I) B, both
from one matrix exponential of the augmented [[A, B], [0, 0]] / theta (float64, then the model's dtype). Fixed,
not learned (buffers), as the paper.

The parallel form (Chilkuri and Eliasmith 2021, arXiv:2102.11417): m_t = sum_{j <= t} A_bar^(t - j) B_bar u_j, a
causal convolution of each input unit with the impulse response H_k = A_bar^k B_bar [q], computed by FFT over 2 n
(the products of spectra [b, units, q, n + 1]): O(b n units q log n). H is a buffer of max_len taps made at init
by doubling (H_{k + 2^j} = A_bar^(2^j) H_k: log2(max_len) products); a longer sequence extends it the same way.
"""
from __future__ import annotations

import torch


def legendre(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The continuous A [q, q] and B [q] (float64)."""
    i = torch.arange(q, dtype=torch.float64)[:, None]
    j = torch.arange(q, dtype=torch.float64)[None, :]
    A = (2 * i + 1) * torch.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    B = (2 * i[:, 0] + 1) * (-1.0) ** i[:, 0]
    return A, B


def zoh(q: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A_bar [q, q], B_bar [q] (float64): the exponential of the augmented matrix."""
    A, B = legendre(q)
    aug = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    aug[:q, :q], aug[:q, q] = A / theta, B / theta
    e = torch.linalg.matrix_exp(aug)
    return e[:q, :q], e[:q, q]


def impulse(Abar: torch.Tensor, Bbar: torch.Tensor, n: int, H: torch.Tensor | None = None) -> torch.Tensor:
    """H_k = A_bar^k B_bar for k < n, [n, q], by doubling (from H's first taps, if given)."""
    H = Bbar[None, :] if H is None else H
    P = torch.linalg.matrix_power(Abar, H.shape[0])
    while H.shape[0] < n:
        H = torch.cat((H, H @ P.T), 0)
        P = P @ P
    return H[:n]


def memory(u: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """u [b, n, units], H [>= n, q] -> m [b, n, units * q] (unit-major), by FFT."""
    b, n, units = u.shape
    work = u if u.dtype in (torch.float32, torch.float64) else u.float()
    hf = torch.fft.rfft(H[:n].to(work.dtype).t(), n=2 * n, dim=-1)  # [q, n + 1]
    uf = torch.fft.rfft(work.transpose(1, 2)[:, :, None], n=2 * n, dim=-1)  # [b, units, 1, n + 1] (no complex
    m = torch.fft.irfft(uf * hf, n=2 * n, dim=-1)[..., :n]  # [b, units, q, n]       unsqueeze: the exporter's form)
    return m.permute(0, 3, 1, 2).reshape(b, n, -1).contiguous().to(u.dtype)  # a copy: the [.., 2 n] result dies
