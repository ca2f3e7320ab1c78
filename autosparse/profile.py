"""The profile: one versioned JSON format for every model family.

A profile says, per attention layer (qualified module name) and per query head, which pattern to
run, plus what the search measured. It records the model it was made for and where it was made.
Diffusion models run the transformer once per denoising step and suffer most from sparsity in the
first steps, so an optional ``steps`` schedule makes step ranges dense or gives them their own
patterns; ``Profile.patterns(layer, num_heads, step)`` is the one lookup the runtime needs.
Loading only builds registered pattern kinds (no pickle, no imports by name), and every validation
error names the field with the expected and the found value.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import platform
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosparse.kernels.block_sparse_op import BLOCK_SIZES
from autosparse.models import AttentionLayer, attention_layers, call_traits, model_signature, signature_fingerprint
from autosparse.patterns import Dense, Pattern, pattern_from_spec
from autosparse.patterns.geometry import TOKEN_ORDERS

__all__ = ["MAX_JSON_DEPTH", "MAX_PROFILE_BYTES", "SCHEMA_VERSION", "LayerProfile", "Profile", "StepRange",
           "environment"]

SCHEMA_VERSION = 1
# A profile of 100 layers x 64 heads x a nested pattern is well under 10 MiB: a larger file is not one.
MAX_PROFILE_BYTES = 64 * 1024 * 1024
# JSON levels a profile can need: steps[i].layers[name].heads[h] is 8, each nested pattern adds 2.
MAX_JSON_DEPTH = 64
# Per-head measurements the search records, with their ranges (low, high; None: unbounded).
_MEASURES = {"error": (0.0, None), "density": (0.0, 1.0), "cost": (0.0, None)}
# A JSON array of scalars, or an object whose values are scalars or such arrays (a pattern spec).
_LEAF = re.compile(r"\[[^\[\]{}]*\]|\{[^{}\[\]]*(?:\[[^\[\]{}]*\][^{}\[\]]*)*\}")
_ONE_LINE = 200  # characters: an object with arrays as values longer than this keeps a line per key
DEFAULT_BLOCK_SIZE = (64, 128)  # query x key tokens: the fastest kernel layout on the H200 (benchmarks/NOTES.md)


def _one_line(leaf: re.Match) -> str:
    """A leaf of the indented JSON on one line; an object too long for one line (the attention
    layers of a 60-layer model) keeps one line per key, each of its arrays joined."""
    joined = re.sub(r"\n\s*", " ", leaf.group())
    if joined.startswith("{") and len(joined) > _ONE_LINE:
        return re.sub(r"\[[^\[\]{}]*\]", lambda array: re.sub(r"\n\s*", " ", array.group()), leaf.group())
    return joined


def _version() -> str:
    from autosparse._version import __version__

    return __version__


def environment() -> dict[str, Any]:
    """Where a profile was made: device, library versions, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.date.today().isoformat(),
    }


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: expected {names}, found {_short(value)}")
    return value


def _expect_int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: expected int >= {minimum}, found {_short(value)}")
    return value


def _short(value: Any) -> str:
    """``repr(value)``, cut to a readable length (a corrupted field can hold a whole file)."""
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:100]}... ({len(text)} characters)"


def _fields(data: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
            root: bool = False) -> dict[str, Any]:
    """``data`` as a dict with every ``required`` key and no key outside ``required + optional``;
    ValueError naming the first missing or unknown field. ``root``: ``where`` is a file (``path:``)."""
    _expect(data, dict, where)
    at = (lambda key: f"{where}: {key}") if root else (lambda key: f"{where}.{key}")
    for key in required:
        if key not in data:
            raise ValueError(f"{at(key)}: missing")
    known = required + optional
    for key in data:
        if key not in known:
            raise ValueError(f"{where}: expected only the fields {sorted(known)}, found unknown field {_short(key)}")
    return data


def _check_measured(entry: Any, where: str) -> None:
    """One head's measurements: finite numbers in their ranges (``_MEASURES``), no other keys."""
    _expect(entry, dict, where)
    for key, value in entry.items():
        if key not in _MEASURES:
            raise ValueError(f"{where}: expected only the fields {sorted(_MEASURES)}, "
                             f"found unknown field {_short(key)}")
        low, high = _MEASURES[key]
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if not number or not math.isfinite(value) or value < low or (high is not None and value > high):
            bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise ValueError(f"{where}.{key}: expected a finite number {bounds}, found {_short(value)}")


