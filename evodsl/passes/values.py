"""Values and parameters for the build pass: hyperparameter arithmetic over bindings, keyword-argument values,
and validation of an op call's parameters against its params model, every problem reported with its span."""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from ..diagnostics import Collector, Span, did_you_mean
from ..ops.registry import FAMILIES
from ..syntax import BinOp, Bool, Call, Name, Neg, Number

_ERR = object()  # an expression whose error was already reported


@dataclass
class Binding:
    value: object
    span: Span


class Values:
    """What the Builder needs to evaluate values: its collector `c`, `bindings`, `defs` and `failed` names."""

    c: Collector
    bindings: dict
    defs: dict
    failed: set

    def _eval(self, e):
        if isinstance(e, (Number, Bool)):
            return e.value
        if isinstance(e, Name):
            if e.id in self.bindings:
                return self.bindings[e.id].value
            if e.id in self.failed:
                return _ERR
            what = "a layer" if (e.id in self.defs or e.id in FAMILIES) else "not defined"
            self.c.error("E205", f"'{e.id}' is {what}; a number is needed here", e.span,
                         help=did_you_mean(e.id, self.bindings) if self.bindings and what != "a layer"
                         else "bindings hold numbers and true/false, e.g. `d_model = 512`")
            return _ERR
        if isinstance(e, Neg):
            v = self._eval(e.operand)
            return _ERR if v is _ERR else self._number(v, e.operand.span) and -v
        if isinstance(e, BinOp):
            a, b = self._eval(e.left), self._eval(e.right)
            if a is _ERR or b is _ERR or not (self._number(a, e.left.span) and self._number(b, e.right.span)):
                return _ERR
            if e.op == "/":
                if b == 0:
                    self.c.error("E211", "division by zero", e.right.span)
                    return _ERR
                if isinstance(a, int) and isinstance(b, int):
                    if a % b:
                        self.c.error("E212", f"{a} / {b} is not a whole number", e.span, label=f"= {a / b:.4g}",
                                     help="integer hyperparameters must divide evenly")
                        return _ERR
                    return a // b
                return a / b
            return {"+": a + b, "-": a - b, "*": a * b}[e.op]
        self.c.error("E214", "expected a number or true/false here, not a layer", e.span)
        return _ERR

    def _number(self, v, span) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.c.error("E210", f"arithmetic needs numbers, got {v!r}", span)
            return False
        return True

    def _arg(self, e):
        """A keyword argument's value: a number, true/false, a bound name, or a bare symbol (act=gelu)."""
        if isinstance(e, Name) and e.id not in self.bindings and e.id not in self.failed:
            if e.id in self.defs:
                self.c.error("E214", f"'{e.id}' is a layer; a value is needed here", e.span)
                return _ERR
            return e.id
        return self._eval(e)

    def _params(self, op, call: Call):
        fields = op.params.model_fields
        data, spans, from_binding = {}, {}, set()
        for kw in call.kwargs:
            if kw.name not in fields:
                self.c.error("E203", f"unknown parameter '{kw.name}' for {op.id}", kw.name_span,
                             help=did_you_mean(kw.name, fields, prefix=f"{op.id} takes ") if fields
                             else f"{op.id} takes no parameters")
                continue
            if kw.name in data:
                self.c.error("E206", f"parameter '{kw.name}' is given twice", kw.name_span)
                continue
            v = self._arg(kw.value)
            if v is not _ERR:
                data[kw.name], spans[kw.name] = v, kw.value.span
        for f in fields:  # a parameter not given takes the binding of the same name, if any
            if f not in data and f in self.bindings:
                data[f], spans[f] = self.bindings[f].value, self.bindings[f].span
                from_binding.add(f)
        try:
            return op.params(**data), spans
        except ValidationError as err:
            for e in err.errors():
                self._param_error(op, call, e, spans, from_binding, data)
            return None, spans

    def _param_error(self, op, call, e, spans, from_binding, data):
        field = str(e["loc"][0]) if e["loc"] else None
        if e["type"] == "missing":
            if field in self.failed:  # its binding's error is already reported
                return
            self.c.error("E204", f"{op.id} needs parameter '{field}'", call.span,
                         help=f"write {op.family}({op.variant}, {field}=...) or bind `{field} = ...` at the top")
            return
        span = spans.get(field, call.span)
        value = data.get(field)
        shown = "true" if value is True else "false" if value is False else value
        where = f" (from the binding at line {span.line})" if field in from_binding else ""
        msg = e["msg"].replace("Input should be", "must be").replace("Input ", "")
        hint = ""
        if e["type"] == "literal_error":
            allowed = [a.strip(" '") for a in str(e["ctx"]["expected"]).replace(" or ", ",").split(",")]
            hint = did_you_mean(str(value), [a for a in allowed if a]) if isinstance(value, str) else ""
        self.c.error("E204", f"invalid value {shown} for parameter '{field}' of {op.id}{where}", span,
                     label=msg, help=hint)

    def _kwargs(self, kwargs, allowed: dict, what: str) -> dict:
        out = {}
        for kw in kwargs:
            if kw.name not in allowed:
                self.c.error("E203", f"unknown parameter '{kw.name}' for {what}", kw.name_span,
                             help=did_you_mean(kw.name, allowed, prefix=f"{what} takes "))
                continue
            if kw.name in out:
                self.c.error("E206", f"parameter '{kw.name}' is given twice", kw.name_span)
                continue
            v = self._arg(kw.value)
            if v is _ERR:
                continue
            choices = allowed[kw.name]
            if choices is bool and not isinstance(v, bool):
                self.c.error("E204", f"'{kw.name}' of {what} is true or false", kw.value.span)
            elif isinstance(choices, list) and v not in choices:
                self.c.error("E204", f"invalid value {v} for '{kw.name}' of {what}", kw.value.span,
                             label=f"expected one of: {', '.join(map(str, choices))}",
                             help=did_you_mean(str(v), choices, listing=False))
            else:
                out[kw.name] = (v, kw.value.span)
        return out
