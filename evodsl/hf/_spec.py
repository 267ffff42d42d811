"""The text of an imported spec: a header comment naming the source, bindings, definitions, the model."""
from __future__ import annotations

from ._config import Config


def fmt(value) -> str:
    """A config value as spec text: true/false, integers without '.0', floats as Python writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


class Spec:
    """Built line by line by a family's writer; `str(spec)` is the .evo text."""

    def __init__(self, name: str, hf_class: str, config: Config):
        self.name, self.hf_class, self.config = name, hf_class, config
        self.bindings: dict[str, object] = {}
        self.lines: list[str] = []
        self.body = ""

    def bind(self, **values) -> None:
        self.bindings.update(values)

    def line(self, text: str) -> None:
        self.lines.append(text)

    def model(self, options: str, prologue: str, epilogue: str, repeat: str = "repeat(block, layers)") -> None:
        self.body = (f"model {self.name}({options}) =\n    {prologue}\n    -> {repeat}\n    -> {epilogue}\n")

    def __str__(self) -> str:
        source = self.config.file if self.config.source is not None else "a config dict"
        head = (f"# Imported by `evodsl from-hf` from a Hugging Face {self.config.model_type!r} config ({source}):\n"
                f"# the architecture of transformers.{self.hf_class}. Its weights load with\n"
                f"# evodsl.load_hf(model, state_dict, config), or `evodsl compile SPEC --weights FOLDER`.\n")
        width = max(map(len, self.bindings), default=0)
        binds = "".join(f"{k.ljust(width)} = {fmt(v)}\n" for k, v in self.bindings.items())
        return head + binds + "\n" + "\n".join(self.lines) + "\n\n" + self.body
