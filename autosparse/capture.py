"""Capture: route a model's attention calls to ``torch.ops.autosparse.attention`` with their layer.

transformers models call a function registered in ``AttentionInterface`` with the attention module
as first argument; the module carries its layer id. diffusers models, and plain modules a family
recognises by structure (VGGT), call ``F.scaled_dot_product_attention`` from inside their attention
modules, with no layer identity and no registry a third party can extend. There (the hook route), a
forward pre-hook on each served attention module publishes the module's layer id, the replacement
of ``F.scaled_dot_product_attention`` (installed while any model is patched through hooks) sends
calls made under a published id to the op and every other call to torch's own function, and a
pre-hook on the model reads the call's token geometry (from the family adapter) and denoising step.
The hooks and the replacement are plain Python that Dynamo traces, and the layer id is a tensor
graph input, so the same capture holds under ``torch.compile`` and ``compile_repeated_blocks``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autosparse import runtime
from autosparse.families import family_of
from autosparse.runtime import ORIGINAL_SDPA, PatchState

log = logging.getLogger("autosparse")

__all__ = ["LAYER_ATTR", "attach_transformers", "detach_transformers", "attach_hooks", "detach_hooks"]

IMPLEMENTATION = "autosparse"
LAYER_ATTR = "_autosparse_layer"  # on each served attention module: its 0-d CPU int64 layer id
# Keyword arguments of transformers attention functions that change the math; SDPA-only models
# never pass them, so seeing one means the call is not plain attention.
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks", "sliding_window")
GRAD_REASON = "autograd (the kernel has no backward)"
_BYPASS_REASON = "attention backend other than F.scaled_dot_product_attention (set_attention_backend?)"


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# -- transformers -------------------------------------------------------------------------------------


def attach_transformers(model: nn.Module) -> str | None:
    """Route ``model`` through autosparse; returns the implementation it had (for detaching)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, transformers_attention)
    # Without the mask function registered under the same name transformers drops padding masks.
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    original = model.config._attn_implementation
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
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]`` (GQA not
    expanded), bool mask ``[B, 1, Sq, Sk]`` or None; returns ``([B, Sq, Hq, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, LAYER_ATTR, None)
    reason = _transformers_reason(module, query, key, value, dropout, kwargs)
    if layer is None or reason is not None:  # not ours, or arguments the op does not take
        if layer is not None:
            runtime.count_unserved(layer, reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    out = torch.ops.autosparse.attention(query, key, value, layer, attention_mask, bool(is_causal), scaling)
    return out.transpose(1, 2), None


def _transformers_reason(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         dropout: float, kwargs: dict[str, Any]) -> str | None:
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"argument {name}"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if dropout > 0.0 and module.training:
        return "dropout"
    if _needs_grad(query, key, value):
        return GRAD_REASON
    return None


# -- hook route: diffusers models and structural families (VGGT) -------------------------------------


class _Current:
    """The served attention module now running (its layer id), published by its pre-hook, and
    whether it has called F.scaled_dot_product_attention yet."""

    layer: torch.Tensor | None = None
    called: bool = False


_current = _Current()
_hooked_models = 0  # models patched through hooks: the F.sdpa replacement is installed while > 0


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Stands in for ``F.scaled_dot_product_attention`` while models are patched through hooks:
    calls inside a served attention module go to the op, all others to torch's function unchanged."""
    layer = _current.layer
    _current.called = True
    if layer is not None and dropout_p == 0.0 and not _needs_grad(query, key, value):
        return torch.ops.autosparse.attention(query, key, value, layer, attn_mask, is_causal, scale)
    if layer is not None:
        runtime.count_unserved(layer, "dropout" if dropout_p > 0.0 else GRAD_REASON)
    return ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)


def _enter_attention(module: nn.Module, args: tuple) -> None:
    _current.layer, _current.called = getattr(module, LAYER_ATTR), False
    return None  # explicit: Dynamo needs hooks that return None


def _exit_attention(module: nn.Module, args: tuple, output: Any) -> None:
    if not _current.called:  # e.g. set_attention_backend("flash"): diffusers bypassed F.sdpa
        runtime.count_unserved(_current.layer, _BYPASS_REASON)
    _current.layer = None
    return None


def attach_hooks(model: nn.Module, state: PatchState, modules: list[nn.Module]) -> list[Any]:
    """Hook ``model`` and its served attention ``modules``; returns the hook handles."""
    global _hooked_models
    handles = [model.register_forward_pre_hook(call_reader(model, state), with_kwargs=True)]
    for module in modules:
        handles.append(module.register_forward_pre_hook(_enter_attention))
        handles.append(module.register_forward_hook(_exit_attention))
    _hooked_models += 1
    F.scaled_dot_product_attention = scaled_dot_product_attention
    return handles


def detach_hooks(handles: list[Any]) -> None:
    global _hooked_models
    for handle in handles:
        handle.remove()
    _hooked_models -= 1
    if _hooked_models == 0:
        F.scaled_dot_product_attention = ORIGINAL_SDPA


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


def call_reader(model: nn.Module, state: PatchState):
    """The model's pre-hook: token geometry and denoising step of this call, into ``state`` (a
    model without a ``timestep`` argument, such as VGGT, has no step: None).

    The step counts distinct timesteps: it restarts at 0 when the timestep rises (a new
    generation; denoising runs from high to low timesteps) and stays when it repeats (classifier-free
    guidance run as a second call). It runs eagerly (one host read of the timestep per call), also
    under ``torch.compile``."""
    family = family_of(model)
    signature = inspect.signature(model.forward)

    @torch._dynamo.disable
    def read_call(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        arguments = signature.bind_partial(*args, **kwargs).arguments
        context = state.context
        context.tokens = _geometry(family, model, arguments)
        timestep = arguments.get("timestep")
        if timestep is None:
            context.step = None
            return None
        now = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        previous = context.timestep
        if previous is None or context.step is None or now > previous:
            context.step = 0
        elif now < previous:
            context.step += 1
        context.timestep = now
        return None

    return read_call
