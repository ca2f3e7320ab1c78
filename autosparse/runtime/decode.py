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

from autosparse.patterns import BlockGeometry
from autosparse.runtime.dense import ORIGINAL_SDPA, dense, empty_output
from autosparse.runtime.heads import HeadSet

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
    ``[B, Sk]`` bool key padding or None; ``blocks``: the profile's (q_block, kv_block)."""
    if isinstance(policy, PageTopK):
        tokens, valid = _page_tokens(policy, pages, layer, query, key)
    else:
        tokens, valid = _static_tokens(heads, blocks, query, key)
    hq, hkv = query.shape[1], key.shape[1]
    per_query_head = tokens.shape[1] == hq and hq != hkv
    k, v = _gather(key, tokens, per_query_head, hq // hkv), _gather(value, tokens, per_query_head, hq // hkv)
    if kv_valid is not None:
        valid = valid & kv_valid[:, None, :].expand(-1, tokens.shape[1], -1).gather(2, tokens)
    mask = valid[:, :, None, :]
    if not per_query_head and hq != hkv:
        mask = mask.repeat_interleave(hq // hkv, dim=1)
    out = empty_output(query, value)
    out.copy_(ORIGINAL_SDPA(query, k, v, attn_mask=mask, scale=scale, enable_gqa=not per_query_head and hq != hkv))
    return out


def _gather(x: torch.Tensor, tokens: torch.Tensor, per_query_head: bool, group: int) -> torch.Tensor:
    """``x[b, h, tokens[b, h']]`` rows as ``[B, H', N, D]``: H' KV heads, or query heads (h = h' //
    group) when ``per_query_head``. Reads the rows where they are (the cache is not copied)."""
    b, hkv, s, d = x.shape
    heads = torch.arange(tokens.shape[1], device=x.device) // (group if per_query_head else 1)
    if x.stride(-1) == 1 and x.stride(0) % x.stride(2) == 0 and x.stride(1) % x.stride(2) == 0:
        step = x.stride(2)
        rows = torch.as_strided(x, ((b - 1) * x.stride(0) // step + (hkv - 1) * x.stride(1) // step + s, d), (step, 1))
        first = (torch.arange(b, device=x.device)[:, None, None] * (x.stride(0) // step)
                 + heads[None, :, None] * (x.stride(1) // step))
    else:  # an unusual cache layout: one copy of it
        rows = x.contiguous().view(-1, d)
        first = torch.arange(b, device=x.device)[:, None, None] * hkv * s + heads[None, :, None] * s
    return rows.index_select(0, (first + tokens).reshape(-1)).view(b, tokens.shape[1], tokens.shape[2], d)


def _static_tokens(heads: HeadSet, blocks: tuple[int, int], query: torch.Tensor,
                   key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept token positions ``[B, H', N]`` and their validity for each head's static pattern at the
    query's position; H' = KV heads when every group of query heads shares its pattern."""
    b, hq, _, _ = query.shape
    hkv, sk, device = key.shape[1], key.shape[2], key.device
    group, kv_block = hq // hkv, blocks[1]
    geometry = BlockGeometry(1, sk, blocks[0], kv_block, True)
    rows: dict[object, torch.Tensor] = {}
    for pattern in set(heads.patterns):
        if pattern.is_dense or pattern.is_dynamic:
            rows[pattern] = geometry.reachable(device)[0]
        else:
            rows[pattern] = pattern.block_mask(geometry, device)[0]
    shared = all(len(set(heads.patterns[g * group:(g + 1) * group])) == 1 for g in range(hkv))
    chosen = [heads.patterns[h * group] for h in range(hkv)] if shared else list(heads.patterns)
    blocks = torch.stack([rows[p] for p in chosen])  # [H', NK] bool
    count = blocks.sum(-1)
    width = int(count.max())  # one small sync per step: the gather's width
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # kept blocks first
    kept = torch.arange(width, device=device)[None, :] < count[:, None]
    tokens = (order[:, :, None] * kv_block + torch.arange(kv_block, device=device)).reshape(len(chosen), -1)
    valid = (kept[:, :, None].expand(-1, -1, kv_block).reshape(len(chosen), -1)) & (tokens < sk)
    return tokens.clamp(max=sk - 1).expand(b, -1, -1), valid.expand(b, -1, -1)


def _page_tokens(policy: PageTopK, pages: dict[str, _Pages], layer: str, query: torch.Tensor,
                 key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept token positions ``[B, Hkv, N]`` and validity: each KV head's highest-bound pages."""
    b, hq, _, d = query.shape
    hkv, sk, ps = key.shape[1], key.shape[2], policy.page_size
    stats = _extended(pages, layer, key, ps)
    full, total = stats.centre.shape[2], -(-sk // ps)
    q = query[:, :, 0].float().view(b, hkv, hq // hkv, d)
    bound = (q @ stats.centre.transpose(-1, -2) + q.abs() @ stats.radius.transpose(-1, -2)).amax(2)  # [B, Hkv, full]
    bound = torch.cat([bound, bound.new_full((b, hkv, total - full), float("inf"))], dim=-1)  # the partial page
    forced = torch.zeros(total, dtype=torch.bool, device=key.device)
    forced[:policy.sinks] = True
    forced[max(total - policy.local, 0):] = True
    bound = bound.masked_fill(forced, float("inf"))
    keep = min(total, policy.pages + int(forced.sum()))
    page = torch.topk(bound, keep, dim=-1, sorted=False).indices  # [B, Hkv, keep]
    tokens = (page[..., None] * ps + torch.arange(ps, device=key.device)).reshape(b, hkv, -1)
    return tokens.clamp(max=sk - 1), tokens < sk


def _extended(pages: dict[str, _Pages], layer: str, key: torch.Tensor, ps: int) -> _Pages:
    """The layer's page statistics over every full page of ``key``: built, or extended by the pages
    completed since the last step (rebuilt when the cache did not grow by appending)."""
    stats, sk = pages.get(layer), key.shape[2]
    full = sk // ps
    if stats is None or stats.length >= sk or stats.centre.shape[:2] != key.shape[:2]:
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


DECODE_REASON = "decode (query length 1)"  # classify's dense reason for a decode step


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
    kv_valid = None
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
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out = attend(state.decode, state.pages, plan.name, heads, plan.profile.block_size, query, key, value, kv_valid,
                 scale)
    state.stats.sparse += 1
    return out
