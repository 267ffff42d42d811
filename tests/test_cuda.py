"""The torch backend on a CUDA device (every test here is skipped where torch sees none; CI has none, so these run
on a lent GPU machine: README "Tests on a GPU").

- Every spec, every attention variant (causal and bidirectional, the growth harness's arguments), every ssm, rnn
  and longconv layer, and every decoding case of test_decode.py, moved to CUDA in float64: the forward and the input and weight gradients
  equal the CPU's within 1e-9 of their scale. float64 takes the exact paths; this is what catches a tensor made
  on the CPU inside a forward, a mask of the wrong dtype for the device, or a kernel that only runs on one.
- The same variants in float32 (TF32 off), where SDPA dispatches to CUDA's flash and memory-efficient kernels:
  within 1e-3 of the CPU's float32 results' scale (slim's chunked sums over 512 tokens differ by 2.4e-4); and
  under bfloat16 autocast, forward and backward finite and within 7.5e-2 of float32 (bfloat16 keeps 8 bits, 4e-3
  a rounding; linformer's projection sums 512 positions: 5e-2), except where the scores make discrete choices
  (hash buckets, sampled keys, top-k blocks), which rounding changes: those are held to float64 alone. Weight gradients are compared at the largest one's scale.
- Decoding on CUDA: prefill and random chunks give the forward's logits (float64, 1e-10), greedy generation
  equals the forward's argmax, and `compile(device="cuda")` builds every spec with every tensor on the device.
"""
from __future__ import annotations

import copy

import pytest
import torch

