"""`evodsl graph`: every spec in specs/ drawn as SVG (parsed as XML, every op and repeat in it), PNG and DOT;
the README's diagram is what the command draws today."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import evodsl
from evodsl.cli import main
from evodsl.diagram import human, to_dot, to_svg

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").rglob("*.evo"))
SVG = "{http://www.w3.org/2000/svg}"


def labels(graph, out=None) -> list[str]:
    """What the diagram must name: every call as family(variant), every repeat's module and count."""
    out = [] if out is None else out
    for n in graph.nodes:
        if n.kind == "call":
            out.append(f"{n.family}({n.variant})")
        elif n.kind == "repeat":
            out.append(f"{n.module}  x {n.count}")
            labels(n.body, out)
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: str(p.relative_to(ROOT / "specs")))
def test_every_spec_draws_as_svg_with_every_op(spec):
    graph = evodsl.parse(spec)
    root = ET.fromstring(to_svg(graph))
    assert root.tag == f"{SVG}svg" and float(root.get("width")) > 0 and float(root.get("height")) > 0
    texts = [t.text for t in root.iter(f"{SVG}text")]
    for label in labels(graph):
        assert any(t and t.startswith(label) for t in texts), f"{label} not drawn"
    boxes = [r for r in root.iter(f"{SVG}rect") if r.get("stroke") and not r.get("stroke-dasharray")]
    frames = [r for r in root.iter(f"{SVG}rect") if r.get("stroke-dasharray")]
    assert len(boxes) == len(list(graph.calls())) + len(graph.inputs)  # every op once (a body drawn once)
    assert len(frames) == len(labels(graph)) - len(list(graph.calls()))  # one frame per repeat


def test_the_drawing_shows_parameters_shapes_and_skips():
    graph = evodsl.parse(ROOT / "specs" / "gpt2.evo")
    svg = to_svg(graph)
    assert "blocks  x 12  (7.09M params each)" in svg  # 12 blocks of 7,087,872
    assert "38.6M params" in svg and "[b, n, 768]" in svg  # the token embedding, its output shape
    root = ET.fromstring(svg)
    adds = [c for c in root.iter(f"{SVG}circle")]
    assert len(adds) == 2  # the block's two residual adds, the body drawn once
    expanded = ET.fromstring(to_svg(graph, expand=True))
    assert len(list(expanded.iter(f"{SVG}circle"))) == 24


def test_human_numbers():
    assert [human(n) for n in (0, 999, 1536, 7_087_872, 124_439_808, 6_738_415_616)] == \
        ["0", "999", "1.54k", "7.09M", "124M", "6.74B"]


def test_dot_names_every_op_and_cluster():
    graph = evodsl.parse(ROOT / "specs" / "t5_small.evo")
    dot = to_dot(graph)
    assert dot.startswith(f'digraph "{graph.name}"') and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    assert dot.count("subgraph cluster_") == sum(1 for n in graph.nodes if n.kind == "repeat")
    for label in labels(graph):
        if "  x " not in label:
            assert label in dot
    assert to_dot(graph, expand=True).count("subgraph cluster_") == sum(n.count for n in graph.nodes
                                                                        if n.kind == "repeat")


def test_cli_writes_svg_png_and_dot_and_refuses_the_rest(tmp_path, capsys):
    spec = str(ROOT / "specs" / "gpt2.evo")
    for name in ("a.svg", "a.png", "a.dot"):
        assert main(["graph", spec, "-o", str(tmp_path / name)]) == 0
        assert (tmp_path / name).stat().st_size > 0
        assert (tmp_path / name).stat().st_mode & 0o044 == 0o044 & ~_umask()  # readable as an open() would make it
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["graph", spec, "-o", str(tmp_path / "a.txt")]) == 2
    assert main(["graph", spec, "-o", str(tmp_path / "no" / "a.svg")]) == 2
    bad = tmp_path / "bad.evo"
    bad.write_text("d_model = 16\nblock = norm -> mha(heads=3)\n")
    assert main(["graph", str(bad), "-o", str(tmp_path / "b.svg")]) == 1
    assert f"{bad}:2:" in capsys.readouterr().err and not (tmp_path / "b.svg").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_readme_diagram_is_current():
    assert (ROOT / "docs" / "gpt2.svg").read_text() == to_svg(evodsl.parse(ROOT / "specs" / "gpt2.evo")), \
        "run: evodsl graph specs/gpt2.evo -o docs/gpt2.svg"
