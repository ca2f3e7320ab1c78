"""How one call runs, decided from its arguments and the layer's patterns, without device work (a
padding mask is read once per forward): dense by design, dense because the kernel cannot serve it
exactly (a fallback), or sparse, with what the call plan is keyed on and the kernel needs per call."""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch

from autosparse.kernels import call_reason
from autosparse.models.parallel import ContextParallel, segments
from autosparse.patterns.geometry import TokenGeometry
from autosparse.runtime.dense import softmax_scale
from autosparse.runtime.heads import HeadSet
from autosparse.runtime.state import CallContext

__all__ = ["DECODE", "Call", "classify"]

DECODE = "decode (query length 1)"  # the dense reason of a decode step (runtime.decode may serve it)


class Call(NamedTuple):
    """How one call runs: dense by design (``dense``: the reason), dense because the kernel cannot
    serve it exactly (``fallback``: the reason), or sparse (neither) with: the keys kept
    (``keys``: a prefix), causality (bottom-right: with ``keys`` > query length the earlier keys are
    a KV-cache prefix, query i sits at position ``keys - Sq + i``), the softmax scale, key padding
    ``[B, keys]``, each row's left padding (``shift``, None without), the model's token geometry,
    and ``pieces``: the call's sequence is gathered from that many context-parallel ranks' pieces
    (1: the model's order; ``models.parallel.gathered_positions``)."""

    dense: str | None = None
    fallback: str | None = None
    keys: int = 0
    causal: bool = False
    scale: float = 1.0
    kv_valid: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    tokens: TokenGeometry | None = None
    pieces: int = 1


def classify(context: CallContext, layer: int, heads: HeadSet, query: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float | None,
             parallel: ContextParallel | None = None, chunks: int = 1) -> Call:
    """How this call of the ``layer``-th served layer (``LayerPlan.index``) runs, in ``context``;
    under context ``parallel``ism (``heads``: the slice the call holds) its queries are one of
    ``chunks`` ring chunks of the gathered sequence (1: all of it)."""
    if heads.is_dense:
        return Call(dense="dense in profile")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or not query.shape[0] == key.shape[0] == value.shape[0]:
        return Call(fallback=f"q/k/v shapes {tuple(query.shape)}/{tuple(key.shape)}/{tuple(value.shape)}")
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1:
        return Call(dense=DECODE)
    if q_len != kv_len and mask is None and not is_causal:
        return Call(dense="cross-attention (query length != key length)")
    if query.shape[1] != len(heads.patterns):
        held = ""
        if parallel is not None and parallel.ulysses > 1:
            held = f" (nor its {parallel.ulysses}-way Ulysses slice)"
        return Call(fallback=f"{query.shape[1]} query heads, profile has {len(heads.patterns)}{held}")
    if scale is not None and not (math.isfinite(scale) and scale > 0.0):
        return Call(fallback=f"scale {scale!r} (the kernel takes a positive finite scale)")
    if mask is not None and is_causal:
        return Call(fallback="attn_mask together with is_causal=True")
    # The kernel's capability: what can change per call here, the rest (dtype, head_dim) once per call plan.
    reason = call_reason(query, key, value)
    if reason is not None:
        return Call(fallback=reason)
    if mask is None:
        # torch's is_causal is top-left aligned: with more keys than queries the later keys are seen
        # by no query (an empty StaticCache's prefill) and are dropped.
        causal, keys, kv_valid, shift = is_causal, (min(kv_len, q_len) if is_causal else kv_len), None, None
        if is_causal and kv_len < q_len:
            return Call(fallback="is_causal with fewer keys than queries")
    else:
        found = _mask_verdict(context, layer, mask, query.shape[0], q_len, kv_len)
        if found.reason is not None:
            return Call(fallback=found.reason)
        causal, keys, kv_valid, shift = found.causal, found.keys, found.kv_valid, found.shift
    if keys != q_len and not causal:
        return Call(dense="cross-attention (query length != key length)")
    if keys < q_len:
        return Call(fallback="causal mask with fewer keys than queries")
    if keys != q_len and shift is not None:
        # Rows rolled to count each row's patterns from its first real token would move a chunk's
        # queries off their bottom-right positions: not exact with a cache prefix.
        return Call(fallback="left padding with a KV-cache prefix")
    tokens = context.tokens
    if tokens is not None and tokens.length != q_len * chunks:
        chunked = f" x {chunks} ring chunks" if chunks > 1 else ""
        return Call(fallback=f"token geometry has {tokens.length} tokens, the call {q_len}{chunked}")
    reason = _parallel_reason(parallel, tokens)
    if reason is not None:
        return Call(fallback=reason)
    if tokens is not None and causal:
        return Call(fallback="causal attention over a token grid")
    if heads.needs_grid and tokens is None:
        return Call(fallback="pattern needs the token grid (no geometry for this model call)")
    if shift is not None and tokens is not None:
        shift = None  # a token grid's positions are its own (text padding is key padding there)
    pieces = parallel.pieces if parallel is not None and tokens is not None and len(segments(tokens)) > 1 else 1
    return Call(keys=keys, causal=causal, scale=softmax_scale(query, scale), kv_valid=kv_valid, shift=shift,
                tokens=tokens, pieces=pieces)


