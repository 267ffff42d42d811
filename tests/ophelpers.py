"""Helpers for op tests: build one registered op's module standalone, and the causal leak check."""
from __future__ import annotations

import pytest
import torch

from evodsl.decode import DecodeState
from evodsl.ops import Ctx, OpEnv, load_all, lookup
from evodsl.ops.position._inattention import InAttentionStream


# mha variants with a causal form only (their shape rule refuses a bidirectional model): the harnesses that run
# each variant causal and bidirectional run these causal alone
CAUSAL_ONLY = ("forgetting", "moba", "exp_smoothing")
# mha variants that choose discretely (hash buckets, top-k keys or blocks, clusters, sorts): a float32 difference in
# their input (another device, another runtime) can flip a choice, so the parity checks give them inputs no other
# op has rounded first
DISCRETE = ("lsh", "yoso", "smart_bird", "moba", "nsa", "colt5", "routing", "clustered", "topk", "probsparse",
            "smyrf", "scatterbrain")  # smyrf, scatterbrain: the sort of the E2LSH projections
CAUSAL_ONLY += ("retention", "gla", "deltanet", "gated_deltanet")  # the chunked linear recurrences (_linear_recurrent.py)
CAUSAL_ONLY += ("based", "fwp", "lightning", "hedgehog",)  # feature-map linear attention in chunks, a state carried forward (issue 14)
CAUSAL_ONLY += ("gsa",)  # Gated Slot Attention: two chunked GLA passes over the slots


def make_op(family: str, variant: str, d: int = 32, causal: bool = False, pos=None, seed: int = 0,
            dtype=torch.float64, residual_scores: bool = False, vocab=None, in_shapes=None, in_causal=(),
            mem_len: int | None = None, in_grad: bool = True, **kwargs):
    """Build op `family(variant, **kwargs)` for a [b, n, d] stream. `pos` = ("rope", {...}) or ("alibi", {})
    attaches that in-attention position scheme. Returns (module, params, env) in `dtype`, eval mode."""
    load_all()
    op = lookup(family, variant)
    assert op is not None, f"{family}({variant}) is not registered"
    params = op.params(**kwargs)
    pos_pair = None
    if pos is not None:
        pos_op = lookup("pos", pos[0])
        pos_pair = (pos_op, pos_op.params(**pos[1]))
    memory = None
    if mem_len is not None:  # memory(xl, mem_len=M) reaches it
        memory = (lookup("memory", "xl"), lookup("memory", "xl").params(mem_len=mem_len))
    env = OpEnv(in_shapes=in_shapes or (("b", "n", d),), causal=causal, pos=pos_pair, vocab=vocab,
                residual_scores=residual_scores, in_causal=tuple(in_causal), memory=memory, in_grad=in_grad)
    op.shape(params, env)  # the shape rule must accept what the test builds
    torch.manual_seed(seed)
    module = op.module(params, env).to(dtype).eval()
    if pos_pair is not None and pos_pair[0].module is not InAttentionStream:  # a scheme with state upstream
        bind_upstream(module, pos_pair[0].module(pos_pair[1], env).to(dtype).eval())
    return module, params, env


def bind_upstream(module: torch.nn.Module, source: torch.nn.Module) -> None:
    """Run `source` (a pos op's stream module, T5's table) before each forward of `module`, as the pos node
    upstream would in a model, so that it hands its state over through the Ctx. It stays outside the module's
    parameters (a model counts it once, on the pos node); module.pos_source is it."""
    module.__dict__["pos_source"] = source

    def before(mod, args):
        x, ctx = args[0], (args[1] if len(args) > 1 and args[1] is not None else Ctx())
        source(x, ctx)
        return (x, ctx, *args[2:])

    module.register_forward_pre_hook(before)


