"""patch_model / unpatch_model / stats: route a model's attention through autosparse.

transformers models are routed through their official hooks: an ``AttentionInterface`` function
(it receives the attention module, hence the layer) plus the SDPA mask function registered under the
same name in ``AttentionMaskInterface`` (without it transformers drops padding masks). Every call
either runs the block-sparse op with the layer's per-head layout, or runs dense SDPA and is counted
with its reason in ``stats(model)``; nothing the kernel cannot honour is ever approximated.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autosparse.kernels import supports
from autosparse.layout import BlockLayout
from autosparse.models import attention_layers
from autosparse.patterns import BlockGeometry, Dense, Pattern
from autosparse.profile import Profile

__all__ = ["AttentionStats", "patch_model", "unpatch_model", "stats"]

log = logging.getLogger("autosparse")

IMPLEMENTATION = "autosparse"
_STATE_ATTR = "_autosparse_state"
_PLAN_ATTR = "_autosparse_plan"
_MAX_LAYOUTS_PER_LAYER = 32  # distinct (length, ...) layouts a layer keeps; the oldest goes first
# Keyword arguments of transformers attention functions that change the math; SDPA-only models
# never pass them, so seeing one means the call is not plain attention.
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks", "sliding_window")


@dataclass
class AttentionStats:
    """Attention calls since patching.

    ``sparse``: served by the block-sparse kernel. ``dense``: run dense by design (the profile is
    dense for every head of the layer, or a decode step), by reason. ``fallback``: run dense because
    the kernel could not serve the call exactly, by reason (``strict=True`` raises instead).
    """

    sparse: int = 0
    dense: Counter[str] = field(default_factory=Counter)
    fallback: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.sparse + sum(self.dense.values()) + sum(self.fallback.values())

    def __str__(self) -> str:
        parts = [f"sparse={self.sparse}"]
        parts += [f"dense[{reason}]={n}" for reason, n in sorted(self.dense.items())]
        parts += [f"fallback[{reason}]={n}" for reason, n in sorted(self.fallback.items())]
        return "AttentionStats(" + ", ".join(parts) + ")"


@dataclass
class _PatchState:
    original_implementation: str | None
    modules: list[nn.Module]
    stats: AttentionStats
    strict: bool
    # The same padding mask object reaches every layer of one forward: check it once.
    mask_seen: Any = None
    mask_verdict: tuple[torch.Tensor | None, str | None] = (None, None)


@dataclass(frozen=True)
class _LayerPlan:
    name: str
    patterns: tuple[Pattern, ...]
    block_size: tuple[int, int]
    state: _PatchState
    # (q_len, kv_len, causal, device, dense heads split off) -> layout: a steady-state call costs one
    # small-tuple lookup.
    layouts: dict[tuple, BlockLayout] = field(default_factory=dict, compare=False, repr=False)
    dense_index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, compare=False,
                                                                        repr=False)

    @functools.cached_property
    def dense_heads(self) -> tuple[int, ...]:
        """Heads whose pattern is dense, in a layer that also has sparse heads (else empty)."""
        dense = tuple(h for h, p in enumerate(self.patterns) if p.is_dense)
        return dense if len(dense) < len(self.patterns) else ()

    @property
    def is_dense(self) -> bool:
        return all(p.is_dense for p in self.patterns)


def patch_model(model: nn.Module, profile: Profile | str | Path, *, strict: bool = False) -> nn.Module:
    """Run ``model``'s attention with the per-head patterns of ``profile``; patches in place.

    Parameters:
        model: a transformers model (``PreTrainedModel``).
        profile: a ``Profile`` or the path of its JSON file; it must fit the model (class, config,
            layer names, head counts), else ValueError naming the field.
        strict: raise instead of falling back to dense when a call cannot be served sparse.

    Returns the same model. Undo with ``unpatch_model``; counts are in ``stats(model)``.
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError("this model is already patched by autosparse; call autosparse.unpatch_model(model) first")
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    profile.check_model(model)
    _register_with_transformers()

    state = _PatchState(model.config._attn_implementation, [], AttentionStats(), strict)
    for layer in attention_layers(model):
        entry = profile.layers.get(layer.name)  # layers the profile leaves out stay dense
        patterns = entry.heads if entry is not None else (Dense(),) * layer.num_heads
        setattr(layer.module, _PLAN_ATTR, _LayerPlan(layer.name, patterns, profile.block_size, state))
        state.modules.append(layer.module)
    setattr(model, _STATE_ATTR, state)
    model.set_attn_implementation(IMPLEMENTATION)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo ``patch_model``: the original attention implementation, no autosparse attributes."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("this model is not patched by autosparse")
    model.set_attn_implementation(state.original_implementation)
    for module in state.modules:
        delattr(module, _PLAN_ATTR)
    delattr(model, _STATE_ATTR)
    return model


