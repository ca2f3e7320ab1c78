"""Sparse decode: one query row per head (a generate step) over a long KV cache, reading only the
kept keys.

Decode is memory-bound: a step reads every cached key and value once, so its cost is the bytes of
K/V read. Two policies, chosen at patch time (``patch_model(..., decode=...)``; without one,
decode runs dense as SDPA does):

* ``StaticDecode()``: each head's static pattern from the profile, laid out for the query's
  position (the last row of ``BlockGeometry(1, Sk, causal)``: bottom-right, as a prefill lays out
  that token), so sinks and a window keep the keys they keep in a prefill. Heads whose pattern is
  dense or dynamic (its estimate needs the rows of a prefill) read every key.
* ``PageTopK(pages, sinks, local, page_size)``: Quest's selection. Per page of ``page_size`` keys,
  the elementwise centre and radius of its keys ((max + min) / 2, (max - min) / 2), kept per layer
  and extended as the cache grows; the upper bound of q.k over a page is
  ``q . centre + |q| . radius`` (= sum_d max(q_d min_d, q_d max_d)). Per KV head the ``pages``
  pages with the highest bound over the head's query heads are kept, with the first ``sinks`` and
  the last ``local`` pages (the last, partial page always).

Both gather the kept tokens' K and V rows from the cache memory as it is (one ``index_select``
each) and run SDPA on them: exact attention over the kept keys. Bytes moved: about 3x the kept K/V
(the gather reads and writes them, SDPA reads them) against all of K/V for dense.

Page statistics are built at a layer's first decode step after a prefill (one pass over the full
pages, as one dense step reads K) and extended by the pages completed since; a prefill or chunk on
the layer (``forget``) or a cache that did not grow by appending drops them. The statistics assume
the cache holds one sequence per batch row in order (greedy or sampled ``generate``): a cache whose
rows are reordered between steps (beam search) must run dense decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from autosparse.patterns import BlockGeometry
from autosparse.runtime.dense import ORIGINAL_SDPA, dense, empty_output
from autosparse.runtime.heads import HeadSet
from autosparse.runtime.lengths import beyond_length, count_beyond

__all__ = ["DecodePolicy", "PageTopK", "StaticDecode", "attend", "forget"]


@dataclass(frozen=True)
class StaticDecode:
    """Decode with the profile's static patterns at the query's position."""


@dataclass(frozen=True)
class PageTopK:
    """Decode with Quest's page selection: ``pages`` pages by upper bound, plus ``sinks`` first and
    ``local`` last pages, of ``page_size`` keys each."""

    pages: int = 32
    sinks: int = 1
    local: int = 1
    page_size: int = 64

    def __post_init__(self) -> None:
        for name in ("pages", "sinks", "local", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name != "sinks" else 0):
                raise ValueError(f"PageTopK.{name} must be an int >= {1 if name != 'sinks' else 0}, got {value!r}")
        if self.page_size % 16:
            raise ValueError(f"PageTopK.page_size must be a multiple of 16, got {self.page_size}")


DecodePolicy = StaticDecode | PageTopK


@dataclass
class _Pages:
    """One layer's page statistics: ``centre``/``radius`` ``[B, Hkv, full pages, D]`` (fp32) and the
    cache length they were last extended at."""

    centre: torch.Tensor
    radius: torch.Tensor
    length: int


def forget(pages: dict[str, _Pages], layer: str) -> None:
    """Drop ``layer``'s page statistics (a prefill or chunk starts a sequence there)."""
    pages.pop(layer, None)


