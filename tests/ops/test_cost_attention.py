"""The attention variants' declared costs against measurement (tests/costhelpers.py): params exact, matmul FLOPs
within 1% of FlopCounterMode, bytes kept for backward and the inference peak within 10% (no absolute slack), in float32,
at two sizes (n = 160 is a multiple of no block or chunk), causal and bidirectional, with grouped K/V heads,
without biases, with head_dim set, with rope and ALiBi inside, RealFormer's residual scores, and dropout on the
weights (training: SDPA's math kernel on CPU, whose fused kernel has no dropout).

Then what the formulas say about growth in n, the complexity class: softmax is quadratic, local, adaptive_span
and linear are linear in n, and their decoding state stops growing."""
from __future__ import annotations

import pytest
import sympy as sp
import torch

from costhelpers import check_op_cost, declared, make_input, measure_op
from evodsl.ops import REGISTRY, load_all, lookup
from evodsl.ops.cost import Symbols
from evodsl.passes.cost import _num
from ophelpers import CAUSAL_ONLY, make_op

load_all()

SIZES = [(2, 64, 64), (1, 160, 96)]  # (b, n, d), heads=4: dh 16 and 24
ROPE, HALF_ROPE, ALIBI, T5 = ("rope", {}), ("rope", {"fraction": 0.5}), ("alibi", {}), ("t5_bias", {"heads": 4})
XL = ("xl_rel", {})
DEBERTA, DEBERTA_SHARED = ("deberta", {}), ("deberta", {"k": 16, "share": True})
DIET_ABS, DIET_REL = ("diet", {"mode": "abs", "max_len": 200}), ("diet", {"mode": "rel", "k": 16})
TUPE, TUPE_REL = ("tupe", {"heads": 4, "max_len": 200}), ("tupe", {"heads": 4, "max_len": 200, "mode": "rel", "cls": True})
BOTH, SMALL, ODD = (0, 1), (0,), (1,)  # which of SIZES a build runs at (the file stays under ~30 s)