def perturb_params(module: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    """Give every parameter random values, so a test does not pass because of zero/one initialisation."""
    g = torch.Generator().manual_seed(seed)
    upstream = module.__dict__.get("pos_source")  # a position scheme's state bound from upstream (make_op)
    with torch.no_grad():
        for p in [*module.parameters(), *(upstream.parameters() if upstream is not None else ())]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def decode_in_pieces(module: torch.nn.Module, x: torch.Tensor, sizes) -> tuple[torch.Tensor, DecodeState]:
    """`module` run on x in consecutive pieces of `sizes` tokens through one decoding cache, as a decoder feeds
    it (each piece at its offset): (the outputs concatenated along n, the cache)."""
    state, pieces, at = DecodeState(), [], 0
    for k in sizes:
        pieces.append(module(x[:, at:at + k], Ctx(cache=state, offset=at)))
        at += k
    assert at == x.shape[1], f"the pieces {sizes} cover {at} of {x.shape[1]} tokens"
    return torch.cat(pieces, 1), state


def onnx_parity(path, graph, model, lengths=(7, 33, 70), batch: int = 2) -> float:
    """The ONNX file at `path` (exported once, a symbolic n) run by onnxruntime against `model` at each length:
    the worst max |onnxruntime - torch| over the output's scale."""
    import numpy as np
    import onnxruntime as ort

    from evodsl.backends.lower_onnx import example_input

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in lengths:
        x = example_input(graph, batch, n, seed=n)
        feed = {i.name: (x.numpy() if "mask" not in i.name else np.ones((batch, n), dtype=np.int64))
                for i in session.get_inputs()}
        with torch.no_grad():
            want = model(x).numpy()
        worst = max(worst, float(np.abs(session.run(None, feed)[0] - want).max() / np.abs(want).max()))
    return worst


def assert_no_leak(fn, b: int = 2, n: int = 24, d: int = 32, dtype=torch.float64, atol: float = 1e-10) -> None:
    """Leak test: for every t, changing tokens t+1.. never changes outputs at positions 0..t, and does change
    the output at t+1 (the negative control: an op that ignores its input would pass the first half alone).
    tests/ops/test_leaks.py shows that it fails on ops that leak, by one position or across one block."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, n, d, generator=g, dtype=dtype)
    y = fn(x)
    for t in range(n - 1):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(b, n - t - 1, d, generator=g, dtype=dtype) * 3
        y2 = fn(x2)
        diff = (y2[:, : t + 1] - y[:, : t + 1]).abs().max().item()
        assert diff <= atol, f"output at positions <= {t} changed by {diff} when tokens > {t} changed"
        reached = (y2[:, t + 1] - y[:, t + 1]).abs().max().item()
        assert reached > 1e3 * atol, f"changing tokens > {t} left position {t + 1} unchanged: the test proves nothing"


def head_projections(m, x: torch.Tensor):
    """q [b, n, heads, dh], k and v [b, n, kv_heads, dh] from an attention module's weights alone (for float64
    references written from an equation, not through the module's own qkv)."""
    b, n, _ = x.shape

    def proj(layer, heads):  # a head's width from the layer's (values may be wider than queries: v_factor)
        return (x @ layer.weight.T + (0 if layer.bias is None else layer.bias)).view(b, n, heads, layer.weight.shape[0] // heads)

    return proj(m.q_proj, m.heads), proj(m.k_proj, m.kv_heads), proj(m.v_proj, m.kv_heads)


def output_projection(m, o: torch.Tensor) -> torch.Tensor:
    """o_proj applied from its weights: o [b, n, heads * dh] -> [b, n, d]."""
    return o @ m.o_proj.weight.T + (0 if m.o_proj.bias is None else m.o_proj.bias)



def refuses(variant: str, cases: dict, causal: bool = False, ok: str | None = None, heads: int = 4) -> None:
    """One-layer specs `mha(variant, heads=4, ARGS)` on features of width 32: `ok` (if given) parses, and each
    ARGS in `cases` is refused with an EvoError matching its pattern (the diagnostics' words, not a traceback)."""
    import evodsl

    def build(args: str) -> None:
        evodsl.parse(f"model m(causal={str(causal).lower()}) = input(features, d=32) "
                     f"-> mha({variant}, heads={heads}, {args}) -> head(linear, d_out=2)")

    if ok is not None:
        build(ok)
    for args, pattern in cases.items():
        with pytest.raises(evodsl.EvoError, match=pattern):
            build(args)


def spec_onnx_parity(src: str, tmp_path, lengths=(7, 33, 70), batches=(1, 3), pad: int = 3, tol: float = 1e-4) -> float:
    """Export spec `src` (features of width 32) once, with a symbolic n, and run the file in onnxruntime against
    the torch model at every (batch, length), the last row right-padded by `pad` tokens (0: no padding) where the
    file takes an attention_mask. Asserts max |ORT - torch| over the real tokens <= tol * the output's scale;
    returns the worst ratio."""
    import numpy as np
    import onnxruntime as ort

    import evodsl

    evodsl.export(src, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    model = evodsl.compile(src)
    names = [i.name for i in session.get_inputs()]
    masked = "attention_mask" in names
    worst = 0.0
    for b in batches:
        for n in lengths:
            x = torch.randn(b, n, 32, generator=torch.Generator().manual_seed(n))
            mask = torch.ones(b, n, dtype=torch.long)
            if pad:
                mask[-1, n - pad:] = 0  # a right-padded row
            with torch.no_grad():
                want = (model(x, attention_mask=mask) if masked else model(x)).numpy()
            got = session.run(None, {names[0]: x.numpy(), **({"attention_mask": mask.numpy()} if masked else {})})[0]
            real = mask.numpy().astype(bool) if masked else np.ones((b, n), dtype=bool)
            diff, scale = float(np.abs(got - want)[real].max()), float(np.abs(want).max())
            assert diff <= tol * scale, (b, n, diff, scale)
            worst = max(worst, diff / scale)
    return worst


def exported_parity(src: str, tmp_path, change=None, lengths=(7, 33, 70)) -> float:
    """Compile spec `src`, let `change(model)` move its weights off their init (under no_grad), save them, export
    the spec with those weights once (a symbolic n) and return onnx_parity's worst error at `lengths`."""
    import evodsl

    graph, model = evodsl.parse(src), evodsl.compile(src)
    if change is not None:
        with torch.no_grad():
            change(model)
    evodsl.save(model, tmp_path / "m.pt")
    evodsl.export(src, tmp_path / "m.onnx", weights=tmp_path / "m.pt")
    return onnx_parity(tmp_path / "m.onnx", graph, model, lengths)


def add_noise(suffixes: tuple, scale: float = 0.5, seed: int = 3):
    """A `change` for exported_parity: seeded noise on the parameters whose names end with one of `suffixes`."""
    def change(model):
        for name, p in model.named_parameters():
            if name.endswith(suffixes):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * scale)
    return change


def assert_padding_either_side(m, reference, both_rows: bool = False, d: int = 32) -> None:
    """A batch of two 14-token rows, the first left-padded by 4, the second right-padded by 4 (float64): the module
    equals reference(x, mask) at the real tokens, is finite everywhere, and the left-padded row's tokens equal
    that row alone (both_rows: the right-padded row's too)."""
    x = torch.randn(2, 14, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, :4], mask[1, 10:] = False, False  # left, right
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        assert torch.isfinite(y).all()
        ref = reference(x, mask)
        assert ((y - ref) * mask[..., None]).abs().max().item() < 1e-10 * ref.abs().max().item()
        for row, cut in ((0, slice(4, 14)), (1, slice(0, 10)))[:2 if both_rows else 1]:
            alone = m(x[row:row + 1, cut], Ctx())
            assert (y[row:row + 1, cut] - alone).abs().max().item() < 1e-10 * alone.abs().max().item()


def assert_every_parameter_learns(m, b: int = 2, n: int = 40, d: int = 32) -> None:
    """Training (float64): one backward of the squared output reaches every parameter with a nonzero gradient, and
    the input's gradient is finite."""
    m.train()
    x = torch.randn(b, n, d, dtype=torch.float64, requires_grad=True)
    m(x, Ctx()).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def assert_padded_row_alone(m, side: str, d: int = 32) -> None:
    """A causal sequence op (float64): the second of two 11-token rows padded by 5 on `side` ("right" or "left")
    gives, at its 6 real tokens, what those tokens give alone (padding enters no state)."""
    x = torch.randn(2, 11, d, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 6:] = False
    if side == "left":
        mask = mask.flip(1)
    real = slice(0, 6) if side == "right" else slice(5, 11)
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        alone = m(x[1:, real], Ctx())[0]
    assert (y[1, real] - alone).abs().max().item() < 1e-10 * max(alone.abs().max().item(), 1.0)


def assert_matches_in_float32_and_float64(m, x: torch.Tensor, reference, dtype, ctx=None, tol32: float = 1e-4) -> None:
    """m in `dtype` on x against reference(m in float64, x) (the equation, float64): within 1e-10 of the
    reference's scale in float64, tol32 in float32 (a kernel that overflows in either fails)."""
    with torch.no_grad():
        want = reference(m.double(), x)
        got = m.to(dtype)(x.to(dtype), ctx).double()
    tol = 1e-10 if dtype == torch.float64 else tol32
    assert torch.isfinite(got).all() and (got - want).abs().max() <= tol * want.abs().max(), \
        f"{dtype}: {((got - want).abs().max() / want.abs().max()).item():.2e} of the reference's scale"


def assert_steps_and_pieces_agree(m, x: torch.Tensor, y: torch.Tensor, scale=1.0) -> None:
    """A causal layer decoded through one cache, a token at a time and in pieces (a prompt, one token, the rest),
    gives y, its forward on x (float64): within 1e-10 * scale."""
    n = x.shape[1]
    steps, _ = decode_in_pieces(m, x, [1] * n)
    pieces, _ = decode_in_pieces(m, x, [s for s in (n // 2, 1, n - n // 2 - 1) if s])
    assert (steps - y).abs().max() < 1e-10 * scale and (pieces - y).abs().max() < 1e-10 * scale


def assert_decodes_with_constant_state(m, family: str, variant: str, d: int, build: dict) -> list[int]:
    """A causal sequence layer in float64: pieces of several sizes through one decoding cache give the forward
    (1e-10 of its scale), and after 1, 4 and 30 tokens the state's bytes equal the cost's kv_cache (b = 2), the
    same at every length. Returns those byte counts, for a test to hold to its own formula."""
    from costhelpers import declared

    x = torch.randn(2, 30, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30, (30,)):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        nbytes = []
        for t in (1, 4, 30):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared(family, variant, 2, t, dtype=torch.float64, d=d, causal=True, **build)
            assert state.nbytes() == ev(cost.cache)
            nbytes.append(state.nbytes())
    assert len(set(nbytes)) == 1, f"the state grows with the length: {nbytes}"
    return nbytes
