"""Find the attention layers of a model and describe the model for profile matching.

Two libraries are served. transformers attention modules call a function looked up through
``AttentionInterface`` with the module as first argument (so the call knows its layer). diffusers
attention modules (``AttentionModuleMixin``) call ``F.scaled_dot_product_attention`` themselves; which
of them are served, and the token geometry of their calls, comes from the model's ``Family``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["AttentionLayer", "attention_layers", "library", "model_signature"]

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


def library(model: nn.Module) -> str:
    """``"transformers"`` or ``"diffusers"``: which capture route serves ``model``; TypeError otherwise."""
    if hasattr(model, "set_attn_implementation") and hasattr(model, "config"):
        return "transformers"
    if _is_diffusers_model(model):
        return "diffusers"
    raise TypeError(
        f"autosparse patches transformers models (PreTrainedModel) and diffusers models (ModelMixin, e.g. "
        f"WanTransformer3DModel or pipeline.transformer); got {type(model).__name__}"
    )


def _is_diffusers_model(model: nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:
        return False
    return isinstance(model, ModelMixin)


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The model's served attention modules, in registration order.

    transformers: modules carrying ``layer_idx``, ``config`` and ``is_causal`` (every self-attention).
    diffusers: attention modules (``AttentionModuleMixin`` or the older ``Attention``) whose name the model's family serves (self and joint
    attention; every attention module for a model without a family adapter).
    """
    layers = _diffusers_layers(model) if library(model) == "diffusers" else _transformers_layers(model)
    if not layers:
        raise TypeError(f"no attention modules found in {type(model).__name__}")
    return layers


def _diffusers_layers(model: nn.Module) -> list[AttentionLayer]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    from autosparse.families import family_of

    family = family_of(model)
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (AttentionModuleMixin, Attention)) and family.serves(name):
            heads = module.heads
            layers.append(AttentionLayer(name, len(layers), heads, getattr(module, "kv_heads", None) or heads,
                                         module.inner_dim // heads, module))
    return layers


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


def model_signature(model: nn.Module) -> dict[str, Any]:
    """``{"class", "config", "fingerprint"}``: what a profile records to refuse the wrong model."""
    if library(model) == "diffusers":
        from autosparse.families import family_of

        config, names = dict(model.config), family_of(model).signature
    else:
        config, names = model.config.to_dict(), _SIGNATURE_FIELDS
    fields = {key: _json(config.get(key)) for key in names if config.get(key) is not None}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"class": type(model).__name__, "config": fields, "fingerprint": digest}


def _json(value: Any) -> Any:
    """Config values as they read back from JSON (tuples become lists), so a loaded profile compares equal."""
    return list(value) if isinstance(value, tuple) else value
