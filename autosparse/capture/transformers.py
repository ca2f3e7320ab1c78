"""The transformers route: autosparse registered as an ``AttentionInterface`` implementation.

transformers models call the registered function with the attention module as first argument; the
module carries its layer id (``LAYER_ATTR``). What the op cannot take (softcap, sinks, attention
weights requested, dropout, gradients, ...) runs the model's own implementation, unchanged, and is
counted.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autosparse import runtime
from autosparse.capture.common import GRAD_REASON, IMPLEMENTATION, LAYER_ATTR, needs_grad

__all__ = ["FALLBACK_IMPLEMENTATIONS", "PLAIN_KWARGS", "SLIDING_REASON", "attach_transformers", "detach_transformers", "model_attention",
           "register_transformers", "transformers_attention"]

# Keyword arguments of transformers attention functions that do not change the math (the op reads
# causality, masks and scaling itself). Any other argument with a value (softcap, sinks/s_aux,
# position_bias, ...) sends the call to the model's own implementation, counted: never approximated.
PLAIN_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "past_key_values", "past_key_value",
                          "output_router_logits", "output_attentions", "output_hidden_states", "layer_idx",
                          "position_embeddings",
                          "sliding_window"})


SLIDING_REASON = "sliding window"


def register_transformers() -> None:
    """Register autosparse's attention function and SDPA's mask function under one name (without the
    mask function transformers drops padding masks). Idempotent; also run when a saved patched
    model is loaded."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, transformers_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


# The implementations a call autosparse does not serve can go back to: autosparse registers SDPA's
# mask function, whose boolean (or skipped) masks these two read as they are or after conversion.
FALLBACK_IMPLEMENTATIONS = ("sdpa", "eager")


def model_attention(module: nn.Module, implementation: str | None) -> Callable[..., Any]:
    """The attention function ``module`` ran under ``implementation`` before patching (what a call
    autosparse cannot serve runs, so it equals the unpatched model), taking the masks autosparse's
    mask function makes. ``implementation`` None: a module autosparse does not serve (no layer id),
    whose model's implementation is not at hand: its modeling file's eager attention (transformers'
    reference semantics, sinks and softcapping included), else SDPA. ValueError naming the
    implementation when there is none."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if implementation == "sdpa" or (implementation is None and eager is None):
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    if implementation not in (None, *FALLBACK_IMPLEMENTATIONS) or eager is None:
        missing = "" if eager is not None else f", and {type(module).__module__} has no eager_attention_forward"
        raise ValueError(f"{type(module).__name__}: autosparse serves models whose attn_implementation is one of "
                         f"{list(FALLBACK_IMPLEMENTATIONS)} (calls it cannot serve run there, unchanged); found "
                         f"{implementation!r}{missing}")
    return functools.partial(_eager, eager)


def _eager(eager: Callable[..., Any], module: nn.Module, query: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
    """A modeling file's eager attention with SDPA's mask made additive, as its own mask function
    would make it: a skipped causal mask (None) is the causal mask SDPA's ``is_causal`` means."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if attention_mask is None and causal and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, **kwargs)


def attach_transformers(model: nn.Module, modules: list[nn.Module]) -> str | None:
    """Route ``model`` through autosparse; returns the implementation it had (for detaching and
    for the calls autosparse leaves to it). ValueError, before anything changes, if a served module
    has no such implementation to fall back to."""
    original = model.config._attn_implementation
    for module in modules:
        model_attention(module, original)
    register_transformers()
    model.set_attn_implementation(IMPLEMENTATION)
    return original


def detach_transformers(model: nn.Module, original: str | None) -> None:
    model.set_attn_implementation(original)


def transformers_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]`` (GQA not
    expanded), bool mask ``[B, 1, Sq, Sk]`` or None; returns ``([B, Sq, Hq, D], weights or None)``.

    Causality is the call's, decided as transformers' SDPA path decides it (the module's
    ``is_causal`` at call time, only without a mask and for more than one query; with a mask, the
    mask says it): a module switched to bidirectional after patching is served bidirectional."""
    layer = getattr(module, LAYER_ATTR, None)
    reason = _transformers_reason(module, query, key, value, dropout, kwargs)
    if layer is None or reason is not None:  # not ours, or arguments the op does not take
        implementation = None
        if layer is not None:
            # A sliding window shorter than the keys stays the model's own: autosparse never widens
            # it (calibration marks such a layer dense_by_model, at the window's cost).
            window = kwargs.get("sliding_window") if reason.startswith(SLIDING_REASON) else None
            runtime.count_unserved(layer, reason, keys=key.shape[2], window=window)
            implementation = runtime.plan_of(layer).state.original_implementation
        return model_attention(module, implementation)(module, query, key, value, attention_mask, dropout=dropout,
                                                       scaling=scaling, is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1 and attention_mask is None
    out = runtime.attention(query, key, value, layer, attention_mask, causal, scaling)
    return out.transpose(1, 2), None


def _transformers_reason(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         dropout: float, kwargs: dict[str, Any]) -> str | None:
    for name, value_ in kwargs.items():
        if value_ is not None and name not in PLAIN_KWARGS:
            return f"argument {name}"
    if kwargs.get("output_attentions"):
        return "output_attentions (attention weights requested)"
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:  # within the window it changes nothing
        return f"{SLIDING_REASON} {window} shorter than the keys ({key.shape[2]})"
    if dropout > 0.0 and module.training:
        return "dropout"
    if needs_grad(query, key, value):
        return GRAD_REASON
    return None