import evodsl
from evodsl.ops import REGISTRY, Ctx
from ophelpers import CAUSAL_ONLY, DISCRETE, make_op, perturb_params
from ops.test_growth import ARGS, HEADS, SEQ_ARGS
from spechelpers import SPECS, min_length, model_inputs, small
from test_decode import ATTENTION as DECODE_TEMPLATE, CASES as DECODE_CASES, DECODABLE, _check_decode_equals_forward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = "cuda"
N, D = 512, 64  # several of every variant's blocks, chunks and bands (blocks of 64 .. 256 in ARGS)


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 on CUDA as on the CPU: no TF32 matmuls or convolutions (10 bits of mantissa)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the scale of b."""
    return ((a.detach().cpu().double() - b.detach().cpu().double()).abs().max()
            / b.detach().double().abs().max().clamp_min(1e-30)).item()


def _grads(module) -> dict:
    return {k: p.grad for k, p in module.named_parameters() if p.grad is not None}


def _compare(cpu_mod, gpu_mod, call, x, tol: float, what: str) -> None:
    """Forward and backward on both devices from the same weights and input: output, input grad and every
    weight grad within `tol` of their scale."""
    xc = x.clone().requires_grad_(x.is_floating_point())
    xg = x.to(CUDA).requires_grad_(x.is_floating_point())
    yc, yg = call(cpu_mod, xc), call(gpu_mod, xg)
    assert yg.device.type == "cuda"
    assert _rel(yg, yc) <= tol, f"{what}: output differs on CUDA by {_rel(yg, yc):.2e} of its scale"
    w = torch.randn(yc.shape, generator=torch.Generator().manual_seed(3), dtype=yc.dtype)
    (yc * w).sum().backward()
    (yg * w.to(CUDA)).sum().backward()
    if x.is_floating_point():
        assert _rel(xg.grad, xc.grad) <= tol, f"{what}: input gradient differs by {_rel(xg.grad, xc.grad):.2e}"
    gc, gg = _grads(cpu_mod), _grads(gpu_mod)
    assert gc.keys() == gg.keys()
    # against the largest weight gradient: some are zero but for rounding (a key bias under softmax, which adds
    # one constant to a query's scores), and their rounding differs between devices
    scale = max(g.abs().max().item() for g in gc.values())
    for k in gc:
        err = (gg[k].cpu() - gc[k]).abs().max().item() / scale
        assert err <= tol, f"{what}: grad of {k} differs by {err:.2e} of the largest weight gradient"


VARIANTS = [(v, c) for v in sorted(ARGS) for c in (True, False)
            if not (c and REGISTRY["mha", v].causal == "no") and not (not c and v in CAUSAL_ONLY)]
# discrete choices from the scores: hash buckets from the signs or argmax of projections, smart_bird's sampled keys,
# the top-k blocks of MoBA and NSA, CoLT5's top-k routed tokens, the clusters of routing and clustered (float64 is exact enough for both devices to choose
# alike, float32 is not)
# routing: argmax over centroids; clustered: hyperplane signs; topk: each query's k keys; probsparse: its u queries
# the forget gates' cumulative log-sigmoids over 512 tokens, folded into the scores: their bias's float32 gradient
# differs by 2.3e-3 between the devices (float64: within 1e-9)
FLOAT32_TOL = {"forgetting": 5e-3}
VARIANT_IDS = [f"{v}-{'causal' if c else 'bidir'}" for v, c in VARIANTS]


def _variant(variant: str, causal: bool, dtype):
    """The variant in eval mode (make_op's): deterministic, so that both devices compute one function."""
    module, _, _ = make_op("mha", variant, d=D, causal=causal, dtype=dtype, heads=HEADS, **ARGS[variant])
    perturb_params(module, scale=0.2)
    return module


def _x(dtype) -> torch.Tensor:
    return torch.randn(2, N, D, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("variant,causal", VARIANTS, ids=VARIANT_IDS)
def test_attention_float64_equals_cpu(variant, causal):
    cpu = _variant(variant, causal, torch.float64)
    gpu = copy.deepcopy(cpu).to(CUDA)
    _compare(cpu, gpu, lambda m, x: m(x, Ctx()), _x(torch.float64), 1e-9, f"mha({variant})")


@pytest.mark.parametrize("key", sorted(SEQ_ARGS))
def test_sequence_layer_float64_equals_cpu(key):
    """The ssm, rnn and longconv layers (the growth harness's arguments): scans, chunk loops and FFT convolutions."""
    family, variant, causal, args = SEQ_ARGS[key]
    cpu, _, _ = make_op(family, variant, d=D, causal=causal, dtype=torch.float64, **args)
    perturb_params(cpu, scale=0.2)
    gpu = copy.deepcopy(cpu).to(CUDA)
    _compare(cpu, gpu, lambda m, x: m(x, Ctx()), _x(torch.float64), 1e-9, f"{family}({variant})")


@pytest.mark.parametrize("variant,causal", VARIANTS, ids=VARIANT_IDS)
def test_attention_fast_kernels(variant, causal):
    """float32 through CUDA's kernels against the CPU; bfloat16 autocast against float32. A view of an SDPA output
    that holds on the CPU fails here: CUDA's kernels return other strides (found by this test in _banded.py,
    bigbird, tglobal, long_short and others)."""
    cpu = _variant(variant, causal, torch.float32)
    gpu = copy.deepcopy(cpu).to(CUDA)
    if variant in DISCRETE:  # float32's rounding differs between devices, and may flip a choice: finite alone
        y = gpu(_x(torch.float32).to(CUDA), Ctx())
        y.square().mean().backward()
        assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in gpu.parameters()
                                               if p.grad is not None)
        gpu.zero_grad()
    else:
        _compare(cpu, gpu, lambda m, x: m(x, Ctx()), _x(torch.float32), FLOAT32_TOL.get(variant, 1e-3),
                 f"mha({variant}) float32")
    x = _x(torch.float32).to(CUDA)
    with torch.no_grad():
        ref = gpu(x, Ctx())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = gpu(x.requires_grad_(), Ctx())
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)
    if variant in DISCRETE:  # bfloat16's rounding moves vectors across those boundaries: another function
        return
    assert _rel(y.float(), ref) <= 7.5e-2, f"mha({variant}) bfloat16 autocast: {_rel(y.float(), ref):.2e} from float32"


SPEC_IDS = [p.stem for p in SPECS]


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_spec_float64_equals_cpu(spec):
    over = small(spec)
    graph = evodsl.parse(spec, over)
    cpu = evodsl.compile(spec, overrides=over, dtype=torch.float64)  # eval mode: no dropout masks to draw
    gpu = copy.deepcopy(cpu).to(CUDA)
    n = max(40, min_length(graph))
    xs = model_inputs(graph, 2, n, n - 5, generator=torch.Generator().manual_seed(0))
    if len(xs) == 1:
        _compare(cpu, gpu, lambda m, x: m(x), xs[0], 1e-9, spec.stem)
    else:  # an encoder-decoder: the source with the target
        _compare(cpu, gpu, lambda m, x: m(x, xs[1].to(x.device)), xs[0], 1e-9, spec.stem)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_compile_on_cuda(spec):
    """compile(device="cuda") puts every parameter and buffer on the device, and the model runs there."""
    over = small(spec)
    graph = evodsl.parse(spec, over)
    model = evodsl.compile(spec, overrides=over, device=CUDA)
    assert all(t.device.type == "cuda" for t in (*model.parameters(), *model.buffers()))
    n = max(40, min_length(graph))
    with torch.no_grad():
        y = model(*model_inputs(graph, 2, n, n - 5, device=CUDA))
    assert y.device.type == "cuda" and torch.isfinite(y).all()


