"""ONNX backend (evodsl.export): every spec in specs/ and every registered op exports, passes the ONNX checker
and runs in onnxruntime with PyTorch's numbers at several batch sizes and sequence lengths from one file;
causal models stay causal, and their matmul FLOPs are what `evodsl cost` declares (artifacts, failures and the
CLI: test_onnx_artifacts.py).

Each case is exported once (a module-scoped cache) and the file is reused by the numeric, causality and FLOPs
tests: an export takes 1 to 5 s, the checks on the file a fraction of that.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import evodsl
from evodsl.backends.lower_onnx import example_input, io_names
from evodsl.backends.onnx_flops import matmul_flops
from evodsl.ops import REGISTRY, load_all
from ophelpers import CAUSAL_ONLY, DISCRETE
from spechelpers import output_causal, output_input, small

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.evo"))
BATCHES, SEQS = (1, 3), (7, 33, 70)  # 70 > the 64-token chunks of causal linear attention and the 32-query blocks
TARGET_SEQS = (5, 41, 9)  # an encoder-decoder's target lengths beside SEQS: shorter, longer, much shorter
TOL = 1e-4  # max |onnxruntime - torch| <= TOL * max |torch|, float32

# ---------------------------------------------------------------- one-op specs, made from the registry

HEADER = "d_model = 32\nheads = 4\nkv_heads = 2\nvocab = 61\n"
# Arguments an op needs to stand alone at this size: required ones, and bands narrower than the test sequences.
ARGS = {  # one entry per line: helpers add rows side by side
    ("mha", "local"): "window=5",
    ("mha", "based"): "feature_dim=4, window=5",
    ("mha", "longformer"): "window=4, dilation=2",
    ("mha", "linformer"): "k=16, max_len=128",
    ("mha", "nystrom"): "landmarks=8, conv=3",
    ("mha", "skyformer"): "landmarks=8",
    ("mha", "soft"): "landmarks=8",
    ("mha", "performer"): "features=16",
    ("mha", "rfa"): "features=8",
    ("mha", "adaptive_span"): "max_span=12, R=4, span_init=0.5",
    ("mha", "sparse"): "stride=6",
    ("mha", "tglobal"): "radius=5, block=4",
    ("mha", "chunk"): "c=5",
    ("mha", "long_short"): "w=6, r=4",
    ("mha", "fmm"): "w=5, kernels=3",
    ("mha", "isab"): "m=6",
    ("mha", "luna"): "l=6",
    ("mha", "star"): "rounds=2",
    ("mha", "blockwise"): "blocks=3, identity=2",
    ("mha", "bigbird"): "block=2, random=2",
    ("mha", "logsparse"): "window=2, conv=3",
    ("mha", "jukebox"): "pattern=column, block=6",
    ("mha", "bpt"): "k=2",
    ("mha", "lambda"): "k=8, u=2, r=5",
    ("mha", "smart_bird"): "s=6, e=8",
    ("mha", "lara"): "C=5, m=2",
    ("mha", "learned_kernel"): "components=2, features=8",
    ("mha", "slim"): "features=16, chunk=16",
    ("mha", "mla"): "kv_rank=16, rope_dim=4, nope_dim=6, v_dim=8",
    ("mha", "memory_compressed"): "k=3",
    ("mha", "lsh"): "buckets=4, chunk=4, rounds=2",
    ("mha", "combiner"): "block=3",
    ("mha", "hierarchical"): "block=4",
    ("mha", "multiscale"): "window=2, scales=2",
    ("mha", "dilated"): "pattern=dilated_mem, layer=2",
    ("mha", "etc"): "radius=3, globals=2, segment=4, hard=both, rel=2",
    ("mha", "differential"): "heads=2, kv_heads=1, layer=3",
    ("mha", "sigmoid"): "block=16, seq=64",
    ("mha", "colt5"): "window=4, k_q=16, k_kv=24",  # routed counts above n = 7 (every token), below 33 and 70
    ("ffn", "colt5"): "k=16",  # above n = 7 (every token routed), below 33 and 70
    ("mha", "nsa"): "block=4, stride=2, select_block=4, topk=3, window=3",  # 33 and 70: many blocks, 7: 2 compressed
    ("mha", "fourier_integral"): "R=0.5, block=16",
    ("mha", "moba"): "block=4, topk=2",
    ("mha", "yoso"): "hashes=8, tau=4",
    ("mha", "clustered"): "clusters=3, bits=8, iterations=3",
    ("mha", "smyrf"): "clusters=3, rounds=2",
    ("mha", "scatterbrain"): "clusters=3, features=16, window=4",
    ("mha", "routing"): "clusters=3, window=4",
    ("mha", "synthesizer"): "kind=mixture, mix=dense_random_vanilla, max_len=128",  # the tables cut by index
    ("mha", "nap"): "kv_heads=2",
    ("mha", "sinkformer"): "iters=3",
    ("mha", "sparse_sinkhorn"): "block=4, max_len=128",
    ("mha", "topk"): "k=5, chunk=4",
    ("mha", "fixed"): "pattern=mixed, window=2",  # 4 heads: local, prev, next, global
    ("mixer", "igloo"): "max_len=128",  # the patch tables cut to n
    ("mha", "sac"): "k=5, chunk=4, edge_dim=8",
    ("mha", "probsparse"): "factor=1, max_len=128",  # u = 2, 4, 5 at n = 7, 33, 70; the export's 5 slots, masked  # k past n = 7 at the first length (the -inf columns), chunks of 4 in torch
    ("mixer", "aft"): "mode=local, max_len=128, window=4", ("mixer", "daft"): "max_len=128, rank=8",
    ("mixer", "hamburger"): "r=4, steps=3",
    ("ssm", "mamba2"): "N=8, heads=4, groups=2",
    ("rnn", "rwkv6"): "head_size=8, mix_rank=4, decay_rank=8",
    ("rnn", "rwkv7"): "head_size=8, decay_rank=4, a_rank=4, gate_rank=8",
    ("rnn", "hgrn2"): "heads=4, expand=8, lower_bound=0.2",
    ("mha", "gsa"): "slots=8, kv_heads=2, chunk=8",
    ("rnn", "mlstm"): "heads=4, expand=1, forget=exp",
    ("ssm", "lru"): "N=8, chunk=8",
    ("ssm", "s5"): "P=8, blocks=2, chunk=8",
    ("rnn", "qrnn"): "window=3, chunk=8",
    ("rnn", "gilr"): "chunk=8",
    ("rnn", "sru"): "scan=true, chunk=8, attention=true",  # SRU++; the light recurrence (a token loop) refuses a symbolic length: E455
    ("longconv", "talk"): "l_max=6, heads=4",
    ("ssm", "lmu"): "order=8, theta=20.0, units=2, max_len=128",  # the impulse buffer past the longest length
    ("rnn", "rfwp"): "heads=4",
    ("ssm", "s4d"): "N=8", ("ssm", "h3"): "N=8, shift=4, head_dim=2", ("longconv", "long"): "max_len=128",
    ("longconv", "sgconv"): "max_len=40, kernel_dim=4", ("longconv", "hyena"): "max_len=128, filter_order=8",
    ("mha", "chord"): "max_len=128",
    ("mha", "skip_reuse"): "k=5",
    ("pos", "learned"): "max_len=128", ("head", "linear"): "d_out=8", ("xattn", "softmax"): "kv=x", ("xattn", "merged"): "kv=x",
    ("latent", "array"): "length=4", ("cat", "seq"): "prefix=mem", ("slice", "seq"): "drop_first=4",
    ("memory", "xl"): "mem_len=8", ("memory", "rmt"): "length=4",
    ("pos", "axial"): "n1=8, n2=16, d1=8, d2=24",  # 128 positions on a grid, past the longest test length
    ("residual", "deepnorm"): "layers=6",
    ("pos", "randomized"): "max_len=128", ("pos", "randomized_rope"): "max_len=128",
    ("ffn", "ngpt"): "s_init=0.1",  # its sqrt(d) s_v on weights not unit-norm: else it dwarfs the chain's leak signal
    ("pos", "tupe"): "max_len=128, mode=rel, cls=true",
    ("pos", "kernel_rpe"): "max_len=128",
    ("pos", "equivariant_kernel"): "method=clipped, clip=3",  # the gathers and prefix sums
    ("pos", "huang"): "method=3, k=4",  # the band's loop and the far matmuls (method 4 is SDPA's float mask)
}
FEATURES, OUT = "input(features, d=32)", "head(linear, d_out=8)"
# family -> (the model around its ops, how one variant appears in it, whether all variants share one spec).
# Per-token families share one spec (a chain of all their variants); the others get a spec per variant.
WRAPPERS = {
    "embed": (f"input(features, d=16) -> {{ops}} -> mha -> {OUT}", "{call}", False),
    "pos": (f"{FEATURES} -> {{ops}} -> mha -> {OUT}", "{call}", False),  # rope / alibi act inside the mha
    "norm": (f"{FEATURES} -> {{ops}} -> mha -> {OUT}", "{call}", True),
    "mha": (f"{FEATURES} -> {{ops}} -> {OUT}", "{call}", False),
    "mixer": (f"{FEATURES} -> {{ops}} -> {OUT}", "residual({call})", False),
    "ffn": (f"{FEATURES} -> mha -> {{ops}} -> {OUT}", "{call}", True),
    **{fam: (f"{FEATURES} -> {{ops}} -> {OUT}", "residual({call})", False) for fam in ("ssm", "rnn", "longconv")},
    "head": (f"{FEATURES} -> mha -> {{ops}}", "{call}", False),
    "residual": (f"{FEATURES} -> {{ops}} -> {OUT}", "residual(norm -> mha, scale={variant})", True),
    "merge": (f"{FEATURES} -> {{ops}} -> {OUT}", "parallel(mha, norm -> ffn, merge={variant})", True),
    "dropout": (f"{FEATURES} -> {{ops}} -> mha -> {OUT}", "{call}", True),
    "memory": (f"{FEATURES} -> {{ops}} -> pos(xl_rel) -> mha -> {OUT}", "{call}", False),  # a first segment
    # models with streams (`{ ... }`): cross-attention reading another stream; memory tokens from a latent array
    # joined before the tokens, attended with them, and dropped before the head
    "xattn": (f"{{{{ x = {FEATURES} -> mha  y = x -> residual({{ops}}) -> {OUT} }}}}", "{call}", False),
    **{fam: (f"{{{{ x = {FEATURES} -> mha  mem = {mem}  y = x -> {cat} -> mha -> {cut} -> {OUT} }}}}", "{call}", True)
       for fam, mem, cat, cut in [("latent", "{ops}", "cat(seq, prefix=mem)", "slice(seq, drop_first=4)"),
                                  ("cat", "latent(array, length=4)", "{ops}", "slice(seq, drop_first=4)"),
                                  ("slice", "latent(array, length=4)", "cat(seq, prefix=mem)", "{ops}")]},
}
# Variants that need token ids around them, or a model of their own (the RMT memory: a first segment).
TOKEN_MODELS = {("embed", "token"): f"input(tokens) -> {{ops}} -> mha -> {OUT}",
                ("embed", "complex"): f"input(tokens) -> {{ops}} -> mha -> {OUT}",
                ("pos", "permute"): f"{FEATURES} -> {{ops}} -> mha(performer, features=16) -> {OUT}",
                ("pos", "kernel_rpe"): f"{FEATURES} -> {{ops}} -> mha(linear) -> {OUT}",
                ("pos", "equivariant_kernel"): f"{FEATURES} -> {{ops}} -> mha(linear) -> {OUT}",
                ("head", "lm"): "input(tokens) -> embed(token) -> mha -> {ops}",
                ("head", "ngpt"): "input(tokens) -> embed(token) -> mha -> {ops}",
                ("memory", "rmt"): f"{{{{ mem = {{ops}}  x = {FEATURES} -> cat(seq, prefix=mem, suffix=mem) -> mha  "
                                   f"next(writes=mem) = x -> slice(seq, last=4)  "
                                   f"y = x -> slice(seq, drop_first=4) -> slice(seq, drop_last=4) -> {OUT} }}}}",
                ("mha", "skip_reuse"): f"{FEATURES} -> mha -> {{ops}} -> {OUT}",  # reads an earlier attention
                # merged attention's W_v reads the stream and the source: a norm between them, or the export's one
                # MatMul serves both (x is kv) and the FLOPs read off the graph fall short of torch's two
                ("xattn", "merged"): f"{{{{ x = {FEATURES} -> mha  y = x -> norm -> residual({{ops}}) -> {OUT} }}}}"}


def call(family: str, variant: str) -> str:
    args = ARGS.get((family, variant))
    return f"{family}({variant}{', ' + args if args else ''})"


@dataclass(frozen=True)
class Case:
    id: str
    source: object  # a spec path, or spec text
    overrides: dict
    ops: tuple = ()  # the (family, variant) pairs the case is there to export

    def graph(self):
        return evodsl.parse(self.source, self.overrides)


# Banded attention: torch runs it in query blocks of B positions over K = B + w - 1 keys each, or as one causal
# call when the band covers the sequence (what `evodsl cost` declares); the export, whose sequence axis is
# symbolic, computes it in the per-query gather form (_gathered_band in evodsl/ops/attention/_banded.py): each
# query against its own w keys. Same O(n w) class, other multiply-adds, so the ONNX graph's matmul FLOPs differ.
BANDED = {("mha", "local"), ("mha", "adaptive_span"), ("mha", "sparse"), ("mha", "tglobal"),
          ("mha", "longformer"), ("mha", "chunk"), ("mha", "jukebox"), ("mha", "logsparse"),
          ("mha", "long_short"), ("mha", "fmm"), ("mha", "etc"),
          ("mha", "colt5"),
          ("mha", "nsa")}  # sparse: each query gathers its keys; etc: its band as longformer's (the input padded
# to at least G + 1 positions); colt5: its light band; nsa: its window branch (and n // d + 2 compressed blocks, the
# ones past n masked, where torch runs the floor((n - l) / d) + 1 complete ones)
# Causal linear attention likewise: torch runs it in chunks of 64 tokens (what `evodsl cost` declares); the
# export runs the prefix-sum form (_prefix_sums in evodsl/ops/attention/linear.py), whose running states are
# elementwise products and cumulative sums, so fewer of its FLOPs are matmuls. Performer and RFA run the same
# scheme on their features (evodsl/ops/attention/_kernelized.py).
PREFIX_SUMS = {("mha", "linear"), ("mha", "fanet"), ("mha", "simpletron"), ("mha", "performer"), ("mha", "momentum"), ("mha", "flowformer"),
               ("mha", "rfa"), ("mha", "learned_kernel"), ("mha", "slim")}  # causal forms exported as prefix sums
PREFIX_SUMS |= {("mha", "scatterbrain")}  # its causal form's low-rank part (_kernelized.py), beside its window


# BP-Transformer: torch gathers each query's spans from a tree of pooled levels as deep as n needs; the export
# (a symbolic n) takes span sums from prefix sums over a fixed number of levels, most of them masked.
# H-Transformer-1D likewise: torch runs as many levels as n needs, each at its own coarse resolution; the export
# runs 16 levels for every query at full resolution from prefix sums (_hierarchical_export.py), those past n masked.
TREES = {("mha", "bpt"), ("mha", "hierarchical")}
# Other export forms: BigBird's runs every block as a query block (the global ones' local rows thrown away);
# blockwise runs a dense masked SDPA; the exporter folds the projections of ISAB's inducing points and Luna's
# packed sequence P (learned constants), so fewer MatMuls remain than torch runs.
OTHER_FORMS = {("mha", "bigbird"), ("mha", "blockwise"), ("mha", "isab"), ("mha", "luna"),
               ("mha", "combiner")}  # combiner: floor(n / s) + 2 blocks exported (the extra ones padding), not ceil(n / s)
# differential: torch runs each map twice (over V's two halves: the fused CPU kernel wants values as wide as the keys);
# the exporter's common-subexpression pass keeps one q k^T and softmax per map, so 2 of its 6 attention MatMuls go
OTHER_FORMS |= {("mha", "differential")}
# Sparse Sinkhorn: ceil(n / B) + 1 blocks exported (the extra one padding, balanced with itself), the blocks gathered by index
OTHER_FORMS |= {("mha", "sparse_sinkhorn")}
# Memory-compressed attention's causal form: torch runs G = m + 1 groups of K queries over the m finished slots
# (m = floor(n / K)); the export gathers m + 2 groups and slots, so that no axis is 1 long at some n (the extra
# ones masked or cut): a few more multiply-adds. Its bidirectional export is torch's form.
# FourierFormer's causal form: torch runs whole tiles of 16 x 16 up to each query block's end (what `evodsl cost`
# declares); the export's plain form scores every pair, masked: more matmul FLOPs. Bidirectional: n^2 both.
CAUSAL_GROUPS = {("mha", "memory_compressed"), ("mha", "fourier_integral")}
# sigmoid attention likewise: torch's blocked kernel skips the blocks above the diagonal; the export's dense form
# scores every pair, masked. Bidirectional: n^2 both.
CAUSAL_GROUPS |= {("mha", "sigmoid")}
# ETSformer's smoothing: torch runs chunks of 64 with a loop over them; the export (a symbolic n) runs the dense
# [n, n] kernel matmul per head (no loop to trace)
OTHER_FORMS |= {("mha", "exp_smoothing")}
# the chunked linear recurrences: torch runs chunks of 64 with a loop over them; the export (a symbolic n) the
# parallel form (_chunked_linear.parallel_decay, _chunked_delta.parallel_delta): [n, n] products, no loop to trace
OTHER_FORMS |= {("mha", "retention"), ("mha", "gla"), ("mha", "deltanet"), ("mha", "gated_deltanet")}
# issue 14's feature-map linear attention: the export runs the linear part's one-piece [n, n] form (no loop over
# chunks to trace) and the window gathered (_banded._gathered_band)
OTHER_FORMS |= {("mha", "based"), ("mha", "hedgehog"), ("mha", "lightning"), ("mha", "fwp")}
# MGK's causal form: torch runs is_causal over the queries repeated r times (r n query rows, what `evodsl cost`
# declares); the export, which always reads the attention mask, runs the n queries against a mask [n, n r]: fewer
# FLOPs. Bidirectional: the same form.
CAUSAL_GROUPS |= {("mha", "mgk")}
# top-k attention likewise: torch's causal selection scores each query chunk against the keys up to its end; the
# export's one chunk scores every pair, masked. Bidirectional: n^2 both.
CAUSAL_GROUPS |= {("mha", "topk")}
CAUSAL_GROUPS |= {("mha", "sac")}  # SAC's edge scores: as top-k's selection
# ProbSparse: torch runs u = c ceil(ln n) active queries and sampled keys; the export, whose n is symbolic, runs
# c ceil(ln max_len) of each, those past u masked: more multiply-adds below max_len
OTHER_FORMS |= {("mha", "probsparse")}
# IGLOO: its convolution exports as a Conv node, which the MatMul / Gemm count leaves out (2 n d^2 k of its FLOPs)
OTHER_FORMS |= {("mixer", "igloo")}
# Chord: torch gathers 1 + ceil(log2 n) links a row; the export (a symbolic n) all 1 + ceil(log2 max_len), the
# links 2^k >= n weighted 0: more multiply-adds below max_len
OTHER_FORMS |= {("mha", "chord")}
# Skip-Attention: its depthwise and ECA convolutions export as Conv nodes, which the MatMul / Gemm count leaves out
OTHER_FORMS |= {("mha", "skip_reuse")}
# Mamba: torch scans chunk by chunk; the export (a symbolic n) runs the doubling scan over the whole sequence
# (exported_scan in evodsl/ops/ssm/_mamba_scan.py), and its depthwise convolution is a Conv node the count leaves out
OTHER_FORMS |= {("ssm", "mamba")}
# Mamba-2: torch runs SSD chunks of T and carries the states; the export runs the whole sequence as one chunk (its
# [n, n] masked form: more multiply-adds), and the convolution is a Conv node
OTHER_FORMS |= {("ssm", "mamba2")}
# RWKV-4: torch runs the WKV in chunks of T and carries (num, den, max); the export runs the whole sequence as one
# chunk (its [n, n] table of log-weights a channel: more multiply-adds)
OTHER_FORMS |= {("rnn", "rwkv4")}
# RWKV-6: torch runs GLA's chunked kernel (chunks of T, carried states); the export its one-piece form ([n, n, N] decay
# ratios a head)
OTHER_FORMS |= {("rnn", "rwkv6")}
# RWKV-7: torch runs the WY-chunked diagonal-plus-rank-one kernel (chunks of T, carried states); the export its
# one-piece form from a zero state ([n, n, N] decay ratios a head, the triangle's inverse as a product)
OTHER_FORMS |= {("rnn", "rwkv7")}
# HGRN2: torch runs GLA's chunks with a loop over them; the export (a symbolic n) the one-piece parallel form
# (_chunked_linear.parallel_decay: [n, n, e] decay ratios), no loop to trace
OTHER_FORMS |= {("rnn", "hgrn2")}
# GSA: torch runs both passes in chunks with a loop over them; the export (a symbolic n) the one-piece parallel form
# of both ([n, n, m] decay ratios, _gsa_kernel.parallel_slot_decay and _chunked_linear.parallel_decay)
OTHER_FORMS |= {("mha", "gsa")}
# mLSTM: torch runs chunks carrying the stabilised state; the export xLSTM's one-piece stabilised parallel form ([n, n]
# log weights)
OTHER_FORMS |= {("rnn", "mlstm")}
# QRNN: its masked convolution exports as a Conv node, which the MatMul / Gemm count leaves out; fo-pooling runs the
# whole-sequence doubling (rnn/_diag_scan.exported_scan), torch the chunked scan (neither has a matmul)
OTHER_FORMS |= {("rnn", "qrnn")}
# the Recurrent Delta Net: torch loops over the tokens; the export runs the same core as one scan (an ONNX Scan node)
OTHER_FORMS |= {("rnn", "rfwp")}
# Hyena: its short depthwise convolution is a Conv node, which the MatMul / Gemm count leaves out
OTHER_FORMS |= {("longconv", "hyena")}
# H3: its shift SSM is a depthwise Conv node, which the MatMul / Gemm count leaves out
OTHER_FORMS |= {("ssm", "h3")}


CHAIN = 12  # ops per bidirectional chain case


def _chains(ops: list, size: int) -> list[list]:
    """ops in chains of at most `size`, a discrete one (DISCRETE) only first in its chain: after another op, ORT's
    and torch's float32 roundings of its input could flip one of its choices (a top-k key, a hash bucket)."""
    discrete = [o for o in ops if o[1] in DISCRETE]
    rest = [o for o in ops if o[1] not in DISCRETE]
    count = max(len(discrete), -(-len(ops) // size))
    chains = [[o] for o in discrete] + [[] for _ in range(count - len(discrete))]
    for i, o in enumerate(rest):  # the others spread over the chains, at most `size` each
        target = min(range(count), key=lambda c: (len(chains[c]), c))
        chains[target].append(o)
    return [c for c in chains if c]


# The sequence families (ssm, rnn, longconv: causal layers, each its own export and four tests) share specs, in
# chains of a few ops: one export a chain, each op checked inside it (parity, padding, causality, its matmul FLOPs)
SEQUENCE_FAMILIES, SEQUENCE_CHAIN = ("ssm", "rnn", "longconv"), 4


def op_cases() -> list[Case]:
    load_all()
    groups: dict[tuple, list[str]] = {}
    for family, variant in sorted(REGISTRY):
        if family == "input":
            continue
        assert family in WRAPPERS, f"add a wrapper for the new op family {family!r} to tests/test_onnx.py"
        key = (family,) if WRAPPERS[family][2] else (family, variant)
        if family in SEQUENCE_FAMILIES:  # chains of SEQUENCE_CHAIN ops, those whose export is torch's form apart,
            # and those with no causal form (a bidirectional model) apart from the rest (a causal one)
            kind = ("other" if (family, variant) in OTHER_FORMS else "same") + \
                ("-bidirectional" if REGISTRY[family, variant].causal == "no" else "")
            group = [k for k in groups if k[:2] == (family, kind)]
            key = group[-1] if group and len(groups[group[-1]]) < SEQUENCE_CHAIN else (family, kind, len(group))
        groups.setdefault(key, []).append(variant)
    cases = []
    for key, variants in groups.items():
        family = key[0]
        model, piece, _ = WRAPPERS[family]
        model = TOKEN_MODELS.get(key[:2], model)
        # a residual scale op's parameters follow scale=V: residual(..., scale=deepnorm, layers=6)
        ops = " -> ".join(piece.format(call=call(family, v), variant=v + (f", {ARGS[family, v]}" if (family, v) in ARGS else ""))
                          for v in variants)
        causal = all(REGISTRY[family, v].causal != "no" for v in variants)
        body = model.format(ops=ops)
        src = f"{HEADER}model m(causal={str(causal).lower()}){' ' if body.startswith('{') else ' = '}{body}\n"
        cases.append(Case(f"{family}({','.join(variants)})", src, {}, tuple((family, v) for v in variants)))
    # every token mixer with a causal form, once more in a bidirectional model (the leak test must see leaks): those
    # whose export runs the form torch runs in one chain (its matmul FLOPs checked against the cost), the others
    # (BANDED, TREES, OTHER_FORMS) in another
    mixers = [(f, v) for (f, v), op in sorted(REGISTRY.items()) if f in ("mha", "mixer") and op.causal != "n.a."
              and v not in CAUSAL_ONLY]  # (a causal-only op: its own case, a causal model, shows it does not leak)
    other = BANDED | TREES | OTHER_FORMS
    # mha(skip_reuse) reads an earlier attention (E312 first in a chain): its bidirectional export and parity,
    # tests/ops/test_skip_reuse.py
    mixers = [m for m in mixers if m != ("mha", "skip_reuse")]
    # In chains of at most CHAIN ops: one export of ~90 ops was the longest item of the run (tens of minutes on a
    # loaded machine), on one worker while the other sat idle.
    for name, part in (("bidirectional", [m for m in mixers if m not in other]),
                       ("bidirectional-other-forms", [m for m in mixers if m in other])):
        size = CHAIN // 2 if name.endswith("other-forms") else CHAIN  # their gathered forms export slowly
        for i, piece in enumerate(_chains(part, size)):
            # a norm before each: unnormalised mixers (right products, Q = K kernels) would compound the scale
            chain = " -> ".join("norm -> " + WRAPPERS[f][1].format(call=call(f, v), variant=v) for f, v in piece)
            cases.append(Case(f"{name}-{i + 1}", f"{HEADER}model m(causal=false) = {FEATURES} -> {chain} -> {OUT}\n",
                              {}, tuple(piece)))
    # a case whose ops other cases export already, in a model as causal, is left out (head(linear) ends every
    # features model, mha(softmax) is the default mha)
    def exports(case):
        graph = case.graph()
        return {(n.family, n.variant, graph.options["causal"]) for n in graph.calls()}

    made = {c.id: exports(c) for c in cases}
    for case in list(cases):
        if {op for op in made[case.id] if op[:2] in case.ops} <= set().union(
                *(made[c.id] for c in cases if c is not case)):
            cases.remove(case)
    # options that give an op another form, chained in one causal model (one export; their default forms are above)
    assert len({WRAPPERS[f][0] for f, _, _ in OPTIONS}) == 1, "OPTIONS of families in different models: split them"
    chain = " -> ".join(WRAPPERS[f][1].format(call=f"{f}({v}, {a})") for f, v, a in OPTIONS)
    cases.append(Case("options:" + ",".join(f"{f}({v})" for f, v, _ in OPTIONS),
                      f"{HEADER}model m(causal=true) = {WRAPPERS[OPTIONS[0][0]][0].format(ops=chain)}\n", {},
                      tuple((f, v) for f, v, _ in OPTIONS)))
    return cases


# (family, variant, arguments): the GILR-LSTM (two scans), the 2019 LMU cell (its token loop as an ONNX Scan node)
OPTIONS = [("rnn", "gilr", "chunk=8, lstm=true"), ("ssm", "lmu", "order=8, theta=20.0, units=2, feedback=true")]


SPEC_CASES = [Case(f"spec:{p.stem}", p, small(p)) for p in SPECS]  # the 7B and 70B specs too, at small sizes
OP_CASES = op_cases()
CASES = SPEC_CASES + OP_CASES
# one xdist group per case: its tests run on one worker, which exports it once (the module's `exported` cache)
# Specs whose every op is exported by the op cases and whose structure another spec shares (an encoder with a band,
# a decoder of llama's shape): their exports (a tenth of the default run) run with `pytest -m slow`
SLOW_SPECS = {"spec:etc_base", "spec:bigbird_base", "spec:longformer_base", "spec:nystromformer", "spec:adaptive_span",
              "spec:llama2_70b", "spec:yoso_base", "spec:vanilla", "spec:transformer", "spec:linear_transformer",
              "spec:memory_transformer"}
SLOW_SPECS |= {"spec:rwkv4_169m"}  # rnn(rwkv4) and ffn(rwkv) export in the op cases; its ln0 is a norm after the embedding
PARAMS = [pytest.param(c, id=c.id, marks=[pytest.mark.xdist_group(re.sub(r"\W", "_", c.id))]
                       + ([pytest.mark.slow] if c.id in SLOW_SPECS else [])) for c in CASES]
# The bidirectional chains (every token mixer once more in a bidirectional model: 13 chains, 8-29 s each to pad)
# check their padding in the slow run; their parity and causality stay in the default one. Padding stays covered by
# test_padding.py (each op's both forms, in torch) and, in ONNX Runtime, by each op's own case (its causal form where
# it has one) and the specs (bert, t5, deberta, ...: bidirectional encoders)
PADDING_PARAMS = [pytest.param(p.values[0], id=p.id, marks=[*p.marks] + ([pytest.mark.slow] if p.id.startswith(
    "bidirectional-") else [])) for p in PARAMS]
def export_form_differs(graph) -> bool:  # (the 2019 LMU cell: its token loop an ONNX Scan node, as rfwp's)
    if any((n.family, n.variant) == ("ssm", "lmu") and n.params.feedback for n in graph.calls()):
        return True
    return any((n.family, n.variant) in BANDED | TREES | OTHER_FORMS or ((n.family, n.variant) in PREFIX_SUMS | CAUSAL_GROUPS and
                                                    graph.options.get("causal")) for n in graph.calls())


# The landmark forms (Nyströmformer, Skyformer, SOFT): the export, whose sequence axis is symbolic, runs the landmark
# form at every n (with exact attention for short sequences picked by a select); torch runs plain exact attention
# at n <= landmarks, which is what `evodsl cost` declares there: fewer FLOPs than the export's (above landmarks,
# equal).
LANDMARKS = {("mha", "nystrom"), ("mha", "skyformer"), ("mha", "soft")}


def export_runs_landmarks_below(graph, n: int) -> bool:
    return any((c.family, c.variant) in LANDMARKS and n <= c.params.landmarks for c in graph.calls())


@dataclass
class Exported:
    path: Path
    graph: object
    result: object
    session: ort.InferenceSession


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[str, Exported | evodsl.EvoError] = {}

    def get(case: Case) -> Exported:
        if case.id not in cache:
            path = tmp_path_factory.mktemp("onnx") / "model.onnx"
            try:
                result = evodsl.export(case.source, path, overrides=case.overrides)
            except evodsl.EvoError as err:  # kept: the case's other tests fail with it, without exporting again
                cache[case.id] = err
            else:
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                cache[case.id] = Exported(path, case.graph(), result, session)
        if isinstance(cache[case.id], evodsl.EvoError):
            pytest.fail(f"export failed:\n{cache[case.id].render()}", pytrace=False)
        return cache[case.id]

    return get


def inputs(graph, b: int, n: int, seed: int, m: int | None = None) -> list[torch.Tensor]:
    """The model's token (or feature) inputs: [x], or [source of n, target of m] for an encoder-decoder."""
    xs = [example_input(graph, b, n, seed)]
    if len(graph.inputs) > 1:
        xs.append(example_input(graph, b, m or max(2, n - 3), seed + 1, graph.inputs[1]))
    return xs


def run(session, xs, masks: dict | None = None) -> np.ndarray:
    """The session on the inputs `xs` (a tensor, or a list as `inputs` makes); the masks it takes from `masks`
    (all ones where not given), token_type_ids 0."""
    xs = list(xs) if isinstance(xs, (list, tuple)) else [xs]
    masks = masks or {}
    feed, data = {}, iter(xs)
    for inp in session.get_inputs():
        if inp.name.endswith("attention_mask"):
            like = xs[1] if inp.name.startswith("decoder") else xs[0]
            mask = masks.get(inp.name)
            feed[inp.name] = (torch.ones(like.shape[:2], dtype=torch.long) if mask is None else mask).numpy()
        elif inp.name == "token_type_ids":
            feed[inp.name] = np.zeros(xs[0].shape[:2], dtype=np.int64)
        else:
            feed[inp.name] = next(data).numpy()
    return session.run(None, feed)[0]


@pytest.mark.parametrize("case", PADDING_PARAMS)
def test_padding_in_onnxruntime(case, exported):
    """Every exported model whose ops honour padding takes attention_mask (and an encoder-decoder
    decoder_attention_mask): a right-padded batch gives, at every real position, what each sequence gives alone,
    in onnxruntime; a model with fnet takes none."""
    ex = exported(case)
    names = [i.name for i in ex.session.get_inputs()]
    takes = all(c.op.padding for c in ex.graph.calls())
    assert ("attention_mask" in names) == takes, names
    if not takes:
        return
    two = len(ex.graph.inputs) > 1
    assert ("decoder_attention_mask" in names) == two, names
    out = ex.graph.output.meta["shape"]
    if len(out) == 3 and isinstance(out[1], int):  # the last positions only (Perceiver AR): no run alone to
        # compare with (test_padding.py says why); left-padded, the padded tokens change no output
        n = 20
        x = inputs(ex.graph, 3, n, seed=4)[0]
        mask = (torch.arange(n)[None, :] >= torch.tensor([[0], [7], [12]])).long()
        other = x.clone()
        other[mask == 0] = (other[mask == 0] + 1) % ex.graph.input.params.vocab
        y, y2 = run(ex.session, x, {"attention_mask": mask}), run(ex.session, other, {"attention_mask": mask})
        assert np.abs(y - y2).max() <= TOL * np.abs(y).max()
        assert np.abs(run(ex.session, x) - run(ex.session, other)).max() > 1e-3 * np.abs(y).max()  # the control
        return
    n, lengths = 20, [20, 13, 5]
    m, target_lengths = 11, [6, 11, 3]
    xs = inputs(ex.graph, len(lengths), n, seed=4, m=m)
    masks = {"attention_mask": (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long(),
             "decoder_attention_mask": (torch.arange(m)[None, :] < torch.tensor(target_lengths)[:, None]).long()}
    y = run(ex.session, xs, masks)
    assert np.isfinite(y).all(), "padded positions must stay finite: a next layer reads them as keys (0 * nan)"
    if not all(c.op.pad_alone for c in ex.graph.calls()):  # a layout that follows the padded length (BigBird):
        other = xs[0].clone()  # not the sequence alone, but the padded tokens change no real output
        pad = masks["attention_mask"] == 0
        # features: a change a LayerNorm cannot undo (x + 1 it would: the chains start with a norm)
        other[pad] = (other[pad] + torch.linspace(-1, 1, other.shape[-1]) if other.is_floating_point()
                      else (other[pad] + 1) % ex.graph.input.params.vocab)
        y2 = run(ex.session, [other, *xs[1:]], masks)
        real = y if y.ndim == 2 else y[masks["attention_mask"].bool().numpy()]
        real2 = y2 if y2.ndim == 2 else y2[masks["attention_mask"].bool().numpy()]
        assert np.abs(real - real2).max() <= TOL * np.abs(real).max()
        assert np.abs(run(ex.session, [other, *xs[1:]]) - run(ex.session, xs)).max() > 1e-3 * np.abs(y).max()
        return
    for i, L in enumerate(lengths):
        alone = run(ex.session, [xs[0][i:i + 1, :L], *([xs[1][i:i + 1, :target_lengths[i]]] if two else [])])[0]
        keep = target_lengths[i] if two else L
        got = y[i] if y.ndim == 2 else y[i, :keep]
        scale = float(np.abs(alone).max())
        assert np.abs(got - alone).max() <= TOL * scale, f"sequence {i} (length {L})"


def test_every_registered_op_is_exported():
    """Every registered op (inputs aside) appears in the graph of some case, so some test exports it."""
    load_all()
    seen = set()
    for case in CASES:
        ops = {(n.family, n.variant) for n in case.graph().calls()}
        assert set(case.ops) <= ops, case.id
        seen |= ops
    missing = {op for op in REGISTRY if op[0] != "input"} - seen
    assert not missing, f"ops no ONNX case exports: {sorted(missing)}"


@pytest.mark.parametrize("case", PARAMS)
def test_onnxruntime_matches_torch(case, exported):
    """One file, dynamic axes: onnxruntime equals evodsl.compile (same default seed) at 2 batch sizes x 3 lengths
    (3 pairs of source and target lengths for an encoder-decoder)."""
    ex = exported(case)
    assert ex.result.max_abs_diff <= TOL * ex.result.output_scale  # export()'s own check
    ins = ex.session.get_inputs()
    assert (ins[0].name, ex.session.get_outputs()[0].name) == io_names(ex.graph)
    for inp in ins:
        assert all(isinstance(dim, str) for dim in inp.shape[:2]), f"batch and lengths must be dynamic: {inp}"
    if len(ex.graph.inputs) > 1:
        assert ins[1].name == "decoder_input_ids" and ins[1].shape[1] != ins[0].shape[1], "two length axes"
    model = evodsl.compile(case.source, overrides=case.overrides)  # the weights export() used by default
    for b in BATCHES:
        for n, m in zip(SEQS, TARGET_SEQS):
            xs = inputs(ex.graph, b, n, seed=10 * b + n, m=m)
            with torch.no_grad():
                want = model(*xs).numpy()
            got = run(ex.session, xs)
            assert got.shape == want.shape
            scale = float(np.abs(want).max())
            diff = float(np.abs(got - want).max())
            assert diff <= TOL * scale, f"batch {b}, seq {n}: max |ORT - torch| {diff:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("case", PARAMS)
def test_causality_in_onnxruntime(case, exported):
    """Causal models: changing tokens t+1.. (the target's, in an encoder-decoder) never changes outputs 0..t, in
    one batched onnxruntime run of all the perturbed copies. Bidirectional ones: the same check finds the leak
    (so it can fail). An encoder-decoder's output does change with its source (the negative control)."""
    ex = exported(case)
    n = 12
    g = torch.Generator().manual_seed(3)
    xs = inputs(ex.graph, 1, n, seed=5, m=n)
    k = output_input(ex.graph)
    x = xs[k]
    copies = [x[0]]
    for t in range(n - 1):  # copy t + 1 differs from x at positions t+1 .. only
        c = x[0].clone()
        if c.dtype == torch.long:
            vocab = ex.graph.inputs[k].params.vocab
            c[t + 1:] = (c[t + 1:] + torch.randint(1, vocab, (n - t - 1,), generator=g)) % vocab
        else:
            c[t + 1:] = torch.randn(c[t + 1:].shape, generator=g) * 3
        copies.append(c)
    batch = [t.expand(n, *t.shape[1:]) for t in xs]
    batch[k] = torch.stack(copies)
    y = run(ex.session, batch)
    if y.ndim == 2:  # pooled: the first token's state, i.e. the output at position 0
        y = y[:, None]
    scale = float(np.abs(y).max())
    shape = ex.graph.output.meta["shape"]
    window = len(shape) == 3 and isinstance(shape[1], int)  # the last positions only: j is position j + offset
    offset = n - y.shape[1] if window else 0
    leaks = [float(np.abs(y[t + 1, : t + 1 - offset] - y[0, : t + 1 - offset]).max())
             for t in range(offset, min(n - 1, y.shape[1] + offset))]
    if output_causal(ex.graph):
        assert max(leaks) <= 1e-5 * scale, f"positions <= t changed with tokens > t: {leaks}"
    else:
        assert max(leaks) > 1e-3 * scale, "a bidirectional model must show the leak the check looks for"
    if len(xs) > 1:  # the source is read: a source whose tokens all differ changes the target's first output
        vocab = ex.graph.inputs[0].params.vocab
        src = (xs[0] + torch.randint(1, vocab, xs[0].shape, generator=g)) % vocab
        other = run(ex.session, [src, xs[1]])
        assert float(np.abs(other[0, 0] - y[0, 0]).max()) > 1e-3 * scale


@pytest.mark.parametrize("case", PARAMS)
def test_matmul_flops_match_cost(case, exported):
    """MatMul / Gemm FLOPs read off the ONNX graph (shape inference at b, n (, m)) against evodsl.cost's
    forward_matmul."""
    ex = exported(case)
    b, n, m = 2, 37, 23
    flops, unknown = matmul_flops(ex.path, b, n, decoder_seq=m)
    assert unknown == 0
    if export_form_differs(ex.graph):
        # the gather / prefix-sum forms (see BANDED): the gather reads lo + hi + 1 keys per query whatever n,
        # more than torch's one causal call when the band is wider than the sequence (adaptive span's 8192)
        assert flops > 0
        return
    declared = evodsl.cost(case.source, seq=n, batch=b, overrides=case.overrides,
                           decoder_seq=m if len(ex.graph.inputs) > 1 else None)["flops"]["forward_matmul"]
    if any(n.op.id == "memory(xl)" for n in ex.graph.calls()):  # the export is a first segment: no memory yet
        source = case.source.read_text() if isinstance(case.source, Path) else case.source
        first = re.sub(r"->\s*memory\(xl[^)]*\)", "", source)  # the same model with no memory to read
        assert first != source
        declared = evodsl.cost(first, seq=n, batch=b, overrides=case.overrides)["flops"]["forward_matmul"]
    if export_runs_landmarks_below(ex.graph, n):
        assert flops > declared
    else:
        assert flops == pytest.approx(declared, rel=0.01)
