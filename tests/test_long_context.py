"""specs/long_context/: the long-context encoders side by side (`evodsl cost specs/long_context/*.evo --seq
1k,4k,16k,64k`). Each is the same BERT-base-sized encoder but for its attention; at 64k positions every
efficient one runs fewer forward FLOPs than the softmax baseline, and none of them decodes; each builds and
runs at small sizes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evodsl
from spechelpers import small

FOLDER = Path(__file__).resolve().parents[1] / "specs" / "long_context"
SPECS = sorted(FOLDER.glob("*.evo"))


@pytest.fixture(scope="module")
def costs():
    return {p.stem: evodsl.cost(p, seq=65536) for p in SPECS}


def test_the_folder_holds_the_baseline_and_the_variants():
    assert SPECS[0].stem == "baseline" and len(SPECS) >= 8  # baseline.evo sorts first: the sweep's reference


def test_same_model_but_the_attention(costs):
    """Only the attention differs: variants whose kernel has no weights of its own have exactly the baseline's
    parameters; the others add theirs (Linformer's [max_len, k] projections per layer, Longformer's global
    projections, LongT5's global bias table)."""
    base = costs["baseline"]["params"]
    for name, c in costs.items():
        if name in ("baseline", "bigbird", "linear", "local", "nystrom", "performer", "sparse"):
            assert c["params"] == base, name
        else:
            assert c["params"] > base, name


def test_every_variant_beats_softmax_flops_at_64k(costs):
    base = costs["baseline"]["flops"]["forward"]
    for name, c in costs.items():
        if name != "baseline":
            assert c["flops"]["forward"] < base / 5, f"{name}: {c['flops']['forward']:.3g} vs softmax {base:.3g}"


def test_encoders_keep_no_decoding_state(costs):
    for name, c in costs.items():
        assert c["memory"]["kv_cache"] == 0 and not c["decodes"], name


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_builds_and_runs_small(spec):
    model = evodsl.compile(spec, overrides=small(spec)).eval()
    ids = torch.randint(0, 97, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (2, 64) and torch.isfinite(out).all()  # the pooler's [b, d_model]
