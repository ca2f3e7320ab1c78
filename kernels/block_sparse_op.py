"""Launcher, argument checks and custom op for the block-sparse kernel.

The ``@triton.jit`` code is in ``block_sparse.py``; the pure-PyTorch versions are in ``reference.py``;
the tile config in ``tile_config.py`` (per-GPU tuning in ``tuning.py``), the program order in
``schedule.py``. A launch is a 1-D grid over (layout row, batch, query tile)
dealt out in :func:`row_schedule` order; on sm_90+ tiles move through tensor descriptors (TMA)
whenever the tensors' strides allow it, else through pointer loads.

Dispatch of :func:`block_sparse_attention`:
  * CUDA tensors -> the Triton kernel;
  * CPU tensors with ``TRITON_INTERPRET=1`` in the environment -> the Triton kernel, run by Triton's
    interpreter (how the CPU tests exercise the Triton code; the variable must be set before Triton
    is first imported, since ``triton.jit`` picks compile vs interpret at decoration time);
  * any other tensors -> :func:`reference.block_sparse_attention_torch` (gathers only listed blocks).

Triton is imported lazily, so the CPU path works where Triton is not installed.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .launch import Relauncher
from .schedule import row_schedule, work_counts
from .tile_config import TileConfig, default_config

__all__ = ["KernelCall", "block_sparse_attention", "call_reason", "supports", "TileConfig", "default_config", "row_schedule"]

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # 80 and 96 run padded to 128 (block_sparse.py)
BLOCK_SIZES = (16, 32, 64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535  # CUDA limit of grid dim 1 (batch)
_OP_NAME = "autosparse::block_sparse_attention"
_OP_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor kv_indices, Tensor kv_counts, Tensor? kv_valid, "
              "Tensor? schedule, "
              "int q_block, int kv_block, bool causal, float scale, Tensor? q_rows=None, "
              "Tensor? columns=None, Tensor? column_counts=None, Tensor? listed=None) -> Tensor")


# ----------------------------------------------------------------------------------------------------
# which backend, and can it serve the call
# ----------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _uses_triton(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def _is_pow2_block(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x in BLOCK_SIZES


def _capability_reason(q: Tensor, k: Tensor, v: Tensor, q_block, kv_block) -> Optional[str]:
    """Why the backend that would run cannot serve these inputs (None if it can)."""
    return _shape_reason(q, k, v, q_block, kv_block) or _stride_reason(q, k, v)


def _shape_reason(q: Tensor, k: Tensor, v: Tensor, q_block, kv_block) -> Optional[str]:
    """The capability rules that hold for every call of one shape, dtype and device."""
    if not _is_pow2_block(q_block):
        return f"q_block {q_block!r} not supported (expected one of {BLOCK_SIZES})"
    if not _is_pow2_block(kv_block):
        return f"kv_block {kv_block!r} not supported (expected one of {BLOCK_SIZES})"
    if q.dtype != k.dtype or q.dtype != v.dtype:
        return f"dtype mismatch q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if q.device != k.device or q.device != v.device:
        return f"device mismatch q {q.device}, k {k.device}, v {v.device}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected 4-D q/k/v, got {q.dim()}/{k.dim()}/{v.dim()}-D"
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        return f"head_dim mismatch q {d}, k {k.shape[-1]}, v {v.shape[-1]}"
    if not q.is_floating_point():
        return f"dtype {str(q.dtype).replace('torch.', '')} not supported"
    if _uses_triton(q.device):
        if q.dtype not in KERNEL_DTYPES:
            return f"dtype {str(q.dtype).replace('torch.', '')} not supported"
        if d not in HEAD_DIMS:
            return f"head_dim {d} not supported (expected one of {HEAD_DIMS})"
    return None


def _stride_reason(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    if _uses_triton(q.device):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.numel() > 0 and t.stride(-1) != 1:
                return f"{name} last dim not contiguous (stride {t.stride(-1)})"
    return None


def _grad_reason(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "requires_grad"
    return None


def supports(q: Tensor, k: Tensor, v: Tensor, q_block: int, kv_block: int) -> Optional[str]:
    """Return None when :func:`block_sparse_attention` can serve this call, else a short reason.

    Reasons include ``"requires_grad"`` (the op has no backward), ``"dtype float64 not supported"``
    and ``"head_dim 80 not supported ..."`` (Triton path only: the CPU PyTorch path accepts any
    floating dtype and head_dim). Callers fall back to dense attention and count the reason.
    Callers that check many calls of one shape ask ``supports`` once and ``call_reason`` per call.
    """
    return _grad_reason(q, k, v) or _capability_reason(q, k, v, q_block, kv_block)


def call_reason(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """The part of :func:`supports` that can differ between calls of one shape, dtype and device
    (gradients, strides); None if the call is servable as far as those go."""
    return _grad_reason(q, k, v) or _stride_reason(q, k, v)


# ----------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_args(q, k, v, kv_indices, kv_counts, q_block, kv_block, causal, scale, kv_valid, schedule, out,
                q_rows=None, columns=None, column_counts=None, listed=None) -> float:
    """Validate everything (no host syncs); return the resolved softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v), ("kv_indices", kv_indices), ("kv_counts", kv_counts)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, x in (("q_block", q_block), ("kv_block", kv_block)):
        if not _is_pow2_block(x):
            raise ValueError(f"{name} must be a power of two in {BLOCK_SIZES}, got {x!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, Hq, Sq, D], got shape {tuple(q.shape)}")
    b, hq, sq, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must be [B={b}, Hkv, Sk, D={d}], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    hkv, sk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq must be a multiple of Hkv (GQA), got Hq={hq}, Hkv={hkv}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    reason = _capability_reason(q, k, v, q_block, kv_block)
    if reason is not None:
        raise NotImplementedError(f"block_sparse_attention: {reason}")

    nq = _cdiv(sq, q_block)
    if kv_indices.dtype != torch.int32 or kv_indices.dim() != 4 or kv_indices.shape[0] not in (1, b) \
            or tuple(kv_indices.shape[1:3]) != (hq, nq):
        raise ValueError(f"kv_indices must be int32 [Bl, Hq, NQ, MAXK] with Bl in (1, {b}), Hq={hq}, "
                         f"NQ=ceil({sq}/{q_block})={nq}, got {kv_indices.dtype} {tuple(kv_indices.shape)}")
    bl = kv_indices.shape[0]
    if kv_counts.dtype != torch.int32 or tuple(kv_counts.shape) != (bl, hq, nq):
        raise ValueError(f"kv_counts must be int32 [Bl={bl}, Hq={hq}, NQ={nq}], "
                         f"got {kv_counts.dtype} {tuple(kv_counts.shape)}")
    for name, t in (("kv_indices", kv_indices), ("kv_counts", kv_counts)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if kv_valid is not None:
        if not isinstance(kv_valid, Tensor):
            raise TypeError(f"kv_valid must be a bool Tensor [B, Sk] or None, got {type(kv_valid).__name__}")
        if kv_valid.dtype != torch.bool or tuple(kv_valid.shape) != (b, sk):
            raise ValueError(f"kv_valid must be bool [B={b}, Sk={sk}], got {kv_valid.dtype} {tuple(kv_valid.shape)}")
        if kv_valid.device != q.device:
            raise ValueError(f"kv_valid must be on q's device {q.device}, got {kv_valid.device}")
    if schedule is not None:
        if not isinstance(schedule, Tensor) or schedule.dtype != torch.int32 or tuple(schedule.shape) != (hq * nq,) \
                or schedule.device != q.device:
            raise ValueError(f"schedule must be int32 [Hq * NQ = {hq * nq}] on {q.device} (row_schedule), got "
                             f"{getattr(schedule, 'dtype', type(schedule).__name__)} "
                             f"{tuple(getattr(schedule, 'shape', ()))}")
    if q_rows is not None:
        if not isinstance(q_rows, Tensor):
            raise TypeError(f"q_rows must be an int32 Tensor [Sq] or None, got {type(q_rows).__name__}")
        if q_rows.dtype != torch.int32 or tuple(q_rows.shape) != (sq,):
            raise ValueError(f"q_rows must be int32 [Sq={sq}] (a permutation of the query rows), "
                             f"got {q_rows.dtype} {tuple(q_rows.shape)}")
        if q_rows.device != q.device:
            raise ValueError(f"q_rows must be on q's device {q.device}, got {q_rows.device}")
        if not q_rows.is_contiguous():
            raise ValueError(f"q_rows must be contiguous, got stride {q_rows.stride()}")
        if causal:
            raise ValueError("q_rows is not supported with causal=True (the causal rule would compare kernel "
                             "positions of permuted queries); permute q yourself for causal layouts")
    _check_columns(columns, column_counts, listed, q.device, bl, hq, nq, _cdiv(sk, kv_block))
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != (b, hq, sq, d) or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be {q.dtype} [B, Hq, Sq, D]={(b, hq, sq, d)} on {q.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        if _uses_triton(q.device) and out.numel() > 0 and out.stride(-1) != 1:
            raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0.0 < float(scale) < math.inf):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return float(scale)


def _check_columns(columns, column_counts, listed, device, bl: int, hq: int, nq: int, nk: int) -> None:
    given = [t is not None for t in (columns, column_counts, listed)]
    if not any(given):
        return
    if not all(given):
        raise ValueError("columns, column_counts and listed go together (BlockLayout gives all three)")
    expected = (("columns", columns, torch.int32, None), ("column_counts", column_counts, torch.int32, (bl, hq, nq)),
                ("listed", listed, torch.bool, (bl, hq, nq, nk)))
    for name, t, dtype, shape in expected:
        if not isinstance(t, Tensor) or t.dtype != dtype or t.device != device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} Tensor on {device}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} on {getattr(t, 'device', None)}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if columns.dim() != 3 or tuple(columns.shape[:2]) != (bl, hq):
        raise ValueError(f"columns must be int32 [Bl={bl}, Hq={hq}, C], got {list(columns.shape)}")


