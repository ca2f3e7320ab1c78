"""``torch.compile(model, backend="autosparse", options={"profile": ...})``: the compile backend.

Registered through the ``torch_dynamo_backends`` entry point, so it works in a fresh process without
importing autosparse. For each graph Dynamo captures it:

1. finds the model: the outermost served model (transformers, diffusers, or a module of a known
   structure such as VGGT) that owns the graph's parameters
   (a Dynamo graph carries parameters, never the model; the live models are found once per graph
   among the garbage collector's objects);
2. attaches the profile (the option, else the shipped profile that fits the model, else none: the
   graph compiles dense and says so once) exactly as ``patch_model`` does: one plan and layer id per
   served attention module;
3. rewrites each SDPA call made inside a served attention module into
   ``torch.ops.autosparse.attention`` (``autosparse.passes.sdpa``), with its layer id computed in the
   graph by ``torch.ops.autosparse.layer_of`` from one of that module's parameters, which Dynamo
   passes as a graph input: a graph compiled once for a repeated block (``compile_repeated_blocks``
   or ``torch.compile`` on each block) still serves every block with its own patterns, with no
   recompile. Calls it cannot serve (dropout, autograd) and layers dense at every step stay SDPA and
   are counted per call in ``autosparse.stats(model)``;
4. hands the graph to the inner compiler (``"inductor"`` unless ``options["inner"]`` says otherwise).

For a model of the hook route (diffusers, or a module of a known structure), a call's context
(token geometry, denoising step) is read by the family adapter from the model's call arguments:
when the graph traced the model's forward, from the graph's own inputs before it runs; otherwise
(the blocks are compiled, the model runs eagerly) by a forward pre-hook on the model, which the
backend installs, seeded for the call in progress.
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import re
import sys
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from autosparse import capture, runtime
from autosparse.models import model_kind
from autosparse.patch import _Patch, attach, patch_of
from autosparse.profile import Profile

__all__ = ["BackendOptions", "autosparse_backend"]

log = logging.getLogger("autosparse")

_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning("autosparse: %s", message)


@dataclass(frozen=True)
class BackendOptions:
    """``torch.compile(..., options={...})`` of the autosparse backend.

    Attributes:
        profile: a ``Profile`` or the path of its JSON file; None: the shipped profile that fits the
            model, if any (else the model compiles dense, said once).
        strict: raise (at compile time, or at the call) instead of running a call dense.
        inner: the compiler the rewritten graph goes to: a registered backend name or a callable.
        mode: inductor's mode (``"reduce-overhead"``, ``"max-autotune"``, ...): ``torch.compile``
            takes ``mode=`` or ``options=``, not both.
        guard: a ``GuardConfig`` or its fields as a dict: the run-time accuracy guard of
            ``patch_model(..., guard=...)``.
    """

    profile: Profile | str | Path | None = None
    strict: bool = False
    inner: str | Callable[..., Any] = "inductor"
    mode: str | None = None
    guard: Any = None

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"autosparse backend options {unknown}: unknown (known: {sorted(known)})")
        return cls(**options)


def autosparse_backend(gm: fx.GraphModule, example_inputs: list[Any], *, options: Mapping[str, Any] | None = None,
                       mode: str | None = None) -> Callable[..., Any]:
    """The ``torch.compile`` backend (see the module docstring)."""
    opts = BackendOptions.parse(options)
    inner = _inner_compiler(opts.inner, opts.mode or mode)
    model = owning_model(gm, example_inputs, opts.profile)
    if model is None:
        _say_once("no transformers, diffusers or known-structure model (VGGT) owns this compiled graph's "
                  "parameters; compiled without autosparse")
        return inner(gm, example_inputs)
    patch = _attached(model, opts)
    if patch is None:
        return inner(gm, example_inputs)
    routed = _route(gm, example_inputs, model, patch)
    compiled = inner(gm, example_inputs)
    return _Runner(compiled, model, routed) if routed.per_call else compiled


def _inner_compiler(inner: str | Callable[..., Any], mode: str | None) -> Callable[..., Any]:
    from torch._dynamo.backends.registry import lookup_backend

    if inner == "inductor" and mode is not None:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(mode)
        if patches.get("triton.cudagraphs") and not runtime.HOST_SIDE_TAGS:
            # This torch cannot mark the op as not capturable: a CUDA graph would freeze one call's decisions.
            _say_once(f"mode={mode!r}: CUDA graphs are off (this torch has no cudagraph_unsafe tag)")
            patches["triton.cudagraphs"] = False
        return lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches)
    if mode is not None:
        _say_once(f"mode={mode!r} is an inductor mode; the inner compiler {inner!r} does not take it")
    return lookup_backend(inner)


# -- 1. the model --------------------------------------------------------------------------------


def owning_model(gm: fx.GraphModule, example_inputs: list[Any], profile: Any = None) -> nn.Module | None:
    """The outermost served model (``models.model_kind``) owning the graph's parameters (inputs under
    Dynamo's default ``inline_inbuilt_nn_modules``, else attributes of ``gm``); with a ``Profile``,
    one of its class when several models do."""
    params = {id(t) for t in example_inputs if isinstance(t, nn.Parameter)} | {id(p) for p in gm.parameters()}
    if not params:
        return None
    # type() rather than isinstance: some live objects (weak proxies, lazy modules) fail isinstance.
    owners = [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module) and _served(obj)
              and any(id(p) in params for p in obj.parameters())]
    nested = {id(sub) for owner in owners for sub in owner.modules() if sub is not owner}
    roots = [owner for owner in owners if id(owner) not in nested]
    if isinstance(profile, Profile):
        roots = [r for r in roots if type(r).__name__ == profile.model.get("class")] or roots
    if len(roots) > 1:
        log.info("autosparse: %d models own this graph's parameters; serving %s", len(roots), type(roots[0]).__name__)
    return roots[0] if roots else None


def _served(module: nn.Module) -> bool:
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):  # a wrapper: its _orig_mod is the model
        return False
    try:
        model_kind(module)
    except TypeError:
        return False
    return True


# -- 2. the profile ------------------------------------------------------------------------------


def _attached(model: nn.Module, opts: BackendOptions) -> _Patch | None:
    """The model's compile-route record (made on its first graph), or None: compile unchanged."""
    patch = patch_of(model)
    if patch is not None and patch.route == "eager":
        _say_once(f"{type(model).__name__} is already patched with patch_model: its graphs call autosparse's op "
                  "already; the backend's profile option is not used")
        return None
    profile = opts.profile
    if profile is not None and not isinstance(profile, Profile):
        profile = Profile.load(profile)
    if patch is not None:
        if profile is not None and profile != patch.profile:
            raise ValueError(f"{type(model).__name__} was compiled with autosparse and another profile; "
                             "call torch._dynamo.reset() and autosparse.unpatch_model(model) first")
        return patch
    if profile is None:
        from autosparse import profiles

        path = profiles.matching(model)
        if path is None:
            _say_once(f"no profile given and no shipped profile fits {type(model).__name__}: compiled dense. "
                      "Make one with `autosparse profile` and pass options={'profile': path}")
            return None
        log.info("autosparse: %s served with the shipped profile %s", type(model).__name__, path.stem)
        profile = Profile.load(path)
        if not profile.search.get("calibrated", True):
            _say_once(f"profile {path.stem}: {profile.search.get('note', 'uncalibrated')}")
    return attach(model, profile, strict=opts.strict, guard=opts.guard, route="compile")


