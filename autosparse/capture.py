"""Capture: route a model's attention calls to ``torch.ops.autosparse.attention`` with their layer.

transformers models call a function registered in ``AttentionInterface`` with the attention module
as first argument; the module carries its layer id. diffusers models, and plain modules a family
recognises by structure (VGGT), call ``F.scaled_dot_product_attention`` from inside their attention
modules, with no layer identity and no registry a third party can extend. There (the hook route), a
forward pre-hook on each served attention module publishes the module's layer id for its thread,
the replacement of ``F.scaled_dot_product_attention`` (installed while any model is patched through
hooks) sends calls made under a published id to the op and every other call to torch's own
function, a pre-hook on the model reads the call's token geometry (from the family adapter) and
denoising step, and the model's forward restores the published state however it ends. The hooks and
the replacement are plain Python that Dynamo traces, and the layer id is a tensor graph input, so
the same capture holds under ``torch.compile`` and ``compile_repeated_blocks``.

Every call keeps the meaning its caller gave it: what the op cannot take as SDPA (or transformers'
attention function) defines it runs there, unchanged, and is counted.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autosparse import runtime
from autosparse.families import family_of
from autosparse.runtime import ORIGINAL_SDPA, PatchState

log = logging.getLogger("autosparse")

__all__ = ["LAYER_ATTR", "CallReader", "attach_transformers", "detach_transformers", "attach_hooks", "detach_hooks"]

IMPLEMENTATION = "autosparse"
LAYER_ATTR = "_autosparse_layer"  # on each served attention module: its 0-d CPU int64 layer id
# Keyword arguments of transformers attention functions that do not change the math (the op reads
# causality, masks and scaling itself). Any other argument with a value (softcap, sinks/s_aux,
# position_bias, ...) sends the call to the model's own implementation, counted: never approximated.
_PLAIN_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "past_key_values", "past_key_value",
                           "output_router_logits", "output_attentions", "layer_idx", "position_embeddings",
                           "sliding_window"})
GRAD_REASON = "autograd (the kernel has no backward)"
_BYPASS_REASON = "attention backend other than F.scaled_dot_product_attention (set_attention_backend?)"


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# -- transformers -------------------------------------------------------------------------------------


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
            runtime.count_unserved(layer, reason)
            implementation = runtime.plan_of(layer).state.original_implementation
        return model_attention(module, implementation)(module, query, key, value, attention_mask, dropout=dropout,
                                                       scaling=scaling, is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1 and attention_mask is None
    out = torch.ops.autosparse.attention(query, key, value, layer, attention_mask, causal, scaling)
    return out.transpose(1, 2), None


def _transformers_reason(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         dropout: float, kwargs: dict[str, Any]) -> str | None:
    for name, value_ in kwargs.items():
        if value_ is not None and name not in _PLAIN_KWARGS:
            return f"argument {name}"
    if kwargs.get("output_attentions"):
        return "output_attentions (attention weights requested)"
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:  # within the window it changes nothing
        return f"sliding window {window} shorter than the keys ({key.shape[2]})"
    if dropout > 0.0 and module.training:
        return "dropout"
    if _needs_grad(query, key, value):
        return GRAD_REASON
    return None


# -- hook route: diffusers models and structural families (VGGT) -------------------------------------


class _Current(threading.local):
    """Per thread: the served attention module now running (its layer id), published by its
    pre-hook, and whether it has called F.scaled_dot_product_attention yet. Other threads' calls
    are never captured."""

    def __init__(self) -> None:  # per thread; in the instance dict, where Dynamo's guards look
        self.layer: torch.Tensor | None = None
        self.called = False
        self.outer: tuple = ()  # (layer, called) of the served modules this one runs inside, innermost last


_current = _Current()
_hooked_models = 0  # models patched through hooks: the F.sdpa replacement is installed while > 0


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Stands in for ``F.scaled_dot_product_attention`` while models are patched through hooks:
    calls inside a served attention module go to the op, all others to torch's function unchanged.
    A call the op cannot take as SDPA defines it runs torch's function with the same arguments."""
    layer = _current.layer
    if layer is not None:
        _current.called = True
        reason = sdpa_reason(query, key, value, dropout_p, scale, enable_gqa)
        if reason is None:
            return torch.ops.autosparse.attention(query, key, value, layer, attn_mask, is_causal, scale)
        runtime.count_unserved(layer, reason)
    return ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)


