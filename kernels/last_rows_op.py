"""The last query rows' attention, summed along key columns and diagonals: ``last_rows(q, k, scale)``.

vertical_slash ranks key columns and diagonals by the attention a causal prefill's last R query
rows give them (``q_last`` row r sits at absolute position ``Sk - R + r``). On CUDA (and on CPU under
``TRITON_INTERPRET=1``) the sums come from the Triton kernel of ``last_rows.py``, which never
writes the ``[B, H, R, Sk]`` attention; elsewhere, or for shapes the kernel does not take, from that
attention computed with torch ops (the reference: the same numbers to rounding).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

__all__ = ["LastRows", "last_rows"]

_BLOCK_N = 64
_PROGRAMS_PER_SM = 32  # key chunks per head: about this many programs per SM in all (short loops: latency-bound)
_LOG2E = 1.4426950408889634


def last_rows(q_last: Tensor, k: Tensor, scale: float) -> LastRows:
    """The attention of ``q_last`` ``[B, H, R, D]`` over ``k`` ``[B, Hk, Sk, D]`` (query head h reads
    key head ``h // (H // Hk)``), causal with the rows last, ready to be summed."""
    if q_last.shape[1] % k.shape[1] or q_last.shape[2] > k.shape[2]:
        raise ValueError(f"last_rows: q {tuple(q_last.shape)} does not fit k {tuple(k.shape)}")
    if _kernel_takes(q_last, k):
        return _TritonRows(q_last, k, scale)
    return _TorchRows(q_last, k, scale)


class LastRows:
    """The last rows' attention: ``lines()`` (its sums along diagonals and columns) and
    ``columns_off(diagonals)`` (the column sums without the kept diagonals)."""

    def lines(self) -> tuple[Tensor, Tensor]:
        """Float32 ``[B, H, Sk]`` each: the attention summed along each diagonal (indexed by the
        offset ``query - key``) and along each key column."""
        raise NotImplementedError

    def columns_off(self, diagonals: Tensor) -> Tensor:
        """Float32 ``[B, H, Sk]``: the column sums of the attention off the diagonals kept in
        bool ``diagonals`` ``[B, H, Sk]`` (by offset)."""
        raise NotImplementedError


class _TorchRows(LastRows):
    """The attention as one ``[B, H, R, Sk]`` tensor in q's dtype (computed in float32, only ranked)."""

    def __init__(self, q_last: Tensor, k: Tensor, scale: float) -> None:
        b, h, rows, d = q_last.shape
        group = h // k.shape[1]
        last = (q_last * scale).reshape(b, k.shape[1], group * rows, d)  # a KV head's queries together
        logits = (last @ k.transpose(-1, -2)).view(b, h, rows, -1)
        self.first = k.shape[2] - rows  # absolute position of the first row
        future = torch.ones(rows, rows, dtype=torch.bool, device=q_last.device).triu_(1)
        logits[..., self.first:].masked_fill_(future, float("-inf"))
        self.attention = torch.softmax(logits, dim=-1)

    def lines(self) -> tuple[Tensor, Tensor]:
        return _sum_by_offset(self.attention), self.attention.sum(2, dtype=torch.float32)

    def columns_off(self, diagonals: Tensor) -> Tensor:
        rows, keys = self.attention.shape[-2:]
        offsets = (self.first + torch.arange(rows, device=diagonals.device)[:, None]
                   - torch.arange(keys, device=diagonals.device)).clamp_(0, keys - 1)  # [R, Sk]
        on_kept = diagonals[:, :, offsets]  # [B, H, R, Sk]: the pair lies on a kept diagonal
        return self.attention.masked_fill(on_kept, 0.0).sum(2, dtype=torch.float32)


def _sum_by_offset(attention: Tensor) -> Tensor:
    """Float32 ``[B, H, Sk]``: ``attention [B, H, R, Sk]`` (row i at absolute position ``Sk - R + i``)
    summed along each diagonal, indexed by the offset ``query - key``. Skewed in place of a scatter:
    in a buffer with R zeros before each row, offset ``d = Sk - 1 - e`` of row i sits at column
    ``e + i + 1``, so rows read ``Sk + R + 1`` apart line every offset up in one column ``e``."""
    b, h, r, s = attention.shape
    padded = attention.new_zeros(b, h, r, s + r)
    padded[..., r:] = attention
    skewed = padded.view(b, h, -1).as_strided((b, h, r, s), (h * r * (s + r), r * (s + r), s + r + 1, 1),
                                              padded.storage_offset() + 1)
    return skewed.sum(2, dtype=torch.float32).flip(-1)


class _TritonRows(LastRows):
    """The kernel's passes: the softmax statistics now, the sums when asked."""

    def __init__(self, q_last: Tensor, k: Tensor, scale: float) -> None:
        self.q, self.k = q_last, k
        b, h, rows, _ = q_last.shape
        self.qk_scale = scale * _LOG2E
        keys = k.shape[2]
        sms = torch.cuda.get_device_properties(k.device).multi_processor_count if k.is_cuda else 1
        chunks = max(1, min(math.ceil(keys / _BLOCK_N), math.ceil(_PROGRAMS_PER_SM * sms / (b * h))))
        self.keys_per_program = _BLOCK_N * math.ceil(keys / (_BLOCK_N * chunks))
        self.chunks = math.ceil(keys / self.keys_per_program)
        stats = torch.empty(b, h, self.chunks, 2, rows, dtype=torch.float32, device=k.device)
        self._launch(0, stats)
        m, l = stats[:, :, :, 0], stats[:, :, :, 1]  # [B, H, chunks, R], log2 domain
        top = m.amax(2, keepdim=True)
        total = (l * torch.exp2(m - top)).sum(2, keepdim=True)
        self.stats = torch.stack((top, total), dim=3).expand(-1, -1, self.chunks, -1, -1).contiguous()

    def _launch(self, which: int, stats: Tensor, skip: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        from . import last_rows as jit  # lazy: imports triton

        q, k = self.q, self.k
        b, h, rows, d = q.shape
        columns = torch.zeros(b, h, k.shape[2], dtype=torch.float32, device=k.device)
        diagonals = torch.zeros_like(columns) if which == 1 else columns
        scratch = torch.empty(b * h * self.chunks if which == 1 else 1, rows, _BLOCK_N, dtype=torch.float32,
                              device=k.device)
        jit._last_rows_fwd[(b * h, self.chunks)](
            q, k, stats, skip if skip is not None else columns, columns, diagonals, scratch,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            h, k.shape[2], self.qk_scale, self.keys_per_program, self.chunks,
            GROUP=h // k.shape[1], R=rows, HEAD_DIM=d, HEAD_DIM_PAD=max(16, 1 << (d - 1).bit_length()),
            BLOCK_N=_BLOCK_N, DIAG=1 << (_BLOCK_N + rows - 2).bit_length(), PASS=which,
            num_warps=4, num_stages=2)
        return diagonals, columns

    def lines(self) -> tuple[Tensor, Tensor]:
        return self._launch(1, self.stats)

    def columns_off(self, diagonals: Tensor) -> Tensor:
        return self._launch(2, self.stats, diagonals.to(torch.uint8).contiguous())[1]


def _kernel_takes(q_last: Tensor, k: Tensor) -> bool:
    """The kernel's shapes: 16-64 rows (a power of two: the tile's height), head_dim up to 256,
    last dims contiguous, fp16/bf16 (fp32 under the interpreter), on CUDA or interpreted."""
    rows, d = q_last.shape[2], q_last.shape[3]
    if not (q_last.is_cuda or (q_last.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")):
        return False
    dtypes = (torch.float16, torch.bfloat16) if q_last.is_cuda else (torch.float16, torch.float32)
    return (rows in (16, 32, 64) and d <= 256 and q_last.dtype in dtypes and k.dtype == q_last.dtype
            and q_last.stride(3) == 1 and k.stride(3) == 1)