# -- 3. the rewrite --------------------------------------------------------------------------------


@dataclass
class _Routed:
    """What the returned function does around the compiled graph on every call."""

    arguments: dict[str, int]  # the model call's arguments among the graph inputs (call context)
    read_context: bool  # this graph traced a hook-route model's forward: read its call context first
    dense: Counter[str]  # SDPA calls left dense by design, by reason (counted per call)
    fallback: Counter[str]  # SDPA calls the op cannot take, by reason (counted per call)

    @property
    def per_call(self) -> bool:
        return bool(self.read_context or self.dense or self.fallback)


def _route(gm: fx.GraphModule, example_inputs: list[Any], model: nn.Module, patch: _Patch) -> _Routed:
    from autosparse.passes.sdpa import find_sdpa, rewrite_sdpa

    calls = find_sdpa(gm)
    served = {id(module): module for module in patch.modules}
    holders = _parameter_nodes(gm, example_inputs)
    routed = _Routed({}, False, Counter(), Counter())
    # SDPA may stay only if every layer is dense at every step: a graph compiled for one block is
    # reused for the others (regional compilation), so one layer's profile decides nothing.
    all_dense = all(patch.profile.always_dense(name) for name in _layer_names(patch))
    anchors = {}
    for call in calls:
        module = next((served[i] for i in reversed(call.module_ids) if i in served), None)
        if module is None:  # not a served attention module (cross-attention, a text encoder, ...)
            continue
        plan = runtime.plan_of(getattr(module, capture.LAYER_ATTR))
        anchor = next((holders[id(p)] for p in module.parameters() if id(p) in holders), None)
        reason = _unservable(call) or (None if anchor is not None else "attention module without parameters")
        if reason is not None:
            if patch.state.strict:
                patch.state.count_fallback(plan.name, reason)  # raises
            routed.fallback[reason] += 1
        elif all_dense:
            routed.dense["dense in profile"] += 1
        else:
            anchors[call] = anchor
    if not calls and not patch.kind.hooked:
        _say_once(f"no SDPA call in a compiled graph of {type(model).__name__} (attn_implementation="
                  f"{model.config._attn_implementation!r}); autosparse serves 'sdpa'")
    if patch.kind.hooked:  # the family reads the call's context
        _read_context(gm, example_inputs, model, patch, routed)
    _index(model)
    rewrite_sdpa(gm, anchors)
    return routed


