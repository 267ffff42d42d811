"""Lark parse tree -> AST with source spans. The grammar itself is grammars/evo.lark."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from .diagnostics import Diagnostic, EvoError, Span

# ---------------------------------------------------------------- AST nodes (every one has .span)


@dataclass(frozen=True)
class Number:
    value: int | float
    span: Span


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * /
    left: object
    right: object
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: object
    span: Span


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: object
    span: Span  # the whole `name=value`
    name_span: Span


@dataclass(frozen=True)
class Call:
    """`op(variant, k=v, ...)`: `args` are the positional arguments (the first one is the variant)."""

    name: str
    args: tuple
    kwargs: tuple[Kwarg, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Pipe:
    """`a -> b -> c`: sequential composition."""

    items: tuple
    span: Span


@dataclass(frozen=True)
class Residual:
    """`residual(body, scale=..., scores=...)`: x + body(x)."""

    body: object
    kwargs: tuple[Kwarg, ...]
    span: Span


@dataclass(frozen=True)
class Parallel:
    """`parallel(a, b, ..., merge=sum|mean|concat)`: branches on the same input, merged."""

    branches: tuple
    kwargs: tuple[Kwarg, ...]
    span: Span


@dataclass(frozen=True)
class Repeat:
    """`repeat(body, count, shared=false)`: count copies in sequence, separate or shared weights."""

    body: object
    count: object
    kwargs: tuple[Kwarg, ...]
    span: Span


@dataclass(frozen=True)
class Assign:
    name: str
    value: object
    span: Span
    name_span: Span


@dataclass(frozen=True)
class StreamDef:
    """`name(options) = pipe` inside `model NAME { ... }`."""

    name: str
    options: tuple[Kwarg, ...]
    body: object
    span: Span
    name_span: Span


@dataclass(frozen=True)
class ModelDef:
    """`model NAME(options) = pipe` (one stream; `body` is the pipe), or `model NAME(options) { streams }`
    (`body` is None, `streams` the StreamDefs in order; the last one is the model's output)."""

    name: str
    options: tuple[Kwarg, ...]
    body: object
    span: Span
    name_span: Span
    streams: tuple[StreamDef, ...] = ()


@dataclass(frozen=True)
class Program:
    statements: tuple
    file: str
    source: str


# ---------------------------------------------------------------- tree -> AST


def _tok_span(file: str, tok: Token) -> Span:
    return Span(file, tok.line, tok.column, tok.end_line, tok.end_column)


class _ToAst(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _span(self, meta) -> Span:
        return Span(self.file, meta.line, meta.column, meta.end_line, meta.end_column)

    @v_args(meta=True, inline=True)
    def number(self, meta, tok):
        text = str(tok)
        is_int = text.isdigit()
        return Number(int(text) if is_int else float(text), self._span(meta))

    @v_args(meta=True)
    def true(self, meta, _):
        return Bool(True, self._span(meta))

    @v_args(meta=True)
    def false(self, meta, _):
        return Bool(False, self._span(meta))

    @v_args(inline=True)
    def name(self, tok):
        return Name(str(tok), _tok_span(self.file, tok))

    def _bin(op):  # noqa: N805 - small factory for the four arithmetic rules
        @v_args(meta=True, inline=True)
        def rule(self, meta, left, right):
            return BinOp(op, left, right, self._span(meta))

        return rule

    add, sub, mul, div = _bin("+"), _bin("-"), _bin("*"), _bin("/")

    @v_args(meta=True, inline=True)
    def neg(self, meta, operand):
        return Neg(operand, self._span(meta))

    @v_args(meta=True, inline=True)
    def kwarg(self, meta, tok, value):
        return Kwarg(str(tok), value, self._span(meta), _tok_span(self.file, tok))

    @v_args(inline=True)
    def positional(self, value):
        return value

    @v_args(meta=True, inline=True)
    def call(self, meta, tok, *args):
        args = [a for a in args if a is not None]
        pos = tuple(a for a in args if not isinstance(a, Kwarg))
        kws = tuple(a for a in args if isinstance(a, Kwarg))
        return Call(str(tok), pos, kws, self._span(meta), _tok_span(self.file, tok))

    @v_args(meta=True, inline=True)
    def pipe(self, meta, *items):
        return Pipe(tuple(items), self._span(meta))

    @v_args(meta=True, inline=True)
    def residual(self, meta, body, *kwargs):
        return Residual(body, tuple(kwargs), self._span(meta))

    @v_args(meta=True, inline=True)
    def parallel(self, meta, *items):
        branches = tuple(i for i in items if not isinstance(i, Kwarg))
        return Parallel(branches, tuple(i for i in items if isinstance(i, Kwarg)), self._span(meta))

    @v_args(meta=True, inline=True)
    def repeat(self, meta, body, count, *kwargs):
        return Repeat(body, count, tuple(kwargs), self._span(meta))

    @v_args(meta=True, inline=True)
    def assign(self, meta, tok, value):
        return Assign(str(tok), value, self._span(meta), _tok_span(self.file, tok))

    def model_opts(self, items):
        return tuple(i for i in items if i is not None)

    @v_args(meta=True, inline=True)
    def model(self, meta, tok, *rest):
        opts, body = (rest[0], rest[1]) if len(rest) == 2 else ((), rest[0])
        return ModelDef(str(tok), opts, body, self._span(meta), _tok_span(self.file, tok))

    @v_args(meta=True, inline=True)
    def model_streams(self, meta, tok, *rest):
        opts = rest[0] if rest and isinstance(rest[0], tuple) else ()
        streams = tuple(r for r in rest if isinstance(r, StreamDef))
        return ModelDef(str(tok), opts, None, self._span(meta), _tok_span(self.file, tok), streams)

    @v_args(meta=True, inline=True)
    def stream(self, meta, tok, *rest):
        opts, body = (rest[0], rest[1]) if len(rest) == 2 else ((), rest[0])
        return StreamDef(str(tok), opts or (), body, self._span(meta), _tok_span(self.file, tok))

    def start(self, items):
        return tuple(items)


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark.open_from_package(
        "evodsl.grammars", "evo.lark", parser="lalr", propagate_positions=True, maybe_placeholders=True
    )


RESERVED = frozenset({"model", "residual", "parallel", "repeat", "true", "false"})

# What users see for grammar terminals in "expected ..." hints.
_TERMINAL_TEXT = {
    "NAME": "a name", "NUMBER": "a number", "EQUAL": "'='", "LPAR": "'('", "RPAR": "')'", "COMMA": "','",
    "__ANON_0": "'->'", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "MODEL": "'model'",
    "RESIDUAL": "'residual'", "PARALLEL": "'parallel'", "REPEAT": "'repeat'", "TRUE": "'true'",
    "FALSE": "'false'", "LBRACE": "'{'", "RBRACE": "'}'", "$END": "end of file",
}


def _expected(names) -> str:
    shown = sorted({_TERMINAL_TEXT.get(n, n) for n in names})
    return ", ".join(shown)


def _syntax_diagnostic(err: UnexpectedInput, file: str, source: str) -> Diagnostic:
    line, col = max(getattr(err, "line", 1) or 1, 1), max(getattr(err, "column", 1) or 1, 1)
    if isinstance(err, UnexpectedCharacters):
        ch = source[err.pos_in_stream] if err.pos_in_stream < len(source) else ""
        if ch == ">" and err.pos_in_stream > 0 and source[err.pos_in_stream - 1] == "-":  # '-' lexed as minus
            return Diagnostic("E101", "unexpected '->'", Span(file, line, col - 1, line, col + 1),
                              help="'->' goes between two layers: a -> b")
        return Diagnostic("E102", f"unexpected character {ch!r}", Span(file, line, col, line, col + 1),
                          help="names are letters, digits and '_'; comments start with '#'")
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END"):
        lines = source.rstrip().split("\n")  # as the parser counts lines (not str.splitlines)
        line, col = len(lines), len(lines[-1]) + 1
        return Diagnostic("E103", "unexpected end of file", Span(file, line, col, line, col + 1),
                          label="the statement is not finished", help=f"expected {_expected(err.expected)}")
    tok = err.token
    text = str(tok)
    end = col + max(len(text), 1) if "\n" not in text else col + 1
    hint = f"expected {_expected(err.accepts or err.expected)}"
    if tok.type in ("MODEL", "RESIDUAL", "PARALLEL", "REPEAT", "TRUE", "FALSE"):
        hint += f"; '{text}' is a reserved word and cannot be a name"
    what = {"NAME": f"name '{text}'", "NUMBER": f"number {text}"}.get(tok.type, f"'{text}'")
    return Diagnostic("E101", f"unexpected {what}", Span(file, line, col, line, end), help=hint)


MAX_DEPTH = 100  # nesting levels (parentheses, calls, a + b + ..., -x): far beyond any real spec, and far below
                 # what the recursive passes (and Python's recursion limit) can take


def _too_deep(tree: Tree, file: str) -> Diagnostic | None:
    stack = [(tree, 0)]
    while stack:
        t, depth = stack.pop()
        if depth > MAX_DEPTH:
            m = t.meta
            return Diagnostic("E104", f"the spec nests more than {MAX_DEPTH} levels deep",
                              Span(file, m.line, m.column, m.line, m.column + 1),
                              help="split the expression into named definitions or bindings")
        stack.extend((c, depth + 1) for c in t.children if isinstance(c, Tree))
    return None


def parse_program(source: str, file: str = "<string>") -> Program:
    """Parse .evo source into a Program, or raise EvoError (E1xx) with the location of the problem."""
    try:
        tree = _parser().parse(source)
        too_deep = _too_deep(tree, file)
        if too_deep is not None:
            raise EvoError([too_deep], source)
        stmts = _ToAst(file).transform(tree)
    except UnexpectedInput as err:
        raise EvoError([_syntax_diagnostic(err, file, source)], source) from None
    except VisitError as err:  # a bug in _ToAst; still never a raw Lark exception
        raise EvoError([Diagnostic("E100", f"internal parser error: {err.orig_exc}")], source) from None
    # The contextual lexer reads a keyword as a NAME where only a name can follow (`repeat = 4`, `model true`).
    reserved = [Diagnostic("E101", f"unexpected '{st.name}'", st.name_span,
                           help=f"'{st.name}' is a reserved word and cannot be a name")
                for st in [*stmts, *(sd for m in stmts if isinstance(m, ModelDef) for sd in m.streams)]
                if st.name in RESERVED]
    if reserved:
        raise EvoError(reserved, source)
    return Program(tuple(stmts), file, source)