@dataclass(frozen=True)
class LayerProfile:
    """Per-head patterns of one attention layer, with the search's per-head measurements."""

    index: int
    num_heads: int
    heads: tuple[Pattern, ...]
    measured: tuple[dict[str, float], ...] | None = None
    # Why the layer stays with the model's own attention (e.g. a sliding window shorter than the
    # keys, which autosparse never widens): every head is then dense in the profile.
    dense_by_model: str | None = None

    def __post_init__(self) -> None:
        _expect_int(self.index, "index", 0)
        _expect_int(self.num_heads, "num_heads", 1)
        object.__setattr__(self, "heads", tuple(_expect(self.heads, (tuple, list), "heads")))
        for h, pattern in enumerate(self.heads):
            _expect(pattern, Pattern, f"heads[{h}]")
        if len(self.heads) != self.num_heads:
            raise ValueError(f"heads: expected {self.num_heads} patterns (num_heads), found {len(self.heads)}")
        if self.measured is not None:
            object.__setattr__(self, "measured", tuple(_expect(self.measured, (tuple, list), "measured")))
            if len(self.measured) != self.num_heads:
                raise ValueError(f"measured: expected {self.num_heads} entries (num_heads), found {len(self.measured)}")
            for h, entry in enumerate(self.measured):
                _check_measured(entry, f"measured[{h}]")
        if self.dense_by_model is not None:
            if not isinstance(self.dense_by_model, str) or not self.dense_by_model:
                raise ValueError(f"dense_by_model: expected null or a reason (non-empty str), "
                                 f"found {_short(self.dense_by_model)}")
            for h, pattern in enumerate(self.heads):
                if not pattern.is_dense:
                    raise ValueError(f"heads[{h}]: expected dense (the layer is dense_by_model), "
                                     f"found {pattern.short_str()}")

    @property
    def is_dense(self) -> bool:
        return all(p.is_dense for p in self.heads)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "num_heads": self.num_heads,
            "heads": [p.to_spec() for p in self.heads],
        }
        if self.measured is not None:
            out["measured"] = list(self.measured)
        if self.dense_by_model is not None:  # absent otherwise: files stay as they were before it
            out["dense_by_model"] = self.dense_by_model
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LayerProfile:
        _fields(data, where, ("index", "num_heads", "heads"), ("measured", "dense_by_model"))
        _expect_int(data["index"], f"{where}.index", 0)
        _expect_int(data["num_heads"], f"{where}.num_heads", 1)
        heads = _expect(data["heads"], list, f"{where}.heads")
        measured = data.get("measured")
        if measured is not None:
            measured = tuple(_expect(measured, list, f"{where}.measured"))
        try:
            return cls(
                index=data["index"],
                num_heads=data["num_heads"],
                heads=tuple(pattern_from_spec(spec, f"{where}.heads[{h}]") for h, spec in enumerate(heads)),
                measured=measured,
                dense_by_model=data.get("dense_by_model"),
            )
        except ValueError as err:
            message = str(err)
            raise ValueError(message if message.startswith(where) else f"{where}.{message}") from None