DECODE_IDS = [p.stem for p in DECODABLE]


@pytest.mark.parametrize("spec", DECODABLE, ids=DECODE_IDS)
def test_spec_decodes_on_cuda(spec):
    over = small(spec)
    model = evodsl.compile(spec, overrides=over, dtype=torch.float64).to(CUDA)
    vocab = evodsl.parse(spec, over).input.params.vocab
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 37), generator=g).to(CUDA)
    state = _check_decode_equals_forward(model, ids, g)
    assert state.nbytes() == 2 * evodsl.cost(spec, seq=37, batch=2, overrides=over)["memory"]["kv_cache"]
    out = model.generate(ids[:, :5], max_new_tokens=6)
    greedy = ids[:, :5]
    with torch.no_grad():
        for _ in range(6):
            greedy = torch.cat([greedy, model(greedy)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.device.type == "cuda" and torch.equal(out, greedy)


@pytest.mark.parametrize("pos,block", DECODE_CASES)
def test_attention_decodes_on_cuda(pos, block):
    model = evodsl.compile(DECODE_TEMPLATE.format(pos=pos, block=block), dtype=torch.float64).to(CUDA)
    g = torch.Generator().manual_seed(1)
    _check_decode_equals_forward(model, torch.randint(0, 53, (2, 29), generator=g).to(CUDA), g)



# the head modifiers (tests/ops/test_talking_heads.py, test_collab_heads.py): builds outside ARGS (one per variant),
# the same checks: float64 against the CPU, float32 through CUDA's kernels, bfloat16 autocast
HEAD_MODIFIERS = [("softmax", {"talking": True, "kv_heads": 1}), ("local", {"window": 64, "sinks": 2, "talking": True}),
                  ("softmax", {"collab": 40, "kv_heads": 1}), ("softmax", {"collab": 16, "bias": False}),
                  ("softmax", {"talking": 3, "kv_heads": 1}), ("local", {"window": 64, "talking": 4, "sink_logit": True}),
                  ("local", {"window": 64, "collab": 40, "kv_heads": 1})]
# the per-option forms whose growth tests live in their own files (test_growth.py's ARGS keys one form per variant):
# tests/ops/test_clustered.py, test_mgk_linear.py, test_combiner.py
OPTION_FORMS = [("clustered", {**ARGS["clustered"], "topk": 32}), ("mgk", {"form": "linear", "components": 2}),
                ("combiner", {"mode": "logsparse"})]
EXTRA_FORMS = [(v, a, c) for v, a in HEAD_MODIFIERS + OPTION_FORMS for c in (True, False)
               if not (c and REGISTRY["mha", v].causal == "no") and not (not c and v in CAUSAL_ONLY)]


@pytest.mark.parametrize("variant,args,causal", EXTRA_FORMS,
                         ids=[f"{v}-{'-'.join(f'{k}={x}' for k, x in a.items())}-{'causal' if c else 'bidir'}" for v, a, c in EXTRA_FORMS])
def test_head_modifiers_on_cuda(variant, args, causal):
    what = f"mha({variant}, {args})"
    cpu, _, _ = make_op("mha", variant, d=D, causal=causal, dtype=torch.float64, heads=HEADS, **args)
    perturb_params(cpu, scale=0.2)
    _compare(cpu, copy.deepcopy(cpu).to(CUDA), lambda m, x: m(x, Ctx()), _x(torch.float64), 1e-9, what)
    if variant in DISCRETE:  # float32 and bfloat16 may flip a choice (test_attention_fast_kernels): finite alone
        gpu = copy.deepcopy(cpu).float().to(CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = gpu(_x(torch.float32).to(CUDA).requires_grad_(), Ctx())
        y.float().square().mean().backward()
        assert torch.isfinite(y).all()
        return
    cpu32 = copy.deepcopy(cpu).float()
    cpu32.zero_grad()
    gpu = copy.deepcopy(cpu32).to(CUDA)
    _compare(cpu32, gpu, lambda m, x: m(x, Ctx()), _x(torch.float32), 1e-3, f"{what} float32")
    x = _x(torch.float32).to(CUDA)
    with torch.no_grad():
        ref = gpu(x, Ctx())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = gpu(x.requires_grad_(), Ctx())
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert _rel(y.float(), ref) <= 7.5e-2, f"{what} bfloat16 autocast: {_rel(y.float(), ref):.2e} from float32"
