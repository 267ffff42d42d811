"""Improved clustered attention (Vyas et al. 2020, arXiv:2007.04825, section 3.3): mha(clustered, topk=k), the form
clustered.py runs when topk > 0.

With the clusters S and the centroid queries q^c of clustered.py, A^c = softmax(Q^c K^T / sqrt(dh)) [C, n]; T_j is
the set of the k keys of highest A^c_j (per cluster, row and head), m_j = sum_{l in T_j} A^c_jl its mass, and a
query i of cluster j attends the keys of T_j exactly, with its own scores, scaled by m_j, and the other keys with
its centroid's weights:

    A^t_il = m_j exp(q_i . k_l / sqrt(dh)) / sum_{r in T_j} exp(q_i . k_r / sqrt(dh))   (l in T_j)
    A^t_il = A^c_jl                                                                 (l not in T_j)
    o_i = sum_l A^t_il v_l = m_j softmax_{T_j}(q_i K_T^T / sqrt(dh)) V_T + sum_{l not in T_j} A^c_jl v_l

O(n C dh + n k dh). How it runs: the centroids' scores [C, n] and A^c formed explicitly (the top k and the mass need
them: no fused kernel), k columns of -inf appended so that k may exceed n with a symbolic n (the top k of the
n + k: the padding ones, like padded keys, are 0 in A^c and masked in the exact softmax); the rest, A^c with its
top k scattered to 0, times V: [C, dh]; each query gathers its cluster's k indices (the cluster from argmax S) and
then its k keys and values from the zero-padded K, V: [n, k, dh]. A padded key is never attended (-inf in A^c, masked
in the exact part); a padded query's output is 0 (its row of S is 0). Ties in the top k: torch.topk's order (random
scores have none). Grouped K/V heads: everything runs per K/V head over its g query heads' rows, no K/V copies.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def improved_clustered(q, k, v, S, qc, keep, topk: int):
    """q [b, h, n, dh], k, v [b, kv, n, dh], S [b, h, n, C] one-hot (padded rows 0), qc [b, h, C, dh] the centroid
    queries, keep [b, n] (1 = token) -> the heads' outputs [b, h, n, dh]."""
    b, h, n, dh = q.shape
    kv, C = k.shape[1], S.shape[-1]
    g = h // kv
    scale = 1 / math.sqrt(dh)
    sc = (qc.reshape(b, kv, g * C, dh) @ k.transpose(-1, -2)) * scale  # [b, kv, g C, n]
    sc = sc.masked_fill(keep[:, None, None, :] == 0, -math.inf)
    sc = F.pad(sc, (0, topk), value=-math.inf)  # [b, kv, g C, n + k]: k more columns, never real keys
    top = sc.topk(topk, -1).indices  # [b, kv, g C, k]
    ac = torch.softmax(sc, -1)  # A^c (the padding columns 0)
    mass = ac.gather(-1, top).sum(-1, keepdim=True)  # m_j [b, kv, g C, 1]
    rest = ac.scatter(-1, top, 0.0)[..., :n] @ v  # sum over l not in T_j of A^c_jl v_l: [b, kv, g C, dh]
    cluster = S.argmax(-1).reshape(b, kv, g, n, 1).expand(-1, -1, -1, -1, topk)  # [b, kv, g, n, k]
    idx = top.reshape(b, kv, g, C, topk).gather(3, cluster).reshape(b, kv, g * n * topk)  # each query's T_j
    kp, vp = F.pad(k, (0, 0, 0, topk)), F.pad(v, (0, 0, 0, topk))  # [b, kv, n + k, dh]
    at = idx[..., None].expand(-1, -1, -1, dh)
    ks = kp.gather(2, at).reshape(b, kv, g, n, topk, dh)
    vs = vp.gather(2, at).reshape(b, kv, g, n, topk, dh)
    real = F.pad(keep, (0, topk)).gather(1, idx.reshape(b, -1)).reshape(b, kv, g, n, 1, topk)
    s = (q.reshape(b, kv, g, n, dh)[..., None, :] @ ks.transpose(-1, -2)) * scale  # [b, kv, g, n, 1, k]
    p = torch.softmax(s.masked_fill(real == 0, -math.inf), -1)
    exact = (p @ vs).squeeze(-2).reshape(b, h, n, dh)  # (squeezed first: no stride of a 1-long axis to reshape)
    return (S @ mass.reshape(b, h, C, 1)) * exact + S @ rest.reshape(b, h, C, dh)
