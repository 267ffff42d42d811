"""Progress of long CLI work (an ONNX export, HF weights loading) on one line of stderr: shown on a terminal,
silent when stderr is piped or redirected, and off in the library unless the CLI turns it on (so `--json`
output and logs stay clean).

    from evodsl import progress
    progress.phase("tracing the graph")          # a step with no count
    for i, t in enumerate(tensors, 1):
        progress.step("writing weights", i, len(tensors))
    progress.done()                              # clears the line
"""
from __future__ import annotations

import sys
import time

_stream = None  # where to draw; None: off
_last = 0.0
_INTERVAL = 0.1  # seconds between redraws of a counted step


def enable(stream=None) -> None:
    """Draw on `stream` (default: stderr when it is a terminal; nothing otherwise)."""
    global _stream
    if stream is None:
        stream = sys.stderr if sys.stderr.isatty() else None
    _stream = stream


def disable() -> None:
    done()
    global _stream
    _stream = None


def _draw(text: str) -> None:
    _stream.write("\r\x1b[K" + text)
    _stream.flush()


def phase(text: str) -> None:
    if _stream is not None:
        _draw(f"{text} ...")


def step(text: str, i: int, total: int) -> None:
    global _last
    if _stream is None:
        return
    now = time.monotonic()
    if i == total or i == 1 or now - _last >= _INTERVAL:
        _last = now
        width = 24
        filled = width * i // max(total, 1)
        _draw(f"{text} [{'#' * filled}{'.' * (width - filled)}] {i}/{total}")


def done() -> None:
    if _stream is not None:
        _draw("")
