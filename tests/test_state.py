"""Every piece of process-wide state in the package is named in docs/architecture.md ("Process-wide
state"), and that section names nothing that is gone.

Found from the source (the modules of tests/test_imports.py), so a new cache or registry cannot
slip in unnoticed:

* module-level names bound to a mutable value (a dict/list/set literal or comprehension, a call of a
  mutable container, counter, lock, ``ContextVar`` or ``threading.local``, an instance of a class of
  the module that is not a frozen dataclass) or to None (a slot filled in at run time), except
  ``__all__``; a tuple or frozenset is a constant and is not listed;
* names a function rebinds with ``global``;
* ``functools.lru_cache`` / ``functools.cache`` functions and methods;
* private per-object caches: ``_name`` attributes a class initialises to a mutable container or a
  thread-local (dataclass ``field(default_factory=...)``, ``self._name = ...``);
* what the package changes outside itself: attributes and items it assigns on, and registries it
  calls ``register``/``append``/``insert``/... on, of imported modules and classes
  (``torch.nn.functional.scaled_dot_product_attention``, ``sys.modules``, ``sys.meta_path``,
  transformers' ``AttentionInterface``);
* ``torch.library`` custom ops it defines (by op name);
* environment variables it reads (by name), and functions that find a path under the home directory
  (on-disk caches).

Each is a key (``module.name``, an op name, a variable name); the doc's section lists them in the
first cell of its table rows, in backticks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from test_imports import MODULES, ROOT

DOC = ROOT / "docs" / "architecture.md"
SECTION = "Process-wide state"

# Calls whose result is mutable state when bound at module level (the callee's last name).
MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "Counter", "OrderedDict", "deque", "ChainMap", "WeakSet",
                 "WeakKeyDictionary", "WeakValueDictionary", "count", "local", "ContextVar", "Lock", "RLock",
                 "Event", "Condition", "Semaphore"}
CACHE_DECORATORS = {"lru_cache", "cache"}
# Methods that change the object they are called on (a registry, a list, a dict).
MUTATORS = {"register", "append", "insert", "extend", "add", "update", "setdefault", "__setitem__"}
OP_DEFINERS = {"custom_op", "triton_op", "define", "Library"}
MUTABLE_NODES = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)


def _name(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _callee(node: ast.AST) -> str | None:
    """The last name of what ``node`` calls (``functools.lru_cache(maxsize=8)`` -> ``lru_cache``)."""
    target = node.func if isinstance(node, ast.Call) else node
    name = _name(target)
    return None if name is None else name.rsplit(".", 1)[-1]


class _Module:
    """What one module's source holds: its imports, module-level classes and string constants."""

    def __init__(self, module: str, path: Path) -> None:
        self.module, self.tree = module, ast.parse(path.read_text())
        self.imported: dict[str, str] = {}  # local name -> dotted origin
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.imported[alias.asname] = alias.name
                    else:
                        self.imported[alias.name.split(".")[0]] = alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        self.classes = {node.name: node for node in self.tree.body if isinstance(node, ast.ClassDef)}
        self.frozen = {name for name, node in self.classes.items() for d in node.decorator_list
                       if isinstance(d, ast.Call) and _callee(d) == "dataclass"
                       and any(k.arg == "frozen" and getattr(k.value, "value", False) for k in d.keywords)}
        self.strings = {target.id: node.value.value for node in self.tree.body if isinstance(node, ast.Assign)
                        and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                        for target in node.targets if isinstance(target, ast.Name)}

    def external(self, node: ast.AST) -> str | None:
        """The dotted name of ``node`` when it is rooted at an imported name (``F.x`` ->
        ``torch.nn.functional.x``), else None."""
        name = _name(node)
        if name is None:
            return None
        root, _, rest = name.partition(".")
        if root not in self.imported:
            return None
        return self.imported[root] + ("." + rest if rest else "")

    def string(self, node: ast.AST | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return self.strings.get(node.id)
        return None

    def is_mutable(self, value: ast.AST) -> bool:
        if isinstance(value, MUTABLE_NODES):
            return True
        if not isinstance(value, ast.Call):
            return False
        if isinstance(value.func, ast.Name) and value.func.id in self.classes:
            return value.func.id not in self.frozen
        return _callee(value) in MUTABLE_CALLS

    def state(self) -> set[str]:
        found = self._module_level() | self._cached() | self._per_object()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Global):
                found |= {f"{self.module}.{name}" for name in node.names}
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found |= {name for t in targets if (name := self._assigned(t)) is not None}
            elif isinstance(node, ast.Call):
                found |= self._call(node)
        return found

    def _assigned(self, target: ast.AST) -> str | None:
        """What an assignment to ``target`` changes outside the package: an attribute or an item of
        an imported module or class (``F.scaled_dot_product_attention = ...``, ``sys.modules[k] = ...``)."""
        if isinstance(target, ast.Attribute):
            return self.external(target)
        if isinstance(target, ast.Subscript):
            return self.external(target.value)
        return None

    def _module_level(self) -> set[str]:
        found = set()
        for node in self.tree.body:
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            slot = isinstance(value, ast.Constant) and value.value is None  # filled in at run time
            found |= {f"{self.module}.{t.id}" for t in targets
                      if isinstance(t, ast.Name) and t.id != "__all__" and (slot or self.is_mutable(value))}
        return found

    def _cached(self) -> set[str]:
        """lru_cache / cache functions: module-level, and methods of module-level classes."""
        scopes = [("", self.tree.body)] + [(f"{c.name}.", c.body) for c in self.classes.values()]
        return {f"{self.module}.{prefix}{node.name}" for prefix, body in scopes for node in body
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and any(_callee(d) in CACHE_DECORATORS for d in node.decorator_list)}

    def _per_object(self) -> set[str]:
        """Private attributes a class initialises to mutable containers or thread-locals (also a
        ``cached_property`` returning one)."""
        found = set()
        for cls in self.classes.values():
            for node in ast.walk(cls):
                if isinstance(node, ast.FunctionDef) and any(_callee(d) == "cached_property" for d in node.decorator_list):
                    returns = [r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value is not None]
                    name, value = node.name, returns[0] if len(returns) == 1 else None
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                    name, value = node.target.id, node.value
                    if _callee(value) == "field":
                        factory = next((k.value for k in value.keywords if k.arg == "default_factory"), None)
                        value = ast.Call(factory, [], []) if factory is not None else value
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                    if not (isinstance(target, ast.Attribute) and _name(target.value) == "self"):
                        continue
                    name, value = target.attr, node.value
                else:
                    continue
                if name.startswith("_") and not name.startswith("__") and value is not None and self.is_mutable(value):
                    found.add(f"{self.module}.{cls.name}.{name}")
        return found

    def _call(self, node: ast.Call) -> set[str]:
        callee, found = _callee(node), set()
        if callee in OP_DEFINERS and (op := self.string(node.args[0] if node.args else None)) and "::" in op:
            found.add(op)
        if callee in MUTATORS and isinstance(node.func, ast.Attribute):
            target = self.external(node.func.value)
            if target is not None and not target.startswith("autosparse"):  # outside the package
                found.add(target)
        name = _name(node.func) or ""
        if name in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
            variable = self.string(node.args[0] if node.args else None)
            if variable is not None:
                found.add(variable)
        if name.endswith("Path.home") or name.endswith("expanduser"):
            found.add(f"{self.module}.{self._function_at(node)}")
        return found

    def _function_at(self, target: ast.AST) -> str:
        """The dotted name of the function (or method) whose body holds ``target``."""
        for scope in ast.walk(self.tree):
            if isinstance(scope, ast.ClassDef):
                for node in scope.body:
                    if isinstance(node, ast.FunctionDef) and any(n is target for n in ast.walk(node)):
                        return f"{scope.name}.{node.name}"
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef) and any(n is target for n in ast.walk(node)):
                return node.name
        return "<module>"


