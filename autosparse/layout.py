"""BlockLayout: the data a block-sparse kernel runs on, built from patterns or a block mask.

Per (head, query block) the list of key blocks to visit and its length, the format of
``autosparse.kernels.block_sparse_attention``. Modelled on FlexAttention's ``BlockMask``: the layout
is data, with ``density()``, ``to_dense()``, ``to(device)``, ``[head]`` indexing and a readable repr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from autosparse.kernels.schedule import row_schedule, work_counts
from autosparse.kernels.reference import layout_mask
from autosparse.patterns import BlockGeometry, Pattern
from autosparse.patterns.geometry import TOKEN_ORDERS, TokenGeometry, default_tile

__all__ = ["TOKEN_ORDERS", "BlockLayout", "block_mask", "grid_order", "left_padded"]


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Key-block lists for every head of one attention call.

    Attributes:
        geometry: lengths, block sizes and causality the layout was built for.
        kv_indices: int32 ``[1, H, NQ, MAXK]``; row ``[0, h, i, :kv_counts[0, h, i]]`` lists the
            key blocks query block ``i`` of head ``h`` attends (ascending), the rest is padding.
        kv_counts: int32 ``[1, H, NQ]``.
        head_density: float ``[H]``, computed key tiles (blocks, and columns in tiles of
            ``kv_block``) over the blocks dense attention computes.
        columns: None, or key columns visited token by token on top of the blocks (a dynamic
            pattern's vertical lines): int32 ``[1, H, C]``, each head's key positions ascending,
            padded with ``kv_len``; ``column_counts`` int32 ``[1, H, NQ]`` how many of them query
            block ``i`` visits (causal: those it may see); ``listed`` bool ``[1, H, NQ, NK]``, the
            blocks as a mask (the kernel skips a column inside a visited block).
    """

    geometry: BlockGeometry
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    head_density: torch.Tensor
    columns: torch.Tensor | None = None
    column_counts: torch.Tensor | None = None
    listed: torch.Tensor | None = None

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, geometry: BlockGeometry, columns: torch.Tensor | None = None,
                        *, max_columns: int | None = None, sync: bool = True) -> BlockLayout:
        """From a bool ``[H, NQ, NK]`` block mask (blocks outside ``geometry.reachable()`` dropped)
        and optionally a bool ``[H, kv_len]`` mask of key columns each head visits token by token
        (at most ``max_columns`` per head; None: all).

        ``sync=True`` sizes the lists to the longest row (one device sync): for layouts built once
        and cached. A layout built per call (dynamic patterns) passes ``sync=False``: the lists are
        then ``NK`` (and ``max_columns``) long and nothing waits for the GPU."""
        expected = (geometry.num_q_blocks, geometry.num_kv_blocks)
        if block_mask.dtype != torch.bool or block_mask.dim() != 3 or tuple(block_mask.shape[1:]) != expected:
            raise ValueError(
                f"block_mask must be bool [H, {expected[0]}, {expected[1]}], "
                f"got {block_mask.dtype} {tuple(block_mask.shape)}"
            )
        reachable = geometry.reachable(block_mask.device)
        block_mask = block_mask & reachable
        counts = block_mask.sum(-1, dtype=torch.int32)
        max_k = max(int(counts.max()), 1) if sync else geometry.num_kv_blocks
        order = _ascending_positions(block_mask, max_k, fill=0)
        if columns is None:
            density = counts.sum(-1).double() / reachable.sum().double()
            return cls(geometry, order[None].contiguous(), counts[None].contiguous(), density.float())
        positions, column_counts = _column_lists(columns, geometry, max_columns, sync)
        tiles = work_counts(counts, column_counts, geometry.kv_block)
        density = tiles.sum(-1).double() / reachable.sum().double()
        return cls(geometry, order[None].contiguous(), counts[None].contiguous(), density.float(),
                   positions[None].contiguous(), column_counts[None].contiguous(), block_mask[None].contiguous())

    @classmethod
    def from_patterns(
        cls, patterns: Sequence[Pattern], geometry: BlockGeometry, device: torch.device | str = "cpu"
    ) -> BlockLayout:
        """One pattern per head (identical heads share one mask computation). Text tokens of
        ``geometry.tokens`` are dense in every head. The runtime builds a layer's layout once per
        call shape and keeps it in its call plan (``autosparse.runtime.plan``)."""
        masks = {p: block_mask(p, geometry, device) for p in set(patterns)}
        return cls.from_block_mask(torch.stack([masks[p] for p in patterns]), geometry)

    @property
    def num_heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def schedule(self, group: int = 1) -> torch.Tensor:
        """The kernel's program order for this layout (heaviest rows first, the ``group`` query
        heads of a KV head together), on the layout's device; callers keep it with the layout."""
        return row_schedule(work_counts(self.kv_counts, self.column_counts, self.geometry.kv_block), group)

    def density(self) -> float:
        """Computed key blocks over those dense (causal-aware) attention computes, all heads."""
        return float(self.head_density.mean())

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def to_dense(self) -> torch.Tensor:
        """Bool ``[H, q_len, kv_len]``: the exact token pairs the kernel attends, in the kernel's
        order (see ``to_dense_model_order``)."""
        g = self.geometry
        return layout_mask(self.kv_indices, self.kv_counts, q_block=g.q_block, kv_block=g.kv_block,
                           seq_q=g.q_len, seq_k=g.kv_len, causal=g.causal, columns=self.columns,
                           column_counts=self.column_counts)[0]

    def to_dense_model_order(self) -> torch.Tensor:
        """``to_dense()`` with positions in the model's sequence order rather than the kernel's:
        differs from it when ``geometry.tokens`` permutes the grid tokens into tiles."""
        dense = self.to_dense()
        tokens = self.geometry.tokens
        inverse = tokens.inverse_permutation(dense.device) if tokens is not None else None
        if inverse is None:
            return dense
        return dense.index_select(1, inverse).index_select(2, inverse)

    def to(self, device: torch.device | str) -> BlockLayout:
        return self._map(lambda t: t.to(device))

    def with_heads_skipped(self, heads: Sequence[int]) -> BlockLayout:
        """The same layout with no key blocks or columns for ``heads`` (the kernel writes zeros
        there): for heads another kernel serves, e.g. dense heads sent to SDPA."""
        def skip(counts: torch.Tensor | None) -> torch.Tensor | None:
            if counts is None:
                return None
            counts = counts.clone()
            counts[:, list(heads)] = 0
            return counts

        density = self.head_density.clone()
        density[list(heads)] = 0.0
        return BlockLayout(self.geometry, self.kv_indices, skip(self.kv_counts), density, self.columns,
                           skip(self.column_counts), self.listed)

    def __getitem__(self, head: int | slice) -> BlockLayout:
        heads = slice(head, head + 1) if isinstance(head, int) else head
        layout = self._map(lambda t: t[:, heads].contiguous())
        return dataclasses.replace(layout, head_density=self.head_density[heads])

    def _map(self, fn) -> BlockLayout:
        """``fn`` applied to every per-head tensor the kernel reads (head density and geometry kept)."""
        def apply(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return BlockLayout(self.geometry, fn(self.kv_indices), fn(self.kv_counts), self.head_density,
                           apply(self.columns), apply(self.column_counts), apply(self.listed))

    def __repr__(self) -> str:
        g = self.geometry
        return (
            f"BlockLayout(heads={self.num_heads}, q_len={g.q_len}, kv_len={g.kv_len}, "
            f"blocks=({g.q_block}, {g.kv_block}), causal={g.causal}, "
            f"max_kv_blocks={self.kv_indices.shape[-1]}, density={self.density():.3f}, device={self.device})"
        )


def _ascending_positions(mask: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """Int32 ``[..., width]``: each row's True positions of bool ``mask [..., N]`` in ascending
    order (the first ``width``), then ``fill``. A scatter to each entry's rank (a running count):
    linear in the mask, unlike sorting it."""
    n = mask.shape[-1]
    rank = mask.cumsum(-1, dtype=torch.int32) - 1
    rank = torch.where(mask & (rank < width), rank, width)  # everything else into a dropped slot
    out = torch.full((*mask.shape[:-1], width + 1), fill, dtype=torch.int32, device=mask.device)
    out.scatter_(-1, rank.long(), torch.arange(n, dtype=torch.int32, device=mask.device).expand(mask.shape))
    return out[..., :width]


def _column_lists(columns: torch.Tensor, geometry: BlockGeometry, max_columns: int | None,
                  sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[H, kv_len]`` key columns -> (int32 ``[H, C]`` positions ascending, padded with
    ``kv_len``; int32 ``[H, NQ]`` how many each query block visits: causal, those not after its
    last query). ``C``: ``max_columns`` (or all when None), the longest head's count with ``sync``."""
    expected = (geometry.kv_len,)
    if columns.dtype != torch.bool or columns.dim() != 2 or tuple(columns.shape[1:]) != expected:
        raise ValueError(f"columns must be bool [H, {geometry.kv_len}], got {columns.dtype} {tuple(columns.shape)}")
    width = geometry.kv_len if max_columns is None else min(max_columns, geometry.kv_len)
    if sync:
        width = max(min(int(columns.sum(-1).max()), width), 1)
    positions = _ascending_positions(columns, width, fill=geometry.kv_len)
    if geometry.causal:
        _, q_last, _, _ = geometry.block_spans(columns.device)
        visible = (q_last[:, 0] + 1).to(positions.dtype).expand(columns.shape[0], -1).contiguous()  # [H, NQ]: keys < this
        counts = torch.searchsorted(positions.contiguous(), visible)
    else:
        counts = (positions < geometry.kv_len).sum(-1)[:, None].expand(-1, geometry.num_q_blocks)
    return positions.to(torch.int32), counts.to(torch.int32)


def left_padded(token_mask: torch.Tensor, first: Sequence[int]) -> torch.Tensor:
    """``[B, H, S, S]``: a square causal call's token mask ``[H, S, S]`` (``BlockLayout.to_dense()``)
    for rows whose first real token is ``first[b]``: as the runtime serves left padding, each row's
    patterns (sinks, windows, blocks) count from that token, and nothing before it is attended."""
    length = token_mask.shape[-1]
    out = token_mask.new_zeros(len(first), *token_mask.shape)
    for b, shift in enumerate(first):
        out[b, :, shift:, shift:] = token_mask[:, :length - shift, :length - shift]
    return out


def block_mask(pattern: Pattern, geometry: BlockGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[NQ, NK]`` bool: the key blocks one head with ``pattern`` computes, text tokens included
    (they attend, and are attended by, every head)."""
    mask = pattern.block_mask(geometry, device)
    text = geometry.text_block_mask(device)
    return mask if text is None else mask | text


# Tile order must save 5% of the blocks to pay for permuting q/k/v and the output.
_TILE_GAIN = 0.95



def grid_order(patterns: Sequence[Pattern], tokens: TokenGeometry, q_block: int, kv_block: int,
               device: torch.device | str = "cpu", order: str = "auto") -> TokenGeometry:
    """The token order to lay ``patterns`` out in: the one owner of that choice (the runtime and
    the search both ask here). ``order``: ``"tile"`` (``default_tile``), ``"raster"``, or
    ``"auto"``: tile order unless raster order needs about as few blocks. Tiles make blocks compact
    boxes, which usually saves blocks, but a small window on some grids touches fewer raster strips
    than tiles. Dynamic heads (their blocks are not known before a call) do not vote. ``"auto"``
    costs two layout builds (and a device sync): callers keep the answer per shape."""
    if order not in TOKEN_ORDERS:
        raise ValueError(f"order: expected one of {list(TOKEN_ORDERS)}, found {order!r}")
    tiled = tokens.with_tile(default_tile(len(tokens.grid), kv_block))
    raster = tokens.with_tile(None)
    if order != "auto":
        return tiled if order == "tile" else raster
    patterns = [p for p in patterns if not p.is_dynamic]

    def density(order: TokenGeometry) -> float:
        return BlockLayout.from_patterns(patterns, BlockGeometry(order.length, order.length, q_block, kv_block,
                                                                 False, order), device).density()

    return tiled if density(tiled) < _TILE_GAIN * density(raster) else raster