@dataclass(frozen=True)
class StepRange:
    """Denoising steps ``[start, end)`` (0-based; ``end`` None: to the last step) that run dense, or
    run ``layers`` in place of the profile's default entries for the layers listed there.

    Exactly one of the two: a range that is both, or neither, has no single meaning.
    """

    start: int
    end: int | None
    dense: bool = False
    layers: dict[str, LayerProfile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"start: expected int >= 0, found {self.start!r}")
        end = self.end
        if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end <= self.start):
            raise ValueError(f"end: expected null or int > start ({self.start}), found {self.end!r}")
        _expect(self.dense, bool, "dense")
        _expect(self.layers, dict, "layers")
        for name, entry in self.layers.items():
            _expect(entry, LayerProfile, f"layers[{name!r}]")
        if self.dense and self.layers:
            raise ValueError(f"layers: expected none with dense=true, found {sorted(self.layers)}")
        if not self.dense and not self.layers:
            raise ValueError("layers: expected at least one layer (or dense=true), found none")

    def __str__(self) -> str:
        return f"[{self.start}, {'inf' if self.end is None else self.end})"

    def contains(self, step: int) -> bool:
        return self.start <= step and (self.end is None or step < self.end)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"start": self.start, "end": self.end}
        if self.dense:
            out["dense"] = True
        else:
            out["layers"] = {name: layer.to_dict() for name, layer in self.layers.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> StepRange:
        # "end" is required (null when open), so that a misspelt key cannot mean "to the last step".
        _fields(data, where, ("start", "end"), ("dense", "layers"))
        layers = _expect(data.get("layers", {}), dict, f"{where}.layers")
        layers = {name: LayerProfile.from_dict(layer, f"{where}.layers[{name!r}]") for name, layer in layers.items()}
        try:
            return cls(start=data["start"], end=data["end"], dense=data.get("dense", False), layers=layers)
        except ValueError as err:
            raise ValueError(f"{where}.{err}") from None


def _sorted_steps(steps: tuple[StepRange, ...]) -> tuple[StepRange, ...]:
    """``steps`` sorted by start; ValueError naming both ranges (by given position) if two overlap,
    since a step must have one meaning whatever order the ranges were written in."""
    order = sorted(range(len(steps)), key=lambda i: steps[i].start)
    for before, after in zip(order, order[1:]):
        # Sorted and, up to here, disjoint: only the range just before can reach into ``after``.
        if steps[before].contains(steps[after].start):
            raise ValueError(f"steps[{after}]: {steps[after]} overlaps steps[{before}]: {steps[before]}")
    return tuple(steps[i] for i in order)


def _check_layers(layers: dict[str, LayerProfile], found: dict[str, AttentionLayer], where: str,
                  model: nn.Module) -> None:
    """Raise ValueError naming ``where[name]``'s first field that does not fit the model's layers,
    or the first head whose pattern no call of its layer can run (``Pattern.unfit_layer``)."""
    for name, entry in layers.items():
        layer = found.get(name)
        here = f"{where}[{name!r}]"
        if layer is None:
            raise ValueError(f"{here}: no such attention layer in the model; it has e.g. {sorted(found)[:3]}")
        if entry.num_heads != layer.num_heads:
            raise ValueError(f"{here}.num_heads: expected {layer.num_heads} (the model), found {entry.num_heads}")
        if entry.index != layer.index:
            raise ValueError(f"{here}.index: expected {layer.index} (the model), found {entry.index}")
        calls = call_traits(model, layer)
        for h, pattern in enumerate(entry.heads):
            reason = pattern.unfit_layer(calls.causal, calls.grid_rank)
            if reason is not None:
                raise ValueError(f"{here}.heads[{h}]: {pattern.short_str()} can never run on this layer "
                                 f"({calls.description}): {reason}")


def _check_recorded_layers(layers: dict[str, LayerProfile], attention: dict[str, list], where: str) -> None:
    """Every layer entry names a layer of the profile's own ``model.attention``, with its index
    (position there) and head count: a profile that disagrees with itself is corrupt."""
    position = {name: i for i, name in enumerate(attention["names"])}
    for name, entry in layers.items():
        here = f"{where}[{name!r}]"
        i = position.get(name)
        if i is None:
            raise ValueError(f"{here}: expected a layer of model.attention.names (e.g. {attention['names'][:3]}), "
                             f"found {name!r}")
        if entry.index != i:
            raise ValueError(f"{here}.index: expected {i} (its position in model.attention.names), found {entry.index}")
        if entry.num_heads != attention["heads"][i]:
            raise ValueError(f"{here}.num_heads: expected {attention['heads'][i]} (model.attention.heads[{i}]), "
                             f"found {entry.num_heads}")


def _check_model_record(model: Any, where: str) -> dict[str, Any]:
    """The ``model`` field of a profile file: ``class``, ``config``, ``attention`` (the served
    attention layers) and ``fingerprint`` (their hash, which must match)."""
    _fields(model, where, ("class", "config", "attention", "fingerprint"))
    if not isinstance(model["class"], str) or not model["class"]:
        raise ValueError(f"{where}.class: expected a class name (non-empty str), found {_short(model['class'])}")
    config = _expect(model["config"], dict, f"{where}.config")
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float, bool)) and not (isinstance(v, float) and not math.isfinite(v))
                   for v in values):
            raise ValueError(f"{where}.config.{key}: expected a str, bool, finite number or a list of them, "
                             f"found {_short(value)}")
    attention = _fields(model["attention"], f"{where}.attention", ("names", "heads", "kv_heads", "head_dim"))
    names = _expect(attention["names"], list, f"{where}.attention.names")
    if not names:
        raise ValueError(f"{where}.attention.names: expected at least one attention layer, found none")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.attention.names[{i}]: expected a layer name (non-empty str), "
                             f"found {_short(name)}")
        if name in names[:i]:
            raise ValueError(f"{where}.attention.names[{i}]: expected each name once, found {name!r} "
                             f"again (names[{names.index(name)}])")
    for key in ("heads", "kv_heads", "head_dim"):
        values = _expect(attention[key], list, f"{where}.attention.{key}")
        if len(values) != len(names):
            raise ValueError(f"{where}.attention.{key}: expected {len(names)} entries (one per attention.names), "
                             f"found {len(values)}")
        for i, value in enumerate(values):
            _expect_int(value, f"{where}.attention.{key}[{i}]", 1)
    for i, (heads, kv_heads) in enumerate(zip(attention["heads"], attention["kv_heads"])):
        if heads % kv_heads:
            raise ValueError(f"{where}.attention.kv_heads[{i}]: expected a divisor of heads[{i}] ({heads}), "
                             f"found {kv_heads}")
    fingerprint = model["fingerprint"]
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{16}", fingerprint):
        raise ValueError(f"{where}.fingerprint: expected 16 hex digits, found {_short(fingerprint)}")
    expected = signature_fingerprint(model)
    if fingerprint != expected:
        raise ValueError(f"{where}.fingerprint: expected {expected!r} (the hash of model.class, model.config and "
                         f"model.attention as recorded), found {fingerprint!r}: the record was edited")
    return model


