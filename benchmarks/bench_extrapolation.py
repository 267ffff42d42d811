"""Length extrapolation of the position schemes, measured without training (issue 13): how each scheme's attention
behaves as the sequence grows past a "trained" length L.

For each scheme, random standard-normal q and k (b x heads rows of width head_dim: the logits of an untrained
layer, variance 1 before a scheme's own factor), the scheme applied as inside mha(softmax) (rope and its
scalings, xPos turn q and k; ALiBi and KERPLE add their bias; NoPE nothing), the last query's softmax over n keys,
at n = L, 2L, 4L, 8L:
- H: its entropy, mean over rows (uniform over n keys: ln n; Gaussian logits of variance σ²: ln n − σ²/2);
- far: the weight on keys more than L positions back (at 8L), i.e. what the query reads outside the window
  it was trained on.
Schemes whose claim is extrapolation should keep H near its value at L (ALiBi, KERPLE, xPos by decay; YaRN by
its temperature; PI/NTK/dynamic NTK by slower frequencies, which random q, k cannot show: their H equals
RoPE's). xPos's decay shrinks far logits toward 0, which on zero-mean random logits flattens the row rather than
sharpening it: its claim holds for scores a model has made positive, not for these. KERPLE's r1, r2 are its
initial draw (seeded), a trained model's differ. pos(randomized_rope) is
pos(rope) outside training and has no row of its own.

    .venv/bin/python benchmarks/bench_extrapolation.py [--train-len 512] [--heads 8] [--head-dim 64] [--batch 4]
        [--out table.md]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from evodsl.ops import load_all, lookup

SCHEMES = [  # (row name, pos variant or None, its arguments; "{L}" is the trained length)
    ("NoPE", None, {}),
    ("RoPE", "rope", {}),
    ("RoPE + PI (factor 8)", "rope", {"scaling": "linear", "factor": 8.0}),
    ("RoPE + NTK (factor 8)", "rope", {"scaling": "ntk", "factor": 8.0}),
    ("RoPE + dynamic NTK (factor 2)", "rope", {"scaling": "dynamic_ntk", "factor": 2.0, "original_max_len": "{L}"}),
    ("RoPE + YaRN (factor 8)", "rope", {"scaling": "yarn", "factor": 8.0, "original_max_len": "{L}"}),
    ("xPos", "xpos", {}),
    ("ALiBi", "alibi", {}),
    ("KERPLE log", "kerple", {"kind": "log"}),
    ("KERPLE power", "kerple", {"kind": "power"}),
]
MULTIPLES = (1, 2, 4, 8)


def build(variant, args, heads, head_dim, L):
    if variant is None:
        return None
    op = lookup("pos", variant)
    args = {k: (L if v == "{L}" else v) for k, v in args.items()}
    torch.manual_seed(0)
    return op.attach(op.params(**args), heads, head_dim)


def last_row(scheme, n, batch, heads, head_dim, seed):
    """The last query's attention weights over n keys, [batch, heads, n]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, head_dim, generator=g)
    k = torch.randn(batch, heads, n, head_dim, generator=g)
    if scheme is not None:
        q, k = scheme.rotate(q, k)
    s = (q[:, :, -1:] @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(head_dim)
    if scheme is not None:
        with torch.no_grad():
            bias = scheme.bias(torch.tensor([[n - 1]]), torch.arange(n)[None, :])
        if bias is not None:
            s = s + bias[:, 0].to(s.dtype)
    return s.softmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-len", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    a = ap.parse_args()
    load_all()
    L = a.train_len
    head = ["scheme", *(f"H at {m}L" for m in MULTIPLES), "H(8L) - H(L)", "far weight at 8L"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    start = time.perf_counter()
    for name, variant, args in SCHEMES:
        scheme = build(variant, args, a.heads, a.head_dim, L)
        hs, far = [], None
        with torch.no_grad():
            for m in MULTIPLES:
                w = last_row(scheme, m * L, a.batch, a.heads, a.head_dim, seed=m)
                hs.append(float(-(w * w.clamp_min(1e-30).log()).sum(-1).mean()))
                if m == MULTIPLES[-1]:
                    far = float(w[..., : m * L - L].sum(-1).mean())
        lines.append("| " + " | ".join([name, *(f"{h:.3f}" for h in hs), f"{hs[-1] - hs[0]:+.3f}", f"{far:.3f}"])
                     + " |")
    lines.append("")
    lines.append(f"L = {L}, heads {a.heads}, head_dim {a.head_dim}, batch {a.batch}, float32; uniform over n keys: "
                 f"ln(L) = {math.log(L):.3f}, ln(8L) = {math.log(8 * L):.3f}; "
                 f"{time.perf_counter() - start:.1f} s")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
