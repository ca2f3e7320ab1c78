"""patch_model / unpatch_model / stats: route a model's attention through autosparse.

In the spirit of torchao's ``quantize_(model, config)``: one verb, in place, undoable. A model from
transformers or diffusers, or a module of a known structure (VGGT), gets a ``LayerPlan`` per served
attention module (its profile entry and
caches, registered under a layer id); ``capture`` routes each call to
``torch.ops.autosparse.attention``, which serves it sparse or runs it dense and counts the reason in
``stats(model)``; nothing the kernel cannot honour is ever approximated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from autosparse import capture, runtime
from autosparse.guard import Guard, GuardConfig
from autosparse.models import ModelKind, attention_layers, model_kind
from autosparse.profile import Profile
from autosparse.runtime import AttentionStats, LayerPlan, PatchState
from autosparse.runtime.decode import DecodePolicy, PageTopK, StaticDecode

__all__ = ["AttentionStats", "patch_model", "unpatch_model", "stats"]

_STATE_ATTR = "_autosparse_state"


@dataclass
class _Patch:
    """What ``unpatch_model`` undoes. ``route``: ``"eager"`` (patch_model: capture hooks or the
    transformers attention function) or ``"compile"`` (the compile backend rewrote the graphs).

    It travels with the model: ``copy.deepcopy(model)`` and ``torch.save``/``torch.load`` give a
    model patched on its own (new layer ids, its own counts and caches)."""

    state: PatchState
    kind: ModelKind
    modules: list[nn.Module]
    plans: list[LayerPlan]
    profile: Profile
    route: str = "eager"
    handles: list[Any] = field(default_factory=list)  # hooks
    context: str | None = None  # compile route, hook-route models: "graph" or "hook" (where the call context is read)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (deepcopy or unpickling): register its own plans under new layer ids, and route
        its attention again (the modules' hooks and forwards came with them). A copy saved by 0.1
        names its model kind by the string it had then."""
        if "library" in state:
            state = {**state, "kind": ModelKind(state["library"])}
            del state["library"]
        self.__dict__.update(state)
        for module, plan in zip(self.modules, self.plans):
            plan.bind(module)
            setattr(module, capture.LAYER_ATTR, runtime.register(plan))
        if self.route == "eager":
            if self.kind.hooked:
                capture.count_hooked(+1)
            else:
                capture.register_transformers()


def patch_model(model: nn.Module, profile: Profile | str | Path, *, strict: bool = False,
                guard: GuardConfig | dict[str, Any] | None = None,
                decode: DecodePolicy | str | None = None) -> nn.Module:
    """Run ``model``'s attention with the per-head patterns of ``profile``; patches in place.

    Parameters:
        model: a transformers model (``PreTrainedModel``), a diffusers transformer (``ModelMixin``:
            Wan, HunyuanVideo, CogVideoX and FLUX with their token geometry; others with 1-D
            patterns only), or a module of a known structure (VGGT or its aggregator: global
            attention served, with per-frame special tokens dense; frame attention untouched).
        profile: a ``Profile``, the path of its JSON file or a shipped profile's name
            (``autosparse.profiles.names()``); it must fit the model (class, config,
            layer names, head counts), else ValueError naming the field.
        strict: raise instead of falling back to dense when a call cannot be served sparse.
        guard: a ``GuardConfig`` (or its fields as a dict): on sampled query rows of every sparse
            call, compare with exact attention; over ``tol``, the call is recomputed dense and
            counted (``stats(model).fallback``), with a log line naming layer, heads and error.
        decode: how decode steps (one query row over the KV cache) run: None (dense, as SDPA),
            ``StaticDecode()`` / ``"static"`` (the profile's static patterns at the query's
            position) or ``PageTopK(...)`` / ``"page_topk"`` (Quest's page selection); both read
            only the kept keys (``autosparse.runtime.decode``).

    Returns the same model. Undo with ``unpatch_model``; counts are in ``stats(model)``. Works
    eagerly and under ``torch.compile`` (also ``compile_repeated_blocks``), patched before or after
    compiling.
    """
    patch = attach(model, profile, strict=strict, guard=guard, route="eager", decode=decode)
    if patch.kind is ModelKind.DIFFUSERS:
        capture.register_diffusers()  # set_attention_backend("autosparse") may then select it
    if patch.kind.hooked:
        patch.handles = capture.attach_hooks(model, patch.state, patch.modules)
    else:
        patch.state.original_implementation = capture.attach_transformers(model, patch.modules)
    return model