def _parallel_reason(parallel: ContextParallel | None, tokens: TokenGeometry | None) -> str | None:
    """Why a call gathered from context-parallel ranks cannot be laid out: where each of its tokens
    sits in the model's sequence is known only from the token geometry and equal pieces."""
    if parallel is None or parallel.pieces == 1:
        return None
    if not parallel.even:
        return "context parallel with unequal pieces (ulysses_anything / ring_anything)"
    if tokens is None:
        return "context parallel without the model's token geometry (its token order across ranks is unknown)"
    if any(n % parallel.pieces for n in segments(tokens)):
        return f"token segments {segments(tokens)} do not cut into {parallel.pieces} equal context-parallel pieces"
    return None


class _MaskVerdict(NamedTuple):
    """A boolean mask read as the kernel's terms: keys kept (a prefix), causal or not, key padding
    ``[B, keys]`` (None: none), left padding per row (None: none); or ``reason`` why it is not."""

    reason: str | None = None
    keys: int = 0
    causal: bool = False
    kv_valid: torch.Tensor | None = None
    shift: torch.Tensor | None = None


def _mask_verdict(context: CallContext, layer: int, mask: torch.Tensor, batch: int, q_len: int,
                  kv_len: int) -> _MaskVerdict:
    """The mask's verdict, classified once per forward: a verdict is reused only by a later layer
    of the same forward (layers run in increasing order; a repeat or an earlier layer means a new
    forward, whose mask may be the same buffer refilled in place) and never after the mask changed
    (its version counter; inference tensors have none)."""
    base = mask._base if mask._base is not None else mask
    version = None if base.is_inference() else base._version
    key = (tuple(mask.shape), mask.stride(), mask.storage_offset(), version, batch, q_len, kv_len)
    seen = context.mask_seen
    if seen is not None and seen[0]() is base and seen[1] == key and seen[2] < layer:
        context.mask_seen = (seen[0], key, layer, seen[3])
        return seen[3]
    verdict = _classify_mask(mask, batch, q_len, kv_len)
    context.mask_seen = (weakref.ref(base), key, layer, verdict)
    return verdict


def _classify_mask(mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> _MaskVerdict:
    """A mask the kernel applies exactly: boolean, broadcast over heads, and key padding alone (any
    number of query rows) or bottom-right causal + key padding (``[B, 1, Sq, Sk]``: with Sk > Sq
    the first Sk - Sq keys are a KV-cache prefix, a chunked prefill's), after dropping the trailing
    keys no query sees (never below Sq: a StaticCache's unwritten tail).

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
    if kv_len > q_len:  # a StaticCache's unwritten tail: the keys after the last one any query sees
        seen = mask[..., q_len:].any(dim=(0, 1, 2)).nonzero()  # the tail's columns any row sees
        keys = q_len + (int(seen[-1]) + 1 if len(seen) else 0)
        mask = mask[..., :keys]
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
