"""One attention call, served: the custom op every capture route calls, and what it runs.

``torch.ops.autosparse.attention(q, k, v, layer, attn_mask, is_causal, scale)`` owns the call. It
is opaque to ``torch.compile`` and takes the layer as a 0-d CPU int64 tensor (one per attention
module, a graph input, not a constant): a graph compiled once for a repeated block
(``compile_repeated_blocks``) still serves each block with its own patterns, and every decision
that changes between calls (denoising step, token geometry, padding mask) is made here at run time,
so it never bakes into a graph or causes a recompile.

Per call: look up the layer's patterns at the current step -> decide sparse or dense (with the
reason counted) -> layout (cached per shape) -> when a pattern needs the grid, K/V copied in tile
order (queries are read, and outputs written, in place by the kernel) -> one block-sparse launch for
every head (dense heads of a mixed layer go to SDPA) -> output with the memory layout
``[B, S, H, D]`` (returned as the ``[B, H, S, D]`` view SDPA returns).
"""

from __future__ import annotations

import functools
import itertools
import logging
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from autosparse.kernels import row_schedule, supports
from autosparse.layout import BlockLayout, block_mask, grid_order
from autosparse.patterns import BlockGeometry, Pattern
from autosparse.profile import Profile
from autosparse.tokens import TokenGeometry

__all__ = ["AttentionStats", "CallContext", "LayerPlan", "PatchState", "count_unserved", "plan_of", "register",
           "unregister"]

log = logging.getLogger("autosparse")

# F.scaled_dot_product_attention as torch defines it: the hook capture (diffusers, VGGT) replaces the module
# attribute, and every dense call here must reach the real one.
ORIGINAL_SDPA = F.scaled_dot_product_attention
# Ops that decide on the host per call (step, layout): a CUDA graph must not capture them.
HOST_SIDE_TAGS = tuple(t for t in [getattr(torch.Tag, "cudagraph_unsafe", None)] if t is not None)
_MAX_LAYOUTS_PER_LAYER = 32  # distinct (patterns, shape, ...) layouts a layer keeps; the oldest goes first


