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
import math
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from autosparse.guard import Guard, log_line
from autosparse.kernels import row_schedule, supports
from autosparse.layout import BlockLayout, block_mask, grid_order
from autosparse.patterns import BlockGeometry, Pattern
from autosparse.profile import Profile
from autosparse.patterns.geometry import TokenGeometry

__all__ = ["AttentionStats", "CallContext", "LayerPlan", "PatchState", "count_unserved", "plan_of", "register",
           "unregister"]

log = logging.getLogger("autosparse")

# F.scaled_dot_product_attention as torch defines it: the hook capture (diffusers, VGGT) replaces the module
# attribute, and every dense call here must reach the real one.
ORIGINAL_SDPA = F.scaled_dot_product_attention
# Ops that decide on the host per call (step, layout): a CUDA graph must not capture them.
HOST_SIDE_TAGS = tuple(t for t in [getattr(torch.Tag, "cudagraph_unsafe", None)] if t is not None)
GUARD_REASON = "accuracy guard: sampled rows over tolerance"
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
    """What the model's current forward call says about its attention calls (one per thread): the
    token geometry of the attention sequence (None: unknown, only 1-D patterns apply), the
    denoising step, and what the step is counted from (see ``advance``); plus the padding-mask
    verdict of this forward, reused by its later layers."""

    tokens: TokenGeometry | None = None
    step: int | None = None
    timestep: float | None = None
    repeats: int = 0  # calls seen at ``timestep``
    per_step: int | None = None  # calls per timestep at this generation's first step (classifier-free guidance: 2)
    # The same padding mask reaches every layer of one forward (eagerly the same object; in a compiled
    # graph a view of the same buffer per layer): classify it once. (weakref to the base, view key, verdict)
    mask_seen: tuple[Any, tuple, Any] | None = None

    def advance(self, timestep: float) -> None:
        """Count the denoising step of a call at ``timestep``. Denoising runs from high to low
        timesteps: a lower one is the next step; the same one again is classifier-free guidance's
        next call of this step, until it repeats more often than the generation's first step did;
        a higher one, or such a repeat, starts a new generation at step 0."""
        previous = self.timestep
        new_generation = (previous is None or self.step is None or timestep > previous
                          or (timestep == previous and self.per_step is not None and self.repeats >= self.per_step))
        if new_generation:
            self.step, self.repeats, self.per_step = 0, 1, None
        elif timestep < previous:
            if self.per_step is None:
                self.per_step = self.repeats
            self.step, self.repeats = self.step + 1, 1
        else:
            self.repeats += 1
        self.timestep = timestep


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.context = CallContext()


@dataclass
class PatchState:
    """One patched model: counts, strictness, the guard, the current call's context (per thread:
    two threads may run the same model), and for transformers models the attention implementation
    it had (what calls autosparse cannot serve run)."""

    strict: bool
    guard: Guard | None = None
    stats: AttentionStats = field(default_factory=AttentionStats)
    original_implementation: str | None = None
    # Calibration (autosparse.search): sees every served call's q/k/v before it is served.
    observer: Any = None
    _local: _PerThread = field(default_factory=_PerThread, repr=False, compare=False)

    @property
    def context(self) -> CallContext:
        return self._local.context

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy: counts and settings, no call in flight
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "observer")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, observer=None, _local=_PerThread())

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

    def unfit(self, geometry: BlockGeometry) -> str | None:
        """Why some head's pattern cannot be laid out on this call (``Pattern.unfit``), else None;
        asked once per geometry."""
        cache = self._unfit
        if geometry not in cache:
            reasons = (p.unfit(geometry) for p in self.patterns)
            _bounded_put(cache, geometry, next((r for r in reasons if r is not None), None))
        return cache[geometry]

    @functools.cached_property
    def _unfit(self) -> dict[BlockGeometry, str | None]:
        return {}

    @functools.cached_property
    def dense_heads(self) -> tuple[int, ...]:
        """Heads whose pattern is dense, in a set that also has sparse heads (else empty)."""
        dense = tuple(h for h, p in enumerate(self.patterns) if p.is_dense)
        return dense if len(dense) < len(self.patterns) else ()


