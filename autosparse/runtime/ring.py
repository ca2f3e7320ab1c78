"""Ring attention, one step at a time: a query chunk against one key chunk, with its log-sum-exp.

diffusers' ring attention (``TemplatedRingAttention``, also inside its unified attention) calls the
attention backend once per key chunk with ``return_lse=True`` and merges the partial outputs by
their log-sum-exp. A step here runs the part of the layer's full layout that the pair touches: the
query blocks holding a query of the chunk and, in their lists, the key blocks holding a key of the
key chunk (blocks are in the kernel's token order, where a chunk of the sequence is scattered),
gathered into one compact launch whose keys outside the key chunk are padding. Its output is the
full layout's attention restricted to that key chunk, so the merge gives the full call's answer; a
pair that touches no block is skipped (output 0, lse -inf).

The merge needs every query to attend a key at the ring's first step (its own chunk: the merge
computes ``-inf - (-inf)`` otherwise). A layout where some query attends nothing in its own chunk,
dynamic patterns (estimated from the whole sequence's keys, which no step holds) and everything
else ``classify`` sends to dense run as dense steps, counted once per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autosparse.kernels import KernelCall, supports
from autosparse.layout import BlockLayout, block_mask
from autosparse.patterns import BlockGeometry, Dense
from autosparse.profile import DEFAULT_BLOCK_SIZE, Profile
from autosparse.runtime.classify import Call, classify
from autosparse.runtime.dense import softmax_scale
from autosparse.runtime.heads import HeadSet
from autosparse.runtime.lengths import beyond_length, count_beyond
from autosparse.runtime.plan import LayerPlan, cached_plan, kernel_order, layer_order

__all__ = ["DIAGONAL_REASON", "DYNAMIC_REASON", "RingStep", "StepPlan", "dense_step", "serve_ring", "step_plan"]

DYNAMIC_REASON = "dynamic patterns under ring attention (estimated from keys no ring step holds)"
DIAGONAL_REASON = "a query attends no key of its own ring chunk (the ring's merge needs one)"


@dataclass(frozen=True)
class RingStep:
    """One step of ring attention: the sequence is ``chunks`` equal chunks (in the order the call
    gathers it), the queries are chunk ``query``, the keys chunk ``key``; the first step is a
    chunk's own keys."""

    chunks: int
    query: int
    key: int

    @property
    def first(self) -> bool:
        return self.query == self.key


@dataclass(frozen=True, eq=False)
class StepPlan:
    """What one ring step launches: the kernel over the pair's compact q/k (``q_index``/``k_index``:
    the local row each of its positions reads, ``k_valid``: which of its keys are real; None: the
    local tensors as they are), and ``back``: where each local query row's answer is in the
    launch. ``kernel`` None: the pair attends nothing (skipped); ``fallback``: why it is not laid out."""

    fallback: str | None = None
    kernel: KernelCall | None = None
    q_index: torch.Tensor | None = None
    k_index: torch.Tensor | None = None
    k_valid: torch.Tensor | None = None
    back: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = [self.q_index, self.k_index, self.k_valid, self.back]
        if self.kernel is not None:
            tensors += [self.kernel.kv_indices, self.kernel.kv_counts, self.kernel.schedule]
        return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, H, Sq, D]`` output and float32 ``[B, H, Sq]`` lse of the step (``[B, H, S, D]`` in)."""
        b, h, sq, _ = query.shape
        if self.kernel is None:
            return (query.new_zeros(b, h, sq, value.shape[-1]),
                    torch.full((b, h, sq), float("-inf"), device=query.device))
        q, k, v = query, key, value
        if self.q_index is not None:
            q = query.index_select(2, self.q_index)
            k, v = key.index_select(2, self.k_index), value.index_select(2, self.k_index)
        kv_valid = None if self.k_valid is None else self.k_valid.expand(b, -1)
        out, lse = self.kernel.run(q, k, v, kv_valid, return_lse=True)
        if self.back is None:
            return out, lse
        return out.index_select(2, self.back), lse.index_select(2, self.back)


def serve_ring(plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
               step: RingStep) -> tuple[torch.Tensor, torch.Tensor]:
    """One ring step of a served layer's call (``[B, H, S, D]``; no mask): output and lse, sparse
    where the layer's patterns allow it, else a dense step; the call is counted at its first step."""
    state = plan.state
    parallel = plan.context_parallel()
    heads = plan.heads_at(state.context.step, plan.held_heads(parallel, query.shape[1]))
    call = classify(state.context, plan.index, heads, query, key, value, None, False, scale, parallel, step.chunks)
    reason = call.fallback or (DYNAMIC_REASON if call.dense is None and heads.dynamic_heads else None)
    if call.dense is None and reason is None:
        longer = beyond_length(plan, heads, call.keys * step.chunks)
        if longer is not None:  # the profile says nothing about this length: the model as it is
            if step.first:
                count_beyond(plan, longer, call.keys * step.chunks)
            return dense_step(query, key, value, scale, plan.profile.block_size)
        planned = step_plan(heads, plan.profile, call, query, key, value, step)
        reason = planned.fallback
    if step.first:  # one call, counted once
        if call.dense is not None:
            state.stats.dense[call.dense] += 1
        elif reason is not None:
            state.count_fallback(plan.name, reason)
        else:
            state.stats.sparse += 1
    if call.dense is not None or reason is not None:
        return dense_step(query, key, value, scale, plan.profile.block_size)
    return planned.run(query, key, value)