# ----------------------------------------------------------------------------------------------------
# kernel handle (compiled, or interpreted on CPU)
# ----------------------------------------------------------------------------------------------------
def _jit_module():
    from . import block_sparse  # lazy: imports triton
    return block_sparse


def _kernel(device: torch.device):
    mod = _jit_module()
    if device.type == "cpu":
        import triton.language as tl

        # triton.jit decides compile vs interpret when a function is decorated, for Triton's own
        # standard library (tl.zeros, tl.sum, ...) too: the interpreter needs TRITON_INTERPRET=1
        # before triton is first imported.
        if type(mod._attn_fwd).__name__ != "InterpretedFunction" or type(tl.zeros).__name__ != "InterpretedFunction":
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; Triton's interpreter "
                               "needs it in the environment before the first `import triton` (start the "
                               "process with TRITON_INTERPRET=1), or unset it to use the PyTorch CPU path")
    return mod._attn_fwd


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _tma_ok(*tensors: Tensor) -> bool:
    """Tensor descriptors need sm_90+, 16-byte aligned base addresses and 16-byte multiple, non-zero
    strides."""
    t0 = tensors[0]
    if t0.device.type != "cuda" or _capability(t0.device.index)[0] < 9:
        return False
    for t in tensors:
        elt = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any(st <= 0 or (st * elt) % 16 for st in t.stride()[:-1]):
            return False
    return True