@dataclass(eq=False)
class LayerPlan:
    """How one attention module is served: its profile entry, caches, and the model's state."""

    name: str
    index: int  # among the model's served layers: one forward calls them in increasing order
    num_heads: int
    profile: Profile
    state: PatchState
    _head_sets: dict[Any, HeadSet] = field(default_factory=dict, repr=False)
    _layouts: dict[tuple, BlockLayout] = field(default_factory=dict, repr=False)
    _head_index: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _row_orders: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _orders: dict[tuple, TokenGeometry] = field(default_factory=dict, repr=False)
    _static_masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy: the plan, not its device caches
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

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
            chosen = grid_order(heads.patterns, tokens, *self.profile.block_size, device, self.profile.token_order)
            _bounded_put(self._orders, key, chosen)
        return chosen

    def dense_index(self, heads: HeadSet, device: torch.device, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Device index tensors of the dense heads and of their KV heads, made once per device."""
        dense = heads.dense_heads
        return self._index(dense, device), self._index(tuple(h // group for h in dense), device)


_CACHE_LOCK = threading.Lock()  # threads serving one model share its caches


def _bounded_put(cache: dict, key: Any, value: Any) -> None:
    """Insert, forgetting the oldest entry beyond _MAX_LAYOUTS_PER_LAYER (many prompt lengths)."""
    with _CACHE_LOCK:
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
    """``F.scaled_dot_product_attention(query, key, value, attn_mask, is_causal=is_causal,
    scale=scale)`` as torch defines it (``[B, H, S, D]`` in and out, GQA by head mapping; causal
    means top-left aligned), served for ``layer``: sparse where the layer's patterns and the call
    allow it exactly, else dense and counted."""
    return serve(plan_of(layer), query, key, value, attn_mask, is_causal, scale)


@attention.register_fake
def _(query, key, value, layer, attn_mask, is_causal, scale):
    return empty_output(query, value)


def empty_output(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, Dv]`` backed by ``[B, S, H, Dv]`` memory: what the kernel writes, and what every
    path returns (a compiled graph plans for one layout)."""
    b, h, s, _ = query.shape
    return query.new_empty(b, s, h, value.shape[-1]).transpose(1, 2)


def serve(plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          mask: torch.Tensor | None, is_causal: bool, scale: float | None) -> torch.Tensor:
    state = plan.state
    if state.observer is not None:  # calibration: every call, as the caller made it
        state.observer(plan, query, key, value, mask, is_causal, _softmax_scale(query, scale))
    heads = plan.heads_at(state.context.step)
    verdict = _classify(plan, heads, query, key, value, mask, is_causal, scale)
    if verdict.dense is not None:
        state.stats.dense[verdict.dense] += 1
        return _dense(query, key, value, mask, is_causal, scale)
    if verdict.fallback is not None:
        state.count_fallback(plan.name, verdict.fallback)
        return _dense(query, key, value, mask, is_causal, scale)
    # Keys no query may see (an empty StaticCache's tail) are dropped: the call is then square.
    k, v = key[:, :, :verdict.keys], value[:, :, :verdict.keys]
    if verdict.shift is None:
        out = _sparse(plan, heads, verdict, query, k, v, verdict.kv_valid)
    else:  # left padding: a row's patterns (sinks, windows, blocks) count from its first real token
        index = _rolled(verdict.shift, query.shape[2])
        rolled = _sparse(plan, heads, verdict, *(_gather_rows(x, index) for x in (query, k, v)),
                         verdict.kv_valid.gather(1, index))
        out = empty_output(query, value)
        out.scatter_(2, index[:, None, :, None].expand_as(out), rolled)
        # Rows before a row's first real token see no key: SDPA's answer there is zero.
        out.masked_fill_(_before_first(verdict.shift, query.shape[2])[:, None, :, None], 0.0)
    if state.guard is not None and state.guard.due(plan.name, query.device):
        checked = state.guard.check(query, k, v, out, causal=verdict.causal, scale=verdict.scale,
                                    kv_valid=verdict.kv_valid, layer=plan.name)
        if not checked.ok:
            log.warning("autosparse: %s", log_line(plan.name, checked))
            state.count_fallback(plan.name, GUARD_REASON)
            return _dense(query, key, value, mask, is_causal, scale)
    state.stats.sparse += 1
    return out


def _sparse(plan: LayerPlan, heads: HeadSet, verdict: _Verdict, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, kv_valid: torch.Tensor | None) -> torch.Tensor:
    """One block-sparse launch for every head (dense heads of a mixed layer on SDPA)."""
    causal, scale, tokens = verdict.causal, verdict.scale, verdict.tokens
    # Dense heads of a mixed layer go to SDPA (cuDNN/flash: faster than our kernel at density 1),
    # unless key padding must be applied (SDPA would then leave its fused kernels).
    split = heads.dense_heads if kv_valid is None else ()
    q_block, kv_block = plan.profile.block_size
    geometry = verdict.geometry
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
    return out


def _rolled(shift: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, S]``: row b's token order with its first ``shift[b]`` tokens (left padding) moved last."""
    return (torch.arange(length, device=shift.device) + shift[:, None]) % length


def _before_first(shift: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, S]`` bool: the positions before each row's first real token."""
    return torch.arange(length, device=shift.device) < shift[:, None]


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, :, index[b]]`` for ``[B, H, S, D]`` ``x``."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _permute(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Reorder the sequence of ``[B, H, S, D]`` ``x`` into the kernel's order; the result is backed
    by ``[B, S, H, D]`` memory (whole token rows move together: contiguous H*D runs)."""
    if order is None:
        return x
    return x.transpose(1, 2).index_select(1, order).transpose(1, 2)


def _dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           is_causal: bool, scale: float | None) -> torch.Tensor:
    """The call exactly as ``F.scaled_dot_product_attention`` answers it, in the op's output layout."""
    out = empty_output(query, value)
    out.copy_(ORIGINAL_SDPA(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scale,
                            enable_gqa=query.shape[1] != key.shape[1]))
    return out


