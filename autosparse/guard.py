"""Run-time accuracy guard: compare a served sparse output with exact attention on a few query rows.

    autosparse.patch_model(model, profile, guard=GuardConfig(rows=64, tol=0.05))

Per checked call, ``rows`` query positions are drawn per batch element (on the device, from the
caller's generator); their exact attention is computed over every allowed key (causal rule and key
padding as the kernel applies them, float32 accumulation) and compared per query head with the
sparse output on the same rows: ``||out - exact|| / ||exact||`` over the head's sampled rows. A head
over ``tol`` fails the call (the runtime then recomputes it dense). Rows with no allowed key (the
kernel writes 0 there, SDPA NaN) are left out on both sides, so they are never flagged.

Cost: ``rows x S x D`` multiply-adds per head and one read of K and V, never an ``S x S`` temporary:
on CUDA one split-KV Triton launch (all sampled rows of a KV head's query heads in one tile; row
tiles of a key split side by side so they share K/V in L2) and a merge of the splits; elsewhere a
PyTorch loop over key chunks with an online softmax. One host sync, for the verdict.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["GuardConfig", "GuardVerdict", "Guard", "check", "exact_rows", "log_line"]

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

    rows: query rows sampled per checked call and batch element (all rows when the call has fewer).
    tol: the largest relative L2 error a head's sampled output rows may have against exact attention.
    every: check every n-th served call of a layer (1: every call; the first call is always checked).
    seed: seed of the generators the guard draws its rows from (one per device).
    """

    rows: int = 64
    tol: float = 0.05
    every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("rows", self.rows, 1)
        _check_int("every", self.every, 1)
        _check_int("seed", self.seed, 0)
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


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"GuardConfig.{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class GuardVerdict:
    """One checked call. ``error``: the worst head's relative error (NaN if an output row that has
    keys is not finite); ``heads``: the query heads over ``tol``; ``rows``: sampled rows compared
    (over the batch; rows without an allowed key are left out)."""

    error: float
    heads: tuple[int, ...]
    tol: float = math.nan
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.heads


def log_line(layer: str, verdict: GuardVerdict) -> str:
    """The log line of a checked call of ``layer``: the heads over tolerance and the error."""
    tol = f" (tol {verdict.tol:g})" if not math.isnan(verdict.tol) else ""
    where = f"guard: layer {layer}"
    if verdict.ok:
        return f"{where}: ok, worst head's relative error {verdict.error:.3g}{tol} on {verdict.rows} sampled rows"
    heads = ", ".join(map(str, verdict.heads))
    return (f"{where}: head{'s' if len(verdict.heads) > 1 else ''} {heads} over tolerance: worst relative error "
            f"{verdict.error:.3g}{tol} vs exact attention on {verdict.rows} sampled rows")


