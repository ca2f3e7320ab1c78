"""Find the attention layers of a model, say what their calls are like, and describe the model for
profile matching.

Three kinds of model are served. transformers attention modules call a function looked up through
``AttentionInterface`` with the module as first argument (so the call knows its layer). diffusers
attention modules (``AttentionModuleMixin``) call ``F.scaled_dot_product_attention`` themselves; which
of them are served, and the token geometry of their calls, comes from the model's ``Family``. A plain
``nn.Module`` that a family recognises by its structure (``ModelKind.MODULE``, e.g. VGGT) is served
the same way as diffusers models: its attention modules call ``F.scaled_dot_product_attention`` too.
Everything here that differs by kind branches on ``model_kind`` (``autosparse.models.kind``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from torch import nn

from autosparse.models.families import family_of
from autosparse.models.kind import ModelKind, model_kind

__all__ = ["AttentionLayer", "CallTraits", "attention_layers", "attention_structure", "call_traits",
           "model_signature", "signature_fingerprint"]

# Config fields that decide whether a profile fits: attention shapes and depth.
_SIGNATURE_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module: its qualified name, index among attention layers and head counts."""

    name: str
    index: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    module: nn.Module


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The model's served attention modules, in registration order.

    transformers: modules carrying ``layer_idx``, ``config`` and ``is_causal`` (every self-attention).
    diffusers: attention modules (``AttentionModuleMixin`` or the older ``Attention``) whose name the
    model's family serves (self and joint attention; every attention module for a model without a
    family adapter). module: modules with ``num_heads`` and ``head_dim`` (or a ``qkv`` projection)
    whose name the model's family serves (VGGT: global attention only).
    """
    kind = model_kind(model)
    layers = _transformers_layers(model) if kind is ModelKind.TRANSFORMERS else _family_layers(model, kind)
    if not layers:
        raise TypeError(f"no attention modules found in {type(model).__name__}")
    return layers


def _family_layers(model: nn.Module, kind: ModelKind) -> list[AttentionLayer]:
    """Hook route: the attention modules whose name the model's family serves."""
    family = family_of(model)
    heads_of = _diffusers_heads() if kind is ModelKind.DIFFUSERS else _module_heads
    layers = []
    for name, module in model.named_modules():
        heads = heads_of(module) if family.serves(name) else None
        if heads is not None:
            layers.append(AttentionLayer(name, len(layers), *heads, module))
    return layers


def _diffusers_heads():
    """``module -> (heads, kv_heads, head_dim)`` of a diffusers attention module, None for others."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    def heads_of(module: nn.Module) -> tuple[int, int, int] | None:
        if not isinstance(module, (AttentionModuleMixin, Attention)):
            return None
        heads = module.heads
        return heads, getattr(module, "kv_heads", None) or heads, module.inner_dim // heads

    return heads_of


def _module_heads(module: nn.Module) -> tuple[int, int, int] | None:
    """``(heads, heads, head_dim)`` of a plain attention module (``num_heads`` with ``head_dim`` or a
    fused ``qkv`` projection, as timm/DINOv2/VGGT write them), None for others."""
    heads = getattr(module, "num_heads", None)
    head_dim = getattr(module, "head_dim", None)
    qkv = getattr(module, "qkv", None)
    if head_dim is None and isinstance(qkv, nn.Linear) and isinstance(heads, int):
        head_dim = qkv.out_features // (3 * heads)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return None
    return heads, heads, head_dim


def _transformers_layers(model: nn.Module) -> list[AttentionLayer]:
    layers = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if not (isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "is_causal") and config):
            continue
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(module, "head_dim", None) or config.hidden_size // num_heads
        layers.append(AttentionLayer(name, len(layers), num_heads, num_kv_heads, head_dim, module))
    return layers


@dataclass(frozen=True)
class CallTraits:
    """What every call of one attention layer is like, as far as the model says before any call:
    ``causal``, ``grid_rank`` (dims of its token grid; None: never a grid) and ``description``, the
    two in words for error messages."""

    causal: bool
    grid_rank: int | None
    description: str


def call_traits(model: nn.Module, layer: AttentionLayer) -> CallTraits:
    """transformers attention: causal as the module says, never a grid. Hook route (diffusers,
    VGGT): non-causal, the family's grid."""
    if model_kind(model) is ModelKind.TRANSFORMERS:
        causal = bool(getattr(layer.module, "is_causal", True))
        return CallTraits(causal, None, f"{'causal' if causal else 'non-causal'} attention of a transformers model, "
                                        "no token grid")
    family = family_of(model)
    grid = f"a {family.grid_rank}-D token grid" if family.grid_rank is not None else "no token grid"
    return CallTraits(False, family.grid_rank, f"non-causal attention of the {family.name!r} family, {grid}")


def _config_field(config: Any, key: str) -> Any:
    """``config.key``, or None where the config has none or refuses one global value (per-layer
    fields of heterogeneous configs: the per-layer heads are in ``attention_structure`` anyway)."""
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - e.g. transformers' AmbiguousGlobalPerLayerAttributeError
        return None


def model_signature(model: nn.Module) -> dict[str, Any]:
    """``{"class", "config", "attention", "fingerprint"}``: what a profile records to refuse the wrong
    model. ``config``: the config fields that shape attention, read as attributes (so transformers'
    ``attribute_map`` applies: GPT-2's ``n_layer`` is ``num_hidden_layers``), or for a hook-route
    model the family's fields (from its config; for ``ModelKind.MODULE``, from its attributes).
    ``attention``: the served attention layers (``attention_structure``), which decide which layers
    run which patterns. ``fingerprint``: a hash of the three (``signature_fingerprint``)."""
    if model_kind(model) is ModelKind.TRANSFORMERS:
        found = {key: _config_field(model.config, key) for key in _SIGNATURE_FIELDS}
    else:
        found = family_of(model).signature_fields(model)
    signature = {
        "class": type(model).__name__,
        "config": {key: _json(value) for key, value in found.items() if value is not None},
        "attention": attention_structure(attention_layers(model)),
    }
    return {**signature, "fingerprint": signature_fingerprint(signature)}


def attention_structure(layers: list[AttentionLayer]) -> dict[str, list]:
    """The served attention layers as parallel lists, in order: ``names``, ``heads`` (query heads),
    ``kv_heads`` and ``head_dim``."""
    return {
        "names": [layer.name for layer in layers],
        "heads": [layer.num_heads for layer in layers],
        "kv_heads": [layer.num_kv_heads for layer in layers],
        "head_dim": [layer.head_dim for layer in layers],
    }


def signature_fingerprint(signature: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over a signature's ``class``, ``config`` and ``attention`` (as JSON,
    keys sorted): equal for two models iff a profile of one fits the other's structure."""
    fields = {key: signature.get(key) for key in ("class", "config", "attention")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _json(value: Any) -> Any:
    """Config values as they read back from JSON (tuples become lists), so a loaded profile compares equal."""
    return [_json(v) for v in value] if isinstance(value, (list, tuple)) else value