class _Verdict(NamedTuple):
    """How one call runs: dense by design (``dense``: the reason), dense because the kernel cannot
    serve it exactly (``fallback``: the reason), or sparse (neither) with what the kernel needs: the
    keys kept (``keys``: a prefix), causality (bottom-right, square), the softmax scale, key padding,
    each row's left padding (``shift``, None without), the token geometry and the block geometry."""

    dense: str | None = None
    fallback: str | None = None
    keys: int = 0
    causal: bool = False
    scale: float = 1.0
    kv_valid: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    tokens: TokenGeometry | None = None
    geometry: BlockGeometry | None = None


def _classify(plan: LayerPlan, heads: HeadSet, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None, is_causal: bool, scale: float | None) -> _Verdict:
    if heads.is_dense:
        return _Verdict(dense="dense in profile")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or not query.shape[0] == key.shape[0] == value.shape[0]:
        return _Verdict(fallback=f"q/k/v shapes {tuple(query.shape)}/{tuple(key.shape)}/{tuple(value.shape)}")
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1:
        return _Verdict(dense="decode (query length 1)")
    if q_len != kv_len and mask is None and not is_causal:
        return _Verdict(dense="cross-attention (query length != key length)")
    if query.shape[1] != len(heads.patterns):
        return _Verdict(fallback=f"{query.shape[1]} query heads, profile has {len(heads.patterns)}")
    if scale is not None and not (math.isfinite(scale) and scale > 0.0):
        return _Verdict(fallback=f"scale {scale!r} (the kernel takes a positive finite scale)")
    if mask is not None and is_causal:
        return _Verdict(fallback="attn_mask together with is_causal=True")
    reason = supports(query, key, value, *plan.profile.block_size)
    if reason is not None:
        return _Verdict(fallback=reason)
    if mask is None:
        # torch's is_causal is top-left aligned: with more keys than queries the later keys are seen
        # by no query (an empty StaticCache's prefill) and are dropped.
        causal, keys, kv_valid, shift = is_causal, (min(kv_len, q_len) if is_causal else kv_len), None, None
        if is_causal and kv_len < q_len:
            return _Verdict(fallback="is_causal with fewer keys than queries")
    else:
        found = _mask_verdict(plan, mask, query.shape[0], q_len, kv_len)
        if found.reason is not None:
            return _Verdict(fallback=found.reason)
        causal, keys, kv_valid, shift = found.causal, found.keys, found.kv_valid, found.shift
    if keys != q_len:
        if causal:
            return _Verdict(fallback="query length != key length (KV cache)")
        return _Verdict(dense="cross-attention (query length != key length)")
    tokens = plan.state.context.tokens
    if tokens is not None and tokens.length != q_len:
        return _Verdict(fallback=f"token geometry has {tokens.length} tokens, the call {q_len}")
    if tokens is not None and causal:
        return _Verdict(fallback="causal attention over a token grid")
    if heads.needs_grid:
        if tokens is None:
            return _Verdict(fallback="pattern needs the token grid (no geometry for this model call)")
        tokens = plan.grid_order(heads, tokens, query.device)
    q_block, kv_block = plan.profile.block_size
    geometry = BlockGeometry(q_len, q_len, q_block, kv_block, causal, tokens)
    reason = heads.unfit(geometry)
    if reason is not None:
        return _Verdict(fallback=reason)
    if shift is not None and tokens is not None:
        shift = None  # a token grid's positions are its own (text padding is key padding there)
    return _Verdict(keys=keys, causal=causal, scale=_softmax_scale(query, scale), kv_valid=kv_valid, shift=shift,
                    tokens=tokens, geometry=geometry)


