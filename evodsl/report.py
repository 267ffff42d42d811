"""`evodsl cost`: the cost report as data (`cost_data`), as text tables, sweeps, crossovers and a plot."""
from __future__ import annotations

from functools import lru_cache

import sympy as sp

from .ops.cost import B, M, N, cost_field
from .passes.complexity import complexity
from .passes.cost import DTYPE_BYTES, Report, _sizes, collect

# the Cost fields the report reads: summed over the model, and per layer (the peak is not summed: the memory
# passes walk it; summing its Max terms symbolically took seconds on ETC's and Longformer's specs)
TOTALS = ("fwd", "fwd_inference", "fwd_other", "bwd", "bwd_other", "cache")
LAYER_FIELDS = ("params", "fwd_inference", "fwd_other", "bwd", "bwd_other", "saved", "cache")


def build_report(graph, dtype: str = "float32", decoder_seq: int | None = None) -> Report:
    """The cost report of a graph; `decoder_seq`: the second input's length m of a model with two (default n)."""
    return Report(collect(graph, DTYPE_BYTES[dtype]), graph, DTYPE_BYTES[dtype], decoder_seq)


@lru_cache(maxsize=4096)
def _lambda(expr):
    return sp.lambdify((B, N, M), expr, modules="math")


def _at(expr, b: int, n) -> int:
    """`expr` at batch b and length n, or (n, m) for a model with two inputs."""
    n, m = n if isinstance(n, tuple) else (n, n)
    value = _lambda(sp.sympify(expr))(b, n, m) if isinstance(expr, sp.Basic) else expr
    return int(round(value))


def cost_data(report: Report, seq: int, batch: int, dtype: str) -> dict:
    """Everything `evodsl cost --json` prints (and `evodsl.cost()` returns), at one (batch, seq) (and the
    report's decoder_seq for a model with two inputs)."""
    totals = {f: report.total(f) for f in TOTALS}
    b, n = batch, report.lengths(seq)
    # forward: where autograd records nothing (what inference runs); a training step's forward may run another form
    fwd_mm, fwd_other = _at(totals["fwd_inference"], b, n), _at(totals["fwd_other"], b, n)
    fwd_train = _at(totals["fwd"], b, n)
    bwd_mm, bwd_other = _at(totals["bwd"], b, n), _at(totals["bwd_other"], b, n)
    params = report.params()
    layers, decoding = [], {id(r) for r in report.decoding_rows()}
    for r in report.rows:
        c = {f: _sizes(cost_field(r.cost, f), r.values) for f in LAYER_FIELDS}
        layers.append({
            "name": r.path, "op": r.op, "count": r.count,
            "params": _at(c["params"], b, n) * r.count,
            "flops": {"forward": (_at(c["fwd_inference"], b, n) + _at(c["fwd_other"], b, n)) * r.count,
                      "forward_matmul": _at(c["fwd_inference"], b, n) * r.count,
                      "forward_other": _at(c["fwd_other"], b, n) * r.count,
                      "backward": (_at(c["bwd"], b, n) + _at(c["bwd_other"], b, n)) * r.count},
            "memory": {"saved_for_backward": (_at(c["saved"], b, n)) * r.count,
                       "output": _at(r.out_bytes, b, n), "kv_cache": _at(c["cache"], b, n) * r.count * (id(r) in decoding)},
            "complexity": {"time": complexity([(sp.sympify(r.cost.fwd) + r.cost.fwd_other, r.values)]),
                           "memory": complexity([(sp.sympify(r.cost.saved) + r.out_bytes, r.values)])},
        })
    time_parts = [((sp.sympify(r.cost.fwd) + r.cost.fwd_other) * r.count, r.values) for r in report.rows]
    mem_parts = [((sp.sympify(r.cost.saved) + r.out_bytes) * r.count, r.values) for r in report.rows]
    return {
        "spec": report.graph.file, "model": report.graph.name, "seq": seq, "batch": batch, "dtype": dtype,
        **({"decoder_seq": n[1]} if isinstance(n, tuple) else {}),
        "params": params, "decodes": bool(report.decoding_rows()),
        "flops": {"forward": fwd_mm + fwd_other, "backward": bwd_mm + bwd_other,
                  "forward_matmul": fwd_mm, "forward_other": fwd_other,
                  "backward_matmul": bwd_mm, "backward_other": bwd_other,
                  "training_forward_matmul": fwd_train,
                  "train_step": fwd_train + fwd_other + bwd_mm + bwd_other},
        "memory": {"params": params * DTYPE_BYTES[dtype],
                   "activations_inference": report.activations_inference(b, n),
                   "activations_training": report.activations_training(b, n),
                   "activations_training_peak": report.activations_training_peak(b, n),
                   "activations_training_checkpointed": report.activations_training_checkpointed(b, n),
                   "activations_training_checkpointed_peak": report.activations_training_checkpointed_peak(b, n),
                   "kv_cache": report.kv_cache(b, n),
                   "gradients": params * DTYPE_BYTES[dtype],
                   "adam_states": params * 4 * 2},
        "complexity": {"time": complexity(time_parts), "memory": complexity(mem_parts)},
        "formula": {"flops_forward": str(sp.nsimplify(totals["fwd_inference"] + totals["fwd_other"])),
                    "flops_backward": str(sp.nsimplify(totals["bwd"] + totals["bwd_other"])),
                    "kv_cache": str(totals["cache"])},
        "layers": layers,
    }


