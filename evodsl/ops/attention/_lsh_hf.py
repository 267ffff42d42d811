"""mha(lsh, form=hf): HF's LSHSelfAttention (transformers' modeling_reformer), the layout its checkpoints run.

Where it differs from the paper form (lsh.py): the R rounds are sorted together, round r's buckets offset by
r (B + 1), into one sequence of R n slots (stable: by bucket, then position), cut into chunks of m; a chunk reads
the chunks `before` and `after` it with wrap-around (the first chunk's previous one is the last, of the last
round: _adjacent.py); no same-bucket mask (a key in the neighbouring chunks is read whatever its bucket); the
causal mask compares positions; a key at the query's own position scores -1e5 in place of q . k (HF's
self-mask value, in every round's copy). Each round's rows go back to their positions with their logsumexp and
the rounds combine by softmax over those, as the paper form. Keys: the queries length-normalised (unit_keys).

The sequence is padded to a multiple of m here, and one chunk more (HF pads its input to a multiple): padded
slots (and a padding mask's) hash to bucket B, sorted after a row's tokens in every round, and a row reads its
own real chunks only, run after run (_adjacent.neighbours): what the row alone gives, padding either side. HF runs
plain attention when n <= m; with every token in each round's one chunk (read twice, through the wrap), this form
gives the same numbers without a branch on n.
The rotations are drawn as HF draws them: torch.manual_seed(seed); randn([h, dh, R, B/2]) (HF's hash_seed).
"""
from __future__ import annotations

import torch

from ._adjacent import attend_adjacent, mod, padded_length, real_counts


def hf_rotations(heads: int, head_dim: int, rounds: int, buckets: int, seed: int) -> torch.Tensor:
    """[h, R, dh, B/2] (lsh.py's layout) from HF's draw: manual_seed(seed), randn(h, dh, R, B/2) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, head_dim, rounds, buckets // 2, generator=g).permute(0, 2, 1, 3).contiguous()


def attend_hf(qk, v, buckets, valid, B: int, m: int, before: int, after: int, causal: bool, dropout: float,
              unit_keys):
    """qk, v [b, h, n, dh]; buckets [b, h, R, n] in 0 .. B-1; valid [b, n] (False: padding) -> out
    [b, h, R, n, dh] and the logsumexps [b, h, R, n] at the original positions."""
    b, h, n, dh = qk.shape
    R = buckets.shape[2]
    N = padded_length(n, m)
    slots = torch.arange(N, device=qk.device)
    src = slots.clamp(max=n - 1)  # padded slots copy the last token (masked): no pad of a symbolic amount
    qk, v = qk[:, :, src], v[:, :, src]
    valid = valid[:, src] & (slots < n)  # [b, N]
    buckets = buckets[..., src].masked_fill(~valid[:, None, None, :], B)  # padding: a bucket of its own
    L = R * N
    flat = (buckets + torch.arange(R, device=qk.device).view(1, 1, R, 1) * (B + 1)).flatten(2)  # [b, h, R N]
    slots = torch.arange(L, device=qk.device)
    order = (flat * L + slots).argsort(-1)  # stable: by bucket, then slot (HF's _stable_argsort)
    pos = mod(order, N)  # [b, h, L]: the position in each sorted slot

    def sort(t):
        return t.gather(2, pos[..., None].expand(b, h, L, dh)).view(b * h, L // m, m, dh)

    sq, sv = sort(qk), sort(v)
    qpos = pos.view(b * h, L // m, m)
    ok = valid[:, None, :].expand(b, h, N).gather(2, pos).view(b * h, L // m, m)
    counts = real_counts(valid, m)[:, None].expand(b, h).reshape(b * h)
    out, lse = attend_adjacent(sq, unit_keys(sq), sv, qpos, qpos, ok, before, after, True, causal, True, counts, R,
                               dropout)
    inv = torch.empty_like(order).scatter_(2, order, slots.expand_as(order))  # each slot's sorted index
    out = out.view(b, h, L, dh).gather(2, inv[..., None].expand(b, h, L, dh)).view(b, h, R, N, dh)
    lse = lse.view(b, h, L).gather(2, inv).view(b, h, R, N)
    keep = torch.arange(n, device=qk.device)  # indexed, not sliced: n <= N is not for torch.export to prove
    return out[:, :, :, keep], lse[:, :, :, keep]