def stats(model: nn.Module, *, reset: bool = False) -> AttentionStats:
    """A snapshot of the attention call counts of a patched model."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("this model is not patched by autosparse")
    snapshot = AttentionStats(state.stats.sparse, Counter(state.stats.dense), Counter(state.stats.fallback))
    if reset:
        state.stats = AttentionStats()
    return snapshot


# -- the attention function transformers calls ---------------------------------------------------


def _register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, autosparse_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def autosparse_attention(
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

    plan: _LayerPlan | None = getattr(module, _PLAN_ATTR, None)
    args = (module, query, key, value, attention_mask)
    kwargs = dict(kwargs, dropout=dropout, scaling=scaling, is_causal=is_causal)
    if plan is None:  # a module the patch did not see: leave it exactly as SDPA would run it
        return sdpa_attention_forward(*args, **kwargs)
    state = plan.state
    if plan.is_dense:
        state.stats.dense["dense in profile"] += 1
        return sdpa_attention_forward(*args, **kwargs)
    if query.shape[2] == 1:
        state.stats.dense["decode (query length 1)"] += 1
        return sdpa_attention_forward(*args, **kwargs)

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    reason, kv_valid = _why_dense(plan, module, query, key, value, attention_mask, dropout, causal, kwargs)
    if reason is not None:
        if state.strict:
            raise RuntimeError(f"autosparse cannot serve attention in {plan.name}: {reason} (strict=True)")
        log.debug("%s: dense fallback: %s", plan.name, reason)
        state.stats.fallback[reason] += 1
        return sdpa_attention_forward(*args, **kwargs)

    # Dense heads of a mixed layer go to SDPA (cuDNN/flash: faster than our kernel at density 1),
    # unless key padding must be applied (SDPA would then leave its fused kernels).
    split = plan.dense_heads if kv_valid is None else ()
    layout = _layout(plan, query.shape[2], key.shape[2], causal, query.device, split)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kv_valid is not None:
        kv_valid = kv_valid.expand(query.shape[0], -1)
    q_block, kv_block = plan.block_size
    group = query.shape[1] // key.shape[1]
    out = torch.ops.autosparse.block_sparse_attention(
        query, key, value, layout.kv_indices, layout.kv_counts, kv_valid, layout.schedule(group),
        q_block, kv_block, causal, scale,
    ).transpose(1, 2)  # [B, Sq, Hq, D], contiguous
    if split:
        heads, kv_heads = _dense_head_index(plan, query.device, group)
        dense = F.scaled_dot_product_attention(
            query.index_select(1, heads), key.index_select(1, kv_heads), value.index_select(1, kv_heads),
            is_causal=causal, scale=scale,
        )
        out.index_copy_(2, heads, dense.transpose(1, 2))
    state.stats.sparse += 1
    return out.contiguous(), None


def _dense_head_index(plan: _LayerPlan, device: torch.device, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Device index tensors of the dense heads and of their KV heads, made once per device."""
    index = plan.dense_index.get((device, group))
    if index is None:
        heads = torch.tensor(plan.dense_heads, device=device)
        index = plan.dense_index[(device, group)] = (heads, heads // group)
    return index


def _layout(plan: _LayerPlan, q_len: int, kv_len: int, causal: bool, device: torch.device,
            skipped: tuple[int, ...]) -> BlockLayout:
    key = (q_len, kv_len, causal, device, skipped)
    layout = plan.layouts.get(key)
    if layout is None:
        if len(plan.layouts) >= _MAX_LAYOUTS_PER_LAYER:  # many prompt lengths: forget the oldest
            del plan.layouts[next(iter(plan.layouts))]
        geometry = BlockGeometry(q_len, kv_len, *plan.block_size, causal)
        layout = BlockLayout.from_patterns(plan.patterns, geometry, device)
        if skipped:
            layout = layout.with_heads_skipped(skipped)
        plan.layouts[key] = layout
    return layout


def _why_dense(
    plan: _LayerPlan,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    causal: bool,
    kwargs: dict[str, Any],
) -> tuple[str | None, torch.Tensor | None]:
    """The reason this call must run dense (None if it can run sparse) and the key-padding mask."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"argument {name}", None
    if kwargs.get("output_attentions"):
        return "output_attentions", None
    if dropout > 0.0 and module.training:
        return "dropout", None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "autograd (the kernel has no backward)", None
    if query.shape[1] != len(plan.patterns):
        return f"{query.shape[1]} query heads, profile has {len(plan.patterns)}", None
    if query.shape[2] != key.shape[2]:
        return "query length != key length (KV cache)", None
    reason = supports(query, key, value, *plan.block_size)
    if reason is not None:
        return reason, None
    if mask is None:
        return None, None
    return _mask_verdict(plan.state, mask, causal)


def _mask_verdict(state: _PatchState, mask: torch.Tensor, causal: bool) -> tuple[str | None, torch.Tensor | None]:
    """Accept a mask only if it is exactly (causal and) key padding: then the kernel applies it."""
    seen = state.mask_seen() if state.mask_seen is not None else None
    if seen is mask:
        return state.mask_verdict
    verdict = _classify_mask(mask, causal)
    state.mask_seen, state.mask_verdict = weakref.ref(mask), verdict
    return verdict


def _classify_mask(mask: torch.Tensor, causal: bool) -> tuple[str | None, torch.Tensor | None]:
    if mask.dtype != torch.bool:
        return "additive (float) attention mask", None
    if mask.dim() != 4 or mask.shape[1] != 1:
        return f"attention mask of shape {tuple(mask.shape)} (expected [B, 1, Sq, Sk])", None
    q_len, kv_len = mask.shape[-2:]
    kv_valid = mask.any(dim=-2)[:, 0]  # [B, Sk]: keys that some query may see
    expected = kv_valid[:, None, None, :]
    if causal:
        rows = torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
        expected = expected & (torch.arange(kv_len, device=mask.device)[None, :] <= rows)
    if not torch.equal(mask, expected.expand_as(mask)):
        return "attention mask is not causal + key padding", None
    return None, (None if bool(kv_valid.all()) else kv_valid)
