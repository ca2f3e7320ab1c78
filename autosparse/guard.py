"""Run-time accuracy guard: compare a served sparse output with exact attention on a few query rows.

    autosparse.patch_model(model, profile, guard=GuardConfig(rows=64, tol=0.05))
    autosparse.patch_model(model, profile, guard=GuardConfig(heads=2))   # cheaper: 2 KV heads a call

What a checked call compares. ``rows`` query positions per batch element, stratified: the
sequence is cut into ``rows`` equal strata (widths differ by one at most) and one position is drawn
uniformly from each: every position has a chance of about ``rows / S``, no position is drawn twice,
and a band of bad rows longer than two strata is always hit. Their exact attention is computed over every allowed key (causal rule and key padding
as the kernel applies them, float32 accumulation) and compared per query head with the sparse
output on the same rows: ``||out - exact|| / ||exact||`` over the head's sampled rows. A head over
``tol`` fails the call (the runtime then recomputes it dense). Rows with no allowed key (the kernel
writes 0 there, SDPA NaN) are left out on both sides, so they are never flagged.

Which heads (``GuardConfig.heads``). By default every head of every checked call. With
``heads=n`` a checked call compares the query heads of ``n`` KV heads only (a KV head and the query
heads that read it: the unit of cost, since the check's one unavoidable cost is reading K and V),
and the choice rotates through the layer's KV heads from one checked call of that layer to the
next: checked call ``c`` takes KV heads ``c*n, c*n + 1, ... (mod Hkv)``, so any ``ceil(Hkv / n)``
consecutive checked calls of a layer cover all of its heads. A layer that is too sparse on some
head is therefore caught within ``ceil(Hkv / n)`` checked calls (``every * ceil(Hkv / n)`` served
calls), not on the very call; a rotation is deterministic, needs no timer and costs no extra sync.
The cost of a checked call falls to about ``n / Hkv`` of a full one.

Cost of a full check: ``rows x S x D`` multiply-adds per head and one read of K and V, never an
``S x S`` temporary. On CUDA (``Guard.check``): no rows are drawn on the host nor uploaded; the
two Triton kernels compute them in place from a 31-bit key (``rows_key(seed, n)`` for the n-th
check on the device; ``hashed_rows`` is the PyTorch reference: stratum r's row is
``lo + h(key, b*R + r) % width``, ``h`` a 32-bit integer mixer), a split-KV pass (all sampled rows of
a KV head's query heads in one tile, read straight from ``query`` by position; enough key splits to
fill the GPU) and one pass that merges the splits of each sampled row and compares it with
``out``'s row; its per-row sums, summed per head on the device, come back with the one host sync,
for the verdict. Grid, constexprs and scratch buffers are cached per (shape, dtype, device,
stream). Elsewhere: a PyTorch loop over key chunks with an online softmax.

Measured (H200, bf16, B=1, benchmarks/guard.py, 2026-12-04, after the in-kernel rows): the host
clock of one ``Guard.check`` is ~0.19 ms (12 heads, S=32K) / ~0.36 ms (32 q / 8 kv heads causal)
(was ~0.6 ms with host-drawn rows): enqueue ~0.1-0.16 ms, reduction + sync 0.06-0.28 ms (mostly
the device work). With every call checked the overhead vs the sparse call was still 4-20 %
(20.5 % H12 32K, 8.6 % GQA 32K, 4.4 % / 6.0 % at 64K; noisy): the per-call sync also exposes the
next sparse call's launch latency, so ``every`` is what brings the amortised overhead to 3 %.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["GuardConfig", "GuardVerdict", "Guard", "check", "exact_rows", "kv_heads_for", "log_line"]

# Extra memory (bytes) one key chunk of the PyTorch path may take (fp32 scores, their exp, K/V chunks).
_TORCH_CHUNK_BYTES = 32 * 1024 * 1024
_TINY = torch.finfo(torch.float32).tiny
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------
# configuration and verdict
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuardConfig:
    """What the guard checks.

    rows: query rows sampled per checked call and batch element (all rows when the call has fewer),
        one from each of ``rows`` equal strata of the sequence.
    tol: the largest relative L2 error a head's sampled output rows may have against exact attention.
    every: check every n-th served call of a layer (1: every call; the first call is always checked).
    seed: seed of the generators the guard draws its rows from (one per device).
    heads: ``None`` (default): every head of every checked call. An int ``n``: each checked call
        compares the query heads of ``n`` KV heads, rotating through the layer's KV heads from one
        checked call to the next (checked call ``c`` of a layer: KV heads ``c*n ... c*n + n - 1``
        mod ``Hkv``), so every head is checked at least once in any ``ceil(Hkv / n)`` consecutive
        checked calls; the check then costs about ``n / Hkv`` of a full one. ``n >= Hkv``: all heads.
    """

    rows: int = 64
    tol: float = 0.05
    every: int = 1
    seed: int = 0
    heads: int | None = None

    def __post_init__(self) -> None:
        _check_int("rows", self.rows, 1)
        _check_int("every", self.every, 1)
        _check_int("seed", self.seed, 0)
        if self.heads is not None:
            _check_int("heads", self.heads, 1, "None (every head) or an int")
        tol = self.tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
            raise ValueError(f"GuardConfig.tol must be a finite number > 0, got {tol!r}")
        object.__setattr__(self, "tol", float(tol))

    @classmethod
    def parse(cls, value: Any) -> GuardConfig | None:
        """``None`` (no guard), a ``GuardConfig``, or a dict of its fields (the compile backend's
        ``options={"guard": {...}}``); anything else is a TypeError, an unknown or bad key a
        ValueError naming it."""
        if value is None or isinstance(value, GuardConfig):
            return value
        if isinstance(value, Mapping):
            known = [f.name for f in fields(cls)]
            unknown = sorted(map(repr, set(value) - set(known)))
            if unknown:
                raise ValueError(f"guard option(s) {', '.join(unknown)}: unknown (known: {known})")
            return cls(**value)
        raise TypeError(f"guard: expected None, a GuardConfig or a dict of its fields, got {type(value).__name__}")


def _check_int(name: str, value: Any, minimum: int, what: str = "an int") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"GuardConfig.{name} must be {what} >= {minimum}, got {value!r}")


def kv_heads_for(call: int, kv_heads: int, heads: int | None) -> tuple[int, ...]:
    """The KV heads checked call ``call`` (0, 1, ...) of a layer with ``kv_heads`` KV heads compares
    under ``GuardConfig.heads = heads``: all of them (``None`` or ``heads >= kv_heads``), else the
    cyclic window ``call*heads ... call*heads + heads - 1`` (mod ``kv_heads``)."""
    first, count = _head_window(call, kv_heads, heads)
    return tuple((first + i) % kv_heads for i in range(count))


def _head_window(call: int, kv_heads: int, heads: int | None) -> tuple[int, int]:
    if heads is None or heads >= kv_heads:
        return 0, kv_heads
    return (call * heads) % kv_heads, heads


@dataclass(frozen=True)
class GuardVerdict:
    """One checked call. ``error``: the worst checked head's relative error (NaN if an output row
    that has keys is not finite); ``heads``: the query heads over ``tol``; ``rows``: sampled rows
    compared (over the batch; rows without an allowed key are left out); ``checked``: the query heads
    compared (all unless ``GuardConfig.heads``), ``errors``: their errors, in that order."""

    error: float
    heads: tuple[int, ...]
    tol: float = math.nan
    rows: int = 0
    checked: tuple[int, ...] = ()
    errors: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.heads


def log_line(layer: str, verdict: GuardVerdict) -> str:
    """The log line of a checked call of ``layer``: the heads over tolerance and the error."""
    tol = f" (tol {verdict.tol:g})" if not math.isnan(verdict.tol) else ""
    where = f"guard: layer {layer}"
    of = f" of {len(verdict.checked)} checked heads" if verdict.checked else ""
    if verdict.ok:
        return (f"{where}: ok, worst head's relative error {verdict.error:.3g}{tol} on {verdict.rows} sampled rows"
                f"{of}")
    heads = ", ".join(map(str, verdict.heads))
    return (f"{where}: head{'s' if len(verdict.heads) > 1 else ''} {heads} over tolerance: worst relative error "
            f"{verdict.error:.3g}{tol} vs exact attention on {verdict.rows} sampled rows{of}")


class Guard:
    """The guard of one patched model: its config, per layer a served-call counter (``every``) and a
    checked-call counter (the ``heads`` rotation), and one row generator per device (seeded with
    ``config.seed``; it never touches torch's global RNG).

    ``due(layer)`` then ``check(...)`` (as ``runtime.serve`` calls them, on one thread): ``check``
    rotates the heads of the layer ``due`` last answered True for on this thread (or of ``layer=``)."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self._calls: dict[Any, int] = {}
        self._checks: dict[Any, int] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._draws: dict[torch.device, int] = {}
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # a copied or saved model starts its own counts and rows
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])

    def due(self, layer: Any, device: torch.device | str | None = None) -> bool:
        """Count a served call of ``layer``; whether this one is checked. Never while a CUDA graph is
        being captured (the verdict needs a host sync)."""
        if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        n = self._calls.get(layer, 0)
        self._calls[layer] = n + 1
        due = n % self.config.every == 0
        if due:
            self._local.layer = layer
        return due

    def generator(self, device: torch.device | str) -> torch.Generator:
        """A CPU generator seeded with ``config.seed`` for ``device`` (``check`` itself draws its rows
        from a counter: ``rows_key(config.seed, n)`` for the n-th check on the device)."""
        device = _device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator().manual_seed(self.config.seed)
        return self._generators[device]

    def check(self, query: Tensor, key: Tensor, value: Tensor, out: Tensor, *, causal: bool, scale: float,
              kv_valid: Tensor | None = None, layer: Any = None) -> GuardVerdict:
        if layer is None:
            layer = getattr(self._local, "layer", None)
        self._local.layer = None
        call = self._checks.get(layer, 0)
        self._checks[layer] = call + 1
        device = _device(query.device)
        draw = self._draws.get(device, 0)
        self._draws[device] = draw + 1
        return check(self.config, query, key, value, out, causal=causal, scale=scale, kv_valid=kv_valid,
                     rows_key=rows_key(self.config.seed, draw), call=call)


