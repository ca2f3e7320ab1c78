"""One attention call, served: the custom op every capture route calls, and what it runs.

``torch.ops.autosparse.attention(q, k, v, layer, attn_mask, is_causal, scale)`` owns the call. It
is opaque to ``torch.compile`` and takes the layer as a 0-d CPU int64 tensor (one per attention
module, a graph input, not a constant): a graph compiled once for a repeated block
(``compile_repeated_blocks``) still serves each block with its own patterns, and every decision
that changes between calls (denoising step, token geometry, padding mask) is made here at run time,
so it never bakes into a graph or causes a recompile. Eager callers go through ``attention``,
which runs the same function without the dispatcher's cost when nothing is tracing.

Per call: read the context (the layer's patterns at the current step) -> classify (sparse, dense by
design or a fallback, with the reason counted; no device work) -> the call plan (built once per
shape, from one bounded cache) -> the plan's launch -> the guard, when it is due -> output with the
memory layout ``[B, S, H, D]`` (returned as the ``[B, H, S, D]`` view SDPA returns).
"""

from __future__ import annotations

import logging

import torch

from autosparse.guard import log_line
from autosparse.runtime import decode
from autosparse.runtime.classify import DECODE, Call, classify
from autosparse.runtime.dense import dense, empty_output, softmax_scale
from autosparse.runtime.lengths import beyond_length, count_beyond
from autosparse.runtime.plan import LayerPlan, call_plan, plan_of

__all__ = ["GUARD_REASON", "HOST_SIDE_TAGS", "attention", "count_unserved", "serve"]

log = logging.getLogger("autosparse")

# Ops that decide on the host per call (step, layout): a CUDA graph must not capture them.
HOST_SIDE_TAGS = tuple(t for t in [getattr(torch.Tag, "cudagraph_unsafe", None)] if t is not None)
GUARD_REASON = "accuracy guard: sampled rows over tolerance"