def _compare_attention(found: dict[str, list], recorded: Any) -> None:
    """Raise ValueError naming the first field of the profile's ``model.attention`` that differs
    from the model's (``found``): the layer count, a name, or a layer's head counts or head dim."""
    where = "profile model.attention"
    if not isinstance(recorded, dict):
        raise ValueError(f"{where}: expected the model's attention layers, found {_short(recorded)} (a profile made "
                         f"before autosparse recorded them: make it again)")
    names = recorded.get("names")
    if not isinstance(names, list) or len(names) != len(found["names"]):
        count = len(names) if isinstance(names, list) else _short(names)
        raise ValueError(f"{where}.names: expected {len(found['names'])} attention layers (the model), found {count}")
    for key in ("names", "heads", "kv_heads", "head_dim"):
        want, have = found[key], recorded.get(key)
        if not isinstance(have, list) or len(have) != len(want):
            raise ValueError(f"{where}.{key}: expected {want} (the model), found {_short(have)}")
        for i, (a, b) in enumerate(zip(want, have)):
            if a != b:
                layer = "" if key == "names" else f" ({found['names'][i]!r})"
                raise ValueError(f"{where}.{key}[{i}]{layer}: expected {a!r} (the model), found {b!r}")


LENGTH_KINDS = ("calibrated", "validated")


def _check_lengths(lengths: Any, where: str) -> dict[str, list[int]] | None:
    """The optional ``lengths`` record: ``{"calibrated": [lo, hi], "validated": [lo, hi]}`` (either
    may be absent), the key lengths (tokens) of the attention calls the search measured on."""
    if lengths is None:
        return None
    _expect(lengths, dict, where)
    if not lengths:
        raise ValueError(f"{where}: expected at least one of {list(LENGTH_KINDS)}, found none")
    checked = {}
    for key, span in lengths.items():
        if key not in LENGTH_KINDS:
            raise ValueError(f"{where}: expected only the fields {list(LENGTH_KINDS)}, found unknown field {_short(key)}")
        if not isinstance(span, (list, tuple)) or len(span) != 2:
            raise ValueError(f"{where}.{key}: expected [shortest, longest] key length, found {_short(span)}")
        low = _expect_int(span[0], f"{where}.{key}[0]", 1)
        high = _expect_int(span[1], f"{where}.{key}[1]", low)
        checked[key] = [low, high]
    return checked


