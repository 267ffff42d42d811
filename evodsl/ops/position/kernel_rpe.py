"""pos(kernel_rpe, max_len=512): kernelized attention with relative positional encoding (Luo et al. 2021, "Stable,
Fast and Accurate: Kernelized Attention with Relative Positional Encoding", arXiv:2106.12566, §3), run inside every
mha(linear) downstream; on the stream it is the identity. With phi the attention's feature map
(F features a head) and b_t one learned number per head and relative distance t = j − i,

    z_i = phi(q_i)^T sum_j e^(b_(j-i)) phi(k_j) v_j^T  /  phi(q_i)^T sum_j e^(b_(j-i)) phi(k_j)

(causal: j <= i). The sums D_i = sum_j c_(j-i) B_j, c_t = e^(b_t), B_j = phi(k_j) [v_j 1]^T, are a Toeplitz
matrix times the n rows of B [n, F (dv + 1)]: computed by FFT (one rfft of B and of the 2n - 1 coefficients, their
product, one irfft, zero-padded to 2n: no circular wrap), O(n log n F dv) time and O(n F dv) memory (B itself, as
the paper's); then phi(q_i)^T D_i. No n x n tensor.
Choices where the paper is silent:
- b is per head and per attention layer, for |t| < max_len (2 max_len − 1 numbers a head), initialised to 0
  (plain linear attention at init); longer distances are clipped to ±(max_len − 1) (their side's last bias), so
  no length is refused.
- Decoding: the state per relative offset is not finite (every key keeps its own distance to each new query), so
  the step keeps phi(k_j) and [v_j 1] of every token seen (a cache, F + dv + 1 numbers a token and head) and sums
  them directly: O(n F dv) per new token, declared.
- mha(linear) only: mha(performer)'s exp features span many orders of magnitude within a sequence, and the FFT's
  rounding, absolute in the largest term of B, swamps the smallest keys' sums (the causal form then reads later
  keys through the rounding: the leak harness measured a change of 8.6 at position 0 in float64). Performer
  would need the sums computed per block or a kernel with bounded features; not done.
- Grouped K/V heads: each query head weighs its K/V head's keys with its own b.
"""
from __future__ import annotations

from pydantic import Field

from ..cost import Cost
from ..registry import Op, OpParams, register, sequence_shape
from ._inattention import InAttentionStream
from ._kernel_rpe_attention import KernelRelative


class KernelRPEParams(OpParams):
    max_len: int = Field(512, ge=1, le=1 << 20, description="relative distances |j - i| < max_len have their own bias "
                                                            "(2 max_len - 1 a head); longer ones are clipped")


OP = register(Op(
    decode="phi(k) and [v 1] of every token seen: O(n F dv) a new token (the relative weights have no finite state)",
    shape=sequence_shape, family="pos", variant="kernel_rpe", params=KernelRPEParams, module=InAttentionStream,
    causal="yes", attach=KernelRelative,
    attach_cost=lambda p, s, h, kv, dh: Cost(),  # its whole cost is the attention's (_kernel_rpe_cost.py)
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream; each attention counts its biases
    paper="Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding, Luo et al. 2021, "
          "arXiv:2106.12566",
    summary="phi(q_i)^T sum_j e^(b_(j-i)) phi(k_j) [v_j 1]^T, the Toeplitz sums by FFT: O(n log n F dv)",
    note="Pe/012.md",
))
