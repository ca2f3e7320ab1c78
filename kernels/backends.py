"""Kernel backends: who runs a prepared block-sparse call, chosen by measurement.

A backend answers ``can_run(call, key_padding) -> reason | None`` and ``run(q, k, v, call, kv_valid)
-> out`` for a :class:`KernelCall` (the layout, program order, query order, blocks, causality and
scale, checked once). The layout travels as that one object. Three backends:

* ``triton`` — our kernel (``block_sparse.py``): CUDA, and the CPU under ``TRITON_INTERPRET=1``.
  Serves every call the op accepts. The portable backend.
* ``torch`` — ``reference.block_sparse_attention_torch``: the CPU backend (where Triton does not
  run; it materialises each row's keys, so it is never a candidate beside Triton).
* ``fa4`` — FlashAttention-4's block-sparse forward (``flash_attn.cute``, the optional extra
  ``autosparse[fa4]``), on sm_90 in fp16/bf16. It computes the same token mask as ours (listed
  blocks, bottom-right causal rule, ragged last block; a row with no block or no key is 0 as in
  ours: flash_fwd_sm90's ``processed_any`` and zero ``row_sum`` cases), so where it can run it is
  exact. It has no token columns and no key-padding input. Grid calls (``q_rows``) gather q into the kernel's
  order and scatter the output back, and that cost is part of what is measured.

:func:`choose_backend` returns the fastest backend that can run a call. It runs each candidate
on the call's own q/k/v once, checks it against the portable backend's output (so a wrong answer
never wins), and times it. The answer is kept per (GPU, library versions, shapes, dtype, blocks,
causality, layout features, density to 0.05), in memory and, when no candidate failed or disagreed
(a failure may be an install or code fixed later), in ``$AUTOSPARSE_CACHE_DIR/backends.json``,
like the tile configs (NATTEN's ``choose_backend`` keyed by problem shape). ``AUTOSPARSE_BACKEND=name``
forces a backend wherever it can run.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import math
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from . import cache, reference
from .block_sparse_op import KernelCall, _uses_triton

log = logging.getLogger("autosparse")

__all__ = ["BACKENDS", "Backend", "FA4Backend", "TorchBackend", "TritonBackend", "backend", "choose_backend",
           "fa4_block_sparse", "fa4_lists", "fa4_tensors", "forget_choices",
           "length_bucket", "reblocks_to_128"]

CACHE = "backends.json"  # the file in $AUTOSPARSE_CACHE_DIR
DENSITY_STEP = 0.05  # layouts whose densities round to the same step share one measured choice


class Backend(Protocol):
    name: str

    def can_run(self, call: KernelCall, key_padding: bool = False) -> Optional[str]:
        """None if this backend computes ``call`` exactly (with key padding, if ``key_padding``)."""

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: KernelCall, kv_valid: Tensor | None = None) -> Tensor:
        """The call's output ``[B, Hq, Sq, D]``, in q's dtype."""


class TritonBackend:
    name = "triton"

    def can_run(self, call: KernelCall, key_padding: bool = False) -> Optional[str]:
        if not _uses_triton(call.device):
            return f"runs on CUDA (or the CPU with TRITON_INTERPRET=1), not {call.device.type}"
        return None

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: KernelCall, kv_valid: Tensor | None = None) -> Tensor:
        return call.run(q, k, v, kv_valid)


class TorchBackend:
    name = "torch"

    def can_run(self, call: KernelCall, key_padding: bool = False) -> Optional[str]:
        if _uses_triton(call.device):  # never a candidate there: it materialises each row's keys
            return f"the Triton kernel serves {call.device.type}; torch is the CPU backend"
        return None

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: KernelCall, kv_valid: Tensor | None = None) -> Tensor:
        return reference.block_sparse_attention_torch(
            q, k, v, call.kv_indices, call.kv_counts, q_block=call.q_block, kv_block=call.kv_block,
            causal=call.causal, scale=call.scale, kv_valid=kv_valid, q_rows=call.q_rows, columns=call.columns,
            column_counts=call.column_counts)


def fa4_block_sparse(call: KernelCall) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """``call``'s layout in FA4's block-sparse format: ``(mask_block_cnt [1, H, M], mask_block_idx
    [1, H, M, NK], (q rows per block, kv_block))``, indices ascending (FA4 masks the ragged end
    on the last listed block, so it must be the highest).

    FA4's sm_90 kernel runs 128-row query tiles, or 64-row ones when the layout's blocks are 64
    rows. A 64-row layout whose query blocks agree in pairs (same key blocks for rows 2i and
    2i+1, e.g. windows and sinks counted in 128-key blocks) is re-blocked to 128 rows. That is
    exact: the same token mask, the causal rule applied per token either way. Otherwise it stays
    at 64 rows. One device sync, at plan time."""
    return fa4_lists(call.kv_counts, call.kv_indices, call.q_block, call.kv_block, call.kv_shape[2])


def fa4_lists(counts: Tensor, indices: Tensor, q_block: int, kv_block: int, kv_len: int, *,
              reblock: bool = True) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Block lists ``kv_counts [1, H, NQ]`` / ``kv_indices [1, H, NQ, W]`` (ascending) in FA4's format
    (``fa4_block_sparse``), re-blocked to 128 rows where ``reblock`` and the pairs agree."""
    indices = _zero_padding(counts, indices)
    _, heads, _, width = indices.shape
    nk = -(-kv_len // kv_block)
    q_rows = q_block
    if reblock and _pairs_agree(counts, indices, q_block):
        counts, indices, q_rows = counts[:, :, ::2], indices[:, :, ::2], 128
    idx = torch.zeros(1, heads, counts.shape[2], nk, dtype=torch.int32, device=indices.device)
    idx[..., :width] = indices
    return counts.contiguous(), idx, (q_rows, kv_block)


def _zero_padding(counts: Tensor, indices: Tensor) -> Tensor:
    """Key-block lists with the entries past each row's count set to 0."""
    live = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    return torch.where(live, indices, 0)


def _pairs_agree(counts: Tensor, indices: Tensor, q_block: int) -> bool:
    """64-row query blocks 2i and 2i+1 list the same key blocks (padding zeroed) for every head."""
    if q_block != 64 or counts.shape[2] < 2:
        return False
    even = counts.shape[2] // 2 * 2
    same_counts = torch.equal(counts[:, :, 0:even:2], counts[:, :, 1:even:2])
    return same_counts and torch.equal(indices[:, :, 0:even:2], indices[:, :, 1:even:2])


def reblocks_to_128(call: KernelCall) -> bool:
    """Whether FA4 runs this 64-row layout as 128-row blocks (one device sync)."""
    return _pairs_agree(call.kv_counts, _zero_padding(call.kv_counts, call.kv_indices), call.q_block)


@functools.lru_cache(maxsize=1)
def _fa4() -> Any:
    """``flash_attn.cute`` (imported once), or the ImportError that says why not."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except Exception as err:  # noqa: BLE001 - any failure to import is a reason, not a crash
        return err
    return flash_attn_func, BlockSparseTensorsTorch


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


class FA4Backend:
    """FlashAttention-4's block-sparse forward, as verified on the H200 (sm_90): fp16/bf16,
    head_dim 64/96/128 with key blocks of 64 or 128 and query blocks of 64 or 128, head_dim 256
    with key blocks of 64 (its tile_n there is 80, and the key block may not exceed it)."""

    name = "fa4"
    head_dims = {64: (64, 128), 96: (64, 128), 128: (64, 128), 256: (64,)}  # head_dim -> key blocks

    def __init__(self) -> None:
        self._prepared: weakref.WeakKeyDictionary[KernelCall, tuple] = weakref.WeakKeyDictionary()

    def can_run(self, call: KernelCall, key_padding: bool = False) -> Optional[str]:
        if call.device.type != "cuda":
            return f"needs CUDA, not {call.device.type}"
        if torch.cuda.get_device_capability(call.device)[0] != 9:
            return "verified on sm_90 only"
        if call.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {str(call.dtype).replace('torch.', '')} not supported (fp16/bf16)"
        d = call.q_shape[-1]
        if call.kv_block not in self.head_dims.get(d, ()):
            return f"head_dim {d} with key blocks of {call.kv_block} not supported"
        if call.q_block not in (64, 128):
            return f"query blocks of {call.q_block} not supported (64 or 128)"
        if call.columns is not None:
            return "token columns (vertical lines) not supported"
        if key_padding:
            return "key padding not supported"
        fa4 = _fa4()
        if isinstance(fa4, Exception):
            return f"flash_attn.cute does not import: {type(fa4).__name__}: {fa4}"
        return None

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: KernelCall, kv_valid: Tensor | None = None) -> Tensor:
        if kv_valid is not None:
            raise ValueError("the fa4 backend has no key padding (can_run says so)")
        prepared = self._prepared.get(call)
        if prepared is None:
            prepared = self._prepared[call] = self._prepare(call)
        blocks, inverse = prepared
        flash_attn_func, _ = _fa4()
        q = q.transpose(1, 2)  # FA4's [B, S, H, D]: the memory the model's projections produce
        if call.q_rows is not None:
            q = q.index_select(1, call.q_rows)
        out = flash_attn_func(q, k.transpose(1, 2), v.transpose(1, 2), softmax_scale=call.scale, causal=call.causal,
                              block_sparse_tensors=blocks)
        out = out[0] if isinstance(out, tuple) else out
        if inverse is not None:
            out = out.index_select(1, inverse)
        return out.transpose(1, 2)

    def _prepare(self, call: KernelCall) -> tuple:
        inverse = None if call.q_rows is None else torch.argsort(call.q_rows)
        return fa4_tensors(*fa4_block_sparse(call)), inverse


def fa4_tensors(counts: Tensor, indices: Tensor, block_size: tuple[int, int]) -> Any:
    """FA4's ``BlockSparseTensorsTorch``: every block a "mask" block (causal and sequence-end
    masks applied there; no mask_mod), and an empty "full" list. The list must be given: FA4
    4.0.0b36's sm_90 forward compiles a branch that reads it even when every count is 0
    (``block_sparse_utils.load_block_list`` on None: TypeError)."""
    _, tensors = _fa4()
    return tensors(mask_block_cnt=counts, mask_block_idx=indices, full_block_cnt=torch.zeros_like(counts),
                   full_block_idx=torch.zeros_like(indices), block_size=block_size)


TRITON, TORCH, FA4 = TritonBackend(), TorchBackend(), FA4Backend()
BACKENDS: tuple[Backend, ...] = (TRITON, FA4, TORCH)  # preference order where nothing is measured


def backend(name: str) -> Backend:
    """The backend called ``name``."""
    for b in BACKENDS:
        if b.name == name:
            return b
    raise ValueError(f"unknown kernel backend {name!r} (expected one of {[b.name for b in BACKENDS]})")


_CHOICES: dict[str, str] = {}  # measured choices of this process, by key (the disk cache's too)


def forget_choices() -> None:
    """Forget the choices measured in this process (the disk cache stays)."""
    _CHOICES.clear()


def choose_backend(call: KernelCall, q: Tensor, k: Tensor, v: Tensor, key_padding: bool = False, *,
                   backends: Sequence[Backend] = BACKENDS, time_fn: Callable[[Callable[[], Any]], float] | None = None,
                   measure: bool | None = None) -> Backend:
    """The fastest of ``backends`` that can run ``call`` exactly, measured on ``q, k, v`` (shaped
    like the call's later inputs) the first time a key is seen. The first backend that can run the
    call is the reference: a candidate is timed only when its output agrees with it. Nothing is
    measured where there is one candidate, while the GPU is being captured into a CUDA graph, or
    with ``measure`` false (None: on CUDA only; CPU backends are ordered by what they are for): the
    preference order then decides, and is not remembered."""
    able = [b for b in backends if b.can_run(call, key_padding) is None]
    if not able:
        raise ValueError("no kernel backend can run this call: "
                         + "; ".join(f"{b.name}: {b.can_run(call, key_padding)}" for b in backends))
    forced = os.environ.get("AUTOSPARSE_BACKEND")
    if forced:
        match = [b for b in able if b.name == forced]
        if match:
            return match[0]
        log.warning("AUTOSPARSE_BACKEND=%s cannot run this call (%s); choosing by measurement", forced,
                    backend(forced).can_run(call, key_padding))
    if measure is None:
        measure = call.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
    if len(able) == 1 or not measure:
        return able[0]
    key = choice_key(call, key_padding, able)
    name = _CHOICES.get(key) or cache.entries(CACHE).get(key, {}).get("backend")
    chosen = next((b for b in able if b.name == name), None)
    if chosen is None:
        chosen, times = _measure(able, call, q, k, v, time_fn)
        failed = {name: t for name, t in times.items() if isinstance(t, str)}
        if failed:  # kept for this process only: a fixed install or code must be measured again
            log.warning("kernel backend for %s: %s; not cached on disk, as %s failed: %s", key, chosen.name,
                        ", ".join(failed), failed)
        else:
            cache.store(CACHE, key, {"backend": chosen.name, "ms": times})
            log.info("kernel backend for %s: %s (%s)", key, chosen.name, times)
    _CHOICES[key] = chosen.name
    return chosen


def choice_key(call: KernelCall, key_padding: bool, candidates: Sequence[Backend]) -> str:
    """What a measured choice is kept under: GPU and versions, shapes (lengths in 2 ** 0.5
    buckets), dtype, blocks, causality, layout features (query order, columns, key padding, 64-row
    blocks agreeing in pairs: FA4 runs those as 128-row blocks, 1.3x faster on the H200) and
    density (to ``DENSITY_STEP``), and the candidates."""
    dev = call.device
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        gpu = f"{torch.cuda.get_device_name(dev)} sm{major}{minor}"
    else:
        gpu = dev.type
    versions = f"torch {torch.__version__} triton {_version('triton')} fa4 {_version('flash-attn-4')}"
    nk = -(-call.kv_shape[2] // call.kv_block)
    listed = float(call.kv_counts.sum()) / (call.kv_counts.numel() * nk)
    density = round(round(listed / DENSITY_STEP) * DENSITY_STEP, 2)
    features = "".join(f for f, on in (("+rows", call.q_rows is not None), ("+cols", call.columns is not None),
                                       ("+pad", key_padding), ("+pairs", reblocks_to_128(call))) if on)
    dt = str(call.dtype).replace("torch.", "")
    q_shape = (*call.q_shape[:2], f"~{length_bucket(call.q_shape[2])}", call.q_shape[3])
    kv_shape = (*call.kv_shape[:2], f"~{length_bucket(call.kv_shape[2])}", call.kv_shape[3])
    return (f"{gpu} | {versions} | q{q_shape} kv{kv_shape} {dt} "
            f"{call.q_block}x{call.kv_block} {'causal' if call.causal else 'full'}{features} d~{density} | "
            + ",".join(b.name for b in candidates))


def length_bucket(length: int) -> int:
    """The lower edge of ``length``'s bucket: buckets grow by ``2 ** 0.5`` (1024, 1448, 2048, ...), so
    a new prompt or chunk length is not measured again (``runtime.speed`` keys its verdicts so too)."""
    return int(2 ** (math.floor(2 * math.log2(max(length, 1))) / 2))


def _measure(able: Sequence[Backend], call: KernelCall, q: Tensor, k: Tensor, v: Tensor,
             time_fn: Callable[[Callable[[], Any]], float] | None) -> tuple[Backend, dict[str, Any]]:
    if time_fn is None:
        from .tuning import gpu_ms as time_fn
    times: dict[str, Any] = {}
    best, best_ms, reference_out = able[0], math.inf, None
    for b in able:
        try:
            out = b.run(q, k, v, call)
        except Exception as err:  # noqa: BLE001 - a backend that fails here is not a candidate
            times[b.name] = f"{type(err).__name__}: {str(err)[:160]}"
            continue
        if reference_out is None:
            reference_out = out
        elif not torch.allclose(out.float(), reference_out.float(), atol=2e-2, rtol=2e-2):
            times[b.name] = f"wrong result (max abs diff {float((out.float() - reference_out.float()).abs().max()):.3g})"
            continue
        ms = float(time_fn(functools.partial(b.run, q, k, v, call)))
        times[b.name] = ms
        if ms < best_ms:
            best, best_ms = b, ms
    return best, times
