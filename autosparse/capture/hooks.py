"""The hook route: diffusers models and plain modules a family recognises by structure (VGGT).

They call ``F.scaled_dot_product_attention`` from inside their attention modules, with no layer
identity and no registry a third party can extend. A forward pre-hook on each served attention
module publishes the module's layer id for its thread, the replacement of
``F.scaled_dot_product_attention`` (installed while any model is patched through hooks) sends calls
made under a published id to the op and every other call to torch's own function, a pre-hook on the
model reads the call's token geometry (from the family adapter) and denoising step, and the model's
forward restores the published state however it ends. The hooks and the replacement are plain
Python that Dynamo traces, and the layer id is a tensor graph input, so the same capture holds under
``torch.compile`` and ``compile_repeated_blocks``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autosparse import runtime
from autosparse.capture.common import LAYER_ATTR, sdpa_reason
from autosparse.models.families import family_of
from autosparse.runtime import ORIGINAL_SDPA, PatchState

log = logging.getLogger("autosparse")

__all__ = ["CallReader", "attach_hooks", "count_hooked", "detach_hooks", "model_forward",
           "scaled_dot_product_attention", "served_layer"]

def _bypass_reason(module: nn.Module) -> str:
    """Why a served module ran without calling F.scaled_dot_product_attention, naming what it ran:
    its attention processor (diffusers), e.g. a linear attention (Sana) or a dispatcher backend."""
    processor = getattr(module, "processor", None)
    name = type(processor if processor is not None else module).__name__
    return (f"{name} did not call F.scaled_dot_product_attention (a linear or custom attention, or an attention "
            "backend set with set_attention_backend)")


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
    layer = served_layer()
    if layer is not None:
        reason = sdpa_reason(query, key, value, dropout_p, scale, enable_gqa)
        if reason is None:
            return runtime.attention(query, key, value, layer, attn_mask, is_causal, scale)
        runtime.count_unserved(layer, reason)
    return ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)


def served_layer() -> torch.Tensor | None:
    """The layer id of the served attention module running on this thread, None outside one; it
    notes that the module reached attention (F.sdpa's stand-in, or the diffusers backend)."""
    layer = _current.layer
    if layer is not None:
        _current.called = True
    return layer


def _enter_attention(module: nn.Module, args: tuple) -> None:
    _current.outer = (*_current.outer, (_current.layer, _current.called))
    _current.layer, _current.called = getattr(module, LAYER_ATTR), False
    return None  # explicit: Dynamo needs hooks that return None


def _exit_attention(module: nn.Module, args: tuple, output: Any) -> None:
    """Withdraw the module's layer (when its forward raised, ``model_forward`` does)."""
    if not _current.called:  # e.g. set_attention_backend("flash"): diffusers bypassed F.sdpa
        runtime.count_unserved(_current.layer, _bypass_reason(module))
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
    """Remove the hooks and give the model its forward back. A forward wrapped again after patching
    (diffusers' ``enable_parallelism`` wraps it) keeps ``model_forward`` inside that wrapper, with a
    warning: it only restores the capture state, which no hook reads any more."""
    for handle in handles:
        handle.remove()
    if getattr(model.forward, "func", None) is model_forward:
        inner = model.forward.args[1]
        if inner is None:
            del model.forward
        else:
            model.forward = inner
    else:
        log.warning("autosparse: %s.forward was wrapped after patch_model (e.g. by enable_parallelism); autosparse's "
                    "wrapper stays inside it, inert. Patch after enable_parallelism to restore the model exactly",
                    type(model).__name__)
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
