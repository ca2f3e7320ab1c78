"""The profile: one versioned JSON format for every model family.

A profile says, per attention layer (qualified module name) and per query head, which pattern to
run, plus what the search measured. It records the model it was made for and where it was made.
Loading only builds registered pattern kinds (no pickle, no imports by name), and every validation
error names the field with the expected and the found value.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosparse.models import attention_layers, model_signature
from autosparse.patterns import Pattern, pattern_from_spec

__all__ = ["SCHEMA_VERSION", "LayerProfile", "Profile", "environment"]

SCHEMA_VERSION = 1
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


@dataclass
class Profile:
    """A per-layer, per-head sparse attention configuration for one model.

    ``block_size`` is ``(q_block, kv_block)``: the granularity patterns are laid out in, so a
    profile means the same attention on every device.
    """

    model: dict[str, Any]
    layers: dict[str, LayerProfile]
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE
    search: dict[str, Any] = field(default_factory=dict)
    created: dict[str, Any] = field(default_factory=environment)
    autosparse_version: str = field(default_factory=_version)
    schema_version: int = SCHEMA_VERSION

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
        return {
            "schema_version": self.schema_version,
            "autosparse_version": self.autosparse_version,
            "model": self.model,
            "created": self.created,
            "search": self.search,
            "block_size": list(self.block_size),
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

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
        return cls(
            model=model,
            layers={name: LayerProfile.from_dict(layer, f"{source}: layers[{name!r}]") for name, layer in layers.items()},
            block_size=(block_size[0], block_size[1]),
            search=_expect(data.get("search", {}), dict, f"{source}: search"),
            created=_expect(data.get("created", {}), dict, f"{source}: created"),
            autosparse_version=_expect(data["autosparse_version"], str, f"{source}: autosparse_version"),
            schema_version=version,
        )

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
        for name, entry in self.layers.items():
            layer = layers.get(name)
            where = f"profile layers[{name!r}]"
            if layer is None:
                raise ValueError(f"{where}: no such attention layer in the model; it has e.g. {sorted(layers)[:3]}")
            if entry.num_heads != layer.num_heads:
                raise ValueError(f"{where}.num_heads: expected {layer.num_heads} (the model), found {entry.num_heads}")
            if entry.index != layer.index:
                raise ValueError(f"{where}.index: expected {layer.index} (the model), found {entry.index}")

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