# ----------------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------------
def check(config: GuardConfig, query: Tensor, key: Tensor, value: Tensor, out: Tensor, *, causal: bool,
          scale: float, kv_valid: Tensor | None = None, generator: torch.Generator | None = None,
          impl: str = "auto", call: int = 0, rows_key: int | None = None) -> GuardVerdict:
    """Compare ``out`` with exact attention on ``config.rows`` sampled query rows per batch element.

    query [B, Hq, Sq, D]; key, value [B, Hkv, Sk, D / Dv], Hq % Hkv == 0 (query head h reads KV head
    h // (Hq // Hkv)); out [B, Hq, Sq, Dv], any strides, rows in the same (model) order as query.
    causal: query i sees keys j <= i + (Sk - Sq). kv_valid: optional bool [B or 1, Sk], True = a real
    key. generator: where the rows come from (a CPU generator: drawn on the host, uploaded
    asynchronously; one on query's device: drawn there); None: the guard's own CPU generator for
    (``config.seed``, device), kept for the process (fresh rows on every call, the same sequence in
    every run; torch's global RNG is never drawn from).
    call: the index of this checked call in its layer's sequence (``config.heads``: which KV heads,
    ``kv_heads_for(call, Hkv, config.heads)``). impl: ``"auto"`` (Triton on CUDA, PyTorch elsewhere),
    ``"torch"`` or ``"triton"``. rows_key: draw the rows from this key instead of a generator
    (``hashed_rows``: the Triton path computes them inside its kernels, no host work nor upload).
    """
    b, hq, sq, d = query.shape
    hkv = key.shape[1]
    _check_shapes(query, key, value, out, kv_valid)
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"guard: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if b == 0 or hq == 0 or sq == 0:
        return GuardVerdict(0.0, (), config.tol, 0)
    first, count = _head_window(call, hkv, config.heads)
    group = hq // hkv
    checked = tuple(((first + j) % hkv) * group + g for j in range(count) for g in range(group))
    if rows_key is not None and key.shape[2] > 0 and _resolve_impl(impl, query, key, value) == "triton":
        if kv_valid is not None:
            kv_valid = kv_valid.to(device=query.device, dtype=torch.bool).expand(b, key.shape[2])
        # rows hashed inside the kernels; launch metadata and buffers cached per shape
        part, sums_buf = _compare_triton(query, key, value, out, None, causal, scale, kv_valid, first, count,
                                         hashed=(min(config.rows, sq), rows_key), reuse=True)
        sums = torch.sum(part, dim=(0, 2), out=sums_buf).tolist()  # the one sync
    else:
        if rows_key is not None:
            pos = hashed_rows(b, sq, config.rows, rows_key, query.device)
        else:
            pos = sample_rows(b, sq, config.rows, query.device,
                              generator if generator is not None else _default_generator(config.seed, query.device))
        part = compare_rows(query, key, value, out, pos, causal=causal, scale=scale, kv_valid=kv_valid,
                            kv_heads=(first, count), impl=impl)
        # [len(checked), 3]: |diff|^2, |exact|^2, rows with a key; summed on the device, then the one sync
        sums = part.sum(dim=(0, 2)).tolist()
    errors = [math.sqrt(num) / max(math.sqrt(den), _TINY) if num == num else math.nan for num, den, _ in sums]
    counted = int(max((n for _, _, n in sums), default=0))
    bad = tuple(sorted(h for h, e in zip(checked, errors) if not e <= config.tol))  # NaN fails
    worst = math.nan if any(math.isnan(e) for e in errors) else max(errors, default=0.0)
    order = sorted(range(len(checked)), key=checked.__getitem__)
    return GuardVerdict(worst, bad, config.tol, counted, tuple(checked[i] for i in order),
                        tuple(errors[i] for i in order))


