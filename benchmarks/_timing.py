"""Interleaved timing shared by the benchmarks: warm up every contender, then alternate them pair by pair.

Two clocks: `wall` (time.perf_counter) and `cpu` (time.process_time: CPU seconds this process was given, all its
threads). On a shared machine the wall clock also counts the time the scheduler gave other processes; with one
torch thread the CPU clock does not, so ratios stay steady under load (what is still shared: caches and memory
bandwidth). With several threads the CPU clock sums them: use `wall` there."""
from __future__ import annotations

import time

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_ms(fn, clock: str = "wall") -> float:
    tick = CLOCKS[clock]
    start = tick()
    fn()
    return (tick() - start) * 1e3


def interleaved(runs: dict, warmup: int, pairs: int, clock: str = "wall") -> dict[str, list[float]]:
    """{name: [ms, ...]} for each callable in `runs`; who goes first alternates every pair, so a change of
    machine load hits every contender alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for i in range(pairs):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            times[name].append(timed_ms(runs[name], clock))
    return times