def dense_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
               block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of a ring step with its lse (the block-sparse kernel with every block:
    exact, on every device the kernel runs on); NotImplementedError where the kernel cannot run it."""
    scale = softmax_scale(query, scale)
    cache_key = ("ring dense", query.shape, key.shape, value.shape, query.dtype, query.device, scale, block_size)
    planned = cached_plan(cache_key, lambda: _dense_plan(query, key, value, scale, block_size))
    if planned.fallback is not None:
        raise NotImplementedError(f"autosparse ring attention: {planned.fallback}")
    return planned.run(query, key, value)


def step_plan(heads: HeadSet, profile: Profile, call: Call, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, step: RingStep) -> StepPlan:
    """The plan of this ring step, from the cache or built; a step whose chunk's own step leaves a
    query without keys falls back like it (the call runs dense at every step)."""
    def cached(at: RingStep) -> StepPlan:
        cache_key = ("ring", heads, query.shape, key.shape, value.shape, query.dtype, query.device, call.scale,
                     call.tokens, call.pieces, profile.block_size, profile.token_order, at)
        return cached_plan(cache_key, lambda: _pair_plan(heads, profile, call, query, key, value, at))

    own = cached(RingStep(step.chunks, step.query, step.query))
    return own if step.first or own.fallback is not None else cached(step)


def _dense_plan(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                block_size: tuple[int, int]) -> StepPlan:
    q_block, kv_block = block_size
    reason = supports(query, key, value, q_block, kv_block)
    if reason is not None:
        return StepPlan(fallback=reason)
    geometry = BlockGeometry(query.shape[2], key.shape[2], q_block, kv_block, False)
    layout = BlockLayout.from_patterns([Dense()] * query.shape[1], geometry, query.device)
    return StepPlan(kernel=_launch(layout, query, key, value, scale))


@dataclass(frozen=True, eq=False)
class _Frame:
    """The whole call every step of one ring lays out its part of, built once: each head's block
    mask in the kernel's token order (text dense) and the call position of each kernel position."""

    fallback: str | None = None
    mask: torch.Tensor | None = None  # bool [H, NQ, NK]
    order: torch.Tensor | None = None  # long [S]

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.mask, self.order) if t is not None)


def _frame(heads: HeadSet, profile: Profile, call: Call, query: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor, length: int) -> _Frame:
    device, (q_block, kv_block) = query.device, profile.block_size
    tokens = layer_order(heads, call.tokens, profile, device)
    geometry = BlockGeometry(length, length, q_block, kv_block, False, tokens)
    reason = next((r for r in (p.unfit(geometry) for p in heads.patterns) if r is not None), None)
    reason = reason or supports(query, key, value, q_block, kv_block)
    if reason is not None:
        return _Frame(fallback=reason)
    order = kernel_order(tokens, call.pieces, device)
    masks = {p: block_mask(p, geometry, device) for p in set(heads.patterns)}
    return _Frame(mask=torch.stack([masks[p] for p in heads.patterns]),
                  order=torch.arange(length, device=device) if order is None else order)


