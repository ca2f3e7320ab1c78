"""Find the attention layers of a model and describe the model for profile matching.

v0 serves transformers models, whose attention modules call a function looked up through
``AttentionInterface`` with the module as first argument (so the call knows its layer).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["AttentionLayer", "attention_layers", "model_signature"]

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


def _require_transformers_model(model: nn.Module) -> None:
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(
            f"autosparse v0 patches transformers models (PreTrainedModel with set_attn_implementation); "
            f"got {type(model).__name__}. Diffusers transformers are not supported yet."
        )


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The model's self-attention modules, in registration order.

    A module counts when it carries the attributes transformers attention modules share:
    ``layer_idx``, ``config`` and ``is_causal``.
    """
    _require_transformers_model(model)
    layers = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if not (isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "is_causal") and config):
            continue
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(module, "head_dim", None) or config.hidden_size // num_heads
        layers.append(AttentionLayer(name, len(layers), num_heads, num_kv_heads, head_dim, module))
    if not layers:
        raise TypeError(f"no transformers attention modules (with layer_idx/is_causal) found in {type(model).__name__}")
    return layers


def model_signature(model: nn.Module) -> dict[str, Any]:
    """``{"class", "config", "fingerprint"}``: what a profile records to refuse the wrong model."""
    _require_transformers_model(model)
    config = model.config.to_dict()
    fields = {key: config.get(key) for key in _SIGNATURE_FIELDS if config.get(key) is not None}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"class": type(model).__name__, "config": fields, "fingerprint": digest}
