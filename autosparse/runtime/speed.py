"""Never slower: a sparse call plan runs only where it measures faster than dense SDPA on this GPU.

Short prompts are where sparse attention loses: a window that covers most of a 1K prompt lists most
blocks, our kernel runs them at 0.8-0.9 of cuDNN's rate, and a launch costs host time that a short
dense call does not. So the first call of a kind times the plan's own launch (what the op runs:
layout, permutations, estimate for dynamic heads) against dense SDPA on the same q/k/v, both with
calls queued back to back (``gpu_ms``: the steady state inside a forward), and keeps the verdict.

A verdict is kept per GPU and software, q/k shape with the length in buckets of ``2 ** 0.5``,
dtype, causality, key padding, blocks, token grid and what the layout is (its density to 0.05, or
its dynamic patterns), in memory and in ``$AUTOSPARSE_CACHE_DIR/sparse_speed.json``: later calls in
a bucket cost a dictionary lookup. Nothing is measured off the GPU (the CPU path is a reference;
its speed says nothing of a GPU's), while a CUDA graph is being captured, or with
``AUTOSPARSE_NEVER_SLOWER=0`` (benchmarks of the kernel itself); sparse then runs wherever the
profile says.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from autosparse.kernels import cache
from autosparse.kernels.backends import length_bucket

__all__ = ["DENSE_REASON", "forget_verdicts", "length_bucket", "sparse_is_faster", "verdict_key"]

log = logging.getLogger("autosparse")

CACHE = "sparse_speed.json"
DENSE_REASON = "not faster than dense at this length (measured)"
# Sparse must win by this much: near break-even the two timings differ by their noise (a few %), and
# a verdict there would flip between runs; within it, dense (the exact answer) is kept.
MARGIN = 0.95
_VERDICTS: dict[str, bool] = {}


def forget_verdicts() -> None:
    """Forget this process's verdicts (the disk cache stays)."""
    _VERDICTS.clear()


def measuring(device: torch.device) -> bool:
    """Whether verdicts are measured here: on CUDA, outside graph capture, unless turned off."""
    if os.environ.get("AUTOSPARSE_NEVER_SLOWER", "1") == "0":
        return False
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def verdict_key(query: torch.Tensor, key: torch.Tensor, causal: bool, key_padding: bool, blocks: tuple[int, int],
                layout: str, grid: bool) -> str:
    """What a verdict is kept under (see the module docstring)."""
    dev = query.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    b, h, s, d = query.shape
    kv_len = length_bucket(key.shape[2])
    dt = str(query.dtype).replace("torch.", "")
    features = "".join(f for f, on in ((" causal", causal), (" +pad", key_padding), (" +grid", grid)) if on)
    return (f"{gpu} | torch {torch.__version__} | q[{b},{h},~{length_bucket(s)},{d}] kv[{key.shape[1]},~{kv_len}] {dt} "
            f"{blocks[0]}x{blocks[1]}{features} | {layout}")


def sparse_is_faster(key: str, sparse: Callable[[], Any], dense: Callable[[], Any], *,
                     time_fn: Callable[[Callable[[], Any]], float] | None = None) -> bool:
    """The verdict kept under ``key``, or measured now: ``sparse()`` vs ``dense()`` on this call's
    inputs. A sparse run that fails is not caught here: it is the plan's to fail."""
    known = _VERDICTS.get(key)
    if known is None:
        entry = cache.entries(CACHE).get(key)
        if entry is not None:
            known = bool(entry["sparse"])
    if known is None:
        if time_fn is None:
            from autosparse.kernels.tuning import gpu_ms as time_fn
        sparse_ms, dense_ms = float(time_fn(sparse)), float(time_fn(dense))
        known = sparse_ms < MARGIN * dense_ms
        cache.store(CACHE, key, {"sparse": known, "sparse_ms": sparse_ms, "dense_ms": dense_ms})
        if not known:
            log.info("autosparse: dense at %s: sparse %.3f ms >= dense %.3f ms", key, sparse_ms, dense_ms)
    _VERDICTS[key] = known
    return known
