"""Kernels of autosparse: a block-sparse flash-attention forward (Triton) and its PyTorch references.

``block_sparse_attention(q, k, v, kv_indices, kv_counts, *, q_block, kv_block, causal, ...)`` runs the
Triton kernel on CUDA (and on CPU under ``TRITON_INTERPRET=1``), else the block-sparse PyTorch path;
``supports(...)`` says why a call cannot be served; ``torch.ops.autosparse.block_sparse_attention`` is
the same function as an opaque custom op. ``reference`` holds the dense oracle and layout helpers;
``tuning`` times tile configs on this GPU and caches the fastest (``autosparse tune``).
"""

from . import tuning
from .block_sparse_op import (TileConfig, block_sparse_attention, block_sparse_attention_op, default_config,
                              row_schedule, supports)
from .reference import block_sparse_attention_torch, dense_attention, layout_mask

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_op",
    "supports",
    "TileConfig",
    "default_config",
    "row_schedule",
    "tuning",
    "block_sparse_attention_torch",
    "dense_attention",
    "layout_mask",
]
