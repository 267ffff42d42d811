"""Op declarations. Every module under evodsl/ops/<family>/ whose name does not start with '_' is imported
here, and registers its variants with `registry.register`: adding an op is adding one file."""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .registry import FAMILIES, REGISTRY, Ctx, Op, OpEnv, OpParams, ShapeProblem, lookup, register, variants

_loaded = False


def load_all() -> dict:
    global _loaded
    if not _loaded:
        here = Path(__file__).parent
        for fam in sorted(p.name for p in here.iterdir() if p.is_dir() and not p.name.startswith("_")):
            for info in pkgutil.iter_modules([str(here / fam)]):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{__name__}.{fam}.{info.name}")
        _loaded = True
    return REGISTRY


__all__ = ["FAMILIES", "REGISTRY", "Ctx", "Op", "OpEnv", "OpParams", "ShapeProblem", "load_all", "lookup",
           "register", "variants"]
