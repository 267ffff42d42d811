"""`evodsl fmt`: the canonical layout of a spec, comments kept where they are.

The layout (gofmt's stance: the author's line breaks between pipeline stages are kept; everything else is
canonical):
- one space around `=`, `->` and binary operators, `, ` between arguments, nothing inside parentheses;
  numbers and names as written (`1e-5` stays `1e-5`); parentheses only where arithmetic needs them;
- a run of consecutive one-line assignments (bindings and short definitions, no blank line or comment between)
  has its `=` aligned, and its trailing comments;
- a pipeline continues on lines indented one level (4 spaces) deeper than its statement, each starting with
  `-> `; a line that would pass LIMIT characters is broken before the stage that passes it; a stage still too
  long alone is broken inside: its call's arguments on lines one level deeper (a pipeline argument, such as a
  residual's body, on one line if it fits, else a stage a line; plain arguments filled line by line), `)` back
  on a line of its own, and the next stage on the next line;
- a comment on its own line stays on its own line before the statement (or stream, or stage) that follows it;
  a comment at the end of a line stays at the end of the line that ends with the same stage; at most one blank
  line between statements, none at the start, one newline at the end.
Formatting twice gives the same text, and the formatted text parses to the same graph (tests/test_fmt.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .diagnostics import Span
from .syntax import (Assign, BinOp, Bool, Call, Kwarg, ModelDef, Name, Neg, Number, Parallel, Pipe, Repeat,
                     Residual, parse_program)

LIMIT = 120
INDENT = "    "
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


class _Src:
    """The source's lines, and its comments: own-line ones by line, trailing ones by line."""

    def __init__(self, text: str):
        self.lines = text.split("\n")
        self.own: dict[int, str] = {}  # line -> comment text (the line holds nothing else)
        self.trailing: dict[int, str] = {}
        for i, line in enumerate(self.lines, 1):
            if "#" in line:  # the language has no strings: '#' always starts a comment
                code, comment = line.split("#", 1)
                (self.own if not code.strip() else self.trailing)[i] = "#" + comment.rstrip()

    def text(self, span: Span) -> str:
        return self.lines[span.line - 1][span.col - 1:span.end_col - 1]


@dataclass
class _Stage:
    node: object
    text: str
    first: int  # its first and last source lines
    last: int
    before: list = field(default_factory=list)  # own-line comments just before it
    trailing: list = field(default_factory=list)  # comments ending the lines it spans (the first stays there)
    break_before: bool = False


def _expr(node, src: _Src) -> str:
    """One line of canonical text for an expression."""
    if isinstance(node, Number):
        return src.text(node.span)
    if isinstance(node, Bool):
        return "true" if node.value else "false"
    if isinstance(node, Name):
        return node.id
    if isinstance(node, Neg):
        inner = _expr(node.operand, src)
        return f"-{inner}" if isinstance(node.operand, (Number, Name, Neg, Call)) else f"-({inner})"
    if isinstance(node, BinOp):
        def side(child, right: bool) -> str:
            text = _expr(child, src)
            if isinstance(child, Pipe) or isinstance(child, BinOp) and (
                    _PREC[child.op] < _PREC[node.op] or right and _PREC[child.op] == _PREC[node.op]):
                return f"({text})"
            return text
        return f"{side(node.left, False)} {node.op} {side(node.right, True)}"
    if isinstance(node, Pipe):
        return " -> ".join(_expr(i, src) for i in node.items)
    if isinstance(node, Kwarg):
        return f"{node.name}={_expr(node.value, src)}"
    if isinstance(node, Call):
        return f"{node.name}({', '.join(_expr(a, src) for a in (*node.args, *node.kwargs))})"
    if isinstance(node, Residual):
        return f"residual({', '.join(_expr(a, src) for a in (node.body, *node.kwargs))})"
    if isinstance(node, Parallel):
        return f"parallel({', '.join(_expr(a, src) for a in (*node.branches, *node.kwargs))})"
    if isinstance(node, Repeat):
        return f"repeat({', '.join(_expr(a, src) for a in (node.body, node.count, *node.kwargs))})"
    raise TypeError(f"fmt: no layout for {type(node).__name__}")  # a new AST node: give it a layout here


