"""Interleaved timing shared by the benchmarks: warm up every contender, then alternate them pair by pair."""
from __future__ import annotations

import time


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(runs: dict, warmup: int, pairs: int) -> dict[str, list[float]]:
    """{name: [ms, ...]} for each callable in `runs`; who goes first alternates every pair, so a change of
    machine load hits every contender alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for i in range(pairs):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            times[name].append(timed_ms(runs[name]))
    return times
