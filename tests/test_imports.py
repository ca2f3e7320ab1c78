"""The import graph: ``kernels/`` (installed as ``autosparse.kernels``) is a leaf, importing torch,
triton and the standard library only, and its modules import each other without a cycle (imports
inside functions count: a lazy import is still a dependency)."""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
ALLOWED_ROOTS = {"torch", "triton", "__future__"}


def _imports(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports, relative imports resolved in autosparse.kernels."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y
                base = "autosparse.kernels" + (f".{node.module}" if node.module else "")
                names += [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]
            else:
                names.append(node.module)
    return names


def _modules() -> dict[str, list[str]]:
    return {f"autosparse.kernels.{p.stem}": _imports(p) for p in KERNELS.glob("*.py") if p.stem != "__init__"}


def test_kernels_import_nothing_of_autosparse():
    import sys

    stdlib = set(sys.stdlib_module_names)
    for module, names in _modules().items():
        for name in names:
            root = name.split(".")[0]
            inside = name.startswith("autosparse.kernels")
            assert inside or root in ALLOWED_ROOTS or root in stdlib, f"{module} imports {name}"


def test_kernels_have_no_import_cycle():
    graph = {m: {n for n in names if n in _modules()} for m, names in _modules().items()}
    state: dict[str, str] = {}

    def visit(module: str, path: tuple[str, ...]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            assert state.get(dependency) != "open", " -> ".join((*path, module, dependency))
            if dependency not in state:
                visit(dependency, (*path, module))
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, ())


def test_the_public_api_resolves_and_has_the_offline_entry_points():
    import autosparse

    missing = [name for name in autosparse.__all__ if not hasattr(autosparse, name)]
    assert not missing, missing
    for name in ("patch_model", "unpatch_model", "stats", "Profile", "GuardConfig", "SearchConfig", "calibrate",
                 "search_profile", "record_inputs", "fit_to_target", "register_pattern"):
        assert name in autosparse.__all__, name
