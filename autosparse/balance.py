"""Balanced heads for Ulysses context parallelism: every rank's heads cost about the same.

Under Ulysses rank ``u`` of ``U`` serves heads ``[u * H / U, (u + 1) * H / U)`` of every layer, and
each layer waits for its slowest rank (the all-to-all after attention). A profile whose heads have
very different densities (a dense head, a narrow window) then runs at the pace of the rank that
drew the dense ones. ``balance_heads`` permutes each layer's heads, in the model's weights and in
the profile together, so that every rank's share of the layer's kernel work is about equal: the
projections producing q, k and v (their output rows, and a per-channel q/k norm's weight) and the
output projection (its input columns) move head by head, so the model computes exactly what it did
(attention treats heads independently; rotary embeddings are the same for every head). It costs
nothing per call. Apply it on every rank, before ``patch_model``, with the profile it returns.

A head's cost is its layout's share of the blocks dense attention computes, at the token geometry
the model serves (``BlockLayout.head_density``: the kernel's work).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from autosparse.layout import BlockLayout, grid_order
from autosparse.models import attention_layers
from autosparse.patterns import BlockGeometry, TokenGeometry
from autosparse.profile import LayerProfile, Profile

__all__ = ["HeadBalance", "balance_heads", "balanced_order", "head_costs", "rank_loads"]

# Projections whose output features are the heads' channels, head-major (q, k, v; FLUX's text stream).
_HEAD_OUTPUTS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
_HEAD_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")  # permuted when per channel (Wan: across heads)
_HEAD_INPUTS = ("to_out", "to_add_out")  # output projections: their input features are the heads' channels


@dataclass(frozen=True)
class HeadBalance:
    """Per-rank cost under ``ranks``-way Ulysses before and after balancing: ``before``/``after``
    are the layers' summed slowest rank over their summed mean rank (1.0: perfectly even; a step
    takes this factor longer than an even split), ``worst_before``/``worst_after`` the largest
    such ratio of one layer; ``kept``: layers left in their order (no output projection of their
    own to permute, e.g. FLUX's single-stream blocks)."""

    ranks: int
    before: float
    after: float
    worst_before: float
    worst_after: float
    kept: tuple[str, ...] = ()


def head_costs(profile: Profile, layer: str, num_heads: int, tokens: TokenGeometry | int) -> list[float]:
    """Each head's share of the blocks dense attention computes, for ``layer``'s default patterns
    over ``tokens`` (a token geometry, or a plain sequence length for 1-D patterns)."""
    patterns = profile.patterns(layer, num_heads)
    q_block, kv_block = profile.block_size
    grid = tokens if isinstance(tokens, TokenGeometry) else None
    length = grid.length if grid is not None else tokens
    if grid is not None and any(p.needs_grid for p in patterns):
        grid = grid_order(patterns, grid, q_block, kv_block, "cpu", profile.token_order)
    geometry = BlockGeometry(length, length, q_block, kv_block, False, grid)
    return BlockLayout.from_patterns(patterns, geometry).head_density.tolist()


def balanced_order(costs: list[float], ranks: int) -> tuple[int, ...]:
    """A permutation of the heads (``order[k]``: the old head that becomes head ``k``) that deals
    them to ``ranks`` equal groups of consecutive heads with near-equal summed cost: heads by
    decreasing cost, each to the cheapest group with room (ties: the lower group, the lower head,
    so every rank computes the same order)."""
    if len(costs) % ranks:
        raise ValueError(f"ranks: expected a divisor of the {len(costs)} heads, got {ranks}")
    size = len(costs) // ranks
    groups: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0.0] * ranks
    for head in sorted(range(len(costs)), key=lambda h: (-costs[h], h)):
        group = min((g for g in range(ranks) if len(groups[g]) < size), key=lambda g: (loads[g], g))
        groups[group].append(head)
        loads[group] += costs[head]
    return tuple(head for group in groups for head in sorted(group))


