"""Growth harness: does an op grow in n as its cost formulas declare? Not the size of its largest tensor (a
row-blocked n x n computation has small tensors), but what it executes and allocates.

For one module at several n (its other sizes fixed), an inference forward is measured under FlopCounterMode
(the matmul and SDPA FLOPs it executes) and the storage tracker (the bytes it allocates in total, and at peak;
weights and input excluded). The op's declared Cost is evaluated at the same n: `fwd` for the FLOPs, `peak` plus
the output for the peak bytes. Each series is then
- fitted: the least-squares slope of log(value) against log(n), its growth exponent;
- classified: the class among 1, n, n log n, n sqrt n, n^2, n^2 log n, n^3 that the series follows most closely
  (the least spread of log(value / class(n)) after removing the best constant), so that n log n and n sqrt n
  are told apart from n and n^2, which slopes alone over one octave range would not do.
`check_growth` asserts, for FLOPs and for peak bytes, that the measured class is the declared class and that the
exponents differ by at most TOL; and that the total bytes allocated grow in the class of the declared peak: an
op that allocates in total far more than it holds at once (n^2 scores in row blocks, freed block by block)
fails there even when its peak and its matmul FLOPs look linear.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from evodsl.measure import StorageTracker, register_cpu_sdpa_flops

TOL = 0.15  # the largest difference between a measured and a declared exponent
NS = (1024, 2048, 4096, 8192)
CLASSES = {
    "1": lambda n: 1.0,
    "n": lambda n: n,
    "n log n": lambda n: n * math.log(n),
    "n sqrt n": lambda n: n ** 1.5,
    "n^2": lambda n: n * n,
    "n^2 log n": lambda n: n * n * math.log(n),
    "n^3": lambda n: n ** 3,
}


@dataclass
class Series:
    """One quantity at each n."""

    ns: tuple
    values: tuple

    @property
    def exponent(self) -> float:
        return slope(self.ns, self.values)

    @property
    def cls(self) -> str:
        return classify(self.ns, self.values)

    def __str__(self) -> str:
        return f"{self.cls} (exponent {self.exponent:.2f}: {', '.join(f'{v:.3g}' for v in self.values)})"


def slope(ns, values) -> float:
    """Least-squares slope of log(value) against log(n)."""
    xs = [math.log(n) for n in ns]
    ys = [math.log(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def classify(ns, values) -> str:
    """The class c whose log(value / c(n)) is the most nearly constant over ns (its standard deviation: a
    constant factor, as the lower-order terms of a formula, is what a class leaves free)."""
    def spread(c):
        r = [math.log(max(v, 1e-30) / c(n)) for n, v in zip(ns, values)]
        m = sum(r) / len(r)
        return sum((x - m) ** 2 for x in r)

    return min(CLASSES, key=lambda k: spread(CLASSES[k]))


@dataclass
class Growth:
    flops: Series  # forward
    allocated: Series  # forward, in total
    peak: Series  # forward, at once
    bwd_flops: Series | None = None  # the backward wrt the input (train=True)
    bwd_allocated: Series | None = None


def measure_growth(run, make_input, ns=NS, exclude=(), train: bool = False) -> Growth:
    """run(x) -> output, an inference forward of the op on make_input(n). Parameters and buffers of the
    modules in `exclude`, and the input, are not counted as allocations. train=True also measures a backward
    (a grad-recording forward, then the gradient wrt the input under a stride-0 gradient of ones)."""
    register_cpu_sdpa_flops()
    rows = []
    fixed = [t for m in exclude for t in (*m.parameters(), *m.buffers())]
    for n in ns:
        x = make_input(n)
        xs = x if isinstance(x, (list, tuple)) else [x]
        with torch.no_grad(), StorageTracker([*fixed, *xs]) as tr, FlopCounterMode(display=False) as fc:
            out = run(x)
            del out
            tr.mark("end")
        row = [fc.get_total_flops(), sum(d for _, d in tr.events if d > 0), tr.peak()]
        if train:
            for t in xs:
                t.requires_grad_(True)
            with torch.enable_grad():
                out = run(x)
            with StorageTracker([*fixed, *xs]) as tr, FlopCounterMode(display=False) as fc:
                torch.autograd.grad(out, xs, torch.ones((), dtype=out.dtype).expand_as(out))
            del out
            row += [fc.get_total_flops(), sum(d for _, d in tr.events if d > 0)]
        rows.append(row)
    series = [Series(tuple(ns), tuple(r[k] for r in rows)) for k in range(len(rows[0]))]
    return Growth(*series)


def declared_growth(cost_at, ns=NS) -> list[Series]:
    """cost_at(n) -> a tuple of declared quantities at length n (e.g. matmul FLOPs, inference peak bytes with
    the output): one Series for each."""
    rows = [cost_at(n) for n in ns]
    return [Series(tuple(ns), tuple(r[k] for r in rows)) for k in range(len(rows[0]))]


def check_growth(label: str, measured: Growth, flops: Series, peak: Series, bwd_flops: Series | None = None,
                 tol: float = TOL) -> None:
    """Assert the measured growth is the declared one (see the module's docstring); with bwd_flops, the
    backward's FLOPs too, and the bytes it allocates in total in the class of the declared peak."""
    problems = []
    if any(flops.values) or any(measured.flops.values):
        problems += _compare("FLOPs", measured.flops, flops, tol)
    problems += _compare("peak bytes", measured.peak, peak, tol)
    problems += _compare("bytes allocated in total", measured.allocated, peak, tol)
    if bwd_flops is not None:
        problems += _compare("backward FLOPs", measured.bwd_flops, bwd_flops, tol)
        problems += _compare("bytes the backward allocates", measured.bwd_allocated, peak, tol)
    assert not problems, f"{label}: " + "; ".join(problems)


def _compare(what: str, got: Series, want: Series, tol: float) -> list[str]:
    if got.cls != want.cls or abs(got.exponent - want.exponent) > tol:
        return [f"{what} measured {got}, declared {want}"]
    return []


def mha_growth(variant: str, causal: bool, ns=NS, d: int = 64, heads: int = 2, **args):
    """One mha variant's module (built at ns[0], in training) measured by measure_growth at each n, beside its
    declared Cost there: (measured, declared FLOPs, declared peak, declared backward) for check_growth."""
    from costhelpers import declared
    from evodsl.ops import Ctx

    def at(n):
        _, _, cost, ev = declared("mha", variant, 1, n, dtype=torch.float32, d=d, causal=causal, heads=heads, **args)
        return ev(cost.fwd), ev(cost.peak) + n * d * 4, ev(cost.bwd)  # the output [1, n, d] is part of the peak

    module = declared("mha", variant, 1, ns[0], dtype=torch.float32, d=d, causal=causal, heads=heads, **args)[0].train()
    got = measure_growth(lambda x: module(x, Ctx()),
                         lambda n: torch.randn(1, n, d, generator=torch.Generator().manual_seed(n)),
                         ns=ns, exclude=[module], train=True)
    return (got, *declared_growth(at, ns=ns))
