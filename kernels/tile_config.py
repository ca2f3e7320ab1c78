"""Launch parameters of the block-sparse kernel: ``TileConfig``, the per-GPU tuned configs stored
by ``tuning.tune`` (``$AUTOSPARSE_CACHE_DIR/tile_configs.json``), and ``default_config``: the tuned
config for this GPU if there is one, else the measured rule.

Keys of the stored configs carry the GPU name, compute capability and Triton version, so a cache
never leaks across machines or compilers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Optional

import torch

from . import cache

log = logging.getLogger(__name__)

__all__ = ["CACHE", "TileConfig", "cache_path", "config_key", "default_config", "lookup"]


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Launch parameters of the kernel.

    ``block_m`` is the query tile (None: the layout's q_block; smaller powers of two split each layout
    row into q_block // block_m programs). ``block_n`` is the key tile (None: the layout's kv_block;
    smaller powers of two visit each listed key block in kv_block // block_n tiles).
    ``use_tma``: None picks tensor descriptors whenever the GPU (sm_90+) and the tensors' strides allow.
    """

    num_warps: int
    num_stages: int
    block_m: Optional[int] = None
    use_tma: Optional[bool] = None
    block_n: Optional[int] = None


@functools.lru_cache(maxsize=None)
def _smem_budget(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return int(optin) - 8 * 1024  # headroom for Triton's own scratch (layout conversions, barriers)


@functools.lru_cache(maxsize=256)
def default_config(q_block: int, kv_block: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, tma: bool = False) -> TileConfig:
    """The tuned config for this GPU if ``autosparse tune`` stored one (``tuning.lookup``), else a rule.
    Memoised per argument tuple (``tuning.tune`` clears it).

    With tensor descriptors (sm_90+, 16-bit): 64-row query tiles, 4 warps, 1 stage. Measured on the
    H200 (benchmarks/NOTES.md, runs 4-7): three or four such programs per SM overlap each other's
    loads, softmax and tensor-core work, 3-15 % faster than 128-row tiles with 8 warps and deep
    pipelines. Pointer loads need more registers (64-row, 1-stage tiles spill there), so they keep
    v1's rule: 8 warps for q_block 128 at head_dim 128, else 4, and as many stages (4, 3, 2) as fit in
    shared memory. fp32 (ieee dots, there for accuracy): 1 stage.

    Head dims 80 and 96 run padded to 128 wide tiles, so they take 128's rule. At 256 the K and V
    tiles of a 128-key block take 64 KB each in 16 bits (128 KB in fp32) of the H200's 227 KB: query
    tiles of at most 64 rows, key tiles of at most 64 (32 in fp32), 4 warps, one stage: 239
    registers, no spills, 64 KB of shared memory. Measured on the H200 at 32K tokens
    (benchmarks/NOTES.md, head_dim 256): 3.1x faster than 8 warps; 128-key tiles with 4 warps read
    8 % faster once but sit at 255 registers, with no headroom for key padding or columns.
    """
    tuned = lookup(device, q_block, kv_block, head_dim, dtype, tma)
    if tuned is not None:
        return tuned
    elt = dtype.itemsize
    head_dim = 1 << (head_dim - 1).bit_length()  # the padded tile width
    if head_dim > 128:
        return TileConfig(num_warps=4, num_stages=1, block_m=min(64, q_block), use_tma=tma,
                          block_n=min(64 if elt <= 2 else 32, kv_block))
    if tma and elt <= 2:
        return TileConfig(num_warps=4, num_stages=1, block_m=min(64, q_block), use_tma=True)
    big = q_block >= 128 and head_dim >= 128
    num_warps = 8 if big else 4
    budget = _smem_budget(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 227 * 1024
    num_stages = 1
    if elt <= 2:
        for stages in (4, 3, 2):
            if elt * (q_block * head_dim + stages * 2 * kv_block * head_dim) <= budget:
                num_stages = stages
                break
    return TileConfig(num_warps=num_warps, num_stages=num_stages, use_tma=tma)


CACHE = "tile_configs.json"  # the file in $AUTOSPARSE_CACHE_DIR


def cache_path() -> Path:
    return cache.path(CACHE)


def _device_key(device: torch.device) -> str:
    import triton

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
    else:
        name = device.type
    return f"{name} triton {triton.__version__}"


def config_key(device: torch.device, q_block: int, kv_block: int, head_dim: int, dtype: torch.dtype,
               tma: bool) -> str:
    dt = str(dtype).replace("torch.", "")
    return f"{_device_key(device)} | d{head_dim} {dt} {q_block}x{kv_block} {'tma' if tma else 'ptr'}"


def lookup(device: torch.device, q_block: int, kv_block: int, head_dim: int, dtype: torch.dtype, tma: bool):
    """The tuned TileConfig for this GPU and shape class (``tuning.tune`` stores it), or None."""
    entry = cache.entries(CACHE).get(config_key(device, q_block, kv_block, head_dim, dtype, tma))
    if not isinstance(entry, dict):
        return None
    try:
        return TileConfig(num_warps=int(entry["num_warps"]), num_stages=int(entry["num_stages"]),
                          block_m=int(entry["block_m"]), use_tma=tma)
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring malformed tile-config cache entry %r", entry)
        return None
