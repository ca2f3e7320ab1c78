"""Dynamic patterns: key blocks chosen per call from the call's own queries and keys.

A static window cannot follow attention that depends on the input (retrieval heads, cross-view
matches). These patterns estimate, cheaply and per call, which key blocks carry the attention mass,
then run the same block-sparse kernel on that layout:

- ``block_topk`` (``k``) and ``block_cdf`` (``mass``): q and k mean-pooled per block, block scores
  ``q̄·k̄ * scale``; keep each query block's ``k`` best key blocks, or the fewest whose estimated
  softmax mass reaches ``mass``.
- ``vertical_slash`` (``vertical``, ``slash``, causal prefill, as MInference): the last query block
  attends every key exactly; the ``vertical`` key columns and the ``slash`` diagonals (query - key
  offsets) with the most of that attention are kept for every query. The diagonals become key
  blocks; the columns stay columns (``select``): the kernel gathers them token by token, so a
  thousand scattered keys cost about eight key blocks rather than every block they touch.

Every estimate also keeps each query block's own key blocks (a query always sees itself), the first
key block (attention sinks) and, through the layout, a diffusion model's text tokens. With a batch,
the layout is the union of the samples' estimates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from autosparse.kernels.last_rows_op import LastRows, last_rows
from autosparse.patterns.basic import BlockGeometry, Pattern, _check_int, register_pattern

__all__ = ["BlockCdf", "BlockTopK", "DynamicPattern", "VerticalSlash", "key_tiles"]

_LAST_ROWS = 64  # vertical_slash: query rows (the last ones) whose attention is computed exactly


@dataclass(frozen=True)
class DynamicPattern(Pattern):
    """A pattern whose key blocks are estimated from each call's q and k (``estimate``)."""

    @property
    def is_dynamic(self) -> bool:
        return True

    @property
    def max_columns(self) -> int:
        """The most key columns ``select`` returns per sample and head (0: blocks only)."""
        return 0

    def block_mask(self, geometry: BlockGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        raise TypeError(f"{self.kind} chooses its blocks from each call's q and k: use estimate(q, k, geometry)")

    def estimate(self, q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry, scale: float) -> torch.Tensor:
        """Bool ``[B, H, NQ, NK]``: every key block holding an attended key, for q ``[B, H, Sq, D]``
        and k ``[B, Hk, Sk, D]``, where query head h reads key head ``h // (H // Hk)`` (GQA: k is
        never expanded); within ``geometry.reachable()``, own and sink blocks included."""
        blocks, columns = self.select(q, k, geometry, scale)
        if columns is None:
            return blocks
        return blocks | (_column_blocks(columns, geometry) & geometry.reachable(q.device))

    def select(self, q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry,
               scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the kernel visits: key blocks, bool ``[B, H, NQ, NK]`` (as ``estimate``), and key
        columns visited token by token, bool ``[B, H, Sk]`` (None for block-only patterns)."""
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} key heads")
        blocks, columns = self._choose(q, k, geometry, scale)
        return (blocks | always_kept(geometry, q.device)) & geometry.reachable(q.device), columns

    def _choose(self, q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry,
                scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError(f"{type(self).__name__} must implement _choose")


def always_kept(geometry: BlockGeometry, device: torch.device | str) -> torch.Tensor:
    """``[NQ, NK]``: each query block's own key blocks (same positions) and the first key block.
    Cached per device (asked on every call): do not modify."""
    return _always_kept(geometry, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _always_kept(geometry: BlockGeometry, device: str) -> torch.Tensor:
    q_first, q_last, k_first, k_last = geometry.block_spans(device)
    own = (k_first <= q_last) & (k_last >= q_first)
    sink = torch.zeros_like(own)
    sink[:, 0] = True
    return own | sink


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Float32 mean over blocks of ``block`` rows along dim 2 (the last block may be partial),
    summed in float32 without a float32 copy of ``x``."""
    b, h, s, d = x.shape
    whole = s // block
    parts = [x[:, :, :whole * block].view(b, h, whole, block, d).sum(3, dtype=torch.float32) / block]
    if s > whole * block:
        parts.append(x[:, :, whole * block:].sum(2, keepdim=True, dtype=torch.float32) / (s - whole * block))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _block_scores(q: torch.Tensor, k: torch.Tensor, geometry: BlockGeometry, scale: float) -> torch.Tensor:
    """Pooled logits ``[B, H, NQ, NK]``, -inf outside ``reachable``."""
    keys = _pool(k, geometry.kv_block).repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # pooled: small
    scores = _pool(q, geometry.q_block) @ keys.transpose(-1, -2) * scale
    return scores.masked_fill(~geometry.reachable(q.device), float("-inf"))


def _check_mass(owner: str, mass) -> None:
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0.0 < mass <= 1.0:
        raise ValueError(f"{owner}.mass must be in (0, 1], got {mass!r}")


@register_pattern
@dataclass(frozen=True)
class BlockTopK(DynamicPattern):
    """Each query block keeps its ``k`` key blocks with the highest pooled score."""

    kind: ClassVar[str] = "block_topk"
    k: int = 16

    def __post_init__(self) -> None:
        _check_int("block_topk", "k", self.k, 1)

    def _choose(self, q, k, geometry, scale):
        scores = _block_scores(q, k, geometry, scale)
        top = scores.topk(min(self.k, scores.shape[-1]), dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True), None


@register_pattern
@dataclass(frozen=True)
class BlockCdf(DynamicPattern):
    """Each query block keeps the fewest key blocks whose estimated share of its softmax mass
    (pooled logits, weighted by block length) reaches ``mass``."""

    kind: ClassVar[str] = "block_cdf"
    mass: float = 0.95

    def __post_init__(self) -> None:
        _check_mass("block_cdf", self.mass)

    def _choose(self, q, k, geometry, scale):
        scores = _block_scores(q, k, geometry, scale)
        _, _, k_first, k_last = geometry.block_spans(q.device)
        probs = torch.softmax(scores + torch.log((k_last - k_first + 1).float()), dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass of the better blocks: keep while it is short of the target
        keep = before < self.mass
        return torch.zeros_like(keep).scatter_(-1, order, keep), None


@register_pattern
@dataclass(frozen=True)
class VerticalSlash(DynamicPattern):
    """Causal prefill: the ``vertical`` key columns and ``slash`` diagonals that the last query
    rows attend most, for every query (MInference's vertical-slash). The diagonals are served as
    key blocks, the columns as gathered columns.

    ``mass`` (None: the fixed counts) keeps fewer: of the top ``slash`` diagonals only the best
    that together hold ``mass`` of those rows' attention, of the top ``vertical`` columns only the
    best that hold ``mass`` of what the kept diagonals miss. A fixed count spends its remainder on
    noise where attention is concentrated: past the few diagonals that carry the mass, the next
    thousands are picked by chance, scatter, and touch every key block."""

    kind: ClassVar[str] = "vertical_slash"
    vertical: int = 1000
    slash: int = 6096
    mass: float | None = None

    def __post_init__(self) -> None:
        _check_int("vertical_slash", "vertical", self.vertical, 1)
        _check_int("vertical_slash", "slash", self.slash, 1)
        if self.mass is not None:
            _check_mass("vertical_slash", self.mass)

    @property
    def max_columns(self) -> int:
        return self.vertical

    def unfit(self, geometry: BlockGeometry) -> str | None:
        return None if geometry.causal else ("vertical_slash is for causal attention (LLM prefill), "
                                             "this call is not causal")

    def unfit_layer(self, causal: bool, grid_rank: int | None) -> str | None:
        return None if causal else ("vertical_slash is for causal attention (LLM prefill), "
                                    "this model's attention is not causal")

    def to_spec(self) -> dict:
        spec = super().to_spec()
        if self.mass is None:  # MInference's fixed counts: the spec as they write it
            del spec["mass"]
        return spec

    def _choose(self, q, k, geometry, scale):
        reason = self.unfit(geometry)
        if reason is not None:
            raise ValueError(reason)
        rows = min(_LAST_ROWS, geometry.q_len)
        # The last rows sit at the end of the keys (after a KV-cache prefix, if any).
        diagonals, columns = self._lines(last_rows(q[:, :, -rows:], k, scale))  # [B, H, Sk]: offsets, key columns kept
        columns[..., :geometry.kv_block] = False  # the first key block is always visited whole
        blocks = _diagonal_blocks(diagonals, geometry) | always_kept(geometry, q.device)
        # A head's columns are visited as the key blocks they add where that costs no more key
        # tiles than gathering them: columns that cluster, or that the diagonals already cover.
        column_blocks = _column_blocks(columns, geometry) & geometry.reachable(q.device)
        added = (column_blocks & ~blocks).sum((-1, -2))  # [B, H]
        as_blocks = added <= _column_tiles(columns, geometry).sum(-1)
        blocks |= column_blocks & as_blocks[..., None, None]
        return blocks, columns & ~as_blocks[..., None]


    def _lines(self, attention: LastRows) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool ``[B, H, Sk]`` diagonals (by offset) and key columns to keep, from the attention of
        the last rows. Fixed counts: the top ``slash`` diagonals and ``vertical`` columns, each
        ranked on all of the attention (MInference). With ``mass``: the top diagonals holding
        ``mass`` of it, then the top columns holding ``mass`` of what those diagonals miss (ranked
        on all of it, the columns would be the recent keys the diagonals already hold, not the keys
        every row reads)."""
        by_offset, by_column = attention.lines()
        if self.mass is None:
            return _top_indicator(by_offset, self.slash), _top_indicator(by_column, self.vertical)
        total = by_offset.sum(-1, keepdim=True)  # [B, H, 1]: the rows' mass (1 a row)
        diagonals = _top_indicator(by_offset, self.slash, self.mass * total)
        missed = attention.columns_off(diagonals)
        return diagonals, _top_indicator(missed, self.vertical, self.mass * missed.sum(-1, keepdim=True))


def _top_indicator(scores: torch.Tensor, n: int, target: torch.Tensor | None = None) -> torch.Tensor:
    """Bool like ``scores`` (non-negative, last dim): its ``n`` largest entries; with ``target``
    (``[..., 1]``) only the largest of those that together reach it."""
    values, top = scores.topk(min(n, scores.shape[-1]), dim=-1)
    keep = torch.ones_like(top, dtype=torch.bool)
    if target is not None:
        keep = values.cumsum(-1) - values < target  # the better ones hold less than the target yet
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, keep)


def key_tiles(blocks: torch.Tensor, columns: torch.Tensor | None, geometry: BlockGeometry) -> torch.Tensor:
    """``[B, H]``: key tiles the kernel visits for ``select``'s blocks and columns (a tile of
    ``kv_block`` gathered columns costs what a key block does), summed over query blocks."""
    tiles = blocks.sum((-1, -2), dtype=torch.float32)
    return tiles if columns is None else tiles + _column_tiles(columns, geometry).sum(-1)


def _column_tiles(columns: torch.Tensor, geometry: BlockGeometry) -> torch.Tensor:
    """``[B, H, NQ]``: key tiles of ``kv_block`` gathered columns each query block visits (causal:
    the columns not after its last query), as ``BlockLayout`` counts them."""
    if geometry.causal:
        _, q_last, _, _ = geometry.block_spans(columns.device)
        visible = columns.cumsum(-1, dtype=torch.int32)[..., q_last[:, 0]]
    else:
        visible = columns.sum(-1, dtype=torch.int32)[..., None].expand(-1, -1, geometry.num_q_blocks)
    return -(-visible // geometry.kv_block)


def _column_blocks(columns: torch.Tensor, geometry: BlockGeometry) -> torch.Tensor:
    """``[B, H, NQ, NK]``: block pairs where some query may see a kept column of the key block
    (causal: the block's first kept column is not after the query block's last position)."""
    b, h, s = columns.shape
    positions = torch.arange(s, device=columns.device).expand_as(columns)
    first = torch.where(columns, positions, s)  # s: no kept column
    first = torch.nn.functional.pad(first, (0, geometry.num_kv_blocks * geometry.kv_block - s), value=s)
    first = first.view(b, h, geometry.num_kv_blocks, geometry.kv_block).amin(-1)[:, :, None, :]  # [B, H, 1, NK]
    _, q_last, _, _ = geometry.block_spans(columns.device)
    if geometry.causal:
        return first <= q_last
    return (first < s).expand(b, h, geometry.num_q_blocks, geometry.num_kv_blocks)


def _diagonal_blocks(diagonals: torch.Tensor, geometry: BlockGeometry) -> torch.Tensor:
    """``[B, H, NQ, NK]``: block pairs holding a (query, key) pair whose offset is kept. A pair of
    blocks spans the offsets ``[q_first - k_last, q_last - k_first]``: count kept ones in it from
    prefix sums."""
    q_first, q_last, k_first, k_last = geometry.block_spans(diagonals.device)
    prefix = torch.nn.functional.pad(diagonals.to(torch.int32).cumsum(-1), (1, 0))  # [B, H, Sk + 1]
    last = diagonals.shape[-1] - 1
    low = (q_first - k_last).clamp(min=0, max=last + 1)
    high = (q_last - k_first).clamp(min=-1, max=last)
    index = lambda x: x.expand(geometry.num_q_blocks, geometry.num_kv_blocks).flatten()  # noqa: E731
    count = prefix[..., index(high + 1)] - prefix[..., index(low)]
    return (count > 0).view(*diagonals.shape[:2], geometry.num_q_blocks, geometry.num_kv_blocks) & (high >= low)
