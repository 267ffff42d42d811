"""mha(sparse_sinkhorn, block=B): Sparse Sinkhorn Attention (Tay, Bahri, Yang, Metzler & Juan 2020, arXiv:2002.11296)

The sequence is cut into m = ceil(n / B) blocks of B tokens (the last zero-padded). A meta sorting network reads
the block summaries psi_P(X) (the sum of each block's inputs) and gives non-negative logits

    R = relu(W_B relu(W_P psi_P(X) + b_P) + b_B)   in R^{m x m}   (W_B: N_B = ceil(max_len / B) outputs, the first m used)

and Sinkhorn's algorithm turns them into a soft permutation, S^0 = exp(R / tau), S^k = F_c(F_r(S^{k-1})) (rows,
then columns, in log space), S = S^iters; in training Gumbel noise is added first, S((R + eps) / tau), eps =
-log(-log U) from torch's generator (seeded by the caller: torch.manual_seed); eval is deterministic. The sorted
blocks are S's mixtures of the key and value blocks (one S for every head, as the paper sorts X),

    K^_i = sum_j S_ij K_j,   V^_i = sum_j S_ij V_j,

and query block i attends, in one softmax (SDPA), to the B keys of its sorted block and the B keys of its own block
(keys past n masked; the sorted block's zero-padded positions are mixtures and stay): O(n B d) for the attention,
O(m^2 B d) = O(n^2 d / B) to mix K and V and O(m^2) for S (the paper's O(n B + n_B^2) leaves the mixing out; with
m = n / B fixed it is linear). Every head shares S (the paper's R is one per layer).

Causal (Causal Sinkhorn Balancing, our reading of the paper's masking): the sorted block of block i mixes past
blocks j < i only, its logits read the mean of the past blocks' sums (block 0: zero; it has no sorted block and
attends its own tokens alone), and each Sinkhorn iteration normalises row i over j < i, then entry (i, j) by the
column's sum over the rows k <= i (a prefix: a full column sum would read later blocks); the own block is masked
after the query. Decoding keeps the layer's inputs so far and reruns this forward over them (exact: nothing reads
ahead), O(n) a step. Padding: right padding only (blocks are counted from the row start; left padding E409):
bidirectional, padded keys and values are zeroed, the summaries skip them, and S is balanced over each row's real
blocks (a padded block pairs with itself), which equals the sequence alone; causal, padding after the tokens is
never read. No position scheme inside (a sorted block mixes positions); dropout= refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import slot
from ...diagnostics import Diagnostic, EvoError
from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._common import AttentionBase, AttentionParams
from ._sparse_sinkhorn_cost import sparse_sinkhorn_cost
from ._sparse_sinkhorn_sort import SortNet, block_summaries, causal_sinkhorn_log, masked_sinkhorn_log
from .isab import no_dropout_shape


class SparseSinkhornParams(AttentionParams):
    block: int = Field(32, ge=1, le=1 << 16, description="B: tokens a block")
    max_len: int = Field(4096, ge=1, le=1 << 22, description="the longest sequence: W_B has ceil(max_len / B) outputs")
    iters: int = Field(5, ge=1, le=64, description="Sinkhorn iterations (a row and a column normalisation each)")
    temperature: float = Field(0.75, gt=0.0, le=100.0, description="tau: the logits are divided by it")


def sparse_sinkhorn_shape(p: SparseSinkhornParams, env: OpEnv):
    n = env.shape[1] if len(env.shape) == 3 else None
    if isinstance(n, int) and n > p.max_len:
        raise ShapeProblem(f"the stream has {n} positions, more than max_len={p.max_len}", "max_len",
                           f"W_B has one output per block of max_len: set max_len >= {n}")
    return no_dropout_shape("mha(sparse_sinkhorn)")(p, env)


class SparseSinkhornAttention(AttentionBase):
    def __init__(self, p: SparseSinkhornParams, env: OpEnv):
        super().__init__(p, env)
        self.block, self.max_len, self.iters, self.tau = p.block, p.max_len, p.iters, p.temperature
        self.sort = SortNet(env.d, -(-p.max_len // p.block), p.bias)

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        n = x.shape[1]
        if isinstance(n, int) and n > self.max_len:
            raise EvoError([Diagnostic("E410", f"mha(sparse_sinkhorn) has max_len={self.max_len}, the input {n} "
                                               "positions", help="set max_len to the longest sequence")])
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(sparse_sinkhorn)", "its blocks are counted from each row's first "
                                                                "position, and left padding moves the tokens")
        return self.o_proj(self.attend(x, key_mask))

    def permutation(self, x, m, blocks):
        """S [b, m, m] from x [b, m, B, d] (zero past n, padding zeroed); `blocks`: the padded key mask [b, m, B]."""
        r = self.sort(block_summaries(x, m, self.causal), m)
        if self.training:
            u = torch.rand(r.shape, dtype=r.dtype, device=r.device).clamp_min(torch.finfo(r.dtype).tiny)
            r = r - (-u.log()).log()
        r = r * (1.0 / self.tau)
        if self.causal:
            return causal_sinkhorn_log(r, self.iters).exp()
        allowed = None
        if blocks is not None:  # each row's real blocks; a padded block with itself
            real = blocks[:, :, 0]  # [b, m]: the block holds a token (right padding)
            i = torch.arange(m, device=x.device)
            allowed = (real[:, :, None] & real[:, None, :]) | ((i[:, None] == i[None, :]) & ~real[:, :, None])
        return masked_sinkhorn_log(r, self.iters, allowed).exp()

    def attend(self, x, key_mask, symbolic: bool | None = None):
        """x [b, n, d] -> o [b, n, h dh] (before o_proj). `symbolic` (default: n is symbolic, an export) runs the
        export's form: one block past n, padding, so that no axis is 1 long at some n, the blocks gathered."""
        b, n, _ = x.shape
        B, h, kv, dh = self.block, self.heads, self.kv_heads, self.head_dim
        symbolic = not isinstance(n, int) if symbolic is None else symbolic
        m = (n + B - 1) // B + (1 if symbolic else 0)  # not -(-n // B): ONNX Div truncates
        if symbolic and key_mask is None:
            key_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        k, v = self.k_proj(x), self.v_proj(x)
        blocks = None if key_mask is None else self._split(key_mask, n, m, symbolic)
        if key_mask is not None:
            keep = key_mask[:, :, None].to(x.dtype)
            x, k, v = x * keep, k * keep, v * keep
        # flatten merges axes, unflatten splits constant ones: no view of b m or m B into two (export would guard it)
        q = self._split(self.q_proj(x), n, m, symbolic).unflatten(-1, (h, dh)).flatten(0, 1).transpose(1, 2)
        k, v = (self._split(t, n, m, symbolic).flatten(2) for t in (k, v))  # [b, m, B kv dh]
        S = self.permutation(self._split(x, n, m, symbolic), m, blocks)

        def keys(t):  # [b m, kv, 2B, dh]: the sorted block, then the own block
            return torch.cat((S @ t, t), dim=-1).unflatten(-1, (2 * B, kv, dh)).flatten(0, 1).transpose(1, 2)

        mask = self._mask(b, n, m, blocks, x.device)
        o = F.scaled_dot_product_attention(q, keys(k), keys(v), attn_mask=mask, enable_gqa=kv != h)
        o = o.unflatten(0, (b, m)).transpose(2, 3).reshape(b, m * B, h * dh)
        return o.index_select(1, torch.arange(n, device=x.device)) if symbolic else o[:, :n]  # export: no slice guard

    def _split(self, t, n, m, symbolic: bool):
        """[b, n, ...] -> [b, m, B, ...], zero (False) past n: padded and viewed; at a symbolic n (export) gathered
        by index, the gather's shape from the index (a view of m B into (m, B) would need a guard)."""
        B = self.block
        if not symbolic:
            return F.pad(t, (0, 0) * (t.dim() - 2) + (0, m * B - n)).view(t.shape[0], m, B, *t.shape[2:])
        tok = torch.arange(m, device=t.device)[:, None] * B + torch.arange(B, device=t.device)  # [m, B]
        keep = (tok < n).view(m, B, *(1,) * (t.dim() - 2))
        g = t[:, tok.clamp(max=n - 1)]
        return g & keep if t.dtype == torch.bool else g * keep.to(t.dtype)

    def _mask(self, b, n, m, blocks, device):
        """bool [b m, 1, B, 2B]: the sorted block's B keys, then the own block's (past n, padded, causal: after
        the query, masked); causal, block 0 has no sorted block. None where nothing is masked."""
        B = self.block
        if not self.causal and blocks is None and n % B == 0:
            return None
        r = torch.arange(B, device=device)
        pos = torch.arange(m, device=device)[:, None] * B + r  # [m, B]: the own block's key positions
        own = pos < n
        if blocks is not None:
            own = own & blocks
        own = own[..., None, :].expand(*own.shape[:-1], B, B)  # [.., m, B query, B key]
        sorted_ = torch.ones_like(own)
        if self.causal:
            own = own & (r[None, :] <= r[:, None])
            sorted_ = (torch.arange(m, device=device) > 0)[:, None, None].expand(m, B, B)
        mask = torch.cat((sorted_.expand_as(own), own), dim=-1).expand(b, m, B, 2 * B)
        return mask.flatten(0, 1)[:, None]

    def _step(self, x, ctx):
        """Decoding (causal): the cache holds the inputs so far; the forward runs over them and the new rows return."""
        old = ctx.cache.caches.get(slot(ctx, self))
        xs = x if old is None else torch.cat((old, x), dim=1)
        ctx.cache.caches[slot(ctx, self)] = xs
        return self.o_proj(self.attend(xs, None)[:, xs.shape[1] - x.shape[1]:])


OP = register(Op(
    decode="the layer's inputs so far [n, d]; each step reruns the causal forward over them",
    family="mha", variant="sparse_sinkhorn", params=SparseSinkhornParams, module=SparseSinkhornAttention,
    causal="yes", shape=sparse_sinkhorn_shape, supports=frozenset(), cost=sparse_sinkhorn_cost,
    paper="Sparse Sinkhorn Attention, Tay et al. 2020, arXiv:2002.11296",
    summary="blocks of B; a sorting network's [m, m] logits Sinkhorn-balanced into a soft permutation S; query "
            "block i attends its own block and sum_j S_ij (K_j, V_j); causal: past blocks only, column sums over "
            "the rows so far; O(n B d + n^2 d / B)",
    note="",
))