_DESCRIPTOR_TEMPLATES: dict[tuple, object] = {}


def _descriptor(t: Tensor, rows: int):
    """4-D descriptor over [B, H, S, D] moving [1, 1, rows, D rounded up to a power of two] tiles.

    Validated once per (shape, strides, dtype, rows) by Triton's constructor, which costs more host
    time than a small kernel; later calls copy that template with their own base. The template keeps
    no tensor alive."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    key = (t.shape, t.stride(), t.dtype, rows)
    template = _DESCRIPTOR_TEMPLATES.get(key)
    if template is None:
        template = TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, 1 << (t.shape[-1] - 1).bit_length()])
        template.base = None
        if len(_DESCRIPTOR_TEMPLATES) > 1024:
            _DESCRIPTOR_TEMPLATES.clear()
        _DESCRIPTOR_TEMPLATES[key] = template
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(template.__dict__)
    desc.base = t
    return desc


def _launch(q, k, v, kv_indices, kv_counts, kv_valid, schedule, out, lse, q_block, kv_block, causal, scale,
            config: TileConfig | None, q_rows: Tensor | None = None, columns: Tensor | None = None,
            column_counts: Tensor | None = None, listed: Tensor | None = None, prepared: tuple | None = None):
    """``prepared``: a ``KernelCall``'s key of everything fixed across its calls; the launch key is
    then that plus what each call's q, k, v, out and key padding can change (strides, alignment)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bl, _, nq, maxk = kv_indices.shape
    if b > _MAX_GRID_YZ:
        raise ValueError(f"grid limit: B={b} must be <= {_MAX_GRID_YZ}")
    use_tma = config.use_tma if config is not None else None
    if use_tma is None:  # with q_rows, Q and out move through pointers: only K/V need descriptors
        use_tma = _tma_ok(k, v) if q_rows is not None else _tma_ok(q, k, v, out)
    if config is None:
        config = default_config(q_block, kv_block, d, q.dtype, q.device, use_tma)
    block_m = config.block_m or q_block
    if block_m not in BLOCK_SIZES or block_m > q_block:
        raise ValueError(f"config.block_m must be a power of two in {BLOCK_SIZES} and <= q_block {q_block}, "
                         f"got {block_m}")
    q_split = q_block // block_m
    block_n = config.block_n or kv_block
    if block_n not in BLOCK_SIZES or block_n > kv_block:
        raise ValueError(f"config.block_n must be a power of two in {BLOCK_SIZES} and <= kv_block {kv_block}, "
                         f"got {block_n}")
    if schedule is None:
        schedule = row_schedule(work_counts(kv_counts, column_counts, kv_block), hq // hkv)
    descs = (None,) * 4
    if use_tma and q_rows is not None:
        descs = (None, _descriptor(k, block_n), _descriptor(v, block_n), None)
    elif use_tma:
        descs = (_descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n),
                 _descriptor(out, block_m))
    valid_arg = kv_valid.contiguous().view(torch.uint8) if kv_valid is not None else kv_counts
    lse_arg = lse if lse is not None else out
    q_rows_arg = q_rows if q_rows is not None else kv_counts  # any int32 pointer when unused
    has_cols = columns is not None
    cols_args = (columns, column_counts, listed.view(torch.uint8)) if has_cols else (kv_counts,) * 3
    cols_strides = (columns.stride(0) if bl > 1 else 0, columns.stride(1),
                    column_counts.stride(0) if bl > 1 else 0, column_counts.stride(1),
                    listed.stride(0) if bl > 1 else 0, listed.stride(1), listed.stride(2)) if has_cols else (0,) * 7
    grid = (hq * nq * q_split, b)
    args = (q, k, v, out, lse_arg, kv_indices, kv_counts, valid_arg, schedule, q_rows_arg, *cols_args, *descs,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
            kv_indices.stride(0) if bl > 1 else 0, kv_indices.stride(1), kv_indices.stride(2), kv_indices.stride(3),
            kv_counts.stride(0) if bl > 1 else 0, kv_counts.stride(1), kv_counts.stride(2),
            valid_arg.stride(0) if kv_valid is not None else 0,
            *cols_strides,
            scale, hq // hkv, sq, sk, maxk, nq)
    meta = dict(HEAD_DIM=d, HEAD_DIM_PAD=1 << (d - 1).bit_length(), BLOCK_M=block_m, BLOCK_N=block_n, KV_BLOCK=kv_block,
                Q_SPLIT=q_split, CAUSAL=causal,
                HAS_KV_VALID=kv_valid is not None, STORE_LSE=lse is not None, EVEN_N=(sk % kv_block == 0),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_TMA=bool(use_tma),
                HAS_Q_ROWS=q_rows is not None, HAS_COLS=has_cols, num_warps=config.num_warps, num_stages=config.num_stages)
    launch = _relauncher(q.device)
    key = None
    if prepared is not None:
        key = (prepared, q.stride(), k.stride(), v.stride(), out.stride(), *(t.data_ptr() % 16 for t in (q, k, v, out)),
               None if kv_valid is None else kv_valid.data_ptr() % 16)
    if q.device.type == "cuda" and q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):
            return launch(grid, args, meta, q.device, key)  # the compiled kernel (n_regs, n_spills, metadata)
    return launch(grid, args, meta, q.device, key)


