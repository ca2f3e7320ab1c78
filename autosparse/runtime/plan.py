"""The call plan: what a sparse call runs on, built once and kept in one bounded cache.

A plan is keyed by the layer's patterns at this step (a ``HeadSet``, shared by every layer with the
same patterns), the q/k/v shapes, dtype and device, causality, softmax scale, token geometry,
whether key padding applies, and the profile's block size and token order. It holds the token
order the grid patterns run in and its permutation, the layout, its prepared kernel launch
(``KernelCall``) and the backend that runs it (``kernels.backends.choose_backend``), the dense heads
of a mixed layer (sent to SDPA), and for dynamic heads what their per-call estimate starts from; or
the reason no call of that key can be laid out, or runs dense (measured slower). Building a plan
is the one place serving does device work beyond the call itself (layouts, index tensors, a device
sync for list widths); a steady-state call costs a dictionary lookup. Plans are never mutated.

Also here: the layer registry (the op receives a layer id; the ``LayerPlan`` lives here).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from autosparse.kernels import KernelCall, row_schedule, supports
from autosparse.kernels.backends import Backend, choose_backend
from autosparse.layout import BlockLayout, block_mask, grid_order
from autosparse.models.parallel import ContextParallel, context_parallel, gathered_positions
from autosparse.patterns import BlockGeometry, Pattern, TokenGeometry
from autosparse.profile import Profile
from autosparse.runtime.classify import Call
from autosparse.runtime import speed
from autosparse.runtime.dense import dense, dense_heads, kernel_causal
from autosparse.runtime.heads import HeadSet
from autosparse.runtime.state import PatchState

__all__ = ["CallPlan", "LayerPlan", "cached_plan", "call_plan", "clear_call_plans", "is_registered", "kernel_order",
           "layer_order", "plan_of", "register", "unregister"]

MAX_CALL_PLANS = 1024  # plans kept, all layers together; the oldest goes first (many prompt lengths)
# ... and at most this many bytes of their device tensors (a plan of a 128K prefill holds its block
# lists: tens of MB; a server sees many prompt and chunk lengths).
MAX_CALL_PLAN_BYTES = 1 << 30
_CALL_PLANS: dict[tuple, CallPlan] = {}
_CALL_PLAN_BYTES = [0]  # the plans' bytes in _CALL_PLANS
_CALL_PLANS_LOCK = threading.Lock()  # threads serving models share the cache


@dataclass(frozen=True, eq=False)
class _Estimate:
    """What a dynamic layout is estimated from per call: the static heads' blocks (dynamic heads'
    rows all reachable: overwritten), text blocks (dense in every head), each dynamic pattern's
    heads as device index tensors (query heads, their KV heads), the list widths (no device sync
    per call) and, causal, the program order of the reachable blocks."""

    static: torch.Tensor
    text: torch.Tensor | None
    groups: tuple[tuple[Pattern, torch.Tensor, torch.Tensor], ...]
    max_columns: int
    row_order: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class CallPlan:
    """Everything one sparse call runs on but q, k, v and key padding; ``fallback``: why no call of
    this key can be laid out, ``dense``: why it runs dense by design (measured not faster: then
    nothing else is set either)."""

    fallback: str | None = None
    dense: str | None = None
    geometry: BlockGeometry | None = None
    order: torch.Tensor | None = None  # K/V (and key padding) into the kernel's token order; None: as they are
    q_rows: torch.Tensor | None = None  # where the kernel reads each query and writes its output
    layout: BlockLayout | None = None  # static heads (None: estimated per call)
    kernel: KernelCall | None = None  # the static layout's prepared launch
    backend: Backend | None = None  # what runs it: the fastest that can, measured once (kernels.backends)
    dense_heads: tuple[torch.Tensor, torch.Tensor] | None = None  # (query heads, their KV heads) sent to SDPA
    skipped: tuple[int, ...] = ()  # heads the kernel leaves to SDPA
    estimate: _Estimate | None = None

    def nbytes(self) -> int:
        """Bytes of the device tensors this plan keeps (its share of the plan cache's budget)."""
        tensors = [self.order, self.q_rows, *(self.dense_heads or ())]
        for owner in (self.layout, self.kernel):
            if owner is not None:
                tensors += [getattr(owner, name, None) for name in ("kv_indices", "kv_counts", "schedule", "columns",
                                                                    "column_counts", "listed")]
        if self.estimate is not None:
            tensors += [self.estimate.static, self.estimate.text, self.estimate.row_order]
        seen: dict[int, int] = {}
        for t in tensors:
            if isinstance(t, torch.Tensor):
                seen[t.data_ptr()] = t.untyped_storage().nbytes()  # a tensor shared by layout and launch: once
        return sum(seen.values())

    def layout_for(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> BlockLayout:
        """This call's layout (q and k in the kernel's order): the static one, or with dynamic heads
        their blocks (and key columns, for vertical_slash) estimated from q and k (union over the
        batch; text tokens dense), the static heads' blocks as planned."""
        if self.estimate is None:
            return self.layout
        est, geometry = self.estimate, self.geometry
        mask, columns = est.static.clone(), None
        for pattern, index, kv_index in est.groups:
            if len(index) == query.shape[1]:  # every head: q and the unexpanded GQA keys as they are
                blocks, cols = pattern.select(query, key, geometry, scale)
            else:
                blocks, cols = pattern.select(query.index_select(1, index), key.index_select(1, kv_index), geometry,
                                              scale)
            mask[index] = blocks.any(0) if est.text is None else blocks.any(0) | est.text
            if cols is not None:
                if columns is None:
                    columns = torch.zeros(query.shape[1], key.shape[2], dtype=torch.bool, device=query.device)
                columns[index] = cols.any(0)
        # Sized without looking at the estimate (no device sync): the host runs ahead of the GPU.
        layout = BlockLayout.from_block_mask(mask, geometry, columns, max_columns=est.max_columns, sync=False)
        return layout.with_heads_skipped(self.skipped) if self.skipped else layout

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_valid: torch.Tensor | None,
            scale: float) -> torch.Tensor:
        """One block-sparse launch for every head (dense heads of a mixed layer on SDPA). In tile
        order K/V (and key padding) are permuted; the kernel reads each query from, and writes its
        output to, the token's place in the model's order (``q_rows``): q and the output never move."""
        k, v = _permute(key, self.order), _permute(value, self.order)
        # Dynamic heads are estimated on q/k in the order the kernel lays the blocks out.
        layout = self.layout_for(query if self.estimate is None else _permute(query, self.order), k, scale)
        if kv_valid is not None:
            kv_valid = kv_valid.expand(query.shape[0], -1)
            kv_valid = kv_valid if self.order is None else kv_valid.index_select(1, self.order)
        if self.kernel is not None:
            out = self.backend.run(query, k, v, self.kernel, kv_valid)
        else:  # a layout estimated for this call: the portable kernel (nothing to measure once)
            out = self._prepare(layout, query, k, v, scale).run(query, k, v, kv_valid)
        if self.dense_heads is not None:
            dense_heads(out, query, key, value, *self.dense_heads, self.geometry.causal, scale)
        return out

    def _prepare(self, layout: BlockLayout, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scale: float) -> KernelCall:
        """The launch of a layout estimated for this call."""
        est, g = self.estimate, self.geometry
        schedule = est.row_order if est.row_order is not None else layout.schedule(query.shape[1] // key.shape[1])
        return KernelCall.prepare(query, key, value, layout.kv_indices, layout.kv_counts, q_block=g.q_block,
                                  kv_block=g.kv_block, causal=g.causal, scale=scale, schedule=schedule,
                                  q_rows=self.q_rows, columns=layout.columns, column_counts=layout.column_counts,
                                  listed=layout.listed)


def _permute(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Reorder the sequence of ``[B, H, S, D]`` ``x`` into the kernel's order; the result is backed
    by ``[B, S, H, D]`` memory (whole token rows move together: contiguous H*D runs)."""
    if order is None:
        return x
    return x.transpose(1, 2).index_select(1, order).transpose(1, 2)


def call_plan(heads: HeadSet, profile: Profile, call: Call, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> CallPlan:
    """The plan of this call (``key``/``value``: the keys it keeps), from the cache or built."""
    cache_key = (heads, query.shape, key.shape, value.shape, query.dtype, query.device, call.causal, call.scale,
                 call.tokens, call.pieces, call.kv_valid is None, profile.block_size, profile.token_order)

    def build() -> CallPlan:
        plan = _build(heads, profile, call, query, key, value)
        if plan.fallback is None and speed.measuring(query.device) and not _faster_than_dense(plan, call, query, key,
                                                                                              value, profile):
            plan = CallPlan(dense=speed.DENSE_REASON)
        return plan

    return cached_plan(cache_key, build)


def cached_plan(key: tuple, build: Callable[[], Any]) -> Any:
    """The plan cached under ``key``, else ``build()``'s, kept within the cache's bounds (plans of
    every kind share them: anything with ``nbytes()``)."""
    plan = _CALL_PLANS.get(key)
    if plan is None:
        plan = build()
        with _CALL_PLANS_LOCK:
            size = plan.nbytes()
            while _CALL_PLANS and (len(_CALL_PLANS) >= MAX_CALL_PLANS
                                   or _CALL_PLAN_BYTES[0] + size > MAX_CALL_PLAN_BYTES):
                _CALL_PLAN_BYTES[0] -= _CALL_PLANS.pop(next(iter(_CALL_PLANS))).nbytes()
            _CALL_PLANS[key] = plan
            _CALL_PLAN_BYTES[0] += size
    return plan


def _faster_than_dense(plan: CallPlan, call: Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       profile: Profile) -> bool:
    """Never slower: whether ``plan`` beats dense SDPA on this call's kind (``runtime.speed``; the
    dense side without key padding, which would only slow it down)."""
    if plan.estimate is not None:
        dynamic = sorted({pattern.kind for pattern, _, _ in plan.estimate.groups})
        layout = "dynamic " + ",".join(dynamic)
    else:
        layout = f"density {round(plan.layout.density() / 0.05) * 0.05:.2f}"
    if plan.skipped:
        layout += f" +{len(plan.skipped)} dense heads"
    verdict = speed.verdict_key(query, key, call.causal, call.kv_valid is not None, profile.block_size, layout,
                                plan.order is not None)
    return speed.sparse_is_faster(verdict, lambda: plan.run(query, key, value, call.kv_valid, call.scale),
                                  lambda: dense(query, key, value, *kernel_causal(query, key, call.causal), call.scale))


def clear_call_plans() -> None:
    """Forget every call plan (their layouts and index tensors on the GPU); later calls build anew."""
    with _CALL_PLANS_LOCK:
        _CALL_PLANS.clear()
        _CALL_PLAN_BYTES[0] = 0


def _build(heads: HeadSet, profile: Profile, call: Call, query: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor) -> CallPlan:
    device, (q_block, kv_block) = query.device, profile.block_size
    tokens = layer_order(heads, call.tokens, profile, device)
    q_len = query.shape[2]
    geometry = BlockGeometry(q_len, key.shape[2], q_block, kv_block, call.causal, tokens)  # causal: a KV-cache prefix
    reasons = (p.unfit(geometry) for p in heads.patterns)
    reason = next((r for r in reasons if r is not None), None) or supports(query, key, value, q_block, kv_block)
    if reason is not None:
        return CallPlan(fallback=reason)
    # Dense heads of a mixed layer go to SDPA (cuDNN/flash: faster than our kernel at density 1),
    # unless key padding must be applied (SDPA would then leave its fused kernels).
    skipped = heads.dense_heads if call.kv_valid is None else ()
    group = query.shape[1] // key.shape[1]
    dense_heads = None
    if skipped:
        dense_heads = (torch.tensor(skipped, device=device), torch.tensor([h // group for h in skipped], device=device))
    order = kernel_order(tokens, call.pieces, device)
    q_rows = order.to(torch.int32) if order is not None else None
    common = dict(geometry=geometry, order=order, q_rows=q_rows, dense_heads=dense_heads, skipped=skipped)
    if heads.dynamic_heads:
        return CallPlan(estimate=_estimate(heads, geometry, query.shape[0], query.shape[1], group, device), **common)
    layout = BlockLayout.from_patterns(heads.patterns, geometry, device)
    layout = layout.with_heads_skipped(skipped) if skipped else layout
    key, value = _permute(key, order), _permute(value, order)
    kernel = KernelCall.prepare(query, key, value, layout.kv_indices, layout.kv_counts, q_block=q_block,
                                kv_block=kv_block, causal=call.causal, scale=call.scale,
                                schedule=layout.schedule(group), q_rows=q_rows, columns=layout.columns,
                                column_counts=layout.column_counts, listed=layout.listed)
    backend = choose_backend(kernel, query, key, value, key_padding=call.kv_valid is not None)
    return CallPlan(layout=layout, kernel=kernel, backend=backend, **common)


def layer_order(heads: HeadSet, tokens: TokenGeometry | None, profile: Profile,
                device: torch.device) -> TokenGeometry | None:
    """``tokens`` in the order the layer's grid patterns are laid out in (``layout.grid_order``,
    chosen from every head of the layer, also for a Ulysses slice); as they are without any."""
    if tokens is None or not any(p.needs_grid for p in heads.layer_patterns):
        return tokens
    return grid_order(heads.layer_patterns, tokens, *profile.block_size, device, profile.token_order)


def kernel_order(tokens: TokenGeometry | None, pieces: int, device: torch.device) -> torch.Tensor | None:
    """Long ``[S]``: the position in the call of the token the kernel sees at each position; None
    when that is the call's own order. The tile order (``tokens.permutation``) maps kernel to model
    positions; a call gathered from ``pieces`` context-parallel ranks holds the model's tokens in
    the gathered order (``models.parallel.gathered_positions``)."""
    model = tokens.permutation(device) if tokens is not None else None
    gathered = gathered_positions(tokens, pieces, device) if tokens is not None else None
    if gathered is None:
        return model
    return gathered if model is None else gathered[model]


def _estimate(heads: HeadSet, geometry: BlockGeometry, batch: int, num_heads: int, group: int,
              device: torch.device) -> _Estimate:
    """What each call's dynamic layout starts from. The program order of a causal layout is
    ``row_schedule`` of the blocks every row may reach (later query blocks first: they have more to
    do), made once: ordering by each call's own counts costs a few sorts per call (0.15 ms of
    block_topk's 0.84 at 32K on the H200); without a causal triangle the reachable blocks say
    nothing about the work, and the per-call order is 3-5 % faster on VGGT's global attention."""
    static = torch.stack([geometry.reachable(device) if p.is_dynamic else block_mask(p, geometry, device)
                          for p in heads.patterns])
    groups = tuple((p, torch.tensor(hs, device=device), torch.tensor([h // group for h in hs], device=device))
                   for p, hs in heads.dynamic_heads.items())
    row_order = None
    if geometry.causal:
        reachable = geometry.reachable(device).sum(-1, dtype=torch.int32)
        row_order = row_schedule(reachable.expand(1, num_heads, -1), group)
    return _Estimate(static, geometry.text_block_mask(device), groups,
                     max(p.max_columns for p in heads.dynamic_heads) * batch, row_order)


@dataclass(eq=False)
class LayerPlan:
    """How one attention module is served: its name and place among the served layers, its profile
    entry, and the model's state; the call plans it uses live in the shared cache."""

    name: str
    index: int  # among the model's served layers: one forward calls them in increasing order
    num_heads: int
    profile: Profile
    state: PatchState
    _head_sets: dict[Any, HeadSet] = field(default_factory=dict, repr=False)
    # The attention module (weakly: a dropped model is not kept alive), whose processor says per
    # call what context parallelism it runs under; bound by ``bind``, again on a copy.
    _module: Callable[[], Any] = field(default=lambda: None, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # pickle / deepcopy: the plan, not its memo or module
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def bind(self, module: Any) -> None:
        self._module = weakref.ref(module)

    def context_parallel(self) -> ContextParallel | None:
        """The context parallelism the module's calls run under now (diffusers), None without."""
        module = self._module()
        return None if module is None else context_parallel(module)

    def held_heads(self, parallel: ContextParallel | None, call_heads: int) -> tuple[int, int] | None:
        """The heads ``[start, stop)`` a call with ``call_heads`` heads holds under context
        ``parallel``ism (a Ulysses rank's slice); None for all of them, or when it holds neither
        (``classify`` then counts the call)."""
        held = None if parallel is None else parallel.heads(self.num_heads, call_heads)
        return None if held == (0, self.num_heads) else held

    def heads_at(self, step: int | None, heads: tuple[int, int] | None = None) -> HeadSet:
        """The patterns at denoising ``step`` of every head, or of heads ``[start, stop)`` (a
        Ulysses rank's slice: its own HeadSet, so call plans key on the slice)."""
        key = step if heads is None else (step, heads)
        found = self._head_sets.get(key)
        if found is None:
            whole = HeadSet.of(self.profile.patterns(self.name, self.num_heads, step))
            found = whole if heads is None else HeadSet.of(whole.patterns[heads[0]:heads[1]], whole)
            self._head_sets[key] = found
        return found


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