def sdpa_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float,
                 scale: float | None, enable_gqa: bool) -> str | None:
    """Why the op cannot take this SDPA call (it takes 4-D ``[B, H, S, D]`` with one batch size and
    GQA by head mapping); None if it can."""
    if dropout_p > 0.0:
        return "dropout"
    if _needs_grad(query, key, value):
        return GRAD_REASON
    if not query.dim() == key.dim() == value.dim() == 4:
        return f"q/k/v of {query.dim()}/{key.dim()}/{value.dim()} dims (the op takes [B, H, S, D])"
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        return "k/v broadcast over the batch"
    if key.shape[1] != value.shape[1] or query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads over {key.shape[1]}/{value.shape[1]} key/value heads"
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return "query and key heads differ without enable_gqa (torch refuses)"
    if scale is not None and not (math.isfinite(scale) and scale > 0.0):
        return f"scale {scale!r} (the kernel takes a positive finite scale)"
    return None


def _enter_attention(module: nn.Module, args: tuple) -> None:
    _current.outer = (*_current.outer, (_current.layer, _current.called))
    _current.layer, _current.called = getattr(module, LAYER_ATTR), False
    return None  # explicit: Dynamo needs hooks that return None


def _exit_attention(module: nn.Module, args: tuple, output: Any) -> None:
    """Withdraw the module's layer (when its forward raised, ``model_forward`` does)."""
    if not _current.called:  # e.g. set_attention_backend("flash"): diffusers bypassed F.sdpa
        runtime.count_unserved(_current.layer, _BYPASS_REASON)
    (_current.layer, _current.called), _current.outer = _current.outer[-1], _current.outer[:-1]
    return None


def model_forward(model: nn.Module, inner: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> Any:
    """A hooked model's ``forward`` while patched: however the forward ends (``finally``: also on
    KeyboardInterrupt, which forward hooks do not see), no layer it published outlives it.
    ``inner``: the instance's own ``forward`` it had (e.g. accelerate's offloading), else None."""
    saved = _current.layer, _current.called, _current.outer
    try:
        return inner(*args, **kwargs) if inner is not None else type(model).forward(model, *args, **kwargs)
    finally:
        _current.layer, _current.called, _current.outer = saved


def attach_hooks(model: nn.Module, state: PatchState, modules: list[nn.Module]) -> list[Any]:
    """Hook ``model`` (its call context; a forward that restores the capture state however it
    ends) and its served attention ``modules``; returns the hook handles."""
    handles = [model.register_forward_pre_hook(CallReader(model, state), with_kwargs=True)]
    for module in modules:
        handles.append(module.register_forward_pre_hook(_enter_attention))
        # Not always_call: Dynamo guards on those hooks' ids, which differ per block (one graph per
        # block under compile_repeated_blocks). An exception is handled by the model's forward.
        handles.append(module.register_forward_hook(_exit_attention))
    model.forward = functools.partial(model_forward, model, model.__dict__.get("forward"))
    count_hooked(+1)
    return handles


def detach_hooks(model: nn.Module, handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    inner = model.forward.args[1]
    if inner is None:
        del model.forward
    else:
        model.forward = inner
    count_hooked(-1)


def count_hooked(change: int) -> None:
    """One model more (+1) or fewer (-1) patched through hooks: the F.sdpa replacement is installed
    while there are any."""
    global _hooked_models
    _hooked_models += change
    F.scaled_dot_product_attention = scaled_dot_product_attention if _hooked_models > 0 else ORIGINAL_SDPA


def _geometry(family, model: nn.Module, arguments: dict[str, Any]):
    """The family's token geometry of this call; None (grid patterns then run dense, counted) when
    the model has no adapter or the adapter cannot read these inputs."""
    if family.geometry is None:
        return None
    try:
        return family.geometry(model, arguments)
    except (KeyError, ValueError, AttributeError) as err:
        log.warning("autosparse: no token geometry for this %s call (%s); grid patterns run dense",
                    type(model).__name__, err)
        return None


class CallReader:
    """The model's pre-hook: token geometry and denoising step of this call, into ``state`` (a
    model without a ``timestep`` argument, such as VGGT, has no step: None). It runs eagerly (one
    host read of the timestep per call), also under ``torch.compile``; it pickles with the model.

    The step counts distinct timesteps (``CallContext.advance``): denoising runs from high to low
    timesteps, a repeated timestep is classifier-free guidance's second call, and a new generation
    starts when the timestep rises or repeats more often than the generation's first step did."""

    def __init__(self, model: nn.Module, state: PatchState) -> None:
        self.state = state
        self._parts: tuple[Any, inspect.Signature] | None = None  # family and forward signature, found once

    def __getstate__(self) -> dict[str, Any]:
        return {"state": self.state, "_parts": None}

    @torch._dynamo.disable
    def __call__(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._parts is None:
            self._parts = family_of(model), inspect.signature(type(model).forward)  # the class's: forward is wrapped
        family, signature = self._parts
        arguments = signature.bind_partial(model, *args, **kwargs).arguments
        context = self.state.context
        context.tokens = _geometry(family, model, arguments)
        timestep = arguments.get("timestep")
        if timestep is None:
            context.step = None
        else:
            context.advance(float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep))
        return None
