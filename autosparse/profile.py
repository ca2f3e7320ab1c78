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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosparse.models import AttentionLayer, attention_layers, model_signature
from autosparse.patterns import Dense, Pattern, pattern_from_spec

__all__ = ["SCHEMA_VERSION", "LayerProfile", "Profile", "StepRange", "environment"]

SCHEMA_VERSION = 1
# A JSON array of scalars, or an object whose values are scalars or such arrays (a pattern spec).
_LEAF = re.compile(r"\[[^\[\]{}]*\]|\{[^{}\[\]]*(?:\[[^\[\]{}]*\][^{}\[\]]*)*\}")
DEFAULT_BLOCK_SIZE = (64, 128)  # query x key tokens: the fastest kernel layout on the H200 (benchmarks/NOTES.md)


def _version() -> str:
    from autosparse import __version__

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
        raise ValueError(f"{where}: expected {names}, found {value!r}")
    return value


@dataclass(frozen=True)
class LayerProfile:
    """Per-head patterns of one attention layer, with the search's per-head measurements."""

    index: int
    num_heads: int
    heads: tuple[Pattern, ...]
    measured: tuple[dict[str, float], ...] | None = None

    def __post_init__(self) -> None:
        if len(self.heads) != self.num_heads:
            raise ValueError(f"heads: expected {self.num_heads} patterns (num_heads), found {len(self.heads)}")
        if self.measured is not None and len(self.measured) != self.num_heads:
            raise ValueError(f"measured: expected {self.num_heads} entries (num_heads), found {len(self.measured)}")

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
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LayerProfile:
        _expect(data, dict, where)
        for key in ("index", "num_heads", "heads"):
            if key not in data:
                raise ValueError(f"{where}.{key}: missing")
        heads = _expect(data["heads"], list, f"{where}.heads")
        measured = data.get("measured")
        if measured is not None:
            _expect(measured, list, f"{where}.measured")
            for h, entry in enumerate(measured):
                _expect(entry, dict, f"{where}.measured[{h}]")
                for key, value in entry.items():
                    _expect(value, (int, float), f"{where}.measured[{h}].{key}")
            measured = tuple(measured)
        try:
            return cls(
                index=_expect(data["index"], int, f"{where}.index"),
                num_heads=_expect(data["num_heads"], int, f"{where}.num_heads"),
                heads=tuple(pattern_from_spec(spec, f"{where}.heads[{h}]") for h, spec in enumerate(heads)),
                measured=measured,
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
        _expect(data, dict, where)
        # "end" is required (null when open), so that a misspelt key cannot mean "to the last step".
        for key in ("start", "end"):
            if key not in data:
                raise ValueError(f"{where}.{key}: missing")
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


def _check_layers(layers: dict[str, LayerProfile], found: dict[str, AttentionLayer], where: str) -> None:
    """Raise ValueError naming ``where[name]``'s first field that does not fit the model's layers."""
    for name, entry in layers.items():
        layer = found.get(name)
        here = f"{where}[{name!r}]"
        if layer is None:
            raise ValueError(f"{here}: no such attention layer in the model; it has e.g. {sorted(found)[:3]}")
        if entry.num_heads != layer.num_heads:
            raise ValueError(f"{here}.num_heads: expected {layer.num_heads} (the model), found {entry.num_heads}")
        if entry.index != layer.index:
            raise ValueError(f"{here}.index: expected {layer.index} (the model), found {entry.index}")


@dataclass
class Profile:
    """A per-layer, per-head sparse attention configuration for one model.

    ``block_size`` is ``(q_block, kv_block)``: the granularity patterns are laid out in, so a
    profile means the same attention on every device. ``steps`` is the optional denoising-step
    schedule (kept sorted by start, never overlapping); ``layers`` applies outside it.
    """

    model: dict[str, Any]
    layers: dict[str, LayerProfile]
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE
    search: dict[str, Any] = field(default_factory=dict)
    created: dict[str, Any] = field(default_factory=environment)
    autosparse_version: str = field(default_factory=_version)
    schema_version: int = SCHEMA_VERSION
    steps: tuple[StepRange, ...] = ()

    def __post_init__(self) -> None:
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
        return out

    def save(self, path: str | Path) -> None:
        """Indented JSON with each pattern spec and each list of numbers on one line (a 60-layer,
        24-head profile stays a file a person can read and diff)."""
        text = json.dumps(self.to_dict(), indent=1)
        # JSON strings never hold a raw newline, so joining a leaf's lines cannot change a value.
        text = _LEAF.sub(lambda leaf: re.sub(r"\n\s*", " ", leaf.group()), text)
        Path(path).write_text(text + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> Profile:
        _expect(data, dict, source)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{source}: schema_version: expected {SCHEMA_VERSION}, found {version!r}")
        for key in ("autosparse_version", "model", "layers", "block_size"):
            if key not in data:
                raise ValueError(f"{source}: {key}: missing")
        model = _expect(data["model"], dict, f"{source}: model")
        for key in ("class", "config", "fingerprint"):
            if key not in model:
                raise ValueError(f"{source}: model.{key}: missing")
        # Required: patterns mean whole blocks, so a profile without its block size has no meaning.
        block_size = _expect(data["block_size"], list, f"{source}: block_size")
        if len(block_size) != 2 or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1) for b in block_size
        ):
            raise ValueError(f"{source}: block_size: expected [q_block, kv_block], powers of two >= 16, found {block_size!r}")
        layers = _expect(data["layers"], dict, f"{source}: layers")
        steps = _expect(data.get("steps", []), list, f"{source}: steps")
        fields = dict(
            model=model,
            layers={name: LayerProfile.from_dict(layer, f"{source}: layers[{name!r}]") for name, layer in layers.items()},
            block_size=(block_size[0], block_size[1]),
            search=_expect(data.get("search", {}), dict, f"{source}: search"),
            created=_expect(data.get("created", {}), dict, f"{source}: created"),
            autosparse_version=_expect(data["autosparse_version"], str, f"{source}: autosparse_version"),
            schema_version=version,
            steps=tuple(StepRange.from_dict(entry, f"{source}: steps[{i}]") for i, entry in enumerate(steps)),
        )
        try:
            return cls(**fields)
        except ValueError as err:  # overlapping ranges
            raise ValueError(f"{source}: {err}") from None

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
        """Raise ValueError naming the first field where this profile does not fit ``model``."""
        found = model_signature(model)
        if self.model["class"] != found["class"]:
            raise ValueError(f"profile model.class: expected {found['class']!r} (the model), found {self.model['class']!r}")
        for key in sorted(set(found["config"]) | set(self.model["config"])):
            want, have = found["config"].get(key), self.model["config"].get(key)
            if want != have:
                raise ValueError(f"profile model.config.{key}: expected {want!r} (the model), found {have!r}")
        layers = {layer.name: layer for layer in attention_layers(model)}
        _check_layers(self.layers, layers, "profile layers")
        for i, step_range in enumerate(self.steps):
            _check_layers(step_range.layers, layers, f"profile steps[{i}].layers")

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
                "mix": mix,
                "density": sum(densities) / len(densities) if densities else math.nan,
                "max_error": max(errors) if errors else math.nan,
            })
        return rows