def attend(policy: DecodePolicy, pages: dict[str, _Pages], layer: str, heads: HeadSet, blocks: tuple[int, int],
           query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_valid: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """The decode step's output ``[B, Hq, 1, Dv]`` (the op's layout) attending only the kept keys.
    ``key``/``value`` ``[B, Hkv, Sk, D]``: the whole cache up to and including this token; ``kv_valid``
    ``[B, Sk]`` bool key padding or None; ``blocks``: the profile's (q_block, kv_block).

    The kept positions are exact (the last, partial block only up to the query), so without key
    padding no mask is needed. With one kept list per KV head, a KV head's query heads run as its
    query rows (``[B, Hkv, G, D]``, no mask, no GQA expansion): flash decoding's shape."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    if isinstance(policy, PageTopK):
        tokens, valid = _page_tokens(policy, pages, layer, query, key), None
        index = _row_index(key, tokens, False, 1)
    else:
        tokens, valid, index = _static_tokens(heads, blocks, b, hq, key)
    rows = tokens.shape[1]  # Hkv (one list per KV head) or Hq
    same = value.stride()[:3] == key.stride()[:3]  # K and V of a cache share a layout
    index_v = index if same else _row_index(value, tokens, rows != hkv, hq // hkv)
    k, v = _rows(key, index, tokens.shape), _rows(value, index_v, tokens.shape)
    if kv_valid is not None:
        padded = kv_valid[:, None, :].expand(-1, rows, -1).gather(2, tokens)
        valid = padded if valid is None else valid & padded
    q = query if rows != hkv else query.reshape(b, hkv, hq // hkv, d)
    mask = None if valid is None else valid[:, :, None, :]
    with sdpa_kernel(list(_BACKENDS)):  # not cuDNN: it builds a plan per new length, and decode's grows each step
        answer = ORIGINAL_SDPA(q, k, v, attn_mask=mask, scale=scale)
    out = empty_output(query, value)
    out.copy_(answer.reshape(b, hq, 1, -1))
    return out


_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def _row_index(x: torch.Tensor, tokens: torch.Tensor, per_query_head: bool, group: int) -> torch.Tensor:
    """Flat row numbers of ``x[b, h, tokens[b, h']]`` in the row view of ``x``'s memory (``_rows``):
    h = h' for KV-head lists, h' // group for query-head lists."""
    b, hkv, s, _ = x.shape
    heads = torch.arange(tokens.shape[1], device=x.device) // (group if per_query_head else 1)
    if _row_view_ok(x):
        step = x.stride(2)
        first = (torch.arange(b, device=x.device)[:, None, None] * (x.stride(0) // step)
                 + heads[None, :, None] * (x.stride(1) // step))
    else:
        first = torch.arange(b, device=x.device)[:, None, None] * hkv * s + heads[None, :, None] * s
    return (first + tokens).reshape(-1)


def _row_view_ok(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1 and x.stride(0) % x.stride(2) == 0 and x.stride(1) % x.stride(2) == 0


def _rows(x: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The rows ``index`` of ``x``'s memory seen as ``[rows, D]`` (a cache sliced or strided as caches
    are: no copy of it; otherwise one), as ``[*shape, D]``."""
    b, hkv, s, d = x.shape
    if _row_view_ok(x):
        step = x.stride(2)
        rows = torch.as_strided(x, ((b - 1) * x.stride(0) // step + (hkv - 1) * x.stride(1) // step + s, d), (step, 1))
    else:
        rows = x.contiguous().view(-1, d)
    return rows.index_select(0, index).view(*shape, d)


_STATIC: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}  # the last step's lists (layers share them)


def _static_tokens(heads: HeadSet, blocks: tuple[int, int], batch: int, hq: int,
                   key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Kept token positions ``[B, H', N]`` for each head's static pattern at the query's position
    (dense and dynamic heads: every key), their validity (None: all valid) and their rows in the
    cache's memory (``_row_index``). H' = KV heads when every group of query heads shares its
    pattern. Laid out on the host (no device sync) and shared by the layers of one step that have
    the same patterns and cache layout."""
    hkv, sk, device = key.shape[1], key.shape[2], key.device
    cache_key = (heads, blocks, batch, hq, key.shape, key.stride(), device)
    found = _STATIC.get(cache_key)
    if found is None:
        group, kv_block = hq // hkv, blocks[1]
        geometry = BlockGeometry(1, sk, blocks[0], kv_block, True)
        lists: dict[object, torch.Tensor] = {}
        for pattern in set(heads.patterns):
            kept = (geometry.reachable() if pattern.is_dense or pattern.is_dynamic else pattern.block_mask(geometry))[0]
            first = kept.nonzero()[:, 0] * kv_block
            tokens = (first[:, None] + torch.arange(kv_block)).flatten()
            lists[pattern] = tokens[tokens < sk]
        shared = all(len(set(heads.patterns[g * group:(g + 1) * group])) == 1 for g in range(hkv))
        chosen = [lists[heads.patterns[h * group]] for h in range(hkv)] if shared else [lists[p] for p in heads.patterns]
        width = max(len(t) for t in chosen)
        tokens = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in chosen])
        valid = None
        if any(len(t) != width for t in chosen):
            valid = torch.stack([torch.arange(width) < len(t) for t in chosen]).to(device, non_blocking=True)
        tokens = tokens.to(device, non_blocking=True).expand(batch, -1, -1)
        valid = None if valid is None else valid.expand(batch, -1, -1)
        found = (tokens, valid, _row_index(key, tokens, len(chosen) != hkv, group))
        _STATIC.clear()
        _STATIC[cache_key] = found
    return found


def _page_tokens(policy: PageTopK, pages: dict[str, _Pages], layer: str, query: torch.Tensor,
                 key: torch.Tensor) -> torch.Tensor:
    """Kept token positions ``[B, Hkv, N]``, exact: each KV head's highest-bound full pages (with
    the first ``sinks`` and last ``local`` forced in), then the partial page's keys, the same for every
    head. No device sync: every count is known on the host."""
    b, hq, _, d = query.shape
    hkv, sk, ps = key.shape[1], key.shape[2], policy.page_size
    stats = _extended(pages, layer, key, ps)
    full = stats.centre.shape[2]
    partial = sk - full * ps  # keys of the page the query is in, always kept
    local = max(policy.local - (1 if partial else 0), 0)  # full pages still forced at the end
    forced = sorted(set(range(min(policy.sinks, full))) | set(range(max(full - local, 0), full)))
    keep = min(full, policy.pages + len(forced))
    q = query[:, :, 0].float().view(b, hkv, hq // hkv, d)
    bound = (q @ stats.centre.transpose(-1, -2) + q.abs() @ stats.radius.transpose(-1, -2)).amax(2)  # [B, Hkv, full]
    if forced:
        bound[..., forced] = float("inf")
    page = torch.topk(bound, keep, dim=-1, sorted=False).indices if keep else bound.new_zeros(b, hkv, 0).long()
    tokens = (page[..., None] * ps + torch.arange(ps, device=key.device)).reshape(b, hkv, -1)
    tail = torch.arange(full * ps, sk, device=key.device).expand(b, hkv, -1)
    return torch.cat([tokens, tail], dim=-1)


def _extended(pages: dict[str, _Pages], layer: str, key: torch.Tensor, ps: int) -> _Pages:
    """The layer's page statistics over every full page of ``key``: built, or extended by the pages
    completed since the last step (rebuilt when the cache shrank: another sequence)."""
    stats, sk = pages.get(layer), key.shape[2]
    full = sk // ps
    if stats is None or stats.length > sk or stats.centre.shape[:2] != key.shape[:2]:
        stats = _Pages(key.new_zeros(*key.shape[:2], 0, key.shape[3], dtype=torch.float32),
                       key.new_zeros(*key.shape[:2], 0, key.shape[3], dtype=torch.float32), 0)
    done = stats.centre.shape[2]
    if full > done:
        new = key[:, :, done * ps:full * ps].float().unflatten(2, (full - done, ps))
        high, low = new.amax(3), new.amin(3)
        stats.centre = torch.cat([stats.centre, (high + low) / 2], dim=2)
        stats.radius = torch.cat([stats.radius, (high - low) / 2], dim=2)
    stats.length = sk
    pages[layer] = stats
    return stats


def serve_decode(plan, heads: HeadSet, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None, is_causal: bool, scale: float | None) -> torch.Tensor | None:
    """A decode step of ``plan``'s layer served with the model's decode policy, counted as sparse;
    arguments the gather cannot take exactly run dense, counted as a fallback with the reason; None
    when the step is dense by design (no policy, a dense layer): the caller counts it."""
    state = plan.state
    if state.decode is None or heads.is_dense:
        return None
    reason = None
    if is_causal and key.shape[2] > 1:
        reason = "is_causal on a decode step (top-left: the query sees key 0 only)"
    elif query.shape[1] != len(heads.patterns) or query.shape[1] % key.shape[1]:
        reason = f"{query.shape[1]} query heads for {key.shape[1]} KV heads, profile has {len(heads.patterns)}"
    elif query.requires_grad or key.requires_grad or value.requires_grad:
        reason = "requires_grad"
    kv_valid, whole = None, (key, value)  # the call as made (dense answers take it so)
    if reason is None and mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            reason = f"decode attention mask {tuple(mask.shape)} {mask.dtype} (expected bool [B, 1, 1, Sk])"
        else:
            kv_valid = mask[:, 0, 0, :].expand(query.shape[0], -1)
            # A StaticCache's buffer: the keys after the last one any row sees are not written yet;
            # the query's position (where its window ends) is the last key it sees.
            seen = kv_valid.any(0).nonzero()
            keys = int(seen[-1]) + 1 if len(seen) else key.shape[2]
            key, value, kv_valid = key[:, :, :keys], value[:, :, :keys], kv_valid[:, :keys]
    if reason is not None:
        state.count_fallback(plan.name, f"sparse decode: {reason}")
        return dense(query, key, value, mask, is_causal, scale)
    if isinstance(state.decode, StaticDecode):  # the profile's patterns: only as far as they were validated
        longer = beyond_length(plan, heads, key.shape[2])
        if longer is not None:
            count_beyond(plan, longer, key.shape[2])
            return dense(query, *whole, mask, is_causal, scale)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out = attend(state.decode, state.pages, plan.name, heads, plan.profile.block_size, query, key, value, kv_valid,
                 scale)
    state.stats.sparse += 1
    return out