def _pair_plan(heads: HeadSet, profile: Profile, call: Call, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, step: RingStep) -> StepPlan:
    """The layer's whole layout (every head, in the kernel's order) restricted to the query blocks
    holding a query of ``step.query`` and the key blocks holding a key of ``step.key``."""
    q_block, kv_block = profile.block_size
    length = query.shape[2] * step.chunks
    frame_key = ("ring frame", heads, length, query.shape[1], query.dtype, query.device, call.tokens, call.pieces,
                 profile.block_size, profile.token_order)
    frame = cached_plan(frame_key, lambda: _frame(heads, profile, call, query, key, value, length))
    if frame.fallback is not None:
        return StepPlan(fallback=frame.fallback)
    chunk, order = length // step.chunks, frame.order
    queries, keys = _Slots.of(order, chunk, step.query, q_block), _Slots.of(order, chunk, step.key, kv_block)
    pair = frame.mask[:, queries.blocks][:, :, keys.blocks]
    layout = BlockLayout.from_block_mask(pair, BlockGeometry(len(queries.index), len(keys.index), q_block, kv_block,
                                                             False))
    counts = layout.kv_counts[0]
    if step.first and bool((counts == 0).any()):
        return StepPlan(fallback=DIAGONAL_REASON)
    if not bool(counts.any()):
        return StepPlan()
    kernel = _launch(layout, query.index_select(2, queries.index), key.index_select(2, keys.index),
                     value.index_select(2, keys.index), call.scale)
    return StepPlan(kernel=kernel, q_index=queries.index, k_index=keys.index, k_valid=keys.valid,
                    back=queries.back(order, chunk, step.query, q_block))


@dataclass(frozen=True)
class _Slots:
    """One side of a pair: the blocks (kernel order) holding a token of one chunk, their positions
    as the compact launch's rows: the chunk-local row each reads (0 where the position holds no
    token of the chunk, or lies past the sequence's end) and whether it is the chunk's."""

    blocks: torch.Tensor  # long [n]: block ids
    index: torch.Tensor  # long [n * block]
    valid: torch.Tensor  # bool [n * block]

    @classmethod
    def of(cls, order: torch.Tensor, chunk: int, which: int, block: int) -> _Slots:
        length = len(order)
        inside = order // chunk == which  # per kernel position: its token is in the chunk
        padded = torch.zeros(-(-length // block) * block, dtype=torch.bool, device=order.device)
        padded[:length] = inside
        blocks = padded.view(-1, block).any(1).nonzero()[:, 0]
        position = (blocks[:, None] * block + torch.arange(block, device=order.device)).flatten()
        valid = padded[position]
        index = torch.where(valid, order[position.clamp(max=length - 1)] - chunk * which, 0)
        return cls(blocks, index, valid)

    def back(self, order: torch.Tensor, chunk: int, which: int, block: int) -> torch.Tensor:
        """Long ``[chunk]``: the launch row of each token of chunk ``which``, in chunk-local order."""
        rank = torch.full((-(-len(order) // block),), -1, dtype=torch.long, device=order.device)
        rank[self.blocks] = torch.arange(len(self.blocks), device=order.device)
        kernel = torch.empty_like(order)
        kernel[order] = torch.arange(len(order), device=order.device)  # call position -> kernel position
        local = kernel[chunk * which:chunk * (which + 1)]
        return rank[local // block] * block + local % block


def _launch(layout: BlockLayout, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            scale: float) -> KernelCall:
    g = layout.geometry
    return KernelCall.prepare(query, key, value, layout.kv_indices, layout.kv_counts, q_block=g.q_block,
                              kv_block=g.kv_block, causal=False, scale=scale,
                              schedule=layout.schedule(query.shape[1] // key.shape[1]))