def _gap(src: _Src, after: int, first: int, taken: set, indent: str, lead_blank: bool) -> list[str]:
    """The own-line comments and blank lines between two statements (or streams), in their order: consecutive
    blank lines become one; a blank line is dropped at the start of a file or block (lead_blank False) and at its
    end (first past the last line)."""
    out: list[str] = []
    for i in range(after + 1, min(first, len(src.lines) + 1)):
        if i in src.own and i not in taken:
            out.append(indent + src.own[i])
            taken.add(i)
        elif not src.lines[i - 1].strip() and (out or lead_blank) and (not out or out[-1] != ""):
            out.append("")
    if first > len(src.lines):  # none at the end of the file
        while out and out[-1] == "":
            out.pop()
    return out


def _stages(body, src: _Src, header_line: int, taken: set) -> list[_Stage]:
    items = body.items if isinstance(body, Pipe) else (body,)
    stages, prev_last = [], header_line
    for item in items:
        s = _Stage(item, _expr(item, src), item.span.line, item.span.end_line)
        s.break_before = s.first > prev_last
        s.before = [src.own[i] for i in range(prev_last + 1, s.first) if i in src.own and i not in taken]
        taken.update(i for i in range(prev_last + 1, s.first) if i in src.own)
        inside = [i for i in range(s.first, s.last + 1) if i in src.own and i not in taken]
        s.before += [src.own[i] for i in inside]  # a comment line inside a stage written over lines: before it
        taken.update(inside)
        prev_last = s.last
        stages.append(s)
    for i, s in enumerate(stages):  # a trailing comment goes with the last stage ending on its line
        for line in range(s.first, s.last + 1):
            if line in src.trailing and line not in taken and (i + 1 == len(stages) or stages[i + 1].first > line):
                s.trailing.append(src.trailing[line])
                taken.add(line)
    return stages


def _layout(head: str, stages: list[_Stage], indent: str, src: _Src, head_trailing: str = "") -> list[str]:
    """`head` (e.g. 'block =') then the stages, on lines as the author broke them (and as comments force),
    broken further where a line would pass LIMIT."""
    cont = indent + INDENT
    lines: list[str] = []
    cur = head + (f"  {head_trailing}" if head_trailing else "")
    on_head = True  # the current line is the statement's first
    force = bool(head_trailing)
    for i, s in enumerate(stages):
        piece = s.text if i == 0 else f"-> {s.text}"
        joined = f"{cur} {piece}"
        brk = force or s.break_before or bool(s.before) or len(joined) > LIMIT and not (on_head and i == 0 and
                                                                                    len(cur) <= len(indent))
        lead = "" if i == 0 else "-> "
        if brk:
            lines.append(cur)
            lines += [cont + c for c in s.before]
            prefix, own, on_head = cont + lead, cont, False
        else:
            prefix, own = f"{cur} {lead}", cur[:len(cur) - len(cur.lstrip())]
        broken = _broken(s.node, s.text, prefix, own, src)
        lines += broken[:-1]
        cur = broken[-1]
        force = bool(s.trailing) or len(broken) > 1
        if s.trailing:  # the first at the line's end; more (a stage written over lines) on lines of their own
            cur += f"  {s.trailing[0]}"
            if len(s.trailing) > 1:
                lines.append(cur)
                where = cont if i + 1 < len(stages) else indent  # where a second formatting would put them
                lines += [where + c for c in s.trailing[1:-1]]
                cur = where + s.trailing[-1]
    lines.append(cur)
    return lines


def _call_parts(node) -> tuple[str, list] | None:
    """A call-like node's name and arguments, in their order; None for any other node."""
    if isinstance(node, Call):
        return node.name, [*node.args, *node.kwargs]
    if isinstance(node, Residual):
        return "residual", [node.body, *node.kwargs]
    if isinstance(node, Parallel):
        return "parallel", [*node.branches, *node.kwargs]
    if isinstance(node, Repeat):
        return "repeat", [node.body, node.count, *node.kwargs]
    return None


def _broken(node, text: str, prefix: str, indent: str, src: _Src) -> list[str]:
    """`prefix` + the node's one-line `text`, or, past LIMIT, the node over lines: a call's arguments one level
    deeper than `indent` (the line's own indent) and `)` back at it; a pipeline argument on one line if it fits,
    else a stage a line (each broken the same way); plain arguments filled line by line."""
    parts = _call_parts(node)
    if len(prefix) + len(text) <= LIMIT or not parts or not parts[1]:
        return [prefix + text]
    name, args = parts
    inner = indent + INDENT
    lines, cur = [f"{prefix}{name}("], None
    for k, arg in enumerate(args):
        comma = "," if k + 1 < len(args) else ""
        if isinstance(arg, Pipe):
            if cur is not None:
                lines.append(cur)
                cur = None
            whole = _expr(arg, src)
            if len(inner) + len(whole) + len(comma) <= LIMIT:
                lines.append(inner + whole + comma)
                continue
            for j, item in enumerate(arg.items):
                lines += _broken(item, _expr(item, src), inner + ("-> " if j else ""), inner, src)
            lines[-1] += comma
            continue
        text = _expr(arg, src)
        if cur is not None and len(cur) + 1 + len(text) + len(comma) <= LIMIT:
            cur += f" {text}{comma}"
            continue
        if cur is not None:
            lines.append(cur)
        sub = _broken(arg, text, inner, inner, src)
        sub[-1] += comma
        lines += sub[:-1]
        cur = sub[-1]
    if cur is not None:
        lines.append(cur)
    lines.append(indent + ")")
    return lines


