"""Modules that moved in 0.2 (modules grouped by job): the old import paths keep working for one
release, with a DeprecationWarning naming the new one. One table, one import hook; no stub files."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "autosparse.bench": "autosparse.tools.bench",
    "autosparse.cost": "autosparse.search.cost",
    "autosparse.demo": "autosparse.tools.demo",
    "autosparse.dits": "autosparse.testing.dits",
    "autosparse.dynamic": "autosparse.patterns.dynamic",
    "autosparse.evaluate": "autosparse.tools.evaluate",
    "autosparse.families": "autosparse.models.families",
    "autosparse.grid": "autosparse.patterns.grid",
    "autosparse.heatmap": "autosparse.tools.heatmap",
    "autosparse.structural": "autosparse.search.structural",
    "autosparse.timing": "autosparse.tools.timing",
    "autosparse.tokens": "autosparse.patterns.geometry",
    "autosparse.validate": "autosparse.search.validate",
    "autosparse.zoo": "autosparse.tools.zoo",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path goes away in the next release", DeprecationWarning,
                  stacklevel=3)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module at its new path (the same module object)."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name, MOVED[spec.name])
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # already imported at its new path; importlib files it under the old name too


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())


def attribute(name: str) -> ModuleType:
    """``autosparse.<name>`` for a moved module (``autosparse.dits`` without importing it first)."""
    old = f"autosparse.{name}"
    if old not in MOVED:
        raise AttributeError(f"module 'autosparse' has no attribute {name!r}")
    return importlib.import_module(old)