def _softmax_scale(query: torch.Tensor, scale: float | None) -> float:
    """SDPA's scale: the given one, else 1 / sqrt(head_dim)."""
    return scale if scale is not None else query.shape[-1] ** -0.5


class _MaskVerdict(NamedTuple):
    """A boolean mask read as the kernel's terms: keys kept (a prefix), causal or not, key padding
    ``[B, keys]`` (None: none), left padding per row (None: none); or ``reason`` why it is not."""

    reason: str | None = None
    keys: int = 0
    causal: bool = False
    kv_valid: torch.Tensor | None = None
    shift: torch.Tensor | None = None


def _mask_verdict(plan: LayerPlan, mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> _MaskVerdict:
    """The mask's verdict, classified once per forward: a verdict is reused only by a later layer
    of the same forward (layers run in increasing order; a repeat or an earlier layer means a new
    forward, whose mask may be the same buffer refilled in place) and never after the mask changed
    (its version counter; inference tensors have none)."""
    context = plan.state.context
    base = mask._base if mask._base is not None else mask
    version = None if base.is_inference() else base._version
    key = (tuple(mask.shape), mask.stride(), mask.storage_offset(), version, batch, q_len, kv_len)
    seen = context.mask_seen
    if seen is not None and seen[0]() is base and seen[1] == key and seen[2] < plan.index:
        context.mask_seen = (seen[0], key, plan.index, seen[3])
        return seen[3]
    verdict = _classify_mask(mask, batch, q_len, kv_len)
    context.mask_seen = (weakref.ref(base), key, plan.index, verdict)
    return verdict


def _classify_mask(mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> _MaskVerdict:
    """A mask the kernel applies exactly: boolean, broadcast over heads, and key padding alone (any
    number of query rows) or bottom-right causal + key padding (``[B, 1, Sq, Sk]``), after dropping
    the trailing keys no query sees.

    One comparison with the mask the kernel would apply (two when the first reading fails), built
    from the keys the last query row may see: a long prefill's mask is S² booleans, so no other
    full-size temporaries."""
    if mask.dtype != torch.bool:
        return _MaskVerdict("additive (float) attention mask")
    if mask.dim() > 4 or (mask.dim() == 4 and mask.shape[1] != 1) or mask.shape[-1] != kv_len:
        return _MaskVerdict(f"attention mask of shape {tuple(mask.shape)} (expected [B, 1, Sq, Sk] or [B, 1, 1, Sk])")
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, q_len):
        return _MaskVerdict(f"attention mask of shape {tuple(mask.shape)} does not broadcast to {batch} x {q_len} queries")
    keys = kv_len
    if kv_len > q_len and not bool(mask[..., q_len:].any()):  # e.g. an empty StaticCache's tail
        mask, keys = mask[..., :q_len], q_len
    kv_valid = mask[:, 0, -1, :].clone()  # [B, Sk]; a copy: the verdict outlives the mask
    padded = not bool(kv_valid.all())
    pad_only = kv_valid[:, None, None, :].expand_as(mask)
    causal = mask.shape[2] == q_len and q_len > 1
    if causal:
        tril = torch.ones(q_len, keys, dtype=torch.bool, device=mask.device).tril_(keys - q_len)
        causal = torch.equal(mask, (tril & kv_valid[:, None, None, :]) if padded else tril.expand_as(mask))
    if not causal and not torch.equal(mask, pad_only):
        return _MaskVerdict("attention mask is not key padding (causal or not)")
    kv_valid = kv_valid.expand(batch, -1) if padded else None
    shift = None
    if causal and padded:
        first = kv_valid.int().argmax(1)  # a row's first real token (0 for a row without one)
        shift = first if bool(first.any()) else None
    return _MaskVerdict(keys=keys, causal=causal, kv_valid=kv_valid, shift=shift)