def format_source(text: str, file: str = "<string>") -> str:
    """The canonical text of a spec (an EvoError, located, if it does not parse)."""
    program = parse_program(text, file)
    src = _Src(text)
    taken: set[int] = set()
    out: list[str] = []
    align: list[tuple[int, str]] = []  # the current run of one-line assignments: (index in out, name)

    def flush() -> None:
        if len(align) > 1:
            width = max(len(name) for _, name in align)
            for i, name in align:
                out[i] = f"{name:<{width}}" + out[i][len(name):]
            code = {i: out[i].split("#", 1)[0].rstrip() for i, _ in align if "#" in out[i]}
            if len(code) > 1:  # their trailing comments aligned too
                col = max(len(c) for c in code.values()) + 2
                for i, c in code.items():
                    out[i] = f"{c:<{col}}#{out[i].split('#', 1)[1]}"
        align.clear()

    prev_end = 0
    for st in program.statements:
        first = st.span.line
        lead = _gap(src, prev_end, first, taken, "", bool(out))
        if lead:
            flush()
        out += lead
        if isinstance(st, Assign):
            head_trailing = _head_trailing(src, st.name_span.line, st.value.span.line, taken)
            lines = _layout(f"{st.name} =", _stages(st.value, src, st.name_span.line, taken), "", src, head_trailing)
            code = [ln for ln in lines if not ln.lstrip().startswith("#")]
            if len(code) == 1:  # one line of code (comments moved below it end the run, as they will next time)
                align.append((len(out), st.name))
            out += lines
            if len(code) > 1 or len(lines) > 1:
                flush()
        else:
            flush()
            out += _model(st, src, taken)
        prev_end = st.span.end_line
    flush()
    out += _gap(src, prev_end, len(src.lines) + 1, taken, "", bool(out))
    return "\n".join(out).rstrip("\n") + "\n" if out else ""


def _head_trailing(src: _Src, head_line: int, body_line: int, taken: set) -> str:
    """A trailing comment on a header line that holds no stage (`model m =  # ...`)."""
    if body_line > head_line and head_line in src.trailing and head_line not in taken:
        taken.add(head_line)
        return src.trailing[head_line]
    return ""


def _kwargs(options, src: _Src) -> str:
    return f"({', '.join(_expr(k, src) for k in options)})" if options else ""


def _model(m: ModelDef, src: _Src, taken: set) -> list[str]:
    head = f"model {m.name}{_kwargs(m.options, src)}"
    if m.body is not None:
        head_trailing = _head_trailing(src, m.name_span.line, m.body.span.line, taken)
        return _layout(f"{head} =", _stages(m.body, src, m.name_span.line, taken), "", src, head_trailing)
    top = m.name_span.line
    lines = [f"{head} {{" + (f"  {src.trailing[top]}" if top in src.trailing and top < m.streams[0].span.line
                             and not taken.add(top) else "")]
    names = [f"{s.name}{_kwargs(s.options, src)}" for s in m.streams]
    prev_end = top
    for s, name in zip(m.streams, names):
        lines += _gap(src, prev_end, s.span.line, taken, INDENT, prev_end != top)
        head_trailing = _head_trailing(src, s.name_span.line, s.body.span.line, taken)
        lines += _layout(f"{INDENT}{name} =", _stages(s.body, src, s.name_span.line, taken), INDENT, src,
                         head_trailing)
        prev_end = s.span.end_line
    end = m.span.end_line
    inner = _gap(src, prev_end, end, taken, INDENT, True)
    while inner and inner[-1] == "":  # no blank line before the closing brace
        inner.pop()
    lines += inner
    closing = "}"
    if end in src.trailing and end not in taken:
        closing += f"  {src.trailing[end]}"
        taken.add(end)
    lines.append(closing)
    return lines
