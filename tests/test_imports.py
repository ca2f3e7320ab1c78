"""The import graph of the installed package (``autosparse``, with ``kernels/`` installed as
``autosparse.kernels`` and ``passes/`` as ``autosparse.passes``), read from the source: no cycle
anywhere, ``kernels/`` a leaf (torch, triton and the standard library only), every module importing
only its own layer or the layers below (``LAYERS``, the flow of one call: docs/architecture.md),
and the public API complete. Imports inside functions count: a lazy import is still a dependency."""

import ast
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"autosparse": ROOT / "autosparse", "autosparse.kernels": ROOT / "kernels",
           "autosparse.passes": ROOT / "passes", "autosparse.profiles": ROOT / "profiles"}

# Lowest first. A module may import modules of its own layer and of the layers before it.
LAYERS = [
    ("kernels", ["autosparse.kernels"]),
    ("patterns and guard", ["autosparse._version", "autosparse.patterns", "autosparse.guard"]),
    ("layout and models", ["autosparse.layout", "autosparse.models"]),
    ("profile", ["autosparse.profile", "autosparse.profiles"]),
    ("runtime", ["autosparse.runtime"]),
    ("capture", ["autosparse.capture", "autosparse.passes"]),
    ("patch", ["autosparse.patch", "autosparse.balance"]),
    ("backend and search", ["autosparse.backend", "autosparse.search"]),
    ("tools", ["autosparse.tools", "autosparse.testing", "autosparse.cli", "autosparse.profiles.make_structural"]),
    ("public API", ["autosparse", "autosparse._moved"]),
]


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """The modules of the package ``module`` imports (``from package import name`` is the submodule
    when ``name`` is one, else the package), and every outside import's top-level name."""
    found = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules or {base}
    return {name for name in found if name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> int:
    """The layer of ``module``: the longest prefix named in LAYERS."""
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer of tests/test_imports.py"
    return best[1]


def test_kernels_import_nothing_of_autosparse():
    allowed = {"torch", "triton", "__future__", *sys.stdlib_module_names,
               "flash_attn"}  # the fa4 backend's optional kernel library (imported lazily)
    for module, names in GRAPH.items():
        if module.startswith("autosparse.kernels"):
            for name in names:
                assert name.startswith("autosparse.kernels") or name.split(".")[0] in allowed, f"{module} imports {name}"


def test_no_import_cycle_anywhere():
    inside = {module: {n for n in names if n in MODULES} for module, names in GRAPH.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: tuple[str, ...]) -> None:
        state[module] = "open"
        for dependency in sorted(inside[module]):
            assert state.get(dependency) != "open", "import cycle: " + " -> ".join((*path, module, dependency))
            if dependency not in state:
                visit(dependency, (*path, module))
        state[module] = "done"

    for module in sorted(inside):
        if module not in state:
            visit(module, ())


def test_every_module_imports_only_its_layer_and_below():
    for module, names in GRAPH.items():
        for name in names & MODULES.keys():
            assert _layer(name) <= _layer(module), (
                f"{module} (layer {LAYERS[_layer(module)][0]!r}) imports {name} (layer {LAYERS[_layer(name)][0]!r})")


def test_nothing_that_serves_a_model_imports_testing():
    tools = next(i for i, (name, _) in enumerate(LAYERS) if name == "tools")
    for module, names in GRAPH.items():
        if _layer(module) < tools:
            assert not any(n.startswith("autosparse.testing") for n in names), f"{module} imports {names}"


def test_the_public_api_resolves_and_has_the_offline_entry_points():
    import autosparse

    missing = [name for name in autosparse.__all__ if not hasattr(autosparse, name)]
    assert not missing, missing
    for name in ("patch_model", "unpatch_model", "stats", "Profile", "GuardConfig", "SearchConfig", "calibrate",
                 "search_profile", "record_inputs", "fit_to_target", "register_pattern"):
        assert name in autosparse.__all__, name


def test_the_public_api_exports_nothing_internal():
    import autosparse

    for name in autosparse.__all__:
        assert not name.startswith("_") or name == "__version__", name
        value = getattr(autosparse, name)
        origin = getattr(value, "__module__", "autosparse") or "autosparse"
        assert origin.startswith("autosparse"), f"{name} comes from {origin}"


@pytest.mark.parametrize("old", sorted(__import__("autosparse._moved", fromlist=["MOVED"]).MOVED))
def test_a_moved_module_imports_at_its_old_path_with_a_deprecation_warning(old):
    import importlib

    from autosparse._moved import MOVED

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=MOVED[old]):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert importlib.import_module(old) is module  # once imported: no second warning