def _layer_names(patch: _Patch) -> list[str]:
    return [runtime.plan_of(getattr(module, capture.LAYER_ATTR)).name for module in patch.modules]


def _parameter_nodes(gm: fx.GraphModule, example_inputs: list[Any]) -> dict[int, fx.Node]:
    """id(parameter) -> the graph value holding it: a placeholder (Dynamo's default
    ``inline_inbuilt_nn_modules``) or a ``get_attr`` node (parameters kept as attributes)."""
    nodes = {}
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        if i < len(example_inputs) and isinstance(example_inputs[i], nn.Parameter):
            nodes[id(example_inputs[i])] = node
    for node in gm.graph.find_nodes(op="get_attr"):
        value = functools.reduce(getattr, node.target.split("."), gm)
        if isinstance(value, nn.Parameter):
            nodes[id(value)] = node
    return nodes


def _unservable(call: Any) -> str | None:
    """Why the op cannot take this call as SDPA defines it (dropout, autograd, shapes: the op takes
    4-D ``[B, H, S, D]`` of one batch size), known at compile time: Dynamo guards on grad mode,
    requires_grad and shapes."""
    if not (isinstance(call.dropout_p, float) and call.dropout_p == 0.0):
        return "dropout"
    if not isinstance(call.enable_gqa, bool) or not (call.scale is None or isinstance(call.scale, float)):
        return "enable_gqa or scale computed in the graph"
    tensors = [n.meta.get("example_value") for n in (call.query, call.key, call.value)]
    if any(t is None for t in tensors):
        return "q/k/v without example values"
    return capture.sdpa_reason(*tensors, call.dropout_p, call.scale, call.enable_gqa)


# -- call context (hook route: diffusers, known-structure modules) ------------------------------------

_ARGUMENT_SOURCE = re.compile(r"L\['kwargs'\]\['(\w+)'\]|L\['args'\]\[(\d+)\]|L\['(\w+)'\]")