def sample_rows(b: int, sq: int, rows: int, device: torch.device | str,
                generator: torch.Generator | None = None) -> Tensor:
    """long [B, R] on ``device``: per batch element one position drawn uniformly from each of
    ``rows`` equal strata of ``range(sq)`` (sorted, distinct); every position when ``rows >= sq``.
    Drawn on the generator's device; a CPU draw for a CUDA device goes up in one asynchronous copy."""
    device = torch.device(device)
    where = generator.device if generator is not None else torch.device("cpu")
    if rows >= sq:
        return torch.arange(sq, device=device).expand(b, sq)
    edges = torch.arange(rows + 1, device=where) * sq // rows  # stratum r: [edges[r], edges[r + 1])
    lo, width = edges[:-1], edges[1:] - edges[:-1]  # width >= 1 (sq > rows)
    u = torch.rand((b, rows), device=where, generator=generator, dtype=torch.float64)
    pos = lo + torch.minimum((u * width).long(), width - 1)
    if pos.device == device or (device.type == "cpu" and pos.device.type == "cpu"):
        return pos
    if pos.device.type == "cpu" and device.type == "cuda":
        return pos.pin_memory().to(device, non_blocking=True)
    return pos.to(device)


_M32 = 0xFFFFFFFF
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B9, 0x7FEB352D, 0x846CA68B


def _mix32(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * _MIX1) & _M32
    x ^= x >> 15
    x = (x * _MIX2) & _M32
    return x ^ (x >> 16)


def rows_key(seed: int, draw: int) -> int:
    """The 31-bit key of the ``draw``-th row draw (0, 1, ...) under ``seed`` (pure Python, no device)."""
    return _mix32(_mix32(_mix32(seed) ^ (seed >> 32)) ^ _mix32(draw) ^ (draw >> 32)) & 0x7FFFFFFF