class Guard:
    """The guard of one patched model: its config, a call counter per layer (``every``) and one row
    generator per device (seeded with ``config.seed``; it never touches torch's global RNG)."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self._calls: dict[Any, int] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

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
        return n % self.config.every == 0

    def generator(self, device: torch.device | str) -> torch.Generator:
        device = _device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.config.seed)
        return self._generators[device]

    def check(self, query: Tensor, key: Tensor, value: Tensor, out: Tensor, *, causal: bool, scale: float,
              kv_valid: Tensor | None = None) -> GuardVerdict:
        return check(self.config, query, key, value, out, causal=causal, scale=scale, kv_valid=kv_valid,
                     generator=self.generator(query.device))


# ----------------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------------
def check(config: GuardConfig, query: Tensor, key: Tensor, value: Tensor, out: Tensor, *, causal: bool,
          scale: float, kv_valid: Tensor | None = None, generator: torch.Generator | None = None,
          impl: str = "auto") -> GuardVerdict:
    """Compare ``out`` with exact attention on ``config.rows`` sampled query rows per batch element.

    query [B, Hq, Sq, D]; key, value [B, Hkv, Sk, D / Dv], Hq % Hkv == 0 (query head h reads KV head
    h // (Hq // Hkv)); out [B, Hq, Sq, Dv], any strides, rows in the same (model) order as query.
    causal: query i sees keys j <= i + (Sk - Sq). kv_valid: optional bool [B or 1, Sk], True = a real
    key. generator: where the rows come from (on query's device); None: the guard's own generator
    for (``config.seed``, device), kept for the process (fresh rows on every call, the same sequence
    in every run; torch's global RNG is never drawn from).
    impl: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"torch"`` or ``"triton"``.
    """
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[-1]
    _check_shapes(query, key, value, out, kv_valid)
    if b == 0 or hq == 0 or sq == 0:
        return GuardVerdict(0.0, (), config.tol, 0)
    device = query.device
    if config.rows >= sq:
        pos = torch.arange(sq, device=device).expand(b, sq)
    else:
        if generator is None:
            generator = _default_generator(config.seed, device)
        pos = torch.randint(0, sq, (b, config.rows), device=device, generator=generator).sort(dim=1).values
    shift = sk - sq if causal else 0
    if kv_valid is not None:
        kv_valid = kv_valid.to(device=device, dtype=torch.bool).expand(b, sk)
    exact = exact_rows(query, key, value, pos, causal=causal, scale=scale, kv_valid=kv_valid, impl=impl)
    rows = pos.shape[1]
    got = out.gather(2, pos[:, None, :, None].expand(b, hq, rows, dv)).float()
    has_key = _rows_with_keys(pos, shift, sk, causal, kv_valid)[:, None, :, None]  # [B, 1, R, 1]
    diff = torch.where(has_key, got - exact, 0.0)  # excluded rows: 0 whatever out holds there (0, NaN)
    ref = torch.where(has_key, exact, 0.0)
    num = torch.linalg.vector_norm(diff, dim=(0, 2, 3))
    den = torch.linalg.vector_norm(ref, dim=(0, 2, 3)).clamp_min(_TINY)
    host = torch.cat([num / den, has_key.sum().reshape(1).to(num.dtype)]).tolist()  # the one sync
    errors, counted = host[:-1], int(host[-1])
    bad = tuple(h for h, e in enumerate(errors) if not e <= config.tol)  # NaN fails
    worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)
    return GuardVerdict(worst, bad, config.tol, counted)


_GENERATORS: dict[tuple[int, torch.device], torch.Generator] = {}


def _device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _default_generator(seed: int, device: torch.device) -> torch.Generator:
    key = (seed, _device(device))
    if key not in _GENERATORS:
        _GENERATORS[key] = torch.Generator(device).manual_seed(seed)
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


def _rows_with_keys(pos: Tensor, shift: int, sk: int, causal: bool, kv_valid: Tensor | None) -> Tensor:
    """bool [B, R]: whether the query at ``pos`` has at least one allowed key (the others are
    empty rows: the kernel writes 0 there)."""
    if sk == 0:
        return torch.zeros_like(pos, dtype=torch.bool)
    if not causal:
        ok = torch.ones_like(pos, dtype=torch.bool)
        return ok if kv_valid is None else ok & kv_valid.any(dim=1, keepdim=True)
    last = pos + shift  # the last key the row may see
    ok = last >= 0
    if kv_valid is not None:
        seen = kv_valid.cumsum(dim=1).gather(1, last.clamp(0, sk - 1))  # valid keys up to ``last``
        ok &= seen > 0
    return ok


def exact_rows(query: Tensor, key: Tensor, value: Tensor, pos: Tensor, *, causal: bool, scale: float,
               kv_valid: Tensor | None = None, impl: str = "auto") -> Tensor:
    """Exact attention of the query rows ``pos`` (long [B, R]) of every head: float32 [B, Hq, R, Dv].

    Softmax over the allowed keys (causal: j <= pos + Sk - Sq; kv_valid [B, Sk] bool), float32
    accumulation; a row without an allowed key gives 0 (as the kernel)."""
    b, hq, sq, d = query.shape
    hkv, sk, dv = key.shape[1], key.shape[2], value.shape[-1]
    group = hq // hkv
    rows = pos.shape[1]
    if impl == "auto":
        impl = "triton" if _triton_serves(query, key, value) else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"guard: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    # The sampled rows of the G query heads of a KV head, row-major: m = r * G + g (positions sorted, so
    # a row tile of a causal call spans few keys, and the heads of a group share each K/V tile).
    qs = query.gather(2, pos[:, None, :, None].expand(b, hq, rows, d))
    qs = qs.view(b, hkv, group, rows, d).transpose(2, 3).reshape(b, hkv, rows * group, d)
    pos_m = pos.repeat_interleave(group, dim=1)  # [B, M]: each row's position
    shift = sk - sq if causal else 0
    if sk == 0:
        res = qs.new_zeros((b, hkv, rows * group, dv), dtype=torch.float32)
    elif impl == "triton":
        res = _exact_triton(qs, pos_m, key, value, causal, scale, kv_valid, shift)
    else:
        res = _exact_torch(qs, pos_m, key, value, causal, scale, kv_valid, shift)
    return res.view(b, hkv, rows, group, dv).transpose(2, 3).reshape(b, hq, rows, dv)


def _exact_torch(qs: Tensor, pos_m: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float,
                 kv_valid: Tensor | None, shift: int) -> Tensor:
    """Key chunks with an online softmax, float32 (any device)."""
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
    return acc / torch.where(den > 0, den, 1.0)


# ----------------------------------------------------------------------------------------------------
# Triton path (CUDA; CPU under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------------
class LaunchConfig(NamedTuple):
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2  # key splits: enough programs for this many per SM


# Benchmarks may set this to time other launch configs (None: the default below).
CONFIG_OVERRIDE: LaunchConfig | None = None


def _launch_config(d: int, dv: int, rows: int) -> LaunchConfig:
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    block_m = min(64, max(16, _next_pow2(rows)))
    if max(d, dv) > 128:
        return LaunchConfig(block_m, 32, 4, 2)
    return LaunchConfig(block_m, 64, 4, 3)


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
    return _triton_kernel() is not None


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _exact_triton(qs: Tensor, pos_m: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float,
                  kv_valid: Tensor | None, shift: int) -> Tensor:
    kernel = _triton_kernel()
    b, hkv, m_rows, d = qs.shape
    sk, dv = key.shape[2], value.shape[-1]
    cfg = _launch_config(d, dv, m_rows)
    n_mtiles = -(-m_rows // cfg.block_m)
    device = qs.device
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    target = cfg.programs_per_sm * _num_sms(torch.device(device.type, index))
    base = n_mtiles * b * hkv
    n_splits = max(1, min(-(-target // base), -(-sk // (2 * cfg.block_n))))
    split = -(-sk // n_splits)
    split = -(-split // cfg.block_n) * cfg.block_n  # whole key tiles per split
    n_splits = -(-sk // split)
    acc = torch.empty((n_splits, b, hkv, m_rows, dv), dtype=torch.float32, device=device)
    mx = torch.empty((n_splits, b, hkv, m_rows), dtype=torch.float32, device=device)
    den = torch.empty_like(mx)
    pos32 = pos_m.to(torch.int32).contiguous()
    if kv_valid is not None:
        valid = kv_valid.to(torch.uint8)
        valid_arg, svb, svn = valid, valid.stride(0), valid.stride(1)
    else:
        valid_arg, svb, svn = pos32, 0, 0  # never read
    block_d, block_dv = max(16, _next_pow2(d)), max(16, _next_pow2(dv))
    grid = (n_mtiles, n_splits, b * hkv)
    kernel[grid](
        qs, pos32, key, value, valid_arg, acc, mx, den,
        qs.stride(0), qs.stride(1), qs.stride(2), qs.stride(3), pos32.stride(0),
        key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        value.stride(0), value.stride(1), value.stride(2), value.stride(3), svb, svn,
        acc.stride(0), acc.stride(1), acc.stride(2), acc.stride(3), mx.stride(0), mx.stride(1), mx.stride(2),
        hkv, m_rows, sk, d, dv, shift, split, float(scale) * _LOG2E,
        CAUSAL=causal, HAS_VALID=kv_valid is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=block_d, BLOCK_DV=block_dv, IEEE=qs.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # merge the key splits (maxima in log2 units)
    top = mx.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, 0.0)
    weight = torch.exp2(mx - top)  # [NS, B, Hkv, M]; an empty split weighs 0
    total = (den * weight).sum(dim=0)
    res = torch.einsum("sbhm,sbhmd->bhmd", weight, acc)
    return res / torch.where(total > 0, total, 1.0)[..., None]


tl = None  # triton.language, bound by _triton_kernel (the kernel's globals)
triton = None


@functools.cache
def _triton_kernel():
    """The split-KV kernel, compiled (or interpreted) on first use; None without Triton."""
    global tl, triton
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _guard_rows(Q, Pos, K, V, Valid, Acc, Mx, Den,
                    sqb, sqh, sqm, sqd, spb,
                    skb, skh, skn, skd, svb_, svh, svn_, svd, svalb, svaln,
                    sas, sab, sah, sam, sms, smb, smh,
                    HKV, M, Sk, D, DV, shift, split, qk_scale,
                    CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
        """One row tile of one (batch, KV head) over one key split: running max (log2 units), sum
        and unnormalised output of its rows."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_bh = tl.program_id(2)
        bi = pid_bh // HKV
        hi_ = pid_bh % HKV
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < M
        q = tl.load(Q + bi * sqb + hi_ * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        lo = pid_s * split
        end = tl.minimum(lo + split, Sk)
        qpos = tl.load(Pos + bi * spb + offs_m, mask=row_ok, other=-1)
        if CAUSAL:  # no key past the tile's last row's last key
            end = tl.minimum(end, tl.max(qpos, axis=0) + shift + 1)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        k_base = K + bi * skb + hi_ * skh
        v_base = V + bi * svb_ + hi_ * svh
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
        part = pid_s * sms + bi * smb + hi_ * smh + offs_m
        tl.store(Mx + part, m_i, mask=row_ok)
        tl.store(Den + part, l_i, mask=row_ok)
        tl.store(Acc + pid_s * sas + bi * sab + hi_ * sah + offs_m[:, None] * sam + offs_dv[None, :], acc,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV))

    return _guard_rows