def rank_loads(costs: list[float], order: tuple[int, ...], ranks: int) -> list[float]:
    """Summed cost of each Ulysses rank's heads once the heads are in ``order``."""
    size = len(costs) // ranks
    return [sum(costs[h] for h in order[r * size:(r + 1) * size]) for r in range(ranks)]


def balance_heads(model: nn.Module, profile: Profile, ranks: int, tokens: TokenGeometry | int) -> tuple[Profile,
                                                                                                      HeadBalance]:
    """Permute every served attention layer's heads in ``model`` (in place) for ``ranks``-way
    Ulysses, costs read from ``profile`` at ``tokens``; returns the profile with its heads in the
    same new order (use it for ``patch_model``) and the per-rank costs before and after."""
    orders, kept, loads = {}, [], []  # loads: per layer (slowest rank before, after, the mean rank)
    for layer in attention_layers(model):
        costs = head_costs(profile, layer.name, layer.num_heads, tokens)
        identity = tuple(range(layer.num_heads))
        order = balanced_order(costs, ranks)
        if not _permutable(layer.module, layer.num_heads, layer.num_kv_heads):
            kept.append(layer.name)
            order = identity
        loads.append((max(rank_loads(costs, identity, ranks)), max(rank_loads(costs, order, ranks)),
                      sum(costs) / ranks))
        if order != identity:
            _permute_module(layer.module, order, layer.head_dim)
            orders[layer.name] = order
    mean = sum(load[2] for load in loads)
    worst = [(before / m, after / m) for before, after, m in loads if m > 0] or [(1.0, 1.0)]
    report = HeadBalance(ranks, sum(load[0] for load in loads) / mean, sum(load[1] for load in loads) / mean,
                         max(w[0] for w in worst), max(w[1] for w in worst), tuple(kept))
    return _permute_profile(profile, orders), report


def _permutable(module: nn.Module, heads: int, kv_heads: int) -> bool:
    """Whether the module's heads can move in its own weights: separate q/k/v projections with one
    KV head per head and an output projection of its own."""
    out = getattr(module, "to_out", None)
    return (heads == kv_heads and getattr(module, "to_qkv", None) is None
            and isinstance(getattr(module, "to_q", None), nn.Linear) and out is not None and len(out) > 0)


def _channels(order: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """The channel indices of ``order``'s heads, head-major."""
    heads = torch.tensor(order)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def _permute_module(module: nn.Module, order: tuple[int, ...], head_dim: int) -> None:
    index = _channels(order, head_dim)
    for name in _HEAD_OUTPUTS:
        linear = getattr(module, name, None)
        if linear is not None:
            _take(linear, "weight", index, 0)
            _take(linear, "bias", index, 0)
    for name in _HEAD_NORMS:
        norm = getattr(module, name, None)
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.numel() == len(index):  # per channel; a per-head-dim norm is shared
            _take(norm, "weight", index, 0)
    for name in _HEAD_INPUTS:
        projection = getattr(module, name, None)
        projection = projection[0] if isinstance(projection, nn.ModuleList) else projection
        if projection is not None:
            _take(projection, "weight", index, 1)


def _take(owner: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    tensor = getattr(owner, name, None)
    if tensor is not None:
        tensor.copy_(tensor.index_select(dim, index.to(tensor.device)))


def _permute_profile(profile: Profile, orders: dict[str, tuple[int, ...]]) -> Profile:
    """``profile`` with each layer in ``orders`` holding its heads (patterns and measurements) in
    that order, in its default entries and in every step range's."""
    def permuted(layers: dict[str, LayerProfile]) -> dict[str, LayerProfile]:
        out = dict(layers)
        for name, order in orders.items():
            entry = layers.get(name)
            if entry is not None:
                measured = None if entry.measured is None else tuple(entry.measured[h] for h in order)
                out[name] = replace(entry, heads=tuple(entry.heads[h] for h in order), measured=measured)
        return out

    steps = tuple(replace(r, layers=permuted(r.layers)) if r.layers else r for r in profile.steps)
    return replace(profile, layers=permuted(profile.layers), steps=steps)