def found_state() -> set[str]:
    return set().union(*(_Module(module, path).state() for module, path in MODULES.items()))


def documented_state() -> set[str]:
    """The backticked keys in the first cell of every table row of the doc's section."""
    text = DOC.read_text()
    match = re.search(rf"^## {re.escape(SECTION)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"{DOC} has no '## {SECTION}' section"
    keys = set()
    for line in match.group(1).splitlines():
        cells = line.strip().strip("|").split("|")
        if line.lstrip().startswith("|") and not set(cells[0].strip()) <= set("-: "):
            keys |= set(re.findall(r"`([^`]+)`", cells[0]))
    return keys


FOUND = found_state()


def test_every_piece_of_state_is_documented():
    missing = sorted(FOUND - documented_state())
    assert not missing, f"process-wide state not named in {DOC.name} ('{SECTION}'): {missing}"


def test_the_doc_names_no_state_that_is_gone():
    gone = sorted(documented_state() - FOUND)
    assert not gone, f"{DOC.name} ('{SECTION}') names state the source no longer has: {gone}"


@pytest.mark.parametrize("source, key", [
    ("_CACHE: dict[str, int] = {}", "m._CACHE"),
    ("_ids = itertools.count()", "m._ids"),
    ("OVERRIDE: int | None = None", "m.OVERRIDE"),
    ("class _T(threading.local):\n    pass\n_t = _T()", "m._t"),
    ("@functools.lru_cache(maxsize=8)\ndef f(x): return x", "m.f"),
    ("def f():\n    global _n\n    _n = 1", "m._n"),
    ("import torch.nn.functional as F\ndef f(g):\n    F.scaled_dot_product_attention = g",
     "torch.nn.functional.scaled_dot_product_attention"),
    ("import sys\nsys.meta_path.append(object())", "sys.meta_path"),
    ("import sys\nsys.modules['x'] = sys", "sys.modules"),
    ("import contextvars\n_depth = contextvars.ContextVar('d', default=0)", "m._depth"),
    ("from transformers import AttentionInterface\nAttentionInterface.register('x', print)",
     "transformers.AttentionInterface"),
    ("import torch\n@torch.library.custom_op('autosparse::x', mutates_args=())\ndef x(t): return t", "autosparse::x"),
    ("import os\ndef f(): return os.environ.get('AUTOSPARSE_X')", "AUTOSPARSE_X"),
    ("class C:\n    def __init__(self):\n        self._memo = {}", "m.C._memo"),
    ("import functools\nclass C:\n    @functools.cached_property\n    def _memo(self):\n        return {}", "m.C._memo"),
])
def test_the_scan_finds_each_kind(tmp_path, source, key):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert key in _Module("m", path).state()


@pytest.mark.parametrize("source", [
    "__all__ = ['a']", "KINDS = ('a', 'b')", "NAMES = frozenset({'a'})",
    "class C:\n    def __init__(self):\n        self.public = {}",
    "from dataclasses import dataclass\n@dataclass(frozen=True)\nclass F:\n    x: int\nDEFAULT = F(1)",
    "from autosparse import runtime\nruntime.register(None)",
])
def test_constants_and_public_fields_are_not_state(tmp_path, source):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert _Module("m", path).state() == set()
