"""Source spans, diagnostics and the one error type users see (`EvoError`).

Every problem found in a spec becomes a `Diagnostic` with a `Span`; passes collect them and raise one
`EvoError` at the end. `render()` prints the rustc-style text shown in STYLE.md.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A 1-based line/column range in one source text. `end_col` is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def join(self, other: "Span") -> "Span":
        return Span(self.file, self.line, self.col, other.end_line, other.end_col)


@dataclass(frozen=True)
class Diagnostic:
    code: str  # E1xx syntax, E2xx names and parameters, E3xx shapes and wiring, E4xx files and backends
    message: str
    span: Span | None = None
    label: str = ""  # printed after the carets
    help: str = ""  # printed as "= help: ..."

    def render(self, source: str | None = None) -> str:
        where = f"{self.span}: " if self.span else ""
        out = [f"{where}error[{self.code}]: {self.message}"]
        line_text = _line(source, self.span.line) if (self.span and source is not None) else None
        if line_text is not None:
            num = str(self.span.line)
            pad = " " * len(num)
            start = max(self.span.col, 1)
            end = self.span.end_col if self.span.end_line == self.span.line else len(line_text) + 1
            width = max(end - start, 1)
            carets = " " * (start - 1) + "^" * width
            out += [f"{pad} |", f"{num} | {line_text}", f"{pad} | {carets}" + (f" {self.label}" if self.label else "")]
        elif self.label:
            out.append(f"  = note: {self.label}")
        if self.help:
            out.append(f"  = help: {self.help}")
        return "\n".join(out)


def _line(source: str, lineno: int) -> str | None:
    lines = source.split("\n")  # lines as the parser counts them: str.splitlines() also breaks at \f, \x1c, ...
    if 1 <= lineno <= len(lines):
        return lines[lineno - 1].rstrip("\r").replace("\t", " ")
    return None


class EvoError(Exception):
    """The one exception the API raises for a bad spec. `.diagnostics` lists every problem found."""

    def __init__(self, diagnostics: list[Diagnostic], source: str | None = None):
        self.diagnostics = list(diagnostics)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        body = "\n\n".join(d.render(self.source) for d in self.diagnostics)
        n = len(self.diagnostics)
        return body + (f"\n\n{n} errors" if n > 1 else "")

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]


@dataclass
class Collector:
    """Collects diagnostics during a pass; `raise_if_any()` raises them together as one EvoError."""

    source: str | None = None
    items: list[Diagnostic] = field(default_factory=list)

    def error(self, code: str, message: str, span: Span | None = None, label: str = "", help: str = "") -> None:
        d = Diagnostic(code, message, span, label, help)
        if d not in self.items:  # a definition used twice reports its problem once
            self.items.append(d)

    def raise_if_any(self) -> None:
        if self.items:
            raise EvoError(self.items, self.source)


def did_you_mean(word: str, choices, prefix: str = "", listing: bool = True) -> str:
    """A hint naming the closest choice, or (with `listing`) listing them all when none is close."""
    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if not listing:
        return ""
    listed = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    if not choices:
        return ""
    return f"{prefix.strip()}: {listed}" if prefix else f"expected one of: {listed}"
