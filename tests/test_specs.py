"""Every spec in specs/ is a tested example: it parses, its graph matches a golden snapshot, it compiles and runs
a forward pass, causal specs never leak the future, and `evodsl compile` prints its parameter count.

Specs are found by glob, so a new specs/*.evo is covered without touching this file (add its snapshot with
EVODSL_UPDATE_GOLDEN=1). Specs up to REAL_WEIGHTS_MAX parameters run with real weights; bigger ones (LLaMA-7B)
are built and run on the meta device, which allocates no weights.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
import torch

import evodsl
from evodsl.cli import main as cli_main
from spechelpers import full_spans, min_length, model_inputs, output_causal, output_input, small

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.evo"))
GOLDEN = Path(__file__).parent / "golden" / "graphs"
UPDATE = os.environ.get("EVODSL_UPDATE_GOLDEN") == "1"
REAL_WEIGHTS_MAX = 200_000_000  # GPT-2 small and BERT-base run with real weights; LLaMA-7B on meta
BATCH, SEQ = 2, 12

specs = pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])


def count(model: torch.nn.Module) -> int:
    """Parameters of a model; a tied weight counts once (nn.Module.parameters() yields it once)."""
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def meta_model(spec: Path):
    return evodsl.compile(spec, device="meta")


def concrete(shape, b: int, n: int, m: int | None = None) -> tuple:
    """A symbolic output shape ([b, n, 512]) with the batch and sequence symbols filled in."""
    return tuple({"b": b, "n": n, "m": m}.get(s, s) if isinstance(s, str) else s for s in shape)


def test_specs_exist():
    names = {p.stem for p in SPECS}
    assert {"gpt2", "vanilla", "bert", "llama", "adaptive_span", "linear_transformer", "fnet"} <= names


@specs
def test_parses(spec):
    graph = evodsl.parse(spec)
    graph.lint()
    first = spec.read_text(encoding="utf-8").lstrip().splitlines()[0]
    assert first.startswith("#"), f"{spec.name} opens with a comment naming its paper"


@specs
def test_graph_matches_golden(spec):
    text = str(evodsl.parse(spec)) + "\n"
    golden = GOLDEN / f"{spec.stem}.txt"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), f"no snapshot {golden.relative_to(ROOT)}: run with EVODSL_UPDATE_GOLDEN=1"
    assert text == golden.read_text(encoding="utf-8"), (
        f"str(graph) of {spec.name} changed; if intended, regenerate with EVODSL_UPDATE_GOLDEN=1")


@specs
def test_cli_prints_parameter_count(spec, capsys):
    assert cli_main(["compile", "--meta", str(spec)]) == 0
    out = capsys.readouterr().out
    printed = re.search(r"^parameters: ([\d,]+) ", out, flags=re.M)
    assert printed, out
    assert int(printed.group(1).replace(",", "")) == count(meta_model(spec))


@pytest.fixture(scope="module", params=SPECS, ids=[p.stem for p in SPECS])
def built(request):
    """(spec, graph, model, on_meta): real weights for specs up to REAL_WEIGHTS_MAX, else the meta device."""
    spec = request.param
    graph = evodsl.parse(spec)
    on_meta = count(meta_model(spec)) > REAL_WEIGHTS_MAX
    model = meta_model(spec) if on_meta else evodsl.compile(spec, seed=0)
    yield spec, graph, model, on_meta
    del model


def test_forward(built):
    spec, graph, model, on_meta = built
    if not on_meta:
        assert count(model) == count(meta_model(spec)), "real and meta builds differ"
    device = "meta" if on_meta else "cpu"
    n = max(SEQ, min_length(graph))
    xs = model_inputs(graph, BATCH, n, n - 5, device, torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(*xs)
    assert tuple(y.shape) == concrete(graph.output.meta["shape"], BATCH, n, n - 5)
    if graph.input.variant == "tokens" and any(n.family == "head" and n.variant == "lm" for n in graph.calls()):
        assert tuple(y.shape) == (BATCH, concrete(graph.output.meta["shape"], BATCH, n, n - 5)[1],
                                  graph.input.params.vocab)
    if on_meta:
        assert y.device.type == "meta"
    else:
        assert torch.isfinite(y).all()


CAUSAL = [p for p in SPECS if output_causal(evodsl.parse(p))]
LEAK_N = 160  # 5 of the banded kernels' 32-query blocks, 3 of linear attention's 64-token chunks, 10 windows of 16


def test_every_causal_spec_is_leak_tested():
    assert {p.stem for p in CAUSAL} >= {"gpt2", "vanilla", "llama", "llama2_70b", "adaptive_span",
                                        "linear_transformer", "transformer", "t5_small", "bart_base",
                                        "perceiver_ar", "memory_transformer"}


@pytest.mark.parametrize("spec", CAUSAL, ids=[p.stem for p in CAUSAL])
def test_causal_specs_never_leak(spec):
    """Changing tokens t+1.. (the target's, in an encoder-decoder) never changes the outputs at 0..t, for every
    t < LEAK_N, at small sizes (every causal spec, 7B and 70B included) in float64; all variants in one batch.
    Adaptive spans are set to their full max_span, so that every band reaches back as far as it can. An output
    shorter than its input is that of its last positions (Perceiver AR: output j is position j + n - m). An
    encoder-decoder's output does change with its source: it is read whole (the negative control)."""
    over = small(spec)
    graph = evodsl.parse(spec, over)
    model = full_spans(evodsl.compile(spec, seed=0, overrides=over, dtype=torch.float64))
    k = output_input(graph)
    assert graph.inputs[k].variant == "tokens", "leak test written for token models"
    vocab, n = graph.inputs[k].params.vocab, LEAK_N
    g = torch.Generator().manual_seed(1)
    xs = [x.expand(n, -1) for x in model_inputs(graph, 1, n, generator=g)]
    base = xs[k][0]
    rows = [base]
    for t in range(n - 1):
        row = base.clone()
        row[t + 1:] = (base[t + 1:] + torch.randint(1, vocab, (n - t - 1,), generator=g)) % vocab  # all differ
        rows.append(row)
    xs[k] = torch.stack(rows)
    with torch.no_grad():
        y = model(*xs)
    scale = y[0].abs().max().item()
    offset = n - y.shape[1]  # output j is the output of position j + offset
    assert offset >= 0
    for t in range(n - 1):
        upto = t + 1 - offset  # outputs j < upto are those of positions <= t
        if upto > 0:
            diff = (y[t + 1, :upto] - y[0, :upto]).abs().max().item()
            assert diff <= 1e-12 * scale, \
                f"{spec.stem}: outputs at positions <= {t} changed by {diff} when tokens > {t} changed"
        if upto >= 0:  # the negative control: the changed tokens do reach position t + 1 itself
            assert (y[t + 1, upto] - y[0, upto]).abs().max().item() > 1e-3 * scale, f"{spec.stem}: t={t} reached nothing"
    if len(xs) > 1:  # the source reaches the target's first position: a source whose tokens all differ
        src = (xs[0][:1] + torch.randint(1, graph.inputs[0].params.vocab, (1, n), generator=g)) % graph.inputs[0].params.vocab
        with torch.no_grad():
            other = model(src, xs[1][:1])
        assert (other[0, 0] - y[0, 0]).abs().max().item() > 1e-3 * scale, f"{spec.stem}: the source is not read"


# hand-derived counts (d = d_model, V = vocab, L = layers): an independent check of the specs' arithmetic
def _attn(d: int, bias: bool = True) -> int:
    return 4 * d * d + (4 * d if bias else 0)


CLOSED_FORM = {
    # GPT-2 small (HF's count) with 20 memory vectors and 20 more rows of learned positions
    "memory_transformer": 124_439_808 + 20 * 768 + 20 * 768,
    # one embedding (source, target, head); encoder layer: attention, 2 LayerNorms, ReLU MLP; decoder layer: the
    # same with cross-attention and a third LayerNorm
    "transformer": 37000 * 512 + 6 * (_attn(512) + 2 * 2 * 512 + 2 * 512 * 2048 + 2048 + 512)
                   + 6 * (2 * _attn(512) + 3 * 2 * 512 + 2 * 512 * 2048 + 2048 + 512),
    # tied head; per layer: attention, 2 LayerNorms, ReLU MLP
    "vanilla": 37000 * 512 + 6 * (_attn(512) + 2 * 2 * 512 + 2 * 512 * 2048 + 2048 + 512),
    # untied head; per layer: attention + 8 learned spans, 2 LayerNorms, GLU with d_ff = 1408; final LayerNorm
    "adaptive_span": 2 * 256 * 512 + 12 * (_attn(512) + 8 + 2 * 2 * 512 + 3 * 512 * 1408) + 2 * 512,
    # tied head, 784 learned positions; per layer: attention, 2 LayerNorms, GELU MLP; final LayerNorm
    "linear_transformer": 256 * 256 + 784 * 256 + 8 * (_attn(256) + 2 * 2 * 256 + 2 * 256 * 1024 + 1024 + 256)
                          + 2 * 256,
    # token table, class token, 197 positions; 6 layers of 2 LayerNorms, attention, GELU MLP; 6 skipping ones of one
    # LayerNorm, the MLP and Phi (FC1 d -> 2d, a 3-tap depthwise convolution of 2d channels, FC2, ECA's 3 taps);
    # final LayerNorm, pre-logits (tanh) layer
    "skipat_vit_tiny": 8192 * 192 + 192 + 197 * 192 + 6 * (2 * 2 * 192 + _attn(192) + 2 * 192 * 768 + 768 + 192)
                       + 6 * (2 * 192 + 2 * 192 * 768 + 768 + 192 + (192 * 384 + 384) + (384 * 3 + 384)
                              + (384 * 192 + 192) + 3) + 2 * 192 + 192 * 192 + 192,
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
def test_parameter_count_matches_hand_count(name):
    assert count(meta_model(ROOT / "specs" / f"{name}.evo")) == CLOSED_FORM[name]


def _rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def test_llama_on_meta_allocates_no_weights():
    """6.7B parameters would be 27 GB in float32; on the meta device the build must stay small."""
    before = _rss_bytes()
    model = evodsl.compile(ROOT / "specs" / "llama.evo", device="meta")
    after = _rss_bytes()
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert all(b.is_meta for b in model.buffers())
    assert count(model) == 6_738_415_616
    if before is not None and after is not None:
        assert after - before < 256 * 2**20, f"meta build grew RSS by {(after - before) / 2**20:.0f} MiB"
