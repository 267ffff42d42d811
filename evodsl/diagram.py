"""`evodsl graph`: a diagram of a model from its graph IR, as SVG (no dependency), PNG (matplotlib) or DOT text.

What it shows: every op as a box (its variant, the arguments it was given, its parameter count), residual adds
as (+) with their skip edges routed beside the blocks they skip, parallel branches side by side, repeats as a
dashed frame around their body drawn once with `x N` (shared weights marked, parameters per copy), or drawn N
times with --expand, a model's streams side by side with the edges between them (cross-attention, cat), and
the tensor shape on every edge where it changes (and out of each input).

Layout (a layered drawing of a series-parallel graph; no graphviz binary needed): a node's rank is one more than
its deepest drawn input's; a rank's nodes sit side by side, centred; an edge that skips ranks runs down the
right of the ranks it passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .ir import Graph, Node

CHAR, LINE, PAD, GAP_Y, GAP_X = 6.6, 15.0, 7.0, 26.0, 18.0
COLOURS = {"input": "#e8e8e8", "embed": "#dbe9f6", "pos": "#e6f2e6", "norm": "#f2f2d9", "mha": "#fbe3d6",
           "xattn": "#fbd6d6", "mixer": "#f7ddee", "ffn": "#e3ddf7", "head": "#d9efef", "merge": "#eeeeee",
           "ssm": "#f6e7d0", "rnn": "#f3e0c4", "longconv": "#dcebf5"}


def human(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


@dataclass
class Item:
    kind: str  # box | add | group
    lines: list
    w: float
    h: float
    family: str = ""
    child: "Layout | None" = None
    copies: int = 1  # a group drawn with its body `copies` times (--expand)
    x: float = 0.0
    y: float = 0.0
    shape: str = ""


@dataclass
class Layout:
    items: dict = field(default_factory=dict)  # node name -> Item (ENTRY: the frame's top)
    edges: list = field(default_factory=list)  # (source, target, label)
    w: float = 0.0
    h: float = 0.0


def _args(n: Node) -> str:
    fields, given = type(n.params).model_fields, n.meta.get("arg_spans", {})
    out = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in n.params.model_dump().items()
           if k in given or fields[k].is_required() or fields[k].default != v]
    text = ", ".join(out)
    return text if len(text) <= 44 else text[:41] + "..."


def _shape(n: Node) -> str:
    return "[" + ", ".join(map(str, n.meta.get("shape", ()))) + "]"


def layout(graph: Graph, params: dict, expand: bool = False) -> Layout:
    """Place graph's nodes (a repeat's body inside its frame, recursively)."""
    lay = Layout()
    body_inputs = [n.name for n in graph.nodes if n.kind == "input" and not n.variant]  # a repeat body's: x, streams
    entry, streams = set(body_inputs), set(body_inputs[1:])
    rank: dict[str, int] = {}
    order: list[str] = []
    for n in graph.nodes:
        if n.kind == "output" or n.name in entry:
            continue
        if n.kind == "input":
            item = Item("box", [f"{n.name}", f"input({n.variant})"], 0, 0, "input")
        elif n.kind == "add":
            item = Item("add", ["+"], 20, 20)
        elif n.kind == "repeat":
            child = layout(n.body, params, expand)
            each = sum(params.get(id(c), 0) for c in n.body.calls())
            title = (f"{n.module}  x {n.count}" + (", shared" if n.shared else "")
                     + (", reversible" if getattr(n, "reversible", False) else "")
                     + (f"  ({human(each)} params{'' if n.shared else ' each'})" if each else ""))
            copies = n.count if expand and not n.shared else 1
            item = Item("group", [title], max(child.w, len(title) * CHAR) + 2 * PAD,
                        copies * child.h + (copies - 1) * GAP_Y + LINE + 2 * PAD, child=child, copies=copies)
        else:
            lines = [f"{n.family}({n.variant})"] + ([a] if (a := _args(n)) else [])
            if params.get(id(n)):
                lines.append(f"{human(params[id(n)])} params")
            item = Item("box", lines, 0, 0, n.family or "")
        if item.kind == "box":
            item.w = max(len(t) for t in item.lines) * CHAR + 2 * PAD
            item.h = len(item.lines) * LINE + PAD
        item.shape = _shape(n)
        lay.items[n.name] = item
        drawn = [i for i in n.inputs if i in lay.items]
        rank[n.name] = 1 + max(rank[i] for i in drawn) if drawn else 0
        order.append(n.name)
        for i in n.inputs:
            src = i if i in lay.items else "ENTRY"
            if i in streams:
                lay.edges.append((src, n.name, i))  # a stream the body reads: named
                continue
            first = graph.node(i) if i in lay.items else None
            changed = first is None or first.kind == "input" or (
                first.inputs and _shape(first) != _shape(graph.node(first.inputs[0])))
            lay.edges.append((src, n.name, _shape(graph.node(i)) if changed and i not in entry else ""))
    ranks: dict[int, list[str]] = {}
    for name in order:
        ranks.setdefault(rank[name], []).append(name)
    widths = {r: sum(lay.items[m].w for m in ms) + GAP_X * (len(ms) - 1) for r, ms in ranks.items()}
    lay.w = max(widths.values(), default=0) + 4 * GAP_X  # room for the skip edges on the right
    y = GAP_Y if entry else 0.0
    for r in sorted(ranks):
        x = (lay.w - 4 * GAP_X - widths[r]) / 2
        for m in ranks[r]:
            it = lay.items[m]
            it.x, it.y = x, y
            x += it.w + GAP_X
        y += max(lay.items[m].h for m in ranks[r]) + GAP_Y
    lay.h = y - GAP_Y
    lay.items["ENTRY"] = Item("entry", [], lay.w - 4 * GAP_X, 0)
    return lay


class SvgCanvas:
    def __init__(self, w: float, h: float):
        self.w, self.h, self.parts = w, h, []

    def rect(self, x, y, w, h, fill, dashed=False):
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        self.parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="5" '
                          f'fill="{fill}" stroke="#555"{dash}/>')

    def circle(self, x, y, r):
        self.parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="#fff" stroke="#555"/>')

    def text(self, x, y, s, size=11, anchor="middle", bold=False, colour="#222"):
        s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        weight = ' font-weight="bold"' if bold else ""
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{weight} '
                          f'fill="{colour}" font-family="monospace">{s}</text>')

    def line(self, pts):
        d = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(pts))
        self.parts.append(f'<path d="{d}" fill="none" stroke="#555" marker-end="url(#arrow)"/>')

    def finish(self) -> str:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w:.0f}" height="{self.h:.0f}" '
                f'viewBox="0 0 {self.w:.0f} {self.h:.0f}">'
                '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
                'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>'
                f'<rect width="100%" height="100%" fill="#fff"/>')
        return head + "".join(self.parts) + "</svg>\n"


def draw(lay: Layout, c, ox: float, oy: float) -> None:
    """Draw `lay` with its origin at (ox, oy) on canvas c."""
    right = ox + lay.w - 3 * GAP_X
    for src, dst, label in lay.edges:
        a, b = lay.items[src], lay.items[dst]
        sx, sy = ox + a.x + a.w / 2, oy + a.y + a.h
        tx, ty = ox + b.x + b.w / 2, oy + b.y
        if src == "ENTRY":
            sx, sy = ox + (lay.w - 4 * GAP_X) / 2, oy
        between = [it for it in lay.items.values() if it.kind != "entry" and sy - oy < it.y + it.h / 2 < ty - oy]
        if between:  # a skip: down the right of what it passes (into a (+) from its side)
            side = max(right, max(ox + it.x + it.w for it in between) + GAP_X / 2)
            end = [(ox + b.x + b.w, ty + b.h / 2)] if b.kind == "add" else [(tx, ty - 6), (tx, ty)]
            c.line([(sx, sy), (sx, sy + 6), (side, sy + 6), (side, end[0][1]), *end])
        else:
            c.line([(sx, sy), (sx, (sy + ty) / 2), (tx, (sy + ty) / 2), (tx, ty)])
        if label:
            c.text(tx + 6, ty - 8, label, size=9, anchor="start", colour="#666")
    for name, it in lay.items.items():
        x, y = ox + it.x, oy + it.y
        if it.kind == "box":
            c.rect(x, y, it.w, it.h, COLOURS.get(it.family, "#f4f4f4"))
            for k, t in enumerate(it.lines):
                c.text(x + it.w / 2, y + PAD / 2 + LINE * (k + 0.75), t, bold=k == 0)
        elif it.kind == "add":
            c.circle(x + it.w / 2, y + it.h / 2, it.w / 2)
            c.text(x + it.w / 2, y + it.h / 2 + 4, "+", size=12)
        elif it.kind == "group":
            c.rect(x, y, it.w, it.h, "none", dashed=True)
            c.text(x + PAD, y + PAD + LINE * 0.7, it.lines[0], anchor="start", bold=True)
            for k in range(it.copies):
                cy = y + LINE + PAD + k * (it.child.h + GAP_Y)
                draw(it.child, c, x + PAD, cy)
                if k:
                    c.line([(x + it.w / 2, cy - GAP_Y), (x + it.w / 2, cy)])


def node_params(graph: Graph) -> dict:
    """id(node) -> its parameter count (the cost pass's formula at the spec's bindings)."""
    from .passes.cost import collect

    return {id(r.node): int(r.num(r.cost.params, 1, 1)) for r in collect(graph, 4) if r.node is not None}


def to_svg(graph: Graph, expand: bool = False) -> str:
    lay = layout(graph, node_params(graph), expand)
    c = SvgCanvas(lay.w + 2 * GAP_X, lay.h + 2 * GAP_Y + LINE)
    c.text(GAP_X, GAP_Y - 6, f"{graph.name}", size=12, anchor="start", bold=True)
    draw(lay, c, GAP_X, GAP_Y + LINE)
    return c.finish()


def to_dot(graph: Graph, expand: bool = False) -> str:
    """Graphviz DOT text: the same boxes, repeats as clusters (drawn once, or `count` times with expand)."""
    params = node_params(graph)
    out = [f'digraph "{graph.name}" {{', "  rankdir=TB; node [shape=box, style=\"rounded,filled\", "
           "fontname=monospace, fontsize=10]; edge [fontname=monospace, fontsize=8];"]
    counter = [0]

    def scope(g: Graph, prefix: str, indent: str, entry_from: dict) -> dict:
        ids = {}
        for n in g.nodes:
            if n.kind == "output":
                ids[n.name] = ids[n.inputs[0]]
                continue
            if n.kind == "input" and not n.variant:
                ids[n.name] = entry_from.get(n.name, entry_from.get("*"))
                continue
            nid = f"{prefix}{n.name}"
            if n.kind == "repeat":
                copies = n.count if expand and not n.shared else 1
                src = [ids[i] for i in n.inputs]
                for k in range(copies):
                    counter[0] += 1
                    title = f"{n.module} x {n.count}{', shared' if n.shared else ''}" if copies == 1 \
                        else f"{n.module}.{k}"
                    out.append(f'{indent}subgraph cluster_{counter[0]} {{ label="{title}"; style=dashed;')
                    body = {"*": src[0], **{b.name: s for b, s in zip([b for b in n.body.nodes if b.kind == "input"],
                                                                      src)}}
                    inner = scope(n.body, f"{nid}_{k}_", indent + "  ", body)
                    out.append(f"{indent}}}")
                    src = [inner["out"], *src[1:]]
                ids[n.name] = src[0]
                continue
            if n.kind == "add":
                out.append(f'{indent}"{nid}" [label="+", shape=circle, style=solid];')
            else:
                label = f"{n.family}({n.variant})" if n.kind == "call" else f"{n.name}\\ninput({n.variant})"
                if n.kind == "call" and (a := _args(n)):
                    label += f"\\n{a}"
                if params.get(id(n)):
                    label += f"\\n{human(params[id(n)])} params"
                out.append(f'{indent}"{nid}" [label="{label}", fillcolor="{COLOURS.get(n.family or "input", "#f4f4f4")}"];')
            ids[n.name] = nid
            for i in n.inputs:
                out.append(f'{indent}"{ids[i]}" -> "{nid}" [label="{_shape(g.node(i))}"];')
        return ids

    scope(graph, "", "  ", {})
    out.append("}")
    return "\n".join(out) + "\n"


def to_png(graph: Graph, path: str, expand: bool = False) -> None:
    """The SVG's drawing through matplotlib (evodsl[plot])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, FancyBboxPatch

    lay = layout(graph, node_params(graph), expand)
    W, H = lay.w + 2 * GAP_X, lay.h + 2 * GAP_Y + LINE
    fig = plt.figure(figsize=(W / 100, H / 100), dpi=150)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.axis("off")

    class Mpl:
        def rect(self, x, y, w, h, fill, dashed=False):
            ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=5",
                                        fc="none" if fill == "none" else fill, ec="#555",
                                        ls="--" if dashed else "-", lw=0.8))

        def circle(self, x, y, r):
            ax.add_patch(Circle((x, y), r, fc="#fff", ec="#555", lw=0.8))

        def text(self, x, y, s, size=11, anchor="middle", bold=False, colour="#222"):
            ax.text(x, y, s, fontsize=size * 0.55, ha={"middle": "center", "start": "left"}[anchor],
                    va="baseline", family="monospace", weight="bold" if bold else "normal", color=colour)

        def line(self, pts):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color="#555", lw=0.7)
            ax.annotate("", xy=pts[-1], xytext=pts[-2], arrowprops=dict(arrowstyle="-|>", color="#555", lw=0.7))

    c = Mpl()
    c.text(GAP_X, GAP_Y - 6, graph.name, size=12, anchor="start", bold=True)
    draw(lay, c, GAP_X, GAP_Y + LINE)
    fig.savefig(path, dpi=150)
    plt.close(fig)