def attach(model: nn.Module, profile: Profile | str | Path, *, strict: bool, route: str,
           guard: GuardConfig | dict[str, Any] | None = None, decode: DecodePolicy | str | None = None) -> _Patch:
    """Give every served attention module of ``model`` its plan and layer id (the capture route is
    the caller's: ``patch_model`` or the compile backend)."""
    existing = getattr(model, _STATE_ATTR, None)
    if existing is not None and existing.route == "compile":
        raise RuntimeError("this model is served by torch.compile(model, backend='autosparse'): the compiled module "
                           "runs sparse, the model called directly runs its own attention. To patch it eagerly as "
                           "well, patch a copy (copy.deepcopy(model)), or call autosparse.unpatch_model(model) first "
                           "(the compiled module then refuses to run)")
    if existing is not None:
        raise RuntimeError("this model is already patched by autosparse; call autosparse.unpatch_model(model) first")
    if not isinstance(profile, Profile):
        from autosparse import profiles

        shipped = isinstance(profile, str) and not Path(profile).exists() and profile in profiles.names()
        profile = profiles.load(profile) if shipped else Profile.load(profile)
    profile.check_model(model)

    config = GuardConfig.parse(guard)
    state = PatchState(strict, None if config is None else Guard(config), decode=_decode_policy(decode))
    layers = attention_layers(model)
    plans = [LayerPlan(layer.name, layer.index, layer.num_heads, profile, state) for layer in layers]
    for layer, plan in zip(layers, plans):
        plan.bind(layer.module)
        setattr(layer.module, capture.LAYER_ATTR, runtime.register(plan))
    patch = _Patch(state, model_kind(model), [layer.module for layer in layers], plans, profile, route)
    setattr(model, _STATE_ATTR, patch)
    return patch


def _decode_policy(decode: DecodePolicy | str | None) -> DecodePolicy | None:
    if decode is None or isinstance(decode, (StaticDecode, PageTopK)):
        return decode
    named = {"static": StaticDecode, "page_topk": PageTopK}
    if isinstance(decode, str) and decode in named:
        return named[decode]()
    raise ValueError(f"decode must be None, 'static', 'page_topk', StaticDecode() or PageTopK(...), got {decode!r}")


def patch_of(model: nn.Module) -> _Patch | None:
    """The model's autosparse record, or None when it is not patched."""
    return getattr(model, _STATE_ATTR, None)


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo ``patch_model``: the original attention, no autosparse attributes or hooks. A model that
    is not patched is returned as it is, with a warning."""
    patch = patch_of(model)
    if patch is None:
        warnings.warn("autosparse.unpatch_model: this model is not patched by autosparse; nothing to undo",
                      stacklevel=2)
        return model
    if patch.route == "eager" and patch.kind.hooked:
        capture.detach_hooks(model, patch.handles)
    elif patch.route == "eager":
        capture.detach_transformers(model, patch.state.original_implementation)
    else:  # compile backend: its graphs refuse to run from now on (they name the reason)
        for handle in patch.handles:
            handle.remove()
    for module in patch.modules:
        runtime.unregister(getattr(module, capture.LAYER_ATTR))
        delattr(module, capture.LAYER_ATTR)
    delattr(model, _STATE_ATTR)
    return model


def stats(model: nn.Module, *, reset: bool = False) -> AttentionStats:
    """A snapshot of the attention call counts of a patched model; empty counts, with a warning, for
    a model that is not patched (every call there runs the model's own attention)."""
    patch = patch_of(model)
    if patch is None:
        warnings.warn("autosparse.stats: this model is not patched by autosparse; no calls counted", stacklevel=2)
        return AttentionStats()
    state = patch.state
    snapshot = AttentionStats(state.stats.sparse, state.stats.dense.copy(), state.stats.fallback.copy())
    if reset:
        state.stats = AttentionStats()
    return snapshot