# -------------------------------------------------------------------- text


def human(x: float, unit: str = "") -> str:
    for suffix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def human_bytes(x: float) -> str:
    for suffix, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size:
            return f"{x / size:.2f} {suffix}"
    return f"{x:.0f} B"


def render_table(data: dict, train: bool, formula: bool) -> str:
    dec = f", decoder seq {data['decoder_seq']}" if "decoder_seq" in data else ""
    head = (f"{data['model']} ({data['spec']}): batch {data['batch']}, seq {data['seq']}{dec}, {data['dtype']}")
    cols = ["layer", "op", "count", "params", "fwd FLOPs", "(not matmul)", "time"]
    align = "<<>>>><"
    if train:
        cols += ["bwd FLOPs", "saved for bwd"]
        align += ">>"
    rows = []
    for L in data["layers"]:
        row = [L["name"], L["op"], f"x{L['count']}", f"{L['params']:,}", human(L["flops"]["forward"]),
               human(L["flops"]["forward_other"]), L["complexity"]["time"]]
        if train:
            row += [human(L["flops"]["backward"]), human_bytes(L["memory"]["saved_for_backward"])]
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells):
        return "  ".join(c.ljust(w) if a == "<" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    f, m = data["flops"], data["memory"]
    out = [head, "", line(cols), line(["-" * w for w in widths]), *map(line, rows), "",
           f"parameters            {data['params']:,} ({human_bytes(m['params'])} of weights)",
           f"forward FLOPs         {human(f['forward'])}  (matmul {human(f['forward_matmul'])}, "
           f"other {human(f['forward_other'])})",
           f"activations (infer)   {human_bytes(m['activations_inference'])} peak",
           f"KV cache / state      {human_bytes(m['kv_cache'])} for {data['seq']} tokens" if data["decodes"] else
           "KV cache / state      none: the output is bidirectional (the model does not decode)",
           f"complexity            time {data['complexity']['time']}, memory {data['complexity']['memory']}"]
    if train:
        out += [f"backward FLOPs        {human(f['backward'])}  (matmul {human(f['backward_matmul'])}, "
                f"other {human(f['backward_other'])})",
                f"train step FLOPs      {human(f['train_step'])}",
                f"activations (train)   {human_bytes(m['activations_training'])} kept for backward",
                f"activations (ckpt)    {human_bytes(m['activations_training_checkpointed'])} kept, "
                f"{human_bytes(m['activations_training_checkpointed_peak'])} at the peak with checkpoint=True "
                f"(each block recomputed in backward)",
                f"gradients + Adam      {human_bytes(m['gradients'])} + {human_bytes(m['adam_states'])} (fp32 states)"]
    if formula:
        out += ["", "forward FLOPs  = " + data["formula"]["flops_forward"],
                "backward FLOPs = " + data["formula"]["flops_backward"],
                "KV cache bytes = " + data["formula"]["kv_cache"]]
    return "\n".join(out)


# -------------------------------------------------------------------- sweeps and crossovers

METRICS = {  # name -> (label, function of (report, b, n))
    "flops": ("forward FLOPs", lambda r, b, n: _at(r.total("fwd_inference") + r.total("fwd_other"), b, r.lengths(n))),
    "activations": ("activations (inference)", lambda r, b, n: r.activations_inference(b, r.lengths(n))),
    "training": ("activations (training)", lambda r, b, n: r.activations_training(b, r.lengths(n))),
    "kv_cache": ("KV cache / state", lambda r, b, n: r.kv_cache(b, r.lengths(n))),
}


def sweep(reports: dict, seqs: list[int], batch: int) -> dict:
    return {name: {m: [fn(rep, batch, n) for n in seqs] for m, (_, fn) in METRICS.items()}
            for name, rep in reports.items()}


def crossover(fa, fb, lo: int = 1, hi: int = 1 << 24) -> int | None:
    """The length from which the sign of fa - fb is the one it has at hi (the long-sequence verdict): the
    smallest n above the last sampled length (lo, 2 lo, 4 lo, ..., hi) where the sign differs, found by
    bisection; None if the sign is the same at every sampled length."""
    sign = lambda n: (fa(n) > fb(n)) - (fa(n) < fb(n))
    samples = [lo]
    while samples[-1] < hi:
        samples.append(min(samples[-1] * 2, hi))
    final = sign(hi)
    differs = [k for k in samples if sign(k) != final]
    if not differs:
        return None
    a = differs[-1]
    z = samples[samples.index(a) + 1]
    while z - a > 1:
        mid = (a + z) // 2
        a, z = (a, mid) if sign(mid) == final else (mid, z)
    return z


def render_sweep(reports: dict, seqs: list[int], batch: int) -> str:
    names = list(reports)
    data = sweep(reports, seqs, batch)
    out = []
    w = max(14, *(len(s) + 2 for s in names))
    for m, (label, fn) in METRICS.items():
        fmt = human if m == "flops" else human_bytes
        out.append(f"{label} (batch {batch})")
        out.append("  " + "seq".rjust(8) + "".join(s.rjust(w) for s in names))
        for i, n in enumerate(seqs):
            out.append("  " + f"{n:>8}" + "".join(fmt(data[s][m][i]).rjust(w) for s in names))
        # two specs: their crossover; more: each against the first (the baseline), the pair named
        pairs = [(names[0], bname) for bname in names[1:]]
        for a, bname in pairs:
            ra, rb = reports[a], reports[bname]
            named = "" if len(names) == 2 else f" ({bname} vs {a})"
            x = crossover(lambda n: fn(ra, batch, n), lambda n: fn(rb, batch, n))
            if x is not None:
                fa, fb = fn(ra, batch, x), fn(rb, batch, x)
                if fa == fb:  # the lead ends in a tie (e.g. a shared peak elsewhere in the model takes over)
                    out.append(f"  crossover{named}: {a} and {bname} are even from n = {x:,}")
                else:
                    out.append(f"  crossover{named}: {a if fa < fb else bname} is cheaper from n = {x:,}")
            else:
                same = fn(ra, batch, 1024) - fn(rb, batch, 1024)
                who = a if same < 0 else bname if same > 0 else None
                out.append(f"  no crossover{named} up to n = {1 << 24:,}" + (f": {who} is cheaper throughout" if who else ""))
        out.append("")
    return "\n".join(out).rstrip()


def plot(reports: dict, seqs: list[int], batch: int, path: str) -> None:
    """FLOPs and memory against n on log axes, one line per spec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = sorted(set(seqs) | {int(2 ** (k / 2)) for k in range(2 * 7, 2 * max(s.bit_length() for s in seqs) + 1)})
    grid = [g for g in grid if min(seqs) <= g <= max(seqs)]
    data = sweep(reports, grid, batch)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    for ax, m in zip(axes, ("flops", "activations", "kv_cache")):
        for name in reports:
            ax.loglog(grid, [max(v, 1) for v in data[name][m]], marker="o", ms=3, label=name)
        ax.set_xlabel("sequence length n")
        ax.set_title(METRICS[m][0] + ("" if m == "flops" else " (bytes)"))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"evodsl cost, batch {batch}")
    fig.savefig(path, dpi=150)
    plt.close(fig)