def _read_context(gm: fx.GraphModule, example_inputs: list[Any], model: nn.Module, patch: _Patch,
                  routed: _Routed) -> None:
    """Decide, on the model's first graph, where its call context is read: from this graph's inputs
    when it traced the model's forward, else by a pre-hook on the model."""
    if patch.context is None:
        traced = torch._guards.TracingContext.get_traced_code() or []
        patch.context = "graph" if inspect.unwrap(type(model).forward).__code__ in traced else "hook"
        if patch.context == "hook":
            reader = capture.CallReader(model, patch.state)
            patch.handles.append(model.register_forward_pre_hook(reader, with_kwargs=True))
            _seed(model, reader)
    if patch.context != "graph":
        return
    names = [name for name in inspect.signature(model.forward).parameters]
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        match = _ARGUMENT_SOURCE.fullmatch(source.name) if source is not None else None
        if match is None or i >= len(example_inputs):
            continue
        keyword, position, local = match.groups()
        name = keyword or local or (names[int(position)] if int(position) < len(names) else None)
        if name in names:
            routed.arguments[name] = i
    routed.read_context = bool(routed.arguments)


def _seed(model: nn.Module, reader: Callable[..., None]) -> None:
    """Run the new pre-hook for the model call in progress (the one that triggered this compile):
    its arguments are in the frame of ``nn.Module._call_impl`` for the model."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is nn.Module._call_impl.__code__ and frame.f_locals.get("self") is model:
            reader(model, frame.f_locals["args"], frame.f_locals["kwargs"])
            return
        frame = frame.f_back
    _say_once(f"{type(model).__name__}: the call that triggered compilation has no token geometry; its grid "
              "patterns run dense")


# -- 4. layer ids at run time, and every call ------------------------------------------------------------

# (device, data pointer) of each parameter of a served module -> its layer id. Keyed by storage, not
# object: the tensor a compiled graph hands to an op need not be the Parameter object itself.
_LAYER_BY_STORAGE: dict[tuple[str, int], torch.Tensor] = {}
_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models compiled with autosparse


def _index(model: nn.Module | None = None) -> None:
    """(Re)build _LAYER_BY_STORAGE from the models compiled with autosparse (parameters move with
    ``.to()`` and offloading)."""
    if model is not None:
        _MODELS.add(model)
    _LAYER_BY_STORAGE.clear()
    for served in list(_MODELS):
        patch = patch_of(served)
        if patch is None or patch.route != "compile":
            continue
        for module in patch.modules:
            layer = getattr(module, capture.LAYER_ATTR)
            for p in module.parameters():
                _LAYER_BY_STORAGE[str(p.device), p.data_ptr()] = layer


@torch.library.custom_op("autosparse::layer_of", mutates_args=(), tags=runtime.HOST_SIDE_TAGS)
def layer_of(parameter: torch.Tensor) -> torch.Tensor:
    """The layer id (0-d CPU int64) of the served attention module owning ``parameter``."""
    key = (str(parameter.device), parameter.data_ptr())
    layer = _LAYER_BY_STORAGE.get(key)
    if layer is None or not runtime.is_registered(layer):
        _index()
        layer = _LAYER_BY_STORAGE.get(key)
        if layer is None:
            raise RuntimeError("autosparse: a compiled attention call's module is no longer served (unpatched, or "
                               "its parameters were replaced); call torch._dynamo.reset() to compile again")
    return layer.clone()


@layer_of.register_fake
def _(parameter):
    return torch.empty((), dtype=torch.int64, device="cpu")


class _Runner:
    """The compiled graph, preceded on every call by what autosparse reads and counts: the model's
    call context (when this graph holds the model call) and the calls left dense."""

    def __init__(self, compiled: Callable[..., Any], model: nn.Module, routed: _Routed) -> None:
        self._compiled = compiled
        self._model = weakref.ref(model)  # Dynamo's cache outlives models: do not keep one alive
        self._routed = routed
        self._reader: Callable[..., None] | None = None

    def __call__(self, *inputs: Any) -> Any:
        model = self._model()
        patch = patch_of(model) if model is not None else None
        if patch is not None and patch.route == "compile":
            routed = self._routed
            if routed.read_context:
                if self._reader is None:
                    self._reader = capture.CallReader(model, patch.state)
                self._reader(model, (), {name: inputs[i] for name, i in routed.arguments.items()})
            patch.state.stats.dense.update(routed.dense)
            patch.state.stats.fallback.update(routed.fallback)
        return self._compiled(*inputs)
