"""The order a block-sparse launch deals its programs out in, and the work each layout row does.

``row_schedule`` is data the layout carries (``BlockLayout.schedule``) and the kernel reads; it has
no other dependency than torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SCHEDULE_LEVELS", "row_schedule", "work_counts"]

# Work levels rows are sorted by inside a KV head: coarse, so neighbouring query blocks stay together.
SCHEDULE_LEVELS = 8


def row_schedule(kv_counts: Tensor, group: int = 1) -> Tensor:
    """The order programs are dealt out in: int32 ``[Hq * NQ]`` layout rows ``h * NQ + i``.

    First the outlier rows (more than twice the mean work: text rows, the rows of a much wider
    head), heaviest first, over all heads; then KV head by KV head, the heaviest head first, and
    inside one, rows by coarse work level, heaviest first (``SCHEDULE_LEVELS`` levels of that
    head's longest row), then by query block, the ``group`` query heads of one KV head side by side.
    Heavy-first (longest-processing-time order) keeps a launch from ending on a tail of long rows;
    head-major, natural order inside a level keeps the programs running at once on the K/V of one
    head and on neighbouring query blocks, which share K/V tiles through L2. Measured on the H200
    (benchmarks/schedule_order.py, fraction of the ideal 1/d): a 3-D neighborhood on Wan's 32,760
    tokens 0.70 with rows sorted by work across heads, 0.82 this way; HunyuanVideo 0.82 -> 0.94;
    GQA causal 32K 0.89 -> 0.92 of SDPA. ``kv_counts`` is ``[Bl, Hq, NQ]``; with per-batch layouts
    (Bl > 1) a row weighs as its heaviest batch entry.
    """
    _, hq, nq = kv_counts.shape
    hkv = hq // group
    work = kv_counts.amax(0).to(torch.int64).view(hkv, group, nq)
    dev = kv_counts.device
    head_work = work.sum((1, 2))
    head_rank = torch.empty_like(head_work)
    head_rank[torch.argsort(-head_work, stable=True)] = torch.arange(hkv, device=dev)
    row_work = work.amax(1)  # [Hkv, NQ]: a query block weighs as its heaviest head in the group
    level = (row_work * SCHEDULE_LEVELS) // (row_work.amax(1, keepdim=True) + 1)  # 0 .. LEVELS-1
    i = torch.arange(nq, device=dev)
    head_major = (head_rank[:, None] * SCHEDULE_LEVELS + (SCHEDULE_LEVELS - 1 - level)) * nq + i  # < hkv*LEVELS*nq
    heaviest = row_work.max()
    outlier = row_work.double() > 2 * row_work.double().mean()
    stage = torch.where(outlier, heaviest - row_work, heaviest + 1)  # outliers first, heaviest first
    key = stage * (hkv * SCHEDULE_LEVELS * nq) + head_major  # [Hkv, NQ]
    key = key[:, None, :] * group + torch.arange(group, device=dev)[None, :, None]  # [Hkv, group, NQ]
    order = torch.argsort(key.flatten())  # positions in (kv head, head in group, query block) order
    kv_head, rest = order // (group * nq), order % (group * nq)
    return ((kv_head * group + rest // nq) * nq + rest % nq).to(torch.int32)


def work_counts(kv_counts: Tensor, column_counts: Tensor | None, kv_block: int) -> Tensor:
    """Key tiles each layout row visits: its blocks, plus its columns in tiles of ``kv_block``."""
    if column_counts is None:
        return kv_counts
    return kv_counts + (column_counts + kv_block - 1) // kv_block