@dataclass
class AttentionStats:
    """Attention calls since patching.

    ``sparse``: served by the block-sparse kernel. ``dense``: run dense by design (the profile is
    dense for every head of the layer, a decode step, cross-attention), by reason. ``fallback``: run
    dense because the kernel could not serve the call exactly, by reason (``strict=True`` raises).
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
class CallContext:
    """What the model's current forward call says about its attention calls: the token geometry of
    the attention sequence (None: unknown, only 1-D patterns apply), the denoising step and the
    timestep it was counted from (the next call's step depends on it)."""

    tokens: TokenGeometry | None = None
    step: int | None = None
    timestep: float | None = None


@dataclass
class PatchState:
    """One patched model: counts, strictness, the current call's context."""

    strict: bool
    stats: AttentionStats = field(default_factory=AttentionStats)
    context: CallContext = field(default_factory=CallContext)
    # Calibration (autosparse.search): sees every served call's q/k/v before it is served.
    observer: Any = None
    # The same padding mask reaches every layer of one forward (eagerly the same object; in a compiled
    # graph a view of the same buffer per layer): classify it once. (weakref to the base, view key, verdict)
    mask_seen: tuple[Any, tuple, tuple[str | None, torch.Tensor | None]] | None = None

    def count_fallback(self, where: str, reason: str) -> None:
        if self.strict:
            raise RuntimeError(f"autosparse cannot serve attention in {where}: {reason} (strict=True)")
        log.debug("%s: dense fallback: %s", where, reason)
        self.stats.fallback[reason] += 1


@dataclass(frozen=True, eq=False)
class HeadSet:
    """The per-head patterns of one layer at one step (hashed by identity: it keys layout caches;
    its summaries are computed once: they are read on every call)."""

    patterns: tuple[Pattern, ...]

    @functools.cached_property
    def is_dense(self) -> bool:
        return all(p.is_dense for p in self.patterns)

    @functools.cached_property
    def needs_grid(self) -> bool:
        return any(p.needs_grid for p in self.patterns)

    @functools.cached_property
    def dynamic_heads(self) -> dict[Pattern, tuple[int, ...]]:
        """The heads of each dynamic pattern (layout estimated per call from q and k)."""
        heads: dict[Pattern, list[int]] = {}
        for h, p in enumerate(self.patterns):
            if p.is_dynamic:
                heads.setdefault(p, []).append(h)
        return {p: tuple(hs) for p, hs in heads.items()}

    @functools.cached_property
    def dense_heads(self) -> tuple[int, ...]:
        """Heads whose pattern is dense, in a set that also has sparse heads (else empty)."""
        dense = tuple(h for h, p in enumerate(self.patterns) if p.is_dense)
        return dense if len(dense) < len(self.patterns) else ()


@dataclass(eq=False)
class LayerPlan:
    """How one attention module is served: its profile entry, caches, and the model's state."""

    name: str
    num_heads: int
    profile: Profile
    state: PatchState
    causal: bool | None = None  # from the module (transformers); None: from the call (hook route)
    _head_sets: dict[Any, HeadSet] = field(default_factory=dict, repr=False)
    _layouts: dict[tuple, BlockLayout] = field(default_factory=dict, repr=False)
    _head_index: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _row_orders: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _orders: dict[tuple, TokenGeometry] = field(default_factory=dict, repr=False)
    _static_masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def heads_at(self, step: int | None) -> HeadSet:
        heads = self._head_sets.get(step)
        if heads is None:
            patterns = self.profile.patterns(self.name, self.num_heads, step)
            # Steps with the same patterns share one HeadSet, hence one layout per shape.
            heads = next((h for h in self._head_sets.values() if h.patterns == patterns), None) or HeadSet(patterns)
            self._head_sets[step] = heads
        return heads

    def layout(self, heads: HeadSet, geometry: BlockGeometry, device: torch.device,
               skipped: tuple[int, ...]) -> BlockLayout:
        key = (heads, geometry, device, skipped)
        layout = self._layouts.get(key)
        if layout is None:
            layout = BlockLayout.from_patterns(heads.patterns, geometry, device)
            if skipped:
                layout = layout.with_heads_skipped(skipped)
            _bounded_put(self._layouts, key, layout)
        return layout

    def dynamic_layout(self, heads: HeadSet, geometry: BlockGeometry, query: torch.Tensor, key: torch.Tensor,
                       scale: float, skipped: tuple[int, ...]) -> BlockLayout:
        """This call's layout when some heads are dynamic: their blocks (and key columns, for
        vertical_slash) estimated from q and k (union over the batch; text tokens dense), the static
        heads' blocks as cached."""
        cache_key = (heads, geometry, query.device)
        static = self._static_masks.get(cache_key)
        if static is None:  # dynamic heads' rows are overwritten below
            static = torch.stack([geometry.reachable(query.device) if p.is_dynamic else block_mask(p, geometry, query.device)
                                  for p in heads.patterns])
            _bounded_put(self._static_masks, cache_key, static)
        mask, columns = static.clone(), None
        group = query.shape[1] // key.shape[1]
        text = geometry.text_block_mask(query.device)
        for pattern, indices in heads.dynamic_heads.items():
            index = self._index(indices, query.device)
            if len(indices) == query.shape[1]:  # every head: q and the unexpanded GQA keys as they are
                blocks, cols = pattern.select(query, key, geometry, scale)
            else:
                blocks, cols = pattern.select(query.index_select(1, index), key.index_select(1, index // group),
                                              geometry, scale)
            mask[index] = blocks.any(0) if text is None else blocks.any(0) | text
            if cols is not None:
                if columns is None:
                    columns = torch.zeros(query.shape[1], key.shape[2], dtype=torch.bool, device=query.device)
                columns[index] = cols.any(0)
        # Sized without looking at the estimate (no device sync): the host runs ahead of the GPU.
        most = max(p.max_columns for p in heads.dynamic_heads) * query.shape[0]
        layout = BlockLayout.from_block_mask(mask, geometry, columns, max_columns=most, sync=False)
        layout = layout.with_heads_skipped(skipped) if skipped else layout
        if geometry.causal:
            layout._schedules[group] = self._row_order(geometry, query.shape[1], group, query.device)
        return layout

    def _row_order(self, geometry: BlockGeometry, heads: int, group: int, device: torch.device) -> torch.Tensor:
        """The program order of this layer's causal per-call layouts: ``row_schedule`` of the blocks
        every row may reach (later query blocks first: they have more to do), made once per shape.
        Ordering by each call's own counts costs a few sorts per call (0.15 ms of block_topk's 0.84
        at 32K on the H200); without a causal triangle the reachable blocks say nothing about the
        work, and the per-call order is 3-5 % faster on VGGT's global attention."""
        key = (geometry, heads, group, device)
        order = self._row_orders.get(key)
        if order is None:
            reachable = geometry.reachable(device).sum(-1, dtype=torch.int32)
            order = row_schedule(reachable.expand(1, heads, -1), group)
            _bounded_put(self._row_orders, key, order)
        return order

    def _index(self, heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``heads`` as a device index tensor, made once (a host-to-device copy waits for the GPU)."""
        key = (heads, device)
        index = self._head_index.get(key)
        if index is None:
            index = self._head_index[key] = torch.tensor(heads, device=device)
        return index

    def grid_order(self, heads: HeadSet, tokens: TokenGeometry, device: torch.device) -> TokenGeometry:
        """The token order this layer's grid patterns run in (``layout.grid_order``), chosen once."""
        key = (heads, tokens, device)
        chosen = self._orders.get(key)
        if chosen is None:
            chosen = grid_order(heads.patterns, tokens, *self.profile.block_size, device)
            _bounded_put(self._orders, key, chosen)
        return chosen

    def dense_index(self, heads: HeadSet, device: torch.device, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Device index tensors of the dense heads and of their KV heads, made once per device."""
        dense = heads.dense_heads
        return self._index(dense, device), self._index(tuple(h // group for h in dense), device)


def _bounded_put(cache: dict, key: Any, value: Any) -> None:
    """Insert, forgetting the oldest entry beyond _MAX_LAYOUTS_PER_LAYER (many prompt lengths)."""
    if len(cache) >= _MAX_LAYOUTS_PER_LAYER:
        del cache[next(iter(cache))]
    cache[key] = value


# -- layer registry: the op receives a layer id, the plan lives here ---------------------------------

_PLANS: dict[int, LayerPlan] = {}
_ids = itertools.count()


def register(plan: LayerPlan) -> torch.Tensor:
    """Give ``plan`` an id; returns the 0-d CPU int64 tensor the capture passes to the op."""
    layer_id = next(_ids)
    _PLANS[layer_id] = plan
    return torch.tensor(layer_id, dtype=torch.int64)


def unregister(layer: torch.Tensor) -> None:
    _PLANS.pop(int(layer), None)


def is_registered(layer: torch.Tensor) -> bool:
    return int(layer) in _PLANS


def plan_of(layer: torch.Tensor) -> LayerPlan:
    plan = _PLANS.get(int(layer))
    if plan is None:
        raise RuntimeError(f"autosparse layer id {int(layer)} is not patched (was the model unpatched?)")
    return plan


@torch._dynamo.disable
def count_unserved(layer: torch.Tensor, reason: str) -> None:
    """Count a call a capture route ran dense before reaching the op (arguments the op does not
    take: gradients, dropout, ...): by design if the layer is dense at this step anyway."""
    plan = plan_of(layer)
    if plan.heads_at(plan.state.context.step).is_dense:
        plan.state.stats.dense["dense in profile"] += 1
    else:
        plan.state.count_fallback(plan.name, reason)


# -- the op ------------------------------------------------------------------------------------------


@torch.library.custom_op("autosparse::attention", mutates_args=(), tags=HOST_SIDE_TAGS)
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor,
              attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None) -> torch.Tensor:
    """SDPA's contract (``[B, H, S, D]`` in and out, GQA by head mapping), served for ``layer``."""
    plan = plan_of(layer)
    causal = plan.causal if plan.causal is not None else is_causal
    return serve(plan, query, key, value, attn_mask, causal, scale if scale is not None else query.shape[-1] ** -0.5)


@attention.register_fake
def _(query, key, value, layer, attn_mask, is_causal, scale):
    return empty_output(query, value)


def empty_output(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, Dv]`` backed by ``[B, S, H, Dv]`` memory: what the kernel writes, and what every
    path returns (a compiled graph plans for one layout)."""
    b, h, s, _ = query.shape
    return query.new_empty(b, s, h, value.shape[-1]).transpose(1, 2)


def serve(plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          mask: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    state = plan.state
    if state.observer is not None:
        state.observer(plan, query, key, value, mask, causal, scale)
    heads = plan.heads_at(state.context.step)
    verdict = _classify(plan, heads, query, key, value, mask, causal)
    if verdict.dense is not None:
        state.stats.dense[verdict.dense] += 1
        return _dense(query, key, value, mask, causal, scale)
    if verdict.fallback is not None:
        state.count_fallback(plan.name, verdict.fallback)
        return _dense(query, key, value, mask, causal, scale)
    kv_valid, tokens = verdict.kv_valid, verdict.tokens

    # Dense heads of a mixed layer go to SDPA (cuDNN/flash: faster than our kernel at density 1),
    # unless key padding must be applied (SDPA would then leave its fused kernels).
    split = heads.dense_heads if kv_valid is None else ()
    q_block, kv_block = plan.profile.block_size
    geometry = BlockGeometry(query.shape[2], key.shape[2], q_block, kv_block, causal, tokens)
    # In tile order K/V (and key padding) are permuted; the kernel reads each query from, and writes
    # its output to, the token's place in the model's order (q_rows), so q and the output never move.
    order = tokens.permutation(query.device) if tokens is not None else None
    k, v = _permute(key, order), _permute(value, order)
    if heads.dynamic_heads:  # estimated on q/k in the order the kernel lays the blocks out
        layout = plan.dynamic_layout(heads, geometry, _permute(query, order), k, scale, split)
    else:
        layout = plan.layout(heads, geometry, query.device, split)
    if kv_valid is not None:
        kv_valid = kv_valid.expand(query.shape[0], -1)
        kv_valid = kv_valid if order is None else kv_valid.index_select(1, order)
    group = query.shape[1] // key.shape[1]
    out = torch.ops.autosparse.block_sparse_attention(
        query, k, v, layout.kv_indices, layout.kv_counts, kv_valid, layout.schedule(group),
        q_block, kv_block, causal, scale, None if order is None else tokens.query_rows(query.device),
        layout.columns, layout.column_counts, layout.listed,
    )
    if split:
        dense_heads, kv_heads = plan.dense_index(heads, query.device, group)
        dense = ORIGINAL_SDPA(query.index_select(1, dense_heads), key.index_select(1, kv_heads),
                              value.index_select(1, kv_heads), is_causal=causal, scale=scale)
        out.transpose(1, 2).index_copy_(2, dense_heads, dense.transpose(1, 2))
    state.stats.sparse += 1
    return out


def _permute(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Reorder the sequence of ``[B, H, S, D]`` ``x`` into the kernel's order; the result is backed
    by ``[B, S, H, D]`` memory (whole token rows move together: contiguous H*D runs)."""
    if order is None:
        return x
    return x.transpose(1, 2).index_select(1, order).transpose(1, 2)


def _dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           causal: bool, scale: float) -> torch.Tensor:
    q_len, kv_len = query.shape[2], key.shape[2]
    if causal and mask is None and q_len != kv_len:  # SDPA's is_causal is top-left aligned; ours bottom-right
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    out = empty_output(query, value)
    out.copy_(ORIGINAL_SDPA(query, key, value, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                            enable_gqa=query.shape[1] != key.shape[1]))
    return out


class _Verdict(NamedTuple):
    """How one call runs: dense by design (``dense``: the reason), dense because the kernel cannot
    serve it exactly (``fallback``: the reason), or sparse (neither) with its key padding and token
    geometry."""

    dense: str | None = None
    fallback: str | None = None
    kv_valid: torch.Tensor | None = None
    tokens: TokenGeometry | None = None


def _classify(plan: LayerPlan, heads: HeadSet, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None, causal: bool) -> _Verdict:
    if heads.is_dense:
        return _Verdict(dense="dense in profile")
    if query.shape[2] == 1:
        return _Verdict(dense="decode (query length 1)")
    if query.shape[2] != key.shape[2]:
        if causal:
            return _Verdict(fallback="query length != key length (KV cache)")
        return _Verdict(dense="cross-attention (query length != key length)")
    if query.shape[1] != len(heads.patterns):
        return _Verdict(fallback=f"{query.shape[1]} query heads, profile has {len(heads.patterns)}")
    reason = supports(query, key, value, *plan.profile.block_size)
    if reason is not None:
        return _Verdict(fallback=reason)
    tokens = plan.state.context.tokens
    if tokens is not None and tokens.length != query.shape[2]:
        return _Verdict(fallback=f"token geometry has {tokens.length} tokens, the call {query.shape[2]}")
    if heads.needs_grid:
        if tokens is None:
            return _Verdict(fallback="pattern needs the token grid (no geometry for this model call)")
        tokens = plan.grid_order(heads, tokens, query.device)
    if mask is None:
        return _Verdict(tokens=tokens)
    reason, kv_valid = _mask_verdict(plan.state, mask, causal)
    return _Verdict(fallback=reason) if reason is not None else _Verdict(kv_valid=kv_valid, tokens=tokens)


def _mask_verdict(state: PatchState, mask: torch.Tensor, causal: bool) -> tuple[str | None, torch.Tensor | None]:
    """Accept a mask only if it is exactly (causal and) key padding: then the kernel applies it."""
    base = mask._base if mask._base is not None else mask
    version = None if base.is_inference() else base._version  # inference tensors keep no version counter
    key = (tuple(mask.shape), mask.stride(), mask.storage_offset(), version, causal)
    if state.mask_seen is not None and state.mask_seen[0]() is base and state.mask_seen[1] == key:
        return state.mask_seen[2]
    verdict = _classify_mask(mask, causal)
    state.mask_seen = (weakref.ref(base), key, verdict)
    return verdict


def _classify_mask(mask: torch.Tensor, causal: bool) -> tuple[str | None, torch.Tensor | None]:
    """Bool masks ``[B, 1, Sq, Sk]`` or ``[B, 1, 1, Sk]`` (key padding, as HunyuanVideo passes).

    One comparison with the mask the kernel would apply, built from the keys the last query row may
    see (every valid key, if the mask is causal + padding): a long prefill's mask is S² booleans, so
    no other full-size temporaries."""
    if mask.dtype != torch.bool:
        return "additive (float) attention mask", None
    if mask.dim() != 4 or mask.shape[1] != 1:
        return f"attention mask of shape {tuple(mask.shape)} (expected [B, 1, Sq, Sk])", None
    q_len, kv_len = mask.shape[-2:]
    if causal and q_len == 1:
        return "key-padding mask [B, 1, 1, Sk] on causal attention", None
    kv_valid = mask[:, 0, -1, :].clone()  # [B, Sk]; a copy: the verdict outlives the mask
    padded = not bool(kv_valid.all())
    if causal:
        expected = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril_(kv_len - q_len)
        expected = expected & kv_valid[:, None, None, :] if padded else expected.expand_as(mask)
    else:
        expected = kv_valid[:, None, None, :].expand_as(mask)
    if not torch.equal(mask, expected.expand_as(mask)):
        return "attention mask is not causal + key padding", None
    return None, (kv_valid if padded else None)
