"""Reading a Hugging Face config: a dict, a PretrainedConfig, a config.json or a folder holding one.

`Config` looks keys up with defaults and turns what evodsl cannot build into diagnostics (E415) that point at the
key in config.json (file:line:col and a caret), so that a refusal names the feature and the key, and an imported
model is never silently another one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..diagnostics import Diagnostic, EvoError, Span

_MISSING = object()


class Config:
    def __init__(self, data: dict, source: str | None = None, file: str = "<config>"):
        self.data, self.source, self.file = data, source, file
        self.problems: list[Diagnostic] = []

    @property
    def model_type(self) -> str:
        return str(self.data.get("model_type", ""))

    def get(self, key: str, default=_MISSING):
        """data[key]; a key missing or null takes `default` (none given: the key is required, E415)."""
        value = self.data.get(key)
        if value is not None:
            return value
        if default is _MISSING:
            self.refuse(key, f"the config has no {key!r}", f"a {self.model_type or 'model'} config sets it")
        return None if default is _MISSING else default

    def require(self, *keys: str) -> None:
        """Every one of `keys` is set, else refuse them all now (the sizes the rest is computed from)."""
        for key in keys:
            if self.data.get(key) is None:
                self.refuse(key, f"the config has no {key!r}", f"a {self.model_type or 'model'} config sets it")
        self.raise_if_any()

    def first(self, keys: tuple[str, ...], default=_MISSING):
        """The first of `keys` that the config sets (families name the same size differently)."""
        for key in keys:
            if self.data.get(key) is not None:
                return self.data[key]
        return self.get(keys[0], default)

    def rope(self) -> dict:
        """The rotary settings, from the older keys (rope_theta, rope_scaling, partial_rotary_factor) or from
        transformers 5's rope_parameters: {"theta", "type", "fraction", and the scaling's own keys}."""
        params = dict(self.data.get("rope_parameters") or {})
        scaling = dict(self.data.get("rope_scaling") or {})
        merged = {**params, **scaling}
        kind = merged.get("rope_type", merged.get("type", "default"))
        theta = self.data.get("rope_theta", params.get("rope_theta", 10000.0))
        fraction = self.data.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
        return {**merged, "theta": float(theta), "type": kind, "fraction": float(fraction),
                "key": "rope_scaling" if scaling else "rope_parameters"}

    def refuse(self, key: str, message: str, help: str = "") -> None:
        self.problems.append(Diagnostic("E415", message, self.span(key), help=help))

    def span(self, key: str) -> Span | None:
        """Where `"key"` (or its last dotted part) is written in config.json; None for a dict."""
        if self.source is None:
            return None
        pos = 0
        for part in key.split("."):
            m = re.compile(r'"' + re.escape(part) + r'"\s*:').search(self.source, pos)
            if m is None:
                return None
            pos = m.start()
        line = self.source.count("\n", 0, pos) + 1
        col = pos - (self.source.rfind("\n", 0, pos) + 1) + 1
        return Span(self.file, line, col, line, col + len(key.split(".")[-1]) + 2)

    def raise_if_any(self) -> None:
        if self.problems:
            raise EvoError(self.problems, self.source)


def read_config(src) -> Config:
    """src: a dict, a transformers PretrainedConfig, a path to config.json, or a folder that holds one."""
    if hasattr(src, "to_dict") and not isinstance(src, dict):
        src = src.to_dict()
    if isinstance(src, dict):
        return Config(dict(src))
    path = Path(src)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise EvoError([Diagnostic("E401", f"cannot read HF config {str(path)!r}: {reason}",
                                   help="pass a config.json, a folder that holds one, or a dict")]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        span = Span(str(path), err.lineno, err.colno, err.lineno, err.colno + 1)
        raise EvoError([Diagnostic("E415", f"{path.name} is not JSON: {err.msg}", span,
                                   help="an HF config.json is one JSON object")], text) from None
    if not isinstance(data, dict):
        raise EvoError([Diagnostic("E415", f"{path.name} holds a JSON {type(data).__name__}, not an object",
                                   Span(str(path), 1, 1, 1, 2))], text)
    return Config(data, text, str(path))