def hashed_rows(b: int, sq: int, rows: int, key: int, device: torch.device | str = "cpu") -> Tensor:
    """long [B, min(R, Sq)]: stratified rows drawn from ``key`` by a hash (what the Triton kernels
    compute in place): stratum r = [r*Sq//R, (r+1)*Sq//R), its row ``lo + h(key, b*R + r) % width``
    (``h``: a 32-bit integer mixer): one row per stratum, so sorted and distinct; every row when
    ``rows >= sq``; a function of the key only."""
    rows = min(rows, sq)
    r = torch.arange(rows, device=device)
    idx = (torch.arange(b, device=device)[:, None] * rows + r).long()
    x = (idx * _GOLDEN + key) & _M32
    x = x ^ (x >> 16)
    x = (x * _MIX1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX2) & _M32
    x = x ^ (x >> 16)
    lo = r * sq // rows
    width = (r + 1) * sq // rows - lo
    return lo + x % width


_GENERATORS: dict[tuple[int, torch.device], torch.Generator] = {}


def _device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _default_generator(seed: int, device: torch.device) -> torch.Generator:
    key = (seed, _device(device))
    if key not in _GENERATORS:
        _GENERATORS[key] = torch.Generator().manual_seed(seed)
    return _GENERATORS[key]


def _check_shapes(query: Tensor, key: Tensor, value: Tensor, out: Tensor, kv_valid: Tensor | None) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"guard: query, key, value must be [B, H, S, D], got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    b, hq, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    if key.shape[0] != b or key.shape[3] != d or tuple(value.shape[:3]) != tuple(key.shape[:3]):
        raise ValueError(f"guard: key {tuple(key.shape)} / value {tuple(value.shape)} do not fit query {tuple(query.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"guard: query heads ({hq}) must be a multiple of key heads ({hkv})")
    if tuple(out.shape) != (b, hq, sq, value.shape[3]):
        raise ValueError(f"guard: out is {tuple(out.shape)}, expected {(b, hq, sq, value.shape[3])}")
    if kv_valid is not None and (kv_valid.dim() != 2 or kv_valid.shape[0] not in (1, b) or kv_valid.shape[1] != sk):
        raise ValueError(f"guard: kv_valid is {tuple(kv_valid.shape)}, expected [{b} or 1, {sk}]")


def _resolve_impl(impl: str, query: Tensor, key: Tensor, value: Tensor) -> str:
    if impl == "auto":
        return "triton" if _triton_serves(query, key, value) else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"guard: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    return impl


def compare_rows(query: Tensor, key: Tensor, value: Tensor, out: Tensor, pos: Tensor, *, causal: bool,
                 scale: float, kv_valid: Tensor | None = None, kv_heads: tuple[int, int] | None = None,
                 impl: str = "auto") -> Tensor:
    """The device half of ``check`` (no sync): float32 [B, C, R, 3], per batch element, compared
    query head and sampled row ``pos`` (long [B, R]): ``|out - exact|^2``, ``|exact|^2`` and 1 where
    the row has an allowed key (all three 0 where it has none). ``kv_heads``: ``(first, count)``,
    the KV heads ``first ... first + count - 1`` (mod Hkv) (None: all); the compared query heads are
    theirs, KV head by KV head (C = count * Hq / Hkv)."""
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[-1]
    first, count = kv_heads if kv_heads is not None else (0, hkv)
    impl = _resolve_impl(impl, query, key, value)
    if kv_valid is not None:
        kv_valid = kv_valid.to(device=query.device, dtype=torch.bool).expand(b, sk)
    if impl == "triton" and sk > 0:
        return _compare_triton(query, key, value, out, pos, causal, scale, kv_valid, first, count)
    group = hq // hkv
    rows = pos.shape[1]
    exact, has_key = _exact_torch_heads(query, key, value, pos, causal, scale, kv_valid, first, count)
    got = out.gather(2, pos[:, None, :, None].expand(b, hq, rows, dv))
    if (first, count) != (0, hkv):
        got = got.index_select(1, _query_heads(first, count, hkv, group, query.device))
    got = got.float()
    keep = has_key[..., None]  # [B, C, R, 1]
    diff = torch.where(keep, got - exact, 0.0)  # excluded rows: 0 whatever out holds there (0, NaN)
    ref = torch.where(keep, exact, 0.0)
    return torch.stack([diff.square().sum(-1), ref.square().sum(-1), has_key.float()], dim=-1)


def _query_heads(first: int, count: int, hkv: int, group: int, device: torch.device) -> Tensor:
    """long [count * G]: the query heads of KV heads ``first ... first + count - 1`` (mod Hkv), built on
    the device (no upload)."""
    kv = (torch.arange(count, device=device) + first) % hkv
    return (kv[:, None] * group + torch.arange(group, device=device)).flatten()


def _exact_torch_heads(query: Tensor, key: Tensor, value: Tensor, pos: Tensor, causal: bool, scale: float,
                       kv_valid: Tensor | None, first: int, count: int) -> tuple[Tensor, Tensor]:
    """Exact rows of the query heads of KV heads ``first ... first + count - 1`` (mod Hkv):
    float32 [B, C, R, Dv] and whether each row has an allowed key, bool [B, C, R]."""
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[-1]
    group = hq // hkv
    rows = pos.shape[1]
    if (first, count) != (0, hkv):
        kv = (torch.arange(count, device=query.device) + first) % hkv
        qh = _query_heads(first, count, hkv, group, query.device)
        query, key, value = query.index_select(1, qh), key.index_select(1, kv), value.index_select(1, kv)
    qs = query.gather(2, pos[:, None, :, None].expand(b, count * group, rows, d))
    qs = qs.view(b, count, group, rows, d).transpose(2, 3).reshape(b, count, rows * group, d)
    pos_m = pos.repeat_interleave(group, dim=1)  # [B, M]: each row's position (m = r * G + g)
    shift = sk - sq if causal else 0
    if sk == 0:
        res = qs.new_zeros((b, count, rows * group, dv), dtype=torch.float32)
        den = qs.new_zeros((b, count, rows * group, 1), dtype=torch.float32)
    else:
        res, den = _exact_torch(qs, pos_m, key, value, causal, scale, kv_valid, shift)
    res = res.view(b, count, rows, group, dv).transpose(2, 3).reshape(b, count * group, rows, dv)
    has_key = (den > 0).view(b, count, rows, group).transpose(2, 3).reshape(b, count * group, rows)
    return res, has_key


def exact_rows(query: Tensor, key: Tensor, value: Tensor, pos: Tensor, *, causal: bool, scale: float,
               kv_valid: Tensor | None = None, impl: str = "auto") -> Tensor:
    """Exact attention of the query rows ``pos`` (long [B, R]) of every head: float32 [B, Hq, R, Dv].

    Softmax over the allowed keys (causal: j <= pos + Sk - Sq; kv_valid [B, Sk] bool), float32
    accumulation; a row without an allowed key gives 0 (as the kernel)."""
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[-1]
    impl = _resolve_impl(impl, query, key, value)
    if kv_valid is not None:
        kv_valid = kv_valid.to(device=query.device, dtype=torch.bool).expand(b, sk)
    if impl == "triton" and sk > 0:
        group, rows = hq // hkv, pos.shape[1]
        acc, mx, den, _ = _split_pass(query, key, value, pos, causal, scale, kv_valid, 0, hkv, filled=True)
        top = mx.amax(dim=0)
        top = torch.where(torch.isfinite(top), top, 0.0)
        weight = torch.exp2(mx - top)  # [NS, B, Hkv, M]; an empty split weighs 0
        total = (den * weight).sum(dim=0)
        res = torch.einsum("sbhm,sbhmd->bhmd", weight, acc) / torch.where(total > 0, total, 1.0)[..., None]
        return res.view(b, hkv, rows, group, dv).transpose(2, 3).reshape(b, hq, rows, dv)
    return _exact_torch_heads(query, key, value, pos, causal, scale, kv_valid, 0, hkv)[0]


def _exact_torch(qs: Tensor, pos_m: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float,
                 kv_valid: Tensor | None, shift: int) -> tuple[Tensor, Tensor]:
    """Key chunks with an online softmax, float32 (any device): the rows and their softmax sums
    (0: no allowed key)."""
    b, hkv, m_rows, d = qs.shape
    sk, dv = key.shape[2], value.shape[-1]
    q = qs.float() * scale
    mx = torch.full((b, hkv, m_rows, 1), -math.inf, device=qs.device)
    den = torch.zeros((b, hkv, m_rows, 1), device=qs.device)
    acc = torch.zeros((b, hkv, m_rows, dv), device=qs.device)
    hi = sk
    if causal and qs.device.type == "cpu":  # no keys past the last sampled row's (free to ask on the CPU)
        hi = max(0, min(sk, int(pos_m.max()) + shift + 1))
    per_key = 4 * (b * hkv * (3 * m_rows + d + dv))
    chunk = max(1, _TORCH_CHUNK_BYTES // per_key)
    for s0 in range(0, hi, chunk):
        s1 = min(s0 + chunk, hi)
        s = torch.matmul(q, key[:, :, s0:s1].float().transpose(-1, -2))  # [B, Hkv, M, L]
        keep = None
        if causal:
            keep = torch.arange(s0, s1, device=qs.device) <= (pos_m + shift)[:, None, :, None]
        if kv_valid is not None:
            valid = kv_valid[:, None, None, s0:s1]
            keep = valid if keep is None else keep & valid
        if keep is not None:
            s.masked_fill_(~keep, -math.inf)
        new = torch.maximum(mx, s.amax(dim=-1, keepdim=True))
        use = torch.where(torch.isfinite(new), new, 0.0)
        s.sub_(use).exp_()
        alpha = torch.exp(mx - use)
        den = den * alpha + s.sum(dim=-1, keepdim=True)
        acc = acc.mul_(alpha).add_(torch.matmul(s, value[:, :, s0:s1].float()))
        mx = new
    return acc / torch.where(den > 0, den, 1.0), den


# ----------------------------------------------------------------------------------------------------
# Triton path (CUDA; CPU under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------------
class LaunchConfig(NamedTuple):
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2  # key splits: enough programs for this many per SM ...
    min_split: int = 2048  # ... but no split shorter than this many keys (each writes M x Dv partials)


# Benchmarks may set this to time other launch configs (None: the default below).
CONFIG_OVERRIDE: LaunchConfig | None = None


def _launch_config(d: int, dv: int, rows: int) -> LaunchConfig:
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    # H200, bf16, d128, B=1, S=32K (benchmarks/guard.py --sweep, 2026-12-04): BLOCK_N 64, 4 warps, 2
    # stages, 2 programs per SM, splits >= 2048 keys was within ~10 % of the fastest of 72 configs on
    # both shapes (12 heads; 32 q / 8 kv heads causal), about 2x faster than 4 programs per SM and
    # splits >= 1024 (a partial second wave of programs).
    block_m = min(64, max(16, _next_pow2(rows)))
    if max(d, dv) > 128:
        return LaunchConfig(block_m, 32, 4, 2)
    return LaunchConfig(block_m, 64, 4, 2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_serves(query: Tensor, key: Tensor, value: Tensor) -> bool:
    if not (query.is_cuda or (query.device.type == "cpu" and _interpreting())):
        return False
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (query.dtype == key.dtype == value.dtype):
        return False
    if max(query.shape[-1], value.shape[-1]) > 256:
        return False
    return _triton_kernels() is not None


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(cfg: LaunchConfig, device: torch.device, base: int, sk: int) -> tuple[int, int]:
    """(number of key splits, keys per split): at least ``programs_per_sm`` programs per SM over the
    ``base`` (row tile, batch, KV head) programs, splits of at least ``min_split`` keys, whole tiles."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    target = cfg.programs_per_sm * _num_sms(torch.device(device.type, index))
    n_splits = max(1, min(-(-target // base), sk // max(cfg.min_split, cfg.block_n)))
    split = -(-sk // n_splits)
    split = -(-split // cfg.block_n) * cfg.block_n  # whole key tiles per split
    return -(-sk // split), split


_PLANS: dict[tuple, dict[str, Any]] = {}  # per (shape, dtypes, device, stream): launch metadata + buffers
_MAX_PLANS = 32


def _plan(query: Tensor, key: Tensor, value: Tensor, rows: int, causal: bool, count: int) -> dict[str, Any]:
    """The launch metadata and the scratch buffers (reused call after call on the same stream) of one
    (shape, dtype, device, stream)."""
    device = query.device
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[-1]
    ident = (device, stream, b, hq, hkv, sq, sk, d, dv, rows, causal, count, query.dtype, CONFIG_OVERRIDE)
    plan = _PLANS.get(ident)
    if plan is not None:
        return plan
    group = hq // hkv
    m_rows = rows * group
    cfg = _launch_config(d, dv, m_rows)
    n_mtiles = -(-m_rows // cfg.block_m)
    n_splits, split = _splits(cfg, device, n_mtiles * b * count, sk)
    block_dv = max(16, _next_pow2(dv))
    chunk = min(32, _next_pow2(n_splits))
    f32 = dict(dtype=torch.float32, device=device)
    plan = dict(cfg=cfg, n_mtiles=n_mtiles, n_splits=n_splits, split=split, block_d=max(16, _next_pow2(d)),
                block_dv=block_dv, chunk=chunk, compare_warps=4 if block_dv * chunk >= 2048 else 2,
                acc=torch.empty((n_splits, b, count, m_rows, dv), **f32),
                mx=torch.empty((n_splits, b, count, m_rows), **f32),
                den=torch.empty((n_splits, b, count, m_rows), **f32),
                part=torch.empty((b, count * group, rows, 3), **f32),
                sums=torch.empty((count * group, 3), **f32))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[ident] = plan
    return plan


def _split_pass(query: Tensor, key: Tensor, value: Tensor, pos: Tensor | None, causal: bool, scale: float,
                kv_valid: Tensor | None, first: int, count: int, filled: bool = False,
                hashed: tuple[int, int] | None = None, plan: dict[str, Any] | None = None):
    """The split-KV launch over the query heads of KV heads ``first ... first + count - 1`` (mod
    Hkv): unnormalised outputs, maxima (log2 units) and sums per split, batch, KV head and row
    ``m = r * G + g`` ([NS, B, count, M, Dv], [NS, B, count, M] twice), and (n_splits, split).
    A causal split past all keys of a row tile is not written: left as allocated unless ``filled``
    (then: max -inf, sum 0, output 0, as an empty split). Rows: ``pos`` (long [B, R]), or
    ``hashed = (R, key)``: ``hashed_rows(B, Sq, R, key)`` computed in the kernel. ``plan``: cached
    metadata and buffers (``_plan``) to write into."""
    split_kernel, _ = _triton_kernels()
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[-1]
    group = hq // hkv
    rows, row_key = hashed if hashed is not None else (pos.shape[1], 0)
    m_rows = rows * group
    if plan is not None:
        cfg, n_mtiles, n_splits, split = plan["cfg"], plan["n_mtiles"], plan["n_splits"], plan["split"]
        acc, mx, den = plan["acc"], plan["mx"], plan["den"]
        block_d, block_dv = plan["block_d"], plan["block_dv"]
    else:
        cfg = _launch_config(d, dv, m_rows)
        n_mtiles = -(-m_rows // cfg.block_m)
        device = query.device
        n_splits, split = _splits(cfg, device, n_mtiles * b * count, sk)
        if filled and causal:
            acc = torch.zeros((n_splits, b, count, m_rows, dv), dtype=torch.float32, device=device)
            mx = torch.full((n_splits, b, count, m_rows), -math.inf, dtype=torch.float32, device=device)
            den = torch.zeros_like(mx)
        else:
            acc = torch.empty((n_splits, b, count, m_rows, dv), dtype=torch.float32, device=device)
            mx = torch.empty((n_splits, b, count, m_rows), dtype=torch.float32, device=device)
            den = torch.empty_like(mx)
        block_d, block_dv = max(16, _next_pow2(d)), max(16, _next_pow2(dv))
    if pos is None:
        pos_arg, spb, spr = mx, 0, 0  # never read
    else:
        pos_arg, spb, spr = pos, pos.stride(0), pos.stride(1)
    if kv_valid is not None:
        valid = kv_valid.view(torch.uint8) if kv_valid.dtype == torch.bool else kv_valid.to(torch.uint8)
        valid_arg, svb, svn = valid, valid.stride(0), valid.stride(1)
    else:
        valid_arg, svb, svn = pos_arg, 0, 0  # never read
    shift = sk - sq if causal else 0
    split_kernel[(n_mtiles, n_splits, b * count)](
        query, pos_arg, key, value, valid_arg, acc, mx, den,
        query.stride(0), query.stride(1), query.stride(2), query.stride(3), spb, spr,
        key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        value.stride(0), value.stride(1), value.stride(2), value.stride(3), svb, svn,
        acc.stride(0), acc.stride(1), acc.stride(2), acc.stride(3), mx.stride(0), mx.stride(1), mx.stride(2),
        hkv, count, first, group, m_rows, sk, d, dv, shift, split, float(scale) * _LOG2E, rows, sq, row_key,
        CAUSAL=causal, HAS_VALID=kv_valid is not None, HASHED=hashed is not None, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, IEEE=query.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return acc, mx, den, (n_splits, split)


def _compare_triton(query: Tensor, key: Tensor, value: Tensor, out: Tensor, pos: Tensor | None, causal: bool,
                    scale: float, kv_valid: Tensor | None, first: int, count: int,
                    hashed: tuple[int, int] | None = None, reuse: bool = False):
    """The two launches. ``reuse``: the cached plan's buffers (its ``part``, overwritten by the next
    call of the shape, is returned with the plan's [C, 3] sums buffer), else a fresh ``part``."""
    _, compare_kernel = _triton_kernels()
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[-1]
    group = hq // hkv
    rows, row_key = hashed if hashed is not None else (pos.shape[1], 0)
    plan = _plan(query, key, value, rows, causal, count)
    acc, mx, den, (n_splits, split) = _split_pass(query, key, value, pos, causal, scale, kv_valid, first, count,
                                                  hashed=hashed, plan=plan)
    part = plan["part"] if reuse else torch.empty((b, count * group, rows, 3), dtype=torch.float32,
                                                  device=query.device)
    if pos is None:
        pos_arg, spb, spr = mx, 0, 0
    else:
        pos_arg, spb, spr = pos, pos.stride(0), pos.stride(1)
    compare_kernel[(rows, b * count * group)](
        pos_arg, acc, mx, den, out, part,
        spb, spr, acc.stride(0), acc.stride(1), acc.stride(2), acc.stride(3),
        mx.stride(0), mx.stride(1), mx.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), part.stride(0), part.stride(1), part.stride(2),
        hkv, count, first, group, dv, n_splits, sk - sq if causal else 0, split, rows, sq, row_key,
        CAUSAL=causal, HASHED=hashed is not None, CHUNK=plan["chunk"], BLOCK_DV=plan["block_dv"],
        num_warps=plan["compare_warps"],
    )
    return (part, plan["sums"]) if reuse else part


tl = None  # triton.language, bound by _triton_kernels (the kernels' globals, as _hashed_pos)
_hashed_pos = None
triton = None


@functools.cache
def _triton_kernels():
    """(split-KV kernel, merge-and-compare kernel), compiled (or interpreted) on first use; None
    without Triton."""
    global tl, triton, _hashed_pos
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _hashed_pos(bi, r, R, Sq, key):
        """hashed_rows' row of batch element bi, stratum r (uint32 arithmetic, as the PyTorch reference)."""
        x = (bi * R + r).to(tl.uint32) * 0x9E3779B9 + key.to(tl.uint32)
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        x = x ^ (x >> 16)
        lo = (r.to(tl.int64) * Sq) // R
        width = ((r + 1).to(tl.int64) * Sq) // R - lo
        return lo + x.to(tl.int64) % width

    @triton.jit(do_not_specialize=["head0", "key"])
    def _guard_rows(Q, Pos, K, V, Valid, Acc, Mx, Den,
                    sqb, sqh, sqm, sqd, spb, spr,
                    skb, skh, skn, skd, svb_, svh, svn_, svd, svalb, svaln,
                    sas, sab, sah, sam, sms, smb, smh,
                    HKV, NSEL, head0, G, M, Sk, D, DV, shift, split, qk_scale, R, Sq, key,
                    CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, HASHED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
        """One row tile (rows m = r * G + g of KV head (head0 + j) % HKV: query head kvh * G + g at
        position Pos[b, r], read straight from Q) over one key split: running max (log2 units),
        sum and unnormalised output of its rows."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_bh = tl.program_id(2)
        bi = (pid_bh // NSEL).to(tl.int64)
        j = pid_bh % NSEL
        kvh = ((head0 + j) % HKV).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < M
        if HASHED:
            qpos = tl.where(row_ok, _hashed_pos(bi, offs_m // G, R, Sq, key), -1)
        else:
            qpos = tl.load(Pos + bi * spb + (offs_m // G) * spr, mask=row_ok, other=-1)
        qhead = kvh * G + offs_m % G
        q = tl.load(Q + bi * sqb + qhead[:, None] * sqh + qpos[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        lo = pid_s * split
        end = tl.minimum(lo + split, Sk)
        if CAUSAL:  # no key past the tile's last row's last key
            end = tl.minimum(end, tl.max(qpos, axis=0) + shift + 1)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        k_base = K + bi * skb + kvh * skh
        v_base = V + bi * svb_ + kvh * svh
        for start in range(lo, end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                         mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_N]
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale
            keep = n_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= qpos[:, None] + shift)
            if HAS_VALID:
                ok = tl.load(Valid + bi * svalb + offs_n * svaln, mask=n_ok, other=0)
                keep = keep & (ok != 0)[None, :]
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * svn_ + offs_dv[None, :] * svd,
                        mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        # A causal split past all of the tile's keys writes nothing: the merge never reads it.
        wrote = row_ok & ((tl.zeros([BLOCK_M], tl.int32) + lo) < end)
        part = pid_s * sms + bi * smb + j * smh + offs_m
        tl.store(Mx + part, m_i, mask=wrote)
        tl.store(Den + part, l_i, mask=wrote)
        tl.store(Acc + pid_s * sas + bi * sab + j * sah + offs_m[:, None] * sam + offs_dv[None, :], acc,
                 mask=wrote[:, None] & (offs_dv[None, :] < DV))

    @triton.jit(do_not_specialize=["head0", "key"])
    def _guard_compare(Pos, Acc, Mx, Den, Out, Part,
                       spb, spr, sas, sab, sah, sam, sms, smb, smh,
                       sob, soh, som, sod, sxb, sxh, sxr,
                       HKV, NSEL, head0, G, DV, NS, shift, split, R, Sq, key,
                       CAUSAL: tl.constexpr, HASHED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_DV: tl.constexpr):
        """One sampled row r of one compared query head: merge its key splits (all loaded at once,
        CHUNK at a time), normalise, compare with Out's row; store |diff|^2, |exact|^2, has-a-key."""
        r = tl.program_id(0)
        pid = tl.program_id(1)
        bi = (pid // (NSEL * G)).to(tl.int64)
        jg = pid % (NSEL * G)
        j = jg // G
        g = jg % G
        qhead = ((head0 + j) % HKV).to(tl.int64) * G + g
        m = r * G + g
        if HASHED:
            qpos = _hashed_pos(bi, r, R, Sq, key)
        else:
            qpos = tl.load(Pos + bi * spb + r * spr)
        n_need = NS
        if CAUSAL:  # splits holding at least one key the row may see (the others were never written)
            last = qpos + shift  # the row's last key; < 0: none
            n_need = tl.where(last >= 0, tl.minimum(NS, tl.maximum(last, 0) // split + 1), 0)
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < DV
        m_run = tl.max(tl.full([CHUNK], float("-inf"), tl.float32), axis=0)
        l_run = tl.sum(tl.zeros([CHUNK], tl.float32), axis=0)
        acc = tl.zeros([BLOCK_DV], tl.float32)
        for c0 in range(0, n_need, CHUNK):
            offs_s = c0 + tl.arange(0, CHUNK)
            need = offs_s < n_need
            base = offs_s * sms + bi * smb + j * smh + m
            mx_s = tl.load(Mx + base, mask=need, other=float("-inf"))
            l_s = tl.load(Den + base, mask=need, other=0.0)
            a_s = tl.load(Acc + offs_s[:, None] * sas + bi * sab + j * sah + m * sam + offs_dv[None, :],
                          mask=need[:, None] & dv_ok[None, :], other=0.0)  # [CHUNK, BLOCK_DV]
            m_new = tl.maximum(m_run, tl.max(mx_s, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            w = tl.exp2(mx_s - m_use)  # an empty split (max -inf) weighs 0
            alpha = tl.exp2(m_run - m_use)
            l_run = l_run * alpha + tl.sum(w * l_s, axis=0)
            acc = acc * alpha + tl.sum(w[:, None] * a_s, axis=0)
            m_run = m_new
        total = tl.zeros([BLOCK_DV], tl.float32) + l_run
        keep = dv_ok & (total > 0)  # a row without an allowed key: left out
        exact = acc / tl.where(total > 0, total, 1.0)
        got = tl.load(Out + bi * sob + qhead * soh + qpos * som + offs_dv * sod, mask=keep, other=0.0)
        diff = tl.where(keep, got.to(tl.float32) - exact, 0.0)
        ref = tl.where(keep, exact, 0.0)
        dst = Part + bi * sxb + jg * sxh + r * sxr
        tl.store(dst, tl.sum(diff * diff, axis=0))
        tl.store(dst + 1, tl.sum(ref * ref, axis=0))
        tl.store(dst + 2, tl.max(tl.where(total > 0, 1.0, 0.0), axis=0))

    return _guard_rows, _guard_compare