def _check_block_size(block_size: Any) -> tuple[int, int]:
    if not isinstance(block_size, (list, tuple)) or len(block_size) != 2 or any(
            isinstance(b, bool) or not isinstance(b, int) or b not in BLOCK_SIZES for b in block_size):
        found = list(block_size) if isinstance(block_size, tuple) else block_size
        raise ValueError(f"block_size: expected [q_block, kv_block], each one of {list(BLOCK_SIZES)} (the block "
                         f"sizes the kernel supports), found {_short(found)}")
    return block_size[0], block_size[1]


# -- reading a profile file ----------------------------------------------------------------------


class _Duplicated(dict):
    """A JSON object that named a key more than once (``duplicates``: those keys, in order)."""

    duplicates: list[str]


class _NonFinite(str):
    """``NaN``, ``Infinity`` or ``-Infinity`` in the file: not JSON, refused with its path."""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    duplicates = []
    for key, value in pairs:
        if key in out:
            duplicates.append(key)
        out[key] = value
    if duplicates:
        out = _Duplicated(out)
        out.duplicates = duplicates
    return out


def _child(path: str, key: str, named: bool) -> str:
    """The path of ``key`` in the object at ``path``: ``layers['model.layers.0.self_attn']`` for a
    name (a key of a ``layers`` object, or not an identifier), else ``model.config``."""
    if named or not key.isidentifier():
        return f"{path}[{key!r}]"
    return f"{path}.{key}" if path else key


def _check_json(data: Any, source: str) -> None:
    """ValueError naming the first place (document order) in parsed JSON ``data`` with a duplicate
    key, a non-finite number, or nesting deeper than ``MAX_JSON_DEPTH``. Iterative: any depth."""
    stack: list[tuple[Any, str, int, bool]] = [(data, "", 1, False)]  # value, path, depth, keys are names
    while stack:
        value, path, depth, named = stack.pop()
        here = path or "the top level"
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{source}: {here}: expected JSON nested at most {MAX_JSON_DEPTH} levels deep, "
                             f"found deeper")
        if isinstance(value, _NonFinite) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{source}: {here}: expected a finite number, found {value}")
        if isinstance(value, dict):
            if isinstance(value, _Duplicated):
                key = value.duplicates[0]
                raise ValueError(f"{source}: {_child(path, key, named)}: expected each key once in a JSON object, "
                                 f"found {key!r} {value.duplicates.count(key) + 1} times")
            stack.extend(reversed([(v, _child(path, k, named), depth + 1, k == "layers") for k, v in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(v, f"{path}[{i}]", depth + 1, False) for i, v in enumerate(value)]))


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]')


def _too_deep(text: str) -> str:
    """The path (as ``_check_json`` writes it) of the first value of JSON ``text`` nested deeper
    than ``MAX_JSON_DEPTH``, from its strings and punctuation alone (no recursion, any depth)."""
    stack: list[list] = []  # per open container: [is_object, key or index, keys are names]
    last_string = None
    for token in _JSON_TOKEN.finditer(text):
        char = token.group()
        if char in "[{":
            if len(stack) >= MAX_JSON_DEPTH:
                break
            named = bool(stack) and stack[-1][0] and stack[-1][1] == "layers"
            stack.append([char == "{", None if char == "{" else 0, named])
        elif char in "]}":
            if stack:
                stack.pop()
        elif char == ":" and stack and last_string is not None:
            stack[-1][1] = json.loads(last_string)
        elif char == "," and stack and not stack[-1][0]:
            stack[-1][1] += 1
        last_string = char if char.startswith('"') else None
    path = ""
    for is_object, key, named in stack:  # each open container's current member: the path down
        if key is None:
            break
        path = _child(path, key, named) if is_object else f"{path}[{key}]"
    return path or "the top level"