CASES = {  # variant: [(build arguments, sizes)], each run causal and bidirectional
    "softmax": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"pos": ROPE}, BOTH), ({"pos": ALIBI}, BOTH),
                ({"residual_scores": True}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
                ({"pos": HALF_ROPE, "kv_heads": 2}, SMALL), ({"residual_scores": True, "kv_heads": 2}, SMALL),
                ({"residual_scores": True, "pos": ALIBI}, ODD), ({"dropout": 0.1}, SMALL),
                ({"residual_scores": True, "dropout": 0.1}, ODD),
                # T5's learned bias: the math kernel in training (its gradient), the Toeplitz bias's one copy
                ({"pos": T5}, BOTH), ({"pos": T5, "kv_heads": 2}, ODD), ({"pos": T5, "dropout": 0.1}, SMALL),
                # QKNorm (_qknorm.py): normalised q, k on SDPA, with GQA and RoPE, with dropout (the math kernel)
                ({"qk_norm": True, "qk_len": 512}, BOTH), ({"qk_norm": True, "qk_len": 512, "kv_heads": 2, "pos": ROPE}, ODD),
                ({"qk_norm": True, "qk_len": 64, "dropout": 0.1}, SMALL),
                # Transformer-XL: a full memory of mem_len earlier inputs (steady state), relative scores
                ({"pos": XL, "mem_len": 32}, BOTH), ({"mem_len": 32, "kv_heads": 2}, BOTH), ({"pos": XL}, SMALL),
                ({"pos": XL, "mem_len": 20, "heads": 2, "head_dim": 8, "bias": False}, ODD),
                # the modifiers' explicit-score kernel (_scored.py): row blocks of 64 (n = 160: three, the causal ones
                # past the diagonal skipped), the cap, the sink logit's column
                ({"softcap": 50.0}, BOTH), ({"softcap": 50.0, "kv_heads": 2}, BOTH), ({"sink_logit": True, "pos": ROPE}, BOTH),
                ({"sink_logit": True, "softcap": 50.0, "kv_heads": 1, "head_dim": 8, "bias": False}, SMALL),
                # talking heads: the blocks' scores and weights mixed across heads (two h x h matmuls each)
                ({"talking": True}, BOTH), ({"talking": True, "kv_heads": 2, "softcap": 50.0}, SMALL),
                ({"talking": True, "sink_logit": True, "pos": ROPE}, ODD),
                # talking=H: H softmax heads between the mixings (heads x H, H x heads), fewer and more than heads
                ({"talking": 2}, BOTH), ({"talking": 7, "kv_heads": 2, "sink_logit": True}, BOTH),
                ({"talking": 3, "softcap": 50.0, "pos": ROPE}, ODD),
                # collaborative heads: shared W_Q, W_K of width D_k (above, at and below dh: q and k or v zero-padded)
                ({"collab": 32}, BOTH), ({"collab": 40, "kv_heads": 2}, SMALL), ({"collab": 8, "bias": False, "kv_heads": 1}, ODD),
                ({"collab": 32, "dropout": 0.1}, SMALL),
                # wide heads (Gemma 2: h dh = 4 d here): o's gradient and the blocks' copies, not the scores, lead the peaks
                ({"softcap": 50.0, "kv_heads": 2, "head_dim": 64, "bias": False}, BOTH),
                ({"softcap": 50.0, "kv_heads": 2, "head_dim": 64, "pos": ROPE}, ODD),
                # rope's context extension: yarn's factor on cos, sin; dynamic NTK's base from the length
                ({"pos": ("rope", {"scaling": "yarn", "factor": 4.0, "original_max_len": 16})}, SMALL),
                ({"pos": ("rope", {"scaling": "dynamic_ntk", "factor": 4.0, "original_max_len": 16}),
                  "kv_heads": 2}, ODD),
                ({"pos": ("xpos", {})}, BOTH), ({"pos": ("xpos", {"fraction": 0.5}), "kv_heads": 2}, SMALL),
                # xpos inside the explicit-score kernel (the cap; the sink logit with talking heads)
                ({"pos": ("xpos", {}), "softcap": 50.0}, ODD),
                # ALiBi's bias inside the explicit-score kernel, block by block: the cap (three blocks at n = 160),
                # the sink logit with GQA, talking heads
                ({"pos": ALIBI, "softcap": 50.0}, BOTH), ({"pos": ALIBI, "sink_logit": True, "kv_heads": 2}, ODD),
                ({"pos": ALIBI, "talking": True}, SMALL),
                ({"pos": ("xpos", {}), "sink_logit": True, "talking": True}, SMALL),
                ({"pos": ("kerple", {})}, BOTH), ({"pos": ("kerple", {"kind": "power"}), "kv_heads": 2}, BOTH),
                ({"pos": ("kerple", {}), "dropout": 0.1}, SMALL),
                ({"pos": ("randomized_rope", {"max_len": 256})}, SMALL),
                # DeBERTa's disentangled scores (pos(deberta)): 2 min(n, k) table rows, c2p and p2c gathered
                ({"pos": DEBERTA}, BOTH), ({"pos": DEBERTA_SHARED, "kv_heads": 2}, BOTH), ({"pos": DEBERTA, "dropout": 0.1}, SMALL),
                ({"pos": ("deberta", {"terms": "c2p"})}, SMALL), ({"pos": ("deberta", {"k": 16, "terms": "p2c"}), "kv_heads": 2}, ODD),
                # DIET's position attention (pos(diet)): P_Q P_K^T or R of the clipped distance, added with a gradient
                ({"pos": DIET_ABS}, BOTH), ({"pos": DIET_REL, "kv_heads": 2}, BOTH), ({"pos": DIET_ABS, "dropout": 0.1}, SMALL),
                # TUPE's untied correlation (pos(tupe)): p's first n rows normed and projected, per head; T5's buckets
                ({"pos": TUPE}, BOTH), ({"pos": TUPE_REL, "kv_heads": 2}, BOTH), ({"pos": TUPE, "dropout": 0.1}, SMALL),
                # Huang et al.'s four methods (pos(huang)): the scores formed (1-3: method 3's band and far matmuls) or
                # SDPA's float mask (4)
                ({"pos": ("huang", {"method": 1, "k": 8})}, SMALL), ({"pos": ("huang", {"method": 2, "k": 8}), "kv_heads": 2}, ODD),
                ({"pos": ("huang", {"method": 3, "k": 8})}, ODD), ({"pos": ("huang", {"method": 3, "k": 5}), "kv_heads": 2}, SMALL),
                ({"pos": ("huang", {"method": 4, "k": 8}), "kv_heads": 2}, SMALL)],
    "local": [({"window": 16}, BOTH), ({"window": 40, "kv_heads": 2}, BOTH), ({"window": 16, "pos": ALIBI}, BOTH),
              ({"window": 33, "heads": 2, "head_dim": 8, "bias": False}, ODD), ({"window": 16, "pos": ROPE}, SMALL),
              ({"window": 16, "pos": ("xpos", {})}, SMALL),
              ({"window": 16, "pos": ("xpos", {}), "softcap": 50.0, "sinks": 2}, ODD),
              # the band's backward peak at its other moment (the softmax's gradient beside the weights'): wide blocks
              # without sinks (was 32 % under), two sinks in a narrow band (was 22 % over)
              ({"window": 40, "softcap": 30.0}, BOTH), ({"window": 16, "softcap": 50.0, "sinks": 2}, ODD),
              # ALiBi in the band (all blocks at once; with sinks), and a window past n (the full layout)
              ({"window": 16, "pos": ALIBI, "softcap": 50.0}, ODD), ({"window": 40, "sinks": 4, "pos": ALIBI, "softcap": 30.0}, ODD),
              ({"window": 200, "pos": ALIBI, "sink_logit": True}, SMALL),
              ({"window": 200}, ODD), ({"window": 16, "dropout": 0.1}, SMALL),
              # causal bands as wide as the sequence at n = 64 (one SDPA call), the prefix and blocks at n = 160
              ({"window": 80, "kv_heads": 2}, BOTH), ({"window": 100, "pos": ALIBI}, BOTH),
              ({"window": 64, "pos": ROPE}, SMALL), ({"window": 70, "dropout": 0.1}, SMALL),
              # the modifiers' kernel: the band in row blocks of max(32, w - 1) queries against their zero-padded keys
              # (and the S sinks), the window over the sequence at n = 64 (the full layout)
              ({"window": 40, "sinks": 4, "softcap": 30.0}, ODD), ({"window": 16, "softcap": 50.0, "pos": ROPE}, ODD),
              ({"window": 16, "sinks": 4, "sink_logit": True}, SMALL), ({"window": 80, "sinks": 4, "kv_heads": 2}, SMALL),
              ({"window": 200, "softcap": 30.0, "sinks": 4}, ODD),
              ({"window": 16, "talking": True}, BOTH), ({"window": 40, "talking": True, "kv_heads": 2, "sinks": 4}, ODD),
              ({"window": 16, "talking": 7}, BOTH), ({"window": 40, "talking": 2, "sinks": 4, "sink_logit": True}, ODD),
              ({"window": 80, "talking": 6, "kv_heads": 2}, SMALL),
              # collaborative heads on the band: shared W_Q, W_K at one width W (q, k or v zero-padded), the causal
              # blocks, the band over the sequence (one call), grouped and single value heads, dropout
              ({"window": 16, "collab": 32}, BOTH), ({"window": 16, "collab": 40, "kv_heads": 2}, BOTH),
              ({"window": 16, "collab": 8, "bias": False, "kv_heads": 1}, ODD), ({"window": 100, "collab": 32}, BOTH),
              ({"window": 40, "collab": 24, "kv_heads": 2}, ODD), ({"window": 16, "collab": 32, "dropout": 0.1}, SMALL),
              # scale= (Gemma 2): q pre-multiplied on the SDPA paths; the capped kernel takes it as its scale
              ({"window": 16, "scale": 0.2, "kv_heads": 2}, BOTH), ({"window": 16, "scale": 0.2, "softcap": 50.0, "pos": ROPE}, ODD),
              # wide heads (Gemma 2: h dh = 4 d here): the unfolded keys' and values' copies, o's blocks' gradient
              ({"window": 16, "softcap": 50.0, "kv_heads": 2, "head_dim": 64, "bias": False}, BOTH),
              ({"window": 16, "softcap": 50.0, "kv_heads": 2, "head_dim": 64, "pos": ROPE}, ODD),
              ({"window": 40, "softcap": 50.0, "head_dim": 64}, ODD)],
    # span_init=1: every head at its full span, the band the cost declares (an upper bound otherwise)
    "adaptive_span": [({"max_span": 48, "R": 8}, BOTH), ({"max_span": 20, "R": 4, "pos": ALIBI}, BOTH),
                      ({"max_span": 20, "R": 4, "kv_heads": 2}, ODD), ({"max_span": 20, "R": 4, "pos": ROPE}, SMALL),
                      ({"max_span": 70, "R": 16, "heads": 2, "head_dim": 8, "bias": False}, ODD),
                      ({"max_span": 40, "R": 8, "dropout": 0.1}, SMALL),
                      ({"max_span": 90, "R": 8}, BOTH), ({"max_span": 64, "R": 8, "pos": ALIBI}, SMALL)],
    # longformer: g = 0, d = 1 runs the banded kernel (local's costs); globals and dilation the dilated band
    # (blocks of residues, padded where n is no multiple of the blocks); globals have no causal form
    "longformer": [({"window": 8}, SMALL), ({"window": 8, "globals": 2}, BOTH), ({"window": 16, "dilation": 2}, BOTH),
                   ({"window": 16, "globals": 1, "dilation": 3}, BOTH), ({"window": 8, "globals": 2, "kv_heads": 2}, BOTH),
                   ({"window": 6, "dilation": 3, "kv_heads": 2}, BOTH), ({"window": 100, "globals": 2, "dilation": 2}, ODD),
                   ({"window": 8, "globals": 3, "heads": 2, "head_dim": 8, "bias": False, "dilation": 2}, BOTH),
                   ({"window": 8, "globals": 2, "dropout": 0.1}, BOTH), ({"window": 16, "dilation": 2, "dropout": 0.1}, SMALL),
                   ({"window": 16, "globals": 1, "dilation": 3, "kv_heads": 2, "dropout": 0.1}, ODD),
                   ({"window": 8, "globals": 3, "heads": 2, "head_dim": 8, "bias": False, "dropout": 0.1}, SMALL)],
    # blocks of 8 (n = 64: 8 blocks, 160: 20) and 12 (the last block padded), no global blocks, three (two first,
    # one last), grouped K/V heads; with dropout (SDPA's math kernel); 32-token blocks at n = 64: full attention
    "bigbird": [({"block": 8, "random": 2}, BOTH), ({"block": 8, "random": 2, "kv_heads": 2}, BOTH),
                ({"block": 8, "globals": 0, "random": 1}, BOTH), ({"block": 12, "random": 1}, BOTH),
                ({"block": 8, "window": 1, "globals": 3, "random": 2, "heads": 2, "head_dim": 8, "bias": False}, ODD),
                ({"block": 32, "random": 1}, SMALL), ({"block": 8, "random": 2, "dropout": 0.1}, BOTH),
                ({"block": 12, "random": 1, "globals": 3, "kv_heads": 2, "dropout": 0.1}, BOTH)],
    # ETC: the band of longformer's dilated_band (d = 1, G global keys; blocks of 32, padded at n = 64 with r = 100)
    # and the G global rows; hard g2l segments; N <= G (every position global: softmax's form)
    "etc": [({"radius": 8, "globals": 2}, BOTH), ({"radius": 8, "globals": 3, "kv_heads": 2}, BOTH),
            ({"radius": 20, "globals": 4, "segment": 16}, BOTH), ({"radius": 100, "globals": 2}, ODD),
            ({"radius": 5, "globals": 2, "segment": 7, "heads": 2, "head_dim": 8, "bias": False}, BOTH),
            ({"radius": 8, "globals": 1, "kv_heads": 1}, ODD), ({"radius": 8, "globals": 100, "kv_heads": 2}, SMALL),
            # hard l2g (a mask on the band's global columns); relative position labels (gathered scores as SDPA's
            # float mask, which has a gradient: SDPA's math kernel in training), with N <= G
            ({"radius": 8, "globals": 3, "segment": 16, "hard": "both"}, BOTH), ({"radius": 8, "globals": 2, "rel": 4}, BOTH),
            ({"radius": 20, "globals": 4, "segment": 16, "hard": "l2g", "rel": 12, "kv_heads": 2}, BOTH),
            ({"radius": 8, "globals": 100, "rel": 2}, SMALL)],
    "linformer": [({"k": 16, "max_len": 256}, BOTH), ({"k": 16, "max_len": 256, "kv_heads": 2}, BOTH),
                  ({"k": 8, "max_len": 256, "share_kv": True, "heads": 2, "head_dim": 8, "bias": False}, ODD),
                  ({"k": 16, "max_len": 256, "dropout": 0.1}, BOTH)],
    "efficient": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"norm": "scaling", "heads": 2, "head_dim": 8, "bias": False}, ODD),
                  ({"norm": "scaling"}, BOTH)],
    "fastformer": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"heads": 2, "head_dim": 8, "bias": False}, ODD)],
    # multi-query (the window a view of the padded values at b = 1), K/V groups with intra-depth (einsum's copies)
    # s < n (n = 64, 160), s >= n (every key), grouped K/V heads, a narrow sketch
    "smart_bird": [({"s": 8}, BOTH), ({"s": 8, "kv_heads": 2, "e": 4}, BOTH), ({"s": 100, "kv_heads": 1}, BOTH),
                   ({"s": 5, "heads": 2, "head_dim": 8, "bias": False}, ODD)],
    "lambda": [({}, BOTH), ({"kv_heads": 2, "u": 2, "k": 8, "r": 5}, BOTH), ({"kv_heads": 2, "k": 8, "r": 5}, ODD),
               ({"kv_heads": 4, "u": 3, "head_dim": 8, "bias": False}, SMALL)],
    # landmarks dividing n (means of views), not dividing it (the averaging matrix), and n <= landmarks (exact)
    "nystrom": [({"landmarks": 16}, BOTH), ({"landmarks": 16, "kv_heads": 2, "conv": 5}, BOTH),
                ({"landmarks": 12, "conv": 7}, BOTH), ({"landmarks": 12, "kv_heads": 1}, BOTH),
                ({"landmarks": 64, "conv": 3}, BOTH), ({"landmarks": 64, "kv_heads": 2, "conv": 3}, SMALL),
                ({"landmarks": 8, "heads": 2, "head_dim": 8, "bias": False, "pinv_init": "sequence", "conv": 3}, ODD),
                ({"landmarks": 32, "pinv_iters": 3, "kv_heads": 2}, ODD)],
    # n > landmarks (the landmark form, one sequence and two: bmm's copy of v), n <= landmarks (exact)
    "skyformer": [({"landmarks": 16}, BOTH), ({"landmarks": 12, "kv_heads": 2}, BOTH), ({"landmarks": 64}, SMALL),
                  ({"landmarks": 64, "kv_heads": 2}, SMALL), ({"landmarks": 40, "kv_heads": 2}, ODD),
                  ({"landmarks": 8, "ridge": 0.0, "heads": 2, "head_dim": 8, "bias": False}, ODD),
                  ({"landmarks": 8, "kv_heads": 1, "pinv_iters": 2}, SMALL)],
    # the same regimes; V heads shared (K is Q: no key projection)
    "soft": [({"landmarks": 16}, BOTH), ({"landmarks": 12, "kv_heads": 2}, BOTH), ({"landmarks": 64}, SMALL),
             ({"landmarks": 64, "kv_heads": 2}, SMALL), ({"landmarks": 40, "kv_heads": 2}, ODD),
             ({"landmarks": 8, "ridge": 0.0, "heads": 2, "head_dim": 8, "bias": False}, ODD),
             ({"landmarks": 200, "heads": 2, "head_dim": 8, "bias": False}, ODD),
             ({"landmarks": 8, "kv_heads": 1, "pinv_iters": 3}, SMALL)],
    "linear": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
               ({"pos": HALF_ROPE}, SMALL),
               ({"pos": ("permute", {})}, ODD), ({"pos": ("permute", {"r": 0.9}), "kv_heads": 2}, SMALL),  # PermuteFormer
               # kernelized RPE (pos(kernel_rpe)): B = phi(k) [v 1]^T, its Toeplitz sums by FFT
               ({"pos": ("kernel_rpe", {"max_len": 256}), "kv_heads": 2}, ODD),
               # translation-equivariant (pos(equivariant_kernel)): the rotation's wider features; the clipped offsets
               ({"pos": ("equivariant_kernel", {})}, SMALL), ({"pos": ("equivariant_kernel", {"scales": 3}), "kv_heads": 2}, ODD),
               ({"pos": ("equivariant_kernel", {"method": "clipped"})}, SMALL),
               ({"pos": ("equivariant_kernel", {"method": "clipped", "clip": 3}), "kv_heads": 2}, ODD)],
    "fanet": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False}, ODD)],
    "simpletron": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False}, ODD)],
    "separable": [({}, BOTH), ({"heads": 1}, BOTH), ({"heads": 2, "head_dim": 8, "bias": False}, ODD),
                  ({"dropout": 0.1}, SMALL)],
    # blocks of l over n = 64 and 160 (padded at l = 12, 24), grouped K/V heads, rope, dropout, l >= n (one call)
    "sparse": [({"stride": 16}, BOTH), ({"stride": 12, "kv_heads": 2}, BOTH), ({"stride": 24, "pos": ROPE}, BOTH),
               ({"stride": 8, "heads": 2, "head_dim": 8, "bias": False}, ODD), ({"stride": 16, "dropout": 0.1}, SMALL),
               ({"stride": 200}, ODD), ({"pattern": "fixed", "stride": 8, "c": 2}, BOTH),
               ({"pattern": "fixed", "stride": 12, "c": 3, "kv_heads": 2}, BOTH),
               ({"pattern": "fixed", "stride": 16, "pos": ROPE}, BOTH), ({"pattern": "fixed", "stride": 8, "c": 7}, ODD),
               ({"pattern": "fixed", "stride": 6, "dropout": 0.1}, SMALL)],
    # rows of l over n = 64 (l = 16 divides it, 12 does not) and 160 (24: a padded last row), one row (l >= n)
    "jukebox": [({"block": 16}, BOTH), ({"block": 12, "kv_heads": 2}, BOTH), ({"pattern": "column", "block": 16}, BOTH),
                ({"pattern": "column", "block": 12, "kv_heads": 2}, BOTH), ({"pattern": "prev_row", "block": 16}, BOTH),
                ({"pattern": "prev_row", "block": 12, "kv_heads": 1}, BOTH),
                ({"pattern": "column", "block": 200, "heads": 2, "head_dim": 8, "bias": False}, ODD),
                ({"pattern": "row", "block": 200}, ODD), ({"pattern": "prev_row", "block": 24, "dropout": 0.1}, ODD),
                ({"block": 12, "dropout": 0.1}, SMALL), ({"pattern": "column", "block": 16, "dropout": 0.1}, SMALL)],
    # the LogSparse set (w = 1), the local variant, the convolutional q and k, a window past the sequence
    "logsparse": [({}, BOTH), ({"window": 4}, BOTH), ({"window": 2, "kv_heads": 2}, BOTH), ({"conv": 3}, BOTH),
                  ({"window": 3, "conv": 5, "heads": 2, "head_dim": 8, "bias": False}, ODD),
                  ({"conv": 2, "kv_heads": 1}, SMALL), ({"window": 200}, ODD), ({"dropout": 0.1}, SMALL)],
    # the band in blocks of 32 queries (n = 64: 2, 160: 5) or 40 (padded queries); one block (radius 200); T5's
    # bias on the band; global tokens of 8, 16 or 32 positions (n = 160 and 16: none left over)
    "tglobal": [({"radius": 8, "block": 8}, BOTH), ({"radius": 40, "block": 8, "kv_heads": 2}, BOTH),
                ({"radius": 5, "block": 32, "pos": T5}, BOTH), ({"radius": 200, "block": 16, "pos": T5}, ODD),
                ({"radius": 3, "block": 16, "heads": 2, "head_dim": 8, "bias": False, "scale": 1.0}, ODD),
                ({"radius": 8, "block": 12, "dropout": 0.1}, BOTH), ({"radius": 8, "block": 7, "kv_heads": 1}, BOTH)],
    # whole chunks (n = 64 and 160 at c = 16), chunks and a tail call (c = 24: 16 tokens left at both sizes)
    "chunk": [({"c": 16}, BOTH), ({"c": 24}, BOTH), ({"c": 16, "kv_heads": 2}, BOTH), ({"c": 24, "kv_heads": 2}, BOTH),
              ({"c": 16, "pos": ROPE}, SMALL), ({"c": 24, "pos": ROPE}, SMALL), ({"c": 16, "pos": ALIBI}, BOTH),
              ({"c": 24, "pos": ALIBI}, BOTH), ({"c": 20, "heads": 2, "head_dim": 8, "bias": False}, ODD),
              ({"c": 16, "dropout": 0.1}, SMALL), ({"c": 24, "dropout": 0.1}, SMALL), ({"c": 200}, ODD),
              # HF Reformer's local attention (_adjacent.py): neighbours with wrap-around, one and three of them
              ({"c": 16, "before": 1, "wrap": True, "bias": False}, BOTH),
              ({"c": 24, "before": 2, "after": 1, "wrap": True, "kv_heads": 2}, BOTH)],
    # blocks dividing n (4: no mask) and not (3, 7: the slots past a shorter block masked)
    "blockwise": [({"blocks": 4}, BOTH), ({"blocks": 3}, BOTH), ({"blocks": 3, "kv_heads": 2, "identity": 1}, BOTH),
                  ({"blocks": 7, "heads": 2, "head_dim": 8, "bias": False}, ODD), ({"blocks": 4, "dropout": 0.1}, SMALL),
                  ({"blocks": 3, "dropout": 0.1}, SMALL)],
    # segments of w: several with a remainder (n = 160), one covering the sequence (w >= n), an odd w
    "long_short": [({"w": 16, "r": 8}, BOTH), ({"w": 16, "r": 8, "kv_heads": 2}, BOTH), ({"w": 100, "r": 8}, BOTH),
                   ({"w": 7, "r": 1}, SMALL), ({"w": 20, "r": 4, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
                   ({"w": 16, "r": 8, "dropout": 0.1}, SMALL), ({"w": 33, "r": 8, "kv_heads": 2, "dropout": 0.1}, ODD)],
    # the band over several blocks, as wide as the sequence at n = 64 (one SDPA call), and wider than n = 160
    "fmm": [({"w": 16}, BOTH), ({"w": 16, "kv_heads": 2}, BOTH), ({"w": 80, "kernels": 1}, SMALL),
            ({"w": 33, "kernels": 3, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD), ({"w": 200}, ODD),
            ({"w": 16, "dropout": 0.1}, SMALL)],
    # M < n, M > n (the MAB's tensors lead the peaks), one K/V head
    "isab": [({"m": 8}, BOTH), ({"m": 100, "kv_heads": 2}, BOTH), ({"m": 5, "heads": 2, "head_dim": 8, "bias": False}, ODD),
             ({"m": 300, "kv_heads": 1}, SMALL)],
    "luna": [({"l": 8}, BOTH), ({"l": 100, "kv_heads": 2}, BOTH), ({"l": 5, "heads": 2, "head_dim": 8, "bias": False}, ODD),
             ({"l": 300, "kv_heads": 1}, SMALL)],
    # one round (no relay update), three with grouped K/V heads, two with narrow heads (d-wide tensors lead)
    "star": [({}, BOTH), ({"rounds": 3, "kv_heads": 2}, BOTH), ({"rounds": 2, "heads": 2, "head_dim": 8, "bias": False}, ODD),
             ({"rounds": 2, "kv_heads": 1}, SMALL)],
    # k dividing n (64 at 4 and 16) and not (3, 5: a partial last slot, copies for several rows), k > n
    # Transformer on a Diet: layer 2's dilation 4 (k = 3: offsets 0, 4, 8), layer 3's union (0, 1, 2, 4, 8, 16),
    # cascade's window of 4 m^2 = 16
    "dilated": [({"pattern": "dilated", "layer": 2}, BOTH), ({"pattern": "dilated_mem", "layer": 3, "kv_heads": 2}, BOTH),
                ({"pattern": "cascade", "layer": 2, "window": 4}, ODD),
                ({"layer": 1, "k": 5, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD)],
    # H-Transformer-1D: blocks of 8 (n = 64: levels of 8, 4, 2 blocks; 160: 20, 10, 5, 3), 4 with GQA (5 levels at 160),
    # 16 (64: two levels), 6 (halves of 3; 160 no multiple of 6 nor of its clusters)
    "hierarchical": [({"block": 8}, BOTH), ({"block": 4, "kv_heads": 2}, BOTH), ({"block": 16}, BOTH),
                     ({"block": 6, "kv_heads": 1, "heads": 2, "head_dim": 8, "bias": False}, BOTH), ({"block": 200}, ODD)],
    # the retina walk: windows of 4 (blocks of 1, 2, then 4 to the end), 3 with pools of 3 (GQA), one scale (blocks of
    # 2 past a window of 8), three scales of 2 (narrow heads: the index tables weigh more), a window past n
    "multiscale": [({"window": 4}, BOTH), ({"window": 3, "pool": 3, "kv_heads": 2}, BOTH), ({"window": 8, "scales": 1}, BOTH),
                   ({"window": 2, "scales": 3, "kv_heads": 1, "heads": 2, "head_dim": 8, "bias": False}, BOTH),
                   ({"window": 200}, ODD)],
    # FourierFormer's tiled kernel: blocks dividing n (16) and not (24, 48 at 64 and 160), a block past n (one tile),
    # grouped K/V heads, a fixed R (no parameter)
    "fourier_integral": [({"block": 16}, BOTH), ({"block": 16, "kv_heads": 2}, BOTH),
                         ({"block": 48, "heads": 2, "head_dim": 8, "bias": False}, BOTH), ({"block": 200}, ODD),
                         ({"block": 24, "kv_heads": 1, "learn_R": False}, ODD)],
    "memory_compressed": [({"k": 3}, BOTH), ({"k": 4, "kv_heads": 2}, BOTH), ({"k": 16}, SMALL), ({"k": 3, "kv_heads": 1}, ODD),
                          ({"k": 5, "heads": 2, "head_dim": 8, "bias": False}, BOTH), ({"k": 200}, ODD)],
    # Combiner-Fixed: blocks dividing n (8 at 64 and 160) and not (12, 5: the last block shorter, copies for b > 1),
    # one block (100 at 64), one-token blocks (every summary a token: quadratic)
    "combiner": [({"block": 8}, BOTH), ({"block": 12, "kv_heads": 2}, BOTH), ({"block": 100}, BOTH), ({"block": 1}, SMALL),
                 ({"block": 5, "kv_heads": 1, "head_dim": 8, "bias": False}, BOTH),
                 # Combiner-Axial: rows of 8, 12, 5 (the last row shorter), one row (100 at 64); not s = 1 (one-token
                 # rows: the size-1 axes spare bmm its copies, the memory formulas do not hold)
                 ({"mode": "axial", "block": 8}, BOTH), ({"mode": "axial", "block": 12, "kv_heads": 2}, BOTH),
                 ({"mode": "axial", "block": 100}, BOTH),
                 ({"mode": "axial", "block": 5, "kv_heads": 1, "head_dim": 8, "bias": False}, BOTH),
                 # Combiner-Logsparse: 7 and 8 levels (n = 64, 160), grouped K/V heads
                 ({"mode": "logsparse"}, BOTH), ({"mode": "logsparse", "kv_heads": 2}, SMALL),
                 ({"mode": "logsparse", "kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
                 ({"mode": "logsparse", "log_size": True, "kv_heads": 2}, ODD)],
    # CoLT5: k_q, k_kv below n, above it at n = 64 (every token routed), narrow heads, a band over the sequence
    "colt5": [({"window": 16, "k_q": 8, "k_kv": 12}, BOTH), ({"window": 7, "k_q": 40, "k_kv": 20, "kv_heads": 2}, BOTH),
              ({"window": 33, "k_q": 100, "k_kv": 200, "light_heads": 4, "kv_heads": 1, "head_dim": 8, "bias": False}, BOTH),
              ({"window": 200, "k_q": 16, "k_kv": 16, "light_heads": 1}, ODD)],
    # NSA: compression blocks of 8 (stride 4) and 12, selection blocks of 16 (n = 160: 10) and 24 (n = 64: the last
    # one short), grouped K/V heads, narrow heads with no overlap (l = l' = 2 d), a window over the sequence (one call)
    "nsa": [({"block": 8, "stride": 4, "select_block": 16, "topk": 3, "window": 16}, BOTH),
            ({"block": 8, "stride": 4, "select_block": 16, "topk": 3, "window": 16, "kv_heads": 2}, BOTH),
            ({"block": 12, "stride": 4, "select_block": 24, "topk": 3, "window": 32, "kv_heads": 2}, SMALL),
            ({"block": 16, "stride": 8, "select_block": 16, "topk": 4, "window": 8, "kv_heads": 1, "heads": 2,
              "head_dim": 8, "bias": False}, ODD),
            ({"block": 4, "stride": 4, "select_block": 8, "topk": 3, "window": 200}, ODD)],
    # Reformer LSH: chunks dividing n (16 at 64 and 160) and not (12, 24: a last chunk of slots past n), two and
    # three rounds with grouped value heads, one bucket with a chunk past n (two chunks, the second past n), chunks
    # of 2 (the sorted q, k, v lead the scores)
    "lsh": [({"buckets": 4, "chunk": 16}, BOTH), ({"buckets": 8, "chunk": 12, "rounds": 2, "kv_heads": 2}, BOTH),
            ({"buckets": 2, "chunk": 24, "rounds": 3, "kv_heads": 1, "heads": 2, "head_dim": 8, "bias": False}, ODD),
            ({"buckets": 1, "chunk": 200}, ODD), ({"buckets": 16, "chunk": 4, "rounds": 2}, SMALL),
            ({"buckets": 4, "chunk": 2, "rounds": 2, "kv_heads": 2}, ODD),
            # HF's LSHSelfAttention (_lsh_hf.py), one round and two (its backward's peak, a fit, is 16% over at n = 160)
            ({"buckets": 4, "chunk": 16, "form": "hf", "bias": False}, SMALL),
            ({"buckets": 8, "chunk": 12, "rounds": 2, "form": "hf", "after": 1}, SMALL)],
    "ufo": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False, "kv_axis": "value"}, ODD)],
    "performer": [({"features": 32}, BOTH), ({"features": 32, "kv_heads": 2}, BOTH), ({}, SMALL),
                  ({"features": 16, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
                  ({"features": 64, "pos": HALF_ROPE}, SMALL),
                  ({"features": 24, "pos": ("permute", {}), "kv_heads": 2}, ODD)],  # PermuteFormer's features
    # gate=true (causal only; its backward's peak approximate): tests/ops/test_rfa.py
    "rfa": [({"features": 16}, BOTH), ({"features": 16, "kv_heads": 2}, BOTH), ({}, SMALL),
            ({"features": 16, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
            ({"features": 32, "pos": HALF_ROPE}, SMALL)],
    # spans of up to 32 and 64 tokens (J = 6, 7 levels), narrow heads (the tree and the table weigh more)
    "bpt": [({"k": 2}, BOTH), ({"k": 2, "kv_heads": 2}, BOTH), ({"k": 4, "rel_pos": False}, SMALL),
            ({"k": 1, "heads": 2, "head_dim": 8, "bias": False, "kv_heads": 1}, ODD), ({"k": 2, "dropout": 0.1}, SMALL)],
    "momentum": [({}, BOTH), ({"kv_heads": 2, "beta": 0.9}, BOTH),
                 ({"kv_heads": 1, "head_dim": 8, "bias": False, "gamma": 0.5}, ODD)],
    "flowformer": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False}, ODD)],
    # S = C m samples: fewer than n, as many (n = 64), more
    "lara": [({"C": 4, "m": 2}, BOTH), ({"C": 8, "kv_heads": 2}, BOTH), ({"C": 16, "m": 4}, SMALL),
             ({"C": 3, "m": 2, "kv_heads": 1, "heads": 2, "head_dim": 8, "bias": False}, ODD),
             ({"C": 32, "m": 8, "kv_heads": 2}, ODD)],
    "learned_kernel": [({"components": 2, "features": 16}, BOTH), ({"components": 2, "features": 16, "kv_heads": 2}, BOTH), ({"components": 3, "features": 8}, ODD),
                       ({"components": 1, "features": 8, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
                       ({"components": 4, "features": 16, "pos": HALF_ROPE}, SMALL)],
    # FoX: one fused SDPA call over width dh + 1 (causal only)
    "forgetting": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
                   # the Pro block (_forgetting_pro.py): all four parts, and each alone where h dh != d
                   ({"pro": True}, BOTH), ({"pro": True, "kv_heads": 2}, SMALL),
                   ({"pro": True, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
                   ({"kv_shift": True, "kv_heads": 1, "head_dim": 8}, SMALL), ({"qk_norm": True, "head_dim": 8}, SMALL),
                   ({"output_norm": True, "kv_heads": 2, "head_dim": 8}, SMALL),
                   ({"output_gate": True, "kv_heads": 1, "head_dim": 8, "bias": False}, SMALL)],
    # MoBA (causal only): blocks dividing n (8 at 64 and 160) and not (12, 5), k past the blocks, a block past n
    "moba": [({"block": 8, "topk": 2}, BOTH), ({"block": 12, "topk": 3, "kv_heads": 2}, BOTH),
             ({"block": 5, "topk": 2, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD), ({"block": 16, "topk": 20}, SMALL),
             ({"block": 200, "topk": 2}, ODD)],
    # top-k: query chunks of 16 and 24 (the last shorter at 160), one chunk past n (200), k past n (80 at n = 64: -inf
    # columns), grouped and single K/V heads, rope (full and half)
    "topk": [({"k": 8, "chunk": 16}, BOTH), ({"k": 12, "chunk": 24, "kv_heads": 2}, BOTH), ({"k": 8, "chunk": 16, "pos": ROPE}, BOTH),
             ({"k": 5, "chunk": 200, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD), ({"k": 80, "chunk": 16}, SMALL),
             ({"k": 16, "chunk": 8, "pos": HALF_ROPE, "kv_heads": 2}, SMALL)],
    # SAC: the edge scores in query chunks of 16 and 24, grouped and single K/V heads, k past n (200: -inf columns)
    "sac": [({"k": 8}, BOTH), ({"k": 8, "chunk": 24, "kv_heads": 2}, BOTH),
            ({"k": 200, "chunk": 16, "kv_heads": 1, "head_dim": 8, "bias": False, "edge_dim": 4}, ODD)],
    # ProbSparse (bidirectional only): u = U = 2 ceil(ln n) (10 of 64, 12 of 160), 3 and 1, u = n (c = 20), grouped and
    # single K/V heads, rope
    "probsparse": [({"factor": 2}, BOTH), ({"factor": 3, "kv_heads": 2}, BOTH), ({"factor": 2, "pos": ROPE}, BOTH),
                   ({"factor": 1, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD), ({"factor": 20}, SMALL),
                   ({"factor": 2, "kv_heads": 2, "pos": HALF_ROPE}, ODD)],
    # h heads of 2 dh (2 and 1 at d = 64, 96), grouped K/V heads, head_dim set, rope on the half-heads, ALiBi (one
    # slope per head, both maps)
    "differential": [({"heads": 2}, BOTH), ({"heads": 4, "kv_heads": 2}, BOTH), ({"heads": 2, "pos": ROPE}, BOTH),
                     ({"heads": 2, "pos": ALIBI, "kv_heads": 1}, BOTH), ({"heads": 4, "pos": ALIBI, "kv_heads": 2}, ODD),
                     ({"heads": 3, "kv_heads": 1, "head_dim": 8, "bias": False, "layer": 5}, ODD)],
    # blocks of 16 (4 and 10 of them), 24 with GQA (the last shorter), one block (200 at n = 160), rope, ALiBi per
    # block, narrow heads with a set score bias
    "ngpt": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"pos": ROPE}, SMALL), ({"pos": ROPE, "kv_heads": 2}, ODD),
             ({"dropout": 0.1}, SMALL), ({"kv_heads": 1, "head_dim": 8, "bias": True}, BOTH)],
    "sigmoid": [({"block": 16}, BOTH), ({"block": 24, "kv_heads": 2}, BOTH), ({"block": 200}, ODD),
                ({"block": 32, "pos": ROPE}, BOTH), ({"block": 32, "pos": ALIBI, "kv_heads": 2}, SMALL),
                ({"block": 48, "pos": ALIBI}, ODD),
                ({"block": 24, "kv_heads": 1, "head_dim": 8, "bias": False, "score_bias": 0.5}, ODD)],
    # sinkformer: the [n, n] scores, every normalisation's input kept (iters = 1: softmax through the same path)
    "sinkformer": [({"iters": 3}, BOTH), ({"iters": 1}, SMALL), ({"iters": 4, "kv_heads": 2}, BOTH),
                   ({"iters": 2, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD)],
    # sparse_sinkhorn: blocks dividing n (no mask, bidirectional) or not (SDPA's float mask; b > 1: o_proj's copy),
    # one block past n, B = 5 (32 blocks at n = 160: the [m, m] mixing)
    "sparse_sinkhorn": [({"block": 16, "max_len": 256}, BOTH), ({"block": 24, "kv_heads": 2, "max_len": 256}, BOTH),
                        ({"block": 8, "kv_heads": 1, "head_dim": 8, "bias": False, "iters": 2, "max_len": 160}, BOTH),
                        ({"block": 200, "max_len": 256}, ODD), ({"block": 5, "iters": 1, "max_len": 200}, SMALL)],
    "slim": [({"features": 32, "chunk": 16}, BOTH), ({"features": 32, "kv_heads": 2, "chunk": 24}, BOTH),
             ({"features": 16, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD), ({"features": 64, "chunk": 8}, SMALL),
             ({"features": 32, "chunk": 16, "pos": HALF_ROPE}, SMALL)],
    # MLA: v narrower than the scores' width (v padded), wider (q, k padded), as wide (v a slice of kv_up's output);
    # query compression; rope on the rope_dim channels (the latent freed once k^R turns)
    "mla": [({"kv_rank": 16, "rope_dim": 8, "nope_dim": 16, "v_dim": 16}, BOTH),
            ({"kv_rank": 24, "rope_dim": 4, "nope_dim": 8, "v_dim": 20, "q_rank": 12}, BOTH),
            ({"kv_rank": 32, "rope_dim": 8, "nope_dim": 8, "v_dim": 16, "bias": False, "pos": ROPE}, BOTH),
            ({"kv_rank": 8, "rope_dim": 4, "nope_dim": 12, "v_dim": 16, "q_rank": 40, "heads": 2, "pos": HALF_ROPE}, ODD)],
    # YOSO: the sample form (bucket tables, 2^tau per round, far more or fewer slots than n), grouped and single K/V
    # heads; the expectation form ([n, n] weights)
    # routing: windows of 16 and 24 (the causal slots past the sequence's start masked), grouped and single K/V heads,
    # a window past n (bidirectional: min(w, n) keys), many small clusters
    "routing": [({"clusters": 4, "window": 16}, BOTH), ({"clusters": 8, "window": 24, "kv_heads": 2}, BOTH),
                ({"clusters": 3, "window": 200, "kv_heads": 1, "heads": 2, "head_dim": 8, "bias": False}, ODD),
                ({"clusters": 16, "window": 5}, SMALL)],
    # clustered (bidirectional): a few clusters, grouped K/V heads, narrow heads, more clusters than tokens (some empty,
    # no iteration), as many clusters and bits as tokens
    "clustered": [({"clusters": 8, "bits": 16, "iterations": 3}, BOTH),
                  ({"clusters": 12, "bits": 32, "iterations": 5, "kv_heads": 2}, BOTH),
                  ({"clusters": 5, "bits": 8, "iterations": 2, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
                  ({"clusters": 200, "bits": 8, "iterations": 0}, ODD), ({"clusters": 64, "bits": 64, "iterations": 2}, SMALL),
                  # improved (topk): k below and above n (the k padding columns), GQA and narrow heads, k = C = n + 40
                  ({"clusters": 8, "bits": 16, "iterations": 3, "topk": 5}, BOTH),
                  ({"clusters": 12, "bits": 32, "iterations": 5, "kv_heads": 2, "topk": 20}, BOTH),
                  ({"clusters": 5, "bits": 8, "iterations": 2, "kv_heads": 1, "head_dim": 8, "bias": False, "topk": 3}, ODD),
                  ({"clusters": 200, "bits": 8, "iterations": 0, "topk": 200}, ODD), ({"clusters": 4, "bits": 16, "topk": 100}, SMALL)],
    # ETSformer's smoothing: chunks of 64 (n = 64: one, no carry; 160: three, the last padded), learned and fixed alpha
    # the chunked recurrences: chunks of 64 (n = 64: one; 160: three, the last padded), grouped and single K/V heads
    "retention": [({}, BOTH), ({"kv_heads": 2, "gamma": 0.9}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False, "chunk": 32}, ODD),
                  ({"v_factor": 2, "kv_heads": 2}, BOTH), ({"v_factor": 2, "head_dim": 8, "chunk": 32}, ODD)],
    # gla: chunks of 16 (four and ten), 24 (padded), 64 (one at n = 64)
    "gla": [({}, BOTH), ({"kv_heads": 2, "chunk": 24}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False, "chunk": 32}, ODD),
            ({"chunk": 64, "rank": 8}, SMALL)],
    # gsa: two passes over 16 slots in chunks of 16 (four, ten), 24 (padded, grouped), 32 (padded, one K/V head), 64 (one)
    "gsa": [({"slots": 16}, BOTH), ({"slots": 16, "kv_heads": 2, "chunk": 24}, BOTH),
            ({"slots": 8, "kv_heads": 1, "head_dim": 8, "bias": False, "chunk": 32}, ODD), ({"slots": 32, "chunk": 64}, SMALL),
            # slots far wider than a head (48 .. 128 against 8 .. 24): pass 2's backward leads, at qd @ states (many
            # small chunks: the stacked states' gradient) or at qd kd^T (one or few large chunks: three m-wide gradients)
            ({"slots": 64, "chunk": 16}, BOTH), ({"slots": 64, "kv_heads": 2, "chunk": 24}, SMALL),
            ({"slots": 96, "chunk": 64}, BOTH), ({"slots": 128, "kv_heads": 2, "chunk": 40}, BOTH),
            ({"slots": 48, "kv_heads": 1, "head_dim": 8, "bias": False, "chunk": 32}, ODD)],
    # the delta rule's WY form: chunks of 64 (one at n = 64, three padded at 160), 24 (padded), 32, 16; no convolutions
    # heads wider and narrower than d / h (one chunk and three padded; four of 16; grouped, padded chunks of 24; two
    # heads of 64 in four equal chunks of 40 on one K/V head): the backward's peak leads at the output side or in
    # the solve's backward (_recurrent_cost.py)
    "deltanet": [({}, BOTH), ({"kv_heads": 2, "chunk": 24}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False, "chunk": 32, "conv": 0}, ODD),
                 ({"chunk": 16}, SMALL), ({"head_dim": 32}, BOTH), ({"head_dim": 8, "chunk": 16}, SMALL),
                 ({"head_dim": 24, "kv_heads": 2, "chunk": 24}, SMALL),
                 ({"heads": 2, "head_dim": 64, "kv_heads": 1, "chunk": 40}, ODD),
                 ({"head_dim": 4, "chunk": 16, "conv": 0}, SMALL)],  # the chunks' [C, C] gradients lead, in the loop
    # gated_deltanet: one chunk at n = 64, three (padded) at n = 160, its backward's peak then at the scores' decay
    # after the loop's releases (_recurrent_cost.py); the same head widths as deltanet's
    "gated_deltanet": [({}, BOTH), ({"kv_heads": 2, "chunk": 24}, ODD), ({"chunk": 16}, BOTH),
                       ({"kv_heads": 1, "head_dim": 8, "bias": False, "chunk": 32, "conv": 0}, BOTH),
                       ({"head_dim": 32}, BOTH), ({"head_dim": 8, "chunk": 16}, SMALL),
                       ({"head_dim": 24, "kv_heads": 2, "chunk": 24}, SMALL),
                       ({"heads": 2, "head_dim": 64, "kv_heads": 1, "chunk": 40}, ODD)],
    # issue 14: Lightning Attention-2's tiles of 64 (one at n = 64, three padded at 160), 24, 32, 16 with one decay
    "lightning": [({}, BOTH), ({"kv_heads": 2, "chunk": 24}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False, "chunk": 32}, ODD),
                  ({"chunk": 16, "decay": 0.9}, SMALL)],
    # hedgehog: 2 dh or 2 f softmax features in chunks of 64, 24 (padded), 16, 32; one K/V head at dh 8 (n = 64) and 16.
    # At n = 160 with dh 8 and one K/V head the declared inference peak is 10.3% over the measured (not held here)
    "hedgehog": [({}, BOTH), ({"kv_heads": 2, "feature_dim": 8, "chunk": 24}, BOTH), ({"chunk": 16}, SMALL),
                 ({"kv_heads": 1, "head_dim": 16, "bias": False, "chunk": 32}, ODD),
                 ({"kv_heads": 1, "head_dim": 8, "bias": False, "chunk": 32}, SMALL), ({"kv_heads": 2, "feature_dim": 12}, ODD)],
    # based: Taylor features (F = 1 + f + f^2) in chunks of 64 (one at n = 64, three padded at 160), 24 and 16 (several),
    # 200 and 1000 (one chunk: no state read; its scores lead the peak at f = 1), beside windows of 64 (the whole
    # sequence at n = 64: one SDPA call), 16, 5, 1 (blocks, overrunning n at n = 160), 200 and 100 (one call); grouped and
    # single K/V heads, narrow and wide heads
    "based": [({}, BOTH), ({"kv_heads": 2}, ODD), ({"kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
              ({"feature_dim": 8, "window": 16, "chunk": 24}, BOTH),
              ({"feature_dim": 4, "window": 5, "chunk": 16, "kv_heads": 2}, BOTH),
              ({"window": 200, "chunk": 32, "kv_heads": 2}, ODD), ({"feature_dim": 8, "chunk": 200}, ODD),
              ({"feature_dim": 1, "chunk": 1000, "kv_heads": 2}, ODD),
              ({"feature_dim": 2, "window": 1, "chunk": 24, "kv_heads": 1}, SMALL),
              ({"heads": 2, "head_dim": 40, "feature_dim": 3, "window": 100, "chunk": 48}, SMALL)],
    # fwp: DPFP-1..3 features into the WY form, chunks of 64 (one at n = 64, three padded at 160), 24, 32, 16
    "fwp": [({}, BOTH), ({"kv_heads": 2, "chunk": 24, "nu": 2}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False, "chunk": 32, "nu": 3}, ODD),
            ({"chunk": 16}, SMALL), ({"kv_heads": 2, "nu": 2}, ODD)],
    "exp_smoothing": [({}, BOTH), ({"alpha": 0.3}, BOTH), ({"heads": 2, "head_dim": 8, "bias": False, "alpha": 0.5}, ODD)],
    # MGK: SDPA over the n r (token, component) pairs; the causal float mask [n, n r] it keeps; r = 1 (one key a token)
    "mgk": [({}, BOTH), ({"components": 3, "kv_heads": 2}, BOTH), ({"components": 1}, SMALL),
            ({"components": 4, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
            # form=linear: the feature kernel (one [S z]; causal chunks of 64: n = 64 one whole, 160 padded)
            ({"form": "linear"}, BOTH), ({"form": "linear", "components": 3, "kv_heads": 2}, BOTH),
            ({"form": "linear", "components": 1}, SMALL),
            ({"form": "linear", "components": 4, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD)],
    "yoso": [({"hashes": 8, "tau": 4}, BOTH), ({"hashes": 8, "tau": 4, "kv_heads": 2}, BOTH), ({"hashes": 16, "tau": 6}, SMALL),
             ({"hashes": 4, "tau": 2, "kv_heads": 1, "head_dim": 8, "bias": False}, BOTH), ({"hashes": 32, "tau": 3}, ODD),
             ({"mode": "expectation", "tau": 4}, BOTH), ({"mode": "expectation", "kv_heads": 2}, BOTH),
             ({"mode": "expectation", "kv_heads": 1, "head_dim": 8, "bias": False}, BOTH)],
    # Synthesizer: each kind (random's [h, n, n] weights shared by the batch, learned and fixed), grouped and single K/V
    # heads, a narrower hidden layer, the mixtures (vanilla's Q and K beside the synthetic logits)
    "synthesizer": [({"kind": "dense", "max_len": 200}, BOTH), ({"kind": "dense", "max_len": 160, "kv_heads": 2, "hidden": 40}, BOTH),
                    ({"kind": "random", "max_len": 200}, BOTH), ({"kind": "random", "max_len": 200, "trainable": False}, SMALL),
                    ({"kind": "factorized_dense", "max_len": 200, "kv_heads": 2}, BOTH),
                    ({"kind": "factorized_random", "max_len": 200, "rank": 4, "kv_heads": 1, "head_dim": 8, "bias": False}, BOTH),
                    ({"kind": "mixture", "max_len": 200}, BOTH), ({"kind": "mixture", "max_len": 200, "mix": "dense_random_vanilla", "kv_heads": 2}, BOTH),
                    ({"kind": "mixture", "max_len": 200, "mix": "factorized_random_vanilla", "kv_heads": 1, "head_dim": 8, "bias": False}, ODD)],
    # NAP: the explicit scores, their rows' statistics (causal: over the past, masked)
    "nap": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False, "eps": 1e-3}, BOTH)],
    # EL-attention: the queries expanded to width d, SDPA against X (one shared K/V head); W_K, W_V repeated to the
    # query heads under grouped K/V heads; head_dim wider than d / h
    "el": [({}, BOTH), ({"kv_heads": 2}, BOTH), ({"kv_heads": 1, "head_dim": 8, "bias": False}, ODD),
           ({"heads": 2, "head_dim": 40}, SMALL)],
    # hand-crafted fixed maps: one pattern per head (mixed: each group's heads picked out, put back in head order),
    # grouped K/V heads (one pattern: on the K/V heads, then repeated), a band wider than n, each pattern alone
    "fixed": [({"pattern": "mixed"}, BOTH), ({"pattern": "mixed", "heads": 5, "kv_heads": 1, "head_dim": 8, "window": 7}, BOTH),
              ({"pattern": "local", "window": 9, "kv_heads": 2}, BOTH), ({"pattern": "local", "window": 100}, SMALL),
              ({"pattern": "global"}, ODD), ({"pattern": "vertical", "globals": 3, "kv_heads": 1, "head_dim": 8, "bias": False}, BOTH),
              ({"pattern": "prev"}, SMALL), ({"pattern": "next", "kv_heads": 2}, ODD), ({"pattern": "diagonal"}, SMALL)],
    # Chord (bidirectional): J = 7 and 9 links a row at n = 64, 160; 1 .. 3 factors, grouped and single V heads, heads
    # wider than d / h, a narrow MLP, max_len = n (every MLP output read)
    "chord": [({"max_len": 256}, BOTH), ({"max_len": 256, "kv_heads": 2, "factors": 3, "hidden": 16}, BOTH),
              ({"max_len": 160, "kv_heads": 1, "head_dim": 24, "factors": 1}, BOTH),
              ({"max_len": 1000, "heads": 2, "head_dim": 8, "bias": False}, ODD)],
    # SMYRF (bidirectional): clusters of 16 and 40 (n = 160: 53 and 54 with C = 3), one round (SDPA) and two (the
    # explicit softmax) with grouped K/V heads, one K/V head and narrow heads, more clusters than tokens (most empty)
    "smyrf": [({"clusters": 4}, BOTH), ({"clusters": 3, "rounds": 2, "kv_heads": 2}, BOTH), ({"clusters": 5, "kv_heads": 2}, SMALL),
              ({"clusters": 7, "kv_heads": 1, "head_dim": 8, "bias": False}, ODD), ({"clusters": 200, "rounds": 2}, ODD)],
    # Scatterbrain: SMYRF's clusters as above with Performer's features; many clusters with many features (the sorted
    # features' gradients lead the backward), more clusters than tokens (the outputs in slots). Causal: windows of 16,
    # 12, 7 and 5 (blocks past n = 160), 64 (the default) and 200 (past the sequence); the prefix sums' chunks of 64
    # Skip-Attention's Phi over the op's input (a module alone reads it): kernels of 3 and 5 (ECA's too), FC1 as wide
    # as d without biases, FC1 4 d wide with k = 7, a kernel past n (the padded input leads the peak)
    "skip_reuse": [({}, BOTH), ({"k": 5, "k_eca": 5}, BOTH), ({"expand": 1, "bias": False}, ODD),
                   ({"expand": 4, "k": 7}, SMALL), ({"k": 200, "expand": 1}, ODD)],
    "scatterbrain": [({"clusters": 4, "features": 16, "window": 16}, BOTH),
                     ({"clusters": 3, "features": 32, "kv_heads": 2, "window": 12}, BOTH),
                     ({"clusters": 7, "features": 8, "kv_heads": 1, "head_dim": 8, "bias": False, "window": 7}, ODD),
                     ({"clusters": 40, "features": 64, "window": 5}, SMALL), ({"clusters": 200, "features": 16}, ODD),
                     ({"clusters": 2, "features": 16, "window": 200}, ODD)],
}


def _cases() -> list:
    cases = []
    for variant, builds in CASES.items():
        for build, sizes in builds:
            causal_form = REGISTRY["mha", variant].causal != "no" and not build.get("globals")  # longformer's
            for causal in (True,) if variant in CAUSAL_ONLY else (False, True) if causal_form else (False,):
                for b, n, d in (SIZES[i] for i in sizes):
                    args = {"heads": 4, **build, "causal": causal, "d": d}
                    if variant == "adaptive_span":
                        args["span_init"] = 1.0
                    label = ",".join(f"{k}={v[0] if k == 'pos' else v}" for k, v in args.items() if k != "d")
                    cases.append(pytest.param(variant, b, n, args, id=f"{variant}-b{b}n{n}d{d}-{label}"))
    return cases


@pytest.mark.parametrize("variant,b,n,build", _cases())
def test_declared_cost_matches_measurement(variant, b, n, build):
    check_op_cost("mha", variant, b=b, n=n, **build)


def test_alibi_runs_the_fused_kernel():
    """The [h, n, n] ALiBi bias goes to SDPA as a 4-D mask, which the fused kernel takes (a 3-D one sends it
    to the math kernel): its backward counts 2.5x the attention matmuls, not 2x."""
    b, n, d = 2, 64, 64
    m = check_op_cost("mha", "softmax", b=b, n=n, d=d, heads=4, pos=ALIBI)
    attention_fwd, attention_bwd = m["fwd"] - 8 * b * n * d * d, m["bwd"] - 16 * b * n * d * d
    assert attention_bwd == 2.5 * attention_fwd


def test_adaptive_span_declares_the_full_band_an_upper_bound():
    """Spans start at 0: the band is cut to R keys, data dependent; the declared cost is that of max_span."""
    module, env, cost, ev = declared("mha", "adaptive_span", 2, 160, dtype=torch.float32, d=64, heads=4,
                                     max_span=96, R=8)
    m = measure_op(module, make_input(env, 2, 160, torch.float32))
    assert m["fwd"] < ev(cost.fwd) and m["bwd"] < ev(cost.bwd)
    assert m["saved"] < ev(cost.saved)


def _cost(variant, d=512, heads=8, **build):
    load_all()
    _, params, env = make_op("mha", variant, d=d, heads=heads, **build)
    s = Symbols(d, 2)
    return lookup("mha", variant).cost(params, env, s), s.values


def _growth(expr, values, n=2 ** 20):
    """How the cost grows when n doubles, at a large n."""
    return _num(expr, values, 1, 2 * n) / _num(expr, values, 1, n)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("variant,build,time,memory", [
    ("softmax", {}, 4, 2),  # SDPA: n^2 time, but only O(n) kept
    ("softmax", {"residual_scores": True}, 4, 4),  # RealFormer keeps the [b, h, n, n] weights
    ("softmax", {"pos": ALIBI}, 4, 4),  # ALiBi's [h, n, n] bias
    ("local", {"window": 128}, 2, 2),
    ("local", {"window": 128, "pos": ALIBI}, 2, 2),  # the bias on the band only
    ("adaptive_span", {"max_span": 1024}, 2, 2),
    ("linear", {}, 2, 2),
    ("fanet", {}, 2, 2),
    ("simpletron", {}, 2, 2),
    ("skip_reuse", {}, 2, 2),  # Phi: linears, a k-tap convolution, ECA: O(n d^2), O(n d) kept
])
def test_complexity_in_n(variant, build, time, memory, causal):
    cost, values = _cost(variant, causal=causal, **build)
    assert _growth(sp.sympify(cost.fwd) + cost.fwd_other, values) == pytest.approx(time, rel=0.05)
    assert _growth(cost.saved, values) == pytest.approx(memory, rel=0.05)
    assert _growth(cost.peak, values) == pytest.approx(memory, rel=0.05)


def test_decoding_state():
    n, by = 4096, 2
    softmax, v = _cost("softmax", kv_heads=2, causal=True)
    assert _num(softmax.cache, v, 1, n) == 2 * n * 2 * 64 * by  # K and V: n tokens, 2 heads of 64
    local, v = _cost("local", window=128, causal=True)
    assert _num(local.cache, v, 1, n) == 2 * 128 * 8 * 64 * by  # the last w keys and values
    assert _num(local.cache, v, 1, 100) == 2 * 100 * 8 * 64 * by
    span, v = _cost("adaptive_span", max_span=1024, causal=True)
    assert _num(span.cache, v, 1, n) == 2 * 1024 * 8 * 64 * by
    linear, v = _cost("linear", causal=True)
    assert _num(linear.cache, v, 1, n) == _num(linear.cache, v, 1, 1) == 8 * (64 * 64 + 64) * by  # S, z


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("b,n,d,heads", [(2, 64, 64, 4), (1, 96, 64, 2), (3, 48, 64, 8)])
def test_t5_bias_memory_is_exact(b, n, d, heads, causal):
    """With T5's bias every byte is accounted for, so its memory is checked with no tolerance at all: at 10%
    the causal bool mask that masked_fill_ keeps (n^2 bytes, ~1% of the total) would go unseen."""
    check_op_cost("mha", "softmax", b=b, n=n, d=d, heads=heads, causal=causal, mem_rtol=0.0,
                  pos=("t5_bias", {"heads": heads}))