@torch.library.custom_op("autosparse::attention", mutates_args=(), tags=HOST_SIDE_TAGS)
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor,
                  attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(query, key, value, attn_mask, is_causal=is_causal,
    scale=scale)`` as torch defines it (``[B, H, S, D]`` in and out, GQA by head mapping; causal
    means top-left aligned), served for ``layer``: sparse where the layer's patterns and the call
    allow it exactly, else dense and counted."""
    return serve(plan_of(layer), query, key, value, attn_mask, is_causal, scale)


@_attention_op.register_fake
def _(query, key, value, layer, attn_mask, is_causal, scale):
    return empty_output(query, value)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor,
              attn_mask: torch.Tensor | None, is_causal: bool, scale: float | None) -> torch.Tensor:
    """``torch.ops.autosparse.attention``, what the capture routes call: the op while Dynamo traces
    (or a dispatch mode, fake or meta tensors are about), else ``serve`` directly: the op's
    dispatch costs about as much host time as serving a call."""
    if (torch.compiler.is_compiling() or type(query) is not torch.Tensor or query.device.type == "meta"
            or torch._C._len_torch_dispatch_stack() > 0):
        return torch.ops.autosparse.attention(query, key, value, layer, attn_mask, is_causal, scale)
    return serve(plan_of(layer), query, key, value, attn_mask, is_causal, scale)


def serve(plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          mask: torch.Tensor | None, is_causal: bool, scale: float | None) -> torch.Tensor:
    state = plan.state
    if state.observer is not None:  # calibration: every call, as the caller made it
        state.observer(plan, query, key, value, mask, is_causal, softmax_scale(query, scale))
    parallel = plan.context_parallel()
    heads = plan.heads_at(state.context.step, plan.held_heads(parallel, query.shape[1]))
    call = classify(state.context, plan.index, heads, query, key, value, mask, is_causal, scale, parallel)
    if state.pages and query.shape[2] > 1:  # a prefill or chunk: a new sequence for page statistics
        decode.forget(state.pages, plan.name)
    if call.dense == DECODE and state.decode is not None:
        out = decode.serve_decode(plan, heads, query, key, value, mask, is_causal, scale)
        if out is not None:
            return out
    if call.dense is not None:
        state.stats.dense[call.dense] += 1
        return dense(query, key, value, mask, is_causal, scale)
    if call.fallback is not None:
        state.count_fallback(plan.name, call.fallback)
        return dense(query, key, value, mask, is_causal, scale)
    longer = beyond_length(plan, heads, call.keys)
    if longer is not None:  # the profile says nothing about this length: the model as it is
        count_beyond(plan, longer, call.keys)
        return _dense_call(call, query, key, value, mask, is_causal, scale)
    # Keys no query may see (a StaticCache's unwritten tail) are dropped.
    k, v = (key, value) if call.keys == key.shape[2] else (key[:, :, :call.keys], value[:, :, :call.keys])
    planned = call_plan(heads, plan.profile, call, query, k, v)
    if planned.fallback is not None:
        state.count_fallback(plan.name, planned.fallback)
        return _dense_call(call, query, key, value, mask, is_causal, scale)
    if planned.dense is not None:  # measured not faster than dense here (runtime.speed)
        state.stats.dense[planned.dense] += 1
        return _dense_call(call, query, key, value, mask, is_causal, scale)
    out = _run(planned, call, query, k, v)
    if state.guard is not None and state.guard.due(plan.name, query.device):
        checked = state.guard.check(query, k, v, out, causal=call.causal, scale=call.scale, kv_valid=call.kv_valid,
                                    layer=plan.name)
        if not checked.ok:
            log.warning("autosparse: %s", log_line(plan.name, checked))
            state.count_fallback(plan.name, GUARD_REASON)
            return dense(query, key, value, mask, is_causal, scale)
    state.stats.sparse += 1
    return out


def _dense_call(call: Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, scale: float | None) -> torch.Tensor:
    """The dense answer of a call classified as servable: without key padding, a square causal call
    runs as SDPA's ``is_causal`` and a mask that keeps every key as no mask (SDPA's fused kernels
    take no boolean mask), keys no query sees dropped. Anything else: the call as it was made."""
    if call.kv_valid is None and call.shift is None and (not call.causal or call.keys == query.shape[2]):
        return dense(query, key[:, :, :call.keys], value[:, :, :call.keys], None, call.causal, scale)
    return dense(query, key, value, mask, is_causal, scale)


def _run(planned, call: Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if call.shift is None:
        return planned.run(query, key, value, call.kv_valid, call.scale)
    # Left padding: a row's patterns (sinks, windows, blocks) count from its first real token.
    index = _rolled(call.shift, query.shape[2])
    rolled = planned.run(*(_gather_rows(x, index) for x in (query, key, value)), call.kv_valid.gather(1, index),
                         call.scale)
    out = empty_output(query, value)
    out.scatter_(2, index[:, None, :, None].expand_as(out), rolled)
    # Rows before a row's first real token see no key: SDPA's answer there is zero.
    out.masked_fill_(_before_first(call.shift, query.shape[2])[:, None, :, None], 0.0)
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


@torch._dynamo.disable
def count_unserved(layer: torch.Tensor, reason: str, *, keys: int | None = None, window: int | None = None) -> None:
    """Count a call a capture route ran dense before reaching the op (arguments the op does not
    take: gradients, dropout, a sliding window shorter than the ``keys``, ...): by design if the
    layer is dense at this step anyway. While calibrating, the observer hears of it too
    (``observer.unserved``): the layer stays with the model's own attention in the profile."""
    plan = plan_of(layer)
    unserved = getattr(plan.state.observer, "unserved", None)
    if unserved is not None:
        unserved(plan, reason, keys=keys, window=window)
    if plan.heads_at(plan.state.context.step).is_dense:
        plan.state.stats.dense["dense in profile"] += 1
    else:
        plan.state.count_fallback(plan.name, reason)