_RELAUNCHERS: dict[str, Relauncher] = {}  # per device type: the compiled kernel (cuda) or the interpreted one (cpu)


def _relauncher(device: torch.device) -> Relauncher:
    launch = _RELAUNCHERS.get(device.type)
    if launch is None:
        launch = _RELAUNCHERS[device.type] = Relauncher(_kernel(device))
    return launch


# ----------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------
def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, *,
                           q_block: int, kv_block: int, causal: bool, scale: float | None = None,
                           kv_valid: Tensor | None = None, schedule: Tensor | None = None,
                           out: Tensor | None = None, return_lse: bool = False, config: TileConfig | None = None,
                           q_rows: Tensor | None = None, columns: Tensor | None = None,
                           column_counts: Tensor | None = None, listed: Tensor | None = None
                           ) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention forward: each query block attends only its listed key blocks.

    Parameters
    ----------
    q : Tensor [B, Hq, Sq, D] — fp16/bf16/fp32 (Triton) or any float (CPU PyTorch path); any strides
        with a contiguous last dim.
    k, v : Tensor [B, Hkv, Sk, D] — Hq % Hkv == 0; query head h reads KV head h // (Hq // Hkv).
    kv_indices : int32 Tensor [Bl, Hq, NQ, MAXK] — Bl in {1, B} (1 broadcasts over batch),
        NQ = ceil(Sq / q_block). Row (b, h, i) lists the key blocks of query block i; entries past
        the count are padding and are never read; indices outside [0, NK) are ignored.
    kv_counts : int32 Tensor [Bl, Hq, NQ] — valid entries per row (clamped to [0, MAXK]).
    q_block, kv_block : block sizes in tokens, powers of two in 16..128.
    causal : bottom-right aligned causal mask, key k allowed for query q iff k <= q + (Sk - Sq).
    scale : softmax scale, default 1 / sqrt(D).
    kv_valid : optional bool Tensor [B, Sk] — key padding mask (True = real key).
    schedule : optional int32 Tensor [Hq * NQ], the order layout rows are dealt out to the GPU
        (a permutation of ``h * NQ + i``; :func:`row_schedule`, which ``BlockLayout`` caches). None
        computes it from ``kv_counts`` on every call. Only the order changes, never the result.
    out : optional Tensor [B, Hq, Sq, D] (q's dtype, any strides with contiguous last dim) to write into.
    return_lse : also return lse, float32 [B, Hq, Sq], natural log of the sum of exp(scaled scores).
    q_rows : optional int32 Tensor [Sq] (contiguous, on q's device), a permutation of ``range(Sq)``,
        the same for every batch entry and head: q (and ``out``, and lse) are then in the caller's
        order and the query at kernel position p is row ``q_rows[p]`` of q; its output goes to row
        ``q_rows[p]`` of out. k, v, kv_valid and the layout stay in kernel order. Equivalent to
        ``out[:, :, q_rows] = attention(q[:, :, q_rows], k, v, ...)`` without the two gathers:
        the kernel reads and writes those rows in place. Not checked to be a permutation (that
        would need a device sync): repeated or out-of-range entries are undefined behaviour.
        Not supported with ``causal=True``.
    columns, column_counts, listed : optional, together — key columns visited token by token on top
        of the listed blocks (vertical lines: scattered keys every query of a head attends).
        ``columns`` int32 [Bl, Hq, C]: per head, key positions in ascending order (padding past the
        longest count is never read); ``column_counts`` int32 [Bl, Hq, NQ]: query block i visits
        the first ``column_counts[b, h, i]`` of them (causal: those it may see);
        ``listed`` bool [Bl, Hq, NQ, NK]: the listed blocks as a mask (a column inside a listed
        block is attended once, with its block). ``BlockLayout`` builds all three.

    Returns
    -------
    out [B, Hq, Sq, D] in q's dtype (allocated as ``empty(B, Sq, Hq, D).transpose(1, 2)`` when
    ``out`` is None), or ``(out, lse)``. Rows with no attended key give 0 and lse = -inf.

    Other Parameters
    ----------------
    config : TileConfig (num_warps, num_stages) overriding :func:`default_config` (Triton only).
    """
    return _block_sparse_attention(q, k, v, kv_indices, kv_counts, q_block=q_block, kv_block=kv_block,
                                   causal=causal, scale=scale, kv_valid=kv_valid, schedule=schedule, out=out,
                                   return_lse=return_lse, config=config, check_grad=True, q_rows=q_rows,
                                   columns=columns, column_counts=column_counts, listed=listed)


def _block_sparse_attention(q, k, v, kv_indices, kv_counts, *, q_block, kv_block, causal, scale, kv_valid,
                            schedule, out, return_lse, config, check_grad, q_rows=None, columns=None,
                            column_counts=None, listed=None):
    scale = _check_args(q, k, v, kv_indices, kv_counts, q_block, kv_block, causal, scale, kv_valid, schedule, out,
                        q_rows, columns, column_counts, listed)
    if check_grad and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise NotImplementedError("block_sparse_attention has no backward: q/k/v require grad "
                                  "(call it under torch.no_grad() or fall back to dense attention)")
    return _run(q, k, v, kv_indices, kv_counts, kv_valid, schedule, out, return_lse, q_block, kv_block, causal, scale,
                config, q_rows, columns, column_counts, listed)


def _run(q, k, v, kv_indices, kv_counts, kv_valid, schedule, out, return_lse, q_block, kv_block, causal, scale,
         config, q_rows, columns, column_counts, listed, prepared=None):
    """The checked call: the PyTorch path, or the output (and lse) allocated and the kernel launched."""
    if not _uses_triton(q.device):
        return reference.block_sparse_attention_torch(q, k, v, kv_indices, kv_counts, q_block=q_block,
                                                      kv_block=kv_block, causal=causal, scale=scale,
                                                      kv_valid=kv_valid, out=out, return_lse=return_lse,
                                                      q_rows=q_rows, columns=columns, column_counts=column_counts)
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    if out is None:
        out = torch.empty((b, sq, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() > 0:
        if sk == 0:  # nothing to attend
            out.zero_()
            if lse is not None:
                lse.fill_(float("-inf"))
        else:
            _launch(q, k, v, kv_indices, kv_counts, kv_valid, schedule, out, lse, q_block, kv_block, causal, scale,
                    config, q_rows, columns, column_counts, listed, prepared)
    return (out, lse) if return_lse else out


@dataclass(frozen=True, eq=False)
class KernelCall:
    """One layout's kernel call, checked once (``KernelCall.prepare``): the layout, program order,
    query order, block sizes, causality and scale, for q/k/v of one shape, dtype and device. ``run``
    then takes each call's q, k, v (any strides with a contiguous last dim), key padding and output
    tensor: checking and binding the arguments is not repeated per call (FlashInfer's plan/run)."""

    q_shape: torch.Size
    kv_shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    kv_indices: Tensor
    kv_counts: Tensor
    schedule: Tensor
    q_block: int
    kv_block: int
    causal: bool
    scale: float
    q_rows: Optional[Tensor] = None
    columns: Optional[Tensor] = None
    column_counts: Optional[Tensor] = None
    listed: Optional[Tensor] = None
    # What its launches share, by value (shapes, strides, dtypes and alignment of the layout tensors,
    # block sizes, causality, scale): with each call's strides and alignment, the kernel's launch key.
    launch_key: tuple = ()

    @classmethod
    def prepare(cls, q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, *, q_block: int,
                kv_block: int, causal: bool, scale: float | None = None, schedule: Tensor | None = None,
                q_rows: Tensor | None = None, columns: Tensor | None = None, column_counts: Tensor | None = None,
                listed: Tensor | None = None) -> KernelCall:
        """Check the call as :func:`block_sparse_attention` does, on tensors shaped like the later ones."""
        scale = _check_args(q, k, v, kv_indices, kv_counts, q_block, kv_block, causal, scale, None, schedule, None,
                            q_rows, columns, column_counts, listed)
        if schedule is None:
            schedule = row_schedule(work_counts(kv_counts, column_counts, kv_block), q.shape[1] // k.shape[1])
        fixed = (kv_indices, kv_counts, schedule, q_rows, columns, column_counts, listed)
        launch_key = (tuple(q.shape), tuple(k.shape), q.dtype, str(q.device), q_block, kv_block, causal, scale,
                      *(None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.data_ptr() % 16) for t in fixed))
        return cls(q.shape, k.shape, q.dtype, q.device, kv_indices, kv_counts, schedule, q_block, kv_block, causal,
                   scale, q_rows, columns, column_counts, listed, launch_key)

    def run(self, q: Tensor, k: Tensor, v: Tensor, kv_valid: Tensor | None = None,
            out: Tensor | None = None, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The prepared call on these q, k, v (``block_sparse_attention``'s result, with the lse
        when ``return_lse``); ValueError if they differ from the prepared ones in shape, dtype or
        device, or lack a contiguous last dim."""
        if (q.shape != self.q_shape or k.shape != self.kv_shape or v.shape != self.kv_shape or q.dtype != self.dtype
                or k.dtype != self.dtype or v.dtype != self.dtype or q.device != self.device
                or k.device != self.device or v.device != self.device):
            raise ValueError(f"KernelCall prepared for q {tuple(self.q_shape)}, k/v {tuple(self.kv_shape)} "
                             f"{self.dtype} on {self.device}; got q {tuple(q.shape)} {q.dtype} on {q.device}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        reason = _stride_reason(q, k, v)
        if reason is not None:
            raise ValueError(f"KernelCall.run: {reason}")
        if kv_valid is not None and (kv_valid.dtype != torch.bool or kv_valid.shape != (q.shape[0], k.shape[2])):
            raise ValueError(f"kv_valid must be bool [B={q.shape[0]}, Sk={k.shape[2]}], got "
                             f"{kv_valid.dtype} {tuple(kv_valid.shape)}")
        return _run(q, k, v, self.kv_indices, self.kv_counts, kv_valid, self.schedule, out, return_lse, self.q_block,
                    self.kv_block, self.causal, self.scale, None, self.q_rows, self.columns, self.column_counts,
                    self.listed, self.launch_key)


# ----------------------------------------------------------------------------------------------------
# custom op (opaque to torch.compile)
# ----------------------------------------------------------------------------------------------------
def _op_impl(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, kv_valid: Optional[Tensor],
             schedule: Optional[Tensor], q_block: int, kv_block: int, causal: bool, scale: float,
             q_rows: Optional[Tensor] = None, columns: Optional[Tensor] = None,
             column_counts: Optional[Tensor] = None, listed: Optional[Tensor] = None) -> Tensor:
    return _block_sparse_attention(q, k, v, kv_indices, kv_counts, q_block=q_block, kv_block=kv_block,
                                   causal=causal, scale=scale, kv_valid=kv_valid, schedule=schedule, out=None,
                                   return_lse=False, config=None, check_grad=False, q_rows=q_rows,
                                   columns=columns, column_counts=column_counts, listed=listed)


def _op_fake(q, k, v, kv_indices, kv_counts, kv_valid, schedule, q_block, kv_block, causal, scale, q_rows=None,
             columns=None, column_counts=None, listed=None):
    # q_rows only moves rows inside out: the shape and strides do not depend on it
    b, hq, sq, d = q.shape
    return q.new_empty((b, sq, hq, d)).transpose(1, 2)


# Registered once: this file is only ever ``autosparse.kernels.block_sparse_op`` (kernels/__init__.py
# hands a top-level ``kernels`` import to the package of that name).
block_sparse_attention_op = torch.library.custom_op(_OP_NAME, mutates_args=(), schema=_OP_SCHEMA)(_op_impl)
block_sparse_attention_op.register_fake(_op_fake)