def _read_json(path: Path) -> Any:
    """The parsed JSON of the profile file at ``path``, checked by ``_check_json``. FileNotFoundError
    if there is none; ValueError naming ``path`` for a directory, a special file, a file over
    ``MAX_PROFILE_BYTES`` (checked before reading), an empty, non-UTF-8 or invalid JSON file."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such profile file") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path}: expected a profile file (JSON), found a directory")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: expected a regular profile file (JSON), found a special file")
    limit = MAX_PROFILE_BYTES
    if info.st_size > limit:
        raise ValueError(f"{path}: expected a profile file of at most {limit} bytes ({limit / 2**20:g} MiB), "
                         f"found {info.st_size} bytes")
    with path.open("rb") as file:
        raw = file.read(limit + 1)  # the limit holds even for a file that grew since stat
    if len(raw) > limit:
        raise ValueError(f"{path}: expected a profile file of at most {limit} bytes ({limit / 2**20:g} MiB), "
                         f"found more")
    if not raw.strip():
        raise ValueError(f"{path}: expected a JSON profile, found an empty file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: expected UTF-8 JSON text, found a byte that is not UTF-8 "
                         f"at offset {err.start}") from None
    try:
        data = json.loads(text, object_pairs_hook=_json_object, parse_constant=_NonFinite)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:  # deeper than Python's parser follows (~1000 levels): find where, without it
        raise ValueError(f"{path}: {_too_deep(text)}: expected JSON nested at most {MAX_JSON_DEPTH} levels deep, "
                         f"found deeper") from None
    _check_json(data, str(path))
    return data


@dataclass
class Profile:
    """A per-layer, per-head sparse attention configuration for one model.

    ``block_size`` is ``(q_block, kv_block)``: the granularity patterns are laid out in, so a
    profile means the same attention on every device. ``steps`` is the optional denoising-step
    schedule (kept sorted by start, never overlapping); ``layers`` applies outside it.
    ``token_order``: the order a token grid's patterns are laid out in (``TOKEN_ORDERS``):
    ``"tile"`` or ``"raster"``, or ``"auto"`` (per layer, whichever needs fewer blocks). A searched
    profile records the order it was scored in, so its measured error and density are the ones
    that run.
    """

    model: dict[str, Any]
    layers: dict[str, LayerProfile]
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE
    search: dict[str, Any] = field(default_factory=dict)
    created: dict[str, Any] = field(default_factory=environment)
    autosparse_version: str = field(default_factory=_version)
    schema_version: int = SCHEMA_VERSION
    steps: tuple[StepRange, ...] = ()
    token_order: str = "auto"
    # Key lengths (tokens) the profile was calibrated and validated on (``LENGTH_KINDS``); None: not
    # recorded (profiles from before 0.3, uniform and structural ones): no length limit at run time.
    lengths: dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        self.lengths = _check_lengths(self.lengths, "lengths")
        if self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order: expected one of {list(TOKEN_ORDERS)}, found {_short(self.token_order)}")
        _expect(self.model, dict, "model")
        self.block_size = _check_block_size(self.block_size)
        _expect(self.layers, dict, "layers")
        for name, entry in self.layers.items():
            _expect(entry, LayerProfile, f"layers[{name!r}]")
        for i, step_range in enumerate(self.steps):
            _expect(step_range, StepRange, f"steps[{i}]")
        self.steps = _sorted_steps(tuple(self.steps))

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def uniform(
        cls, model: nn.Module, spec: dict[str, Any] | Pattern, *, block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE
    ) -> Profile:
        """Apply one pattern to every head of every attention layer: quick starts and tests."""
        pattern = pattern_from_spec(spec)
        layers = {
            layer.name: LayerProfile(layer.index, layer.num_heads, (pattern,) * layer.num_heads)
            for layer in attention_layers(model)
        }
        return cls(model=model_signature(model), layers=layers, block_size=tuple(block_size),
                   search={"method": "uniform", "pattern": pattern.to_spec()})

    # -- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "autosparse_version": self.autosparse_version,
            "model": self.model,
            "created": self.created,
            "search": self.search,
            "block_size": list(self.block_size),
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
        }
        if self.steps:  # absent, not empty, without a schedule: files stay as they were before schedules
            out["steps"] = [step_range.to_dict() for step_range in self.steps]
        if self.token_order != "auto":  # absent means auto, as in files written before it
            out["token_order"] = self.token_order
        if self.lengths is not None:  # absent: not recorded, as in files written before it
            out["lengths"] = self.lengths
        return out

    def save(self, path: str | Path) -> None:
        """Indented JSON with each pattern spec and each list of numbers on one line (a 60-layer,
        24-head profile stays a file a person can read and diff)."""
        data = self.to_dict()
        _check_json(data, "profile")  # e.g. NaN in the search's metadata: a file load() would refuse
        text = json.dumps(data, indent=1, allow_nan=False)
        # JSON strings never hold a raw newline, so joining a leaf's lines cannot change a value.
        text = _LEAF.sub(_one_line, text)
        Path(path).write_text(text + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile file. Every error names the file and the field, with the expected and the
        found value: FileNotFoundError if there is no file, ValueError for anything else (a
        directory, a file over ``MAX_PROFILE_BYTES``, empty or invalid JSON, duplicate keys, NaN or
        Infinity, nesting deeper than ``MAX_JSON_DEPTH``, any field of the wrong type or range)."""
        return cls.from_dict(_read_json(Path(path)), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> Profile:
        _expect(data, dict, source)
        # The version first: a profile of another schema may have other fields.
        if "schema_version" not in data:
            raise ValueError(f"{source}: schema_version: missing")
        version = data["schema_version"]
        if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
            raise ValueError(f"{source}: schema_version: expected {SCHEMA_VERSION}, found {_short(version)}")
        _fields(data, source, ("schema_version", "autosparse_version", "model", "layers", "block_size"),
                ("created", "search", "steps", "token_order", "lengths"), root=True)
        model = _check_model_record(data["model"], f"{source}: model")
        # Required: patterns mean whole blocks, so a profile without its block size has no meaning.
        block_size = _expect(data["block_size"], list, f"{source}: block_size")
        layers = _expect(data["layers"], dict, f"{source}: layers")
        steps = _expect(data.get("steps", []), list, f"{source}: steps")
        fields = dict(
            model=model,
            layers={name: LayerProfile.from_dict(layer, f"{source}: layers[{name!r}]") for name, layer in layers.items()},
            block_size=block_size,
            search=_expect(data.get("search", {}), dict, f"{source}: search"),
            created=_expect(data.get("created", {}), dict, f"{source}: created"),
            autosparse_version=_expect(data["autosparse_version"], str, f"{source}: autosparse_version"),
            schema_version=version,
            steps=tuple(StepRange.from_dict(entry, f"{source}: steps[{i}]") for i, entry in enumerate(steps)),
            token_order=data.get("token_order", "auto"),
            lengths=_check_lengths(data.get("lengths"), f"{source}: lengths"),
        )
        try:
            profile = cls(**fields)
        except ValueError as err:  # the block size, overlapping ranges
            raise ValueError(f"{source}: {err}") from None
        _check_recorded_layers(profile.layers, model["attention"], f"{source}: layers")
        for i, step_range in enumerate(fields["steps"]):  # numbered as in the file
            _check_recorded_layers(step_range.layers, model["attention"], f"{source}: steps[{i}].layers")
        return profile

    def length_limit(self) -> tuple[int, str] | None:
        """The longest key length this profile is known to hold at, and what it was measured by:
        ``(N, "validated")`` (end to end on held-out inputs) if recorded, else ``(N, "calibrated")``
        (per-head errors); None without a record. The runtime runs longer calls dense unless every
        pattern of the layer scales with length (``runtime.lengths.scales_with_length``)."""
        lengths = self.lengths
        if not lengths:
            return None
        kind = "validated" if "validated" in lengths else "calibrated"
        return lengths[kind][1], kind

    # -- schedule ----------------------------------------------------------------------------

    def with_dense_steps(self, n: int) -> Profile:
        """A copy that runs the first ``n`` denoising steps dense (the usual way to keep diffusion
        quality), replacing a dense range that starts at 0; ValueError if another range overlaps."""
        kept = tuple(r for r in self.steps if not (r.dense and r.start == 0))
        try:
            return replace(copy.deepcopy(self), steps=(StepRange(0, n, dense=True), *kept))
        except ValueError as err:
            raise ValueError(f"with_dense_steps({n!r}): {err}") from None

    def step_range(self, step: int) -> StepRange | None:
        """The range holding denoising step ``step`` (0-based), or None: outside every range the
        default ``layers`` apply."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected int >= 0, found {step!r}")
        return next((r for r in self.steps if r.contains(step)), None)

    def patterns(self, layer_name: str, num_heads: int, step: int | None = None) -> tuple[Pattern, ...]:
        """Per-head patterns of ``layer_name`` at denoising ``step`` (None: ignore the schedule).

        A dense range makes every layer dense; another range's entry for the layer replaces the
        default one; a layer with no entry where it is looked up is dense, as in ``patch_model``.
        """
        active = None if step is None else self.step_range(step)
        if active is not None and active.dense:
            return (Dense(),) * num_heads
        where, entry = f"layers[{layer_name!r}]", self.layers.get(layer_name)
        if active is not None and layer_name in active.layers:
            where, entry = f"steps[{self.steps.index(active)}].layers[{layer_name!r}]", active.layers[layer_name]
        if entry is None:
            return (Dense(),) * num_heads
        if entry.num_heads != num_heads:
            raise ValueError(f"profile {where}.num_heads: expected {num_heads} (the caller), found {entry.num_heads}")
        return entry.heads

    def always_dense(self, layer_name: str) -> bool:
        """Whether ``layer_name`` is dense in every head at every step (the compile backend then
        leaves its calls to SDPA)."""
        entries = [self.layers.get(layer_name)] + [r.layers.get(layer_name) for r in self.steps if not r.dense]
        return all(entry is None or all(p.is_dense for p in entry.heads) for entry in entries)

    # -- matching ----------------------------------------------------------------------------

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError naming the first field where this profile does not fit ``model``: its
        class, a config field, the attention layers (count, names, heads, KV heads, head dim), a
        layer entry, or a head whose pattern no call of its layer can run (a grid pattern on a model
        without a token grid or with a grid of other dims, ``vertical_slash`` on non-causal
        attention)."""
        found = model_signature(model)
        recorded = self.model
        if recorded.get("class") != found["class"]:
            raise ValueError(f"profile model.class: expected {found['class']!r} (the model), "
                             f"found {recorded.get('class')!r}")
        config = recorded.get("config") if isinstance(recorded.get("config"), dict) else {}
        for key in sorted(set(found["config"]) | set(config)):
            want, have = found["config"].get(key), config.get(key)
            if want != have:
                raise ValueError(f"profile model.config.{key}: expected {want!r} (the model), found {have!r}")
        _compare_attention(found["attention"], recorded.get("attention"))
        if recorded.get("fingerprint") != found["fingerprint"]:  # what the fields above hash: edited by hand
            raise ValueError(f"profile model.fingerprint: expected {found['fingerprint']!r} (the model), "
                             f"found {recorded.get('fingerprint')!r}")
        layers = {layer.name: layer for layer in attention_layers(model)}
        _check_layers(self.layers, layers, "profile layers", model)
        for i, step_range in enumerate(self.steps):
            _check_layers(step_range.layers, layers, f"profile steps[{i}].layers", model)

    # -- summary -----------------------------------------------------------------------------

    def summary_rows(self) -> list[dict[str, Any]]:
        """Per layer: pattern mix, mean measured density and max measured error."""
        rows = []
        for name, layer in self.layers.items():
            mix: dict[str, int] = {}
            for pattern in layer.heads:
                mix[pattern.short_str()] = mix.get(pattern.short_str(), 0) + 1
            densities = [m.get("density", math.nan) for m in layer.measured or ()]
            errors = [m.get("error", math.nan) for m in layer.measured or ()]
            rows.append({
                "layer": name,
                "dense_by_model": layer.dense_by_model,
                "mix": mix,
                "density": sum(densities) / len(densities) if densities else math.nan,
                "max_error": max(errors) if errors else math.nan,
            })
        return rows
