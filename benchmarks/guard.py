"""The run-time accuracy guard (``autosparse.guard``): its cost next to the sparse call, and its catch rate.

    PYTHONUNBUFFERED=1 python benchmarks/guard.py [--sweep]       # GPU: S = 32K and 64K, bf16, B = 1
    python benchmarks/guard.py --smoke                             # CPU, tiny shapes (PyTorch paths)
    TRITON_INTERPRET=1 python benchmarks/guard.py --smoke --lengths 1024 --calls 2   # + the Triton code

1. correctness: the guard's exact rows (Triton on CUDA) vs its PyTorch path and vs the same rows of
   F.scaled_dot_product_attention; the guard's verdict on SDPA's own output (must pass, error ~bf16).
2. cost, per shape (12 heads d128 non-causal; 32 q / 8 kv heads d128 causal) and S: the sparse op
   ``torch.ops.autosparse.block_sparse_attention`` called as ``runtime.serve`` calls it, on a
   sink + local layout (blocks 64 x 128, window ``--window-frac`` x S), alone and followed by
   ``guard.check`` (CUDA events, warm-up, median of ``--reps``); the check alone (with its host
   sync), its kernels alone (``gpu_ms``, no sync), the PyTorch path of the check, and default SDPA.
   Overhead = (sparse + check - sparse) / sparse (target <= 3 %); ``every`` = the smallest
   ``GuardConfig.every`` that brings the amortised overhead under 3 %; K/V GB/s = one read of K and V
   (the floor of any exact check) over the check's time.
3. catch rate (``--calls`` calls per setting, fresh structured inputs each): every query puts almost
   all its attention mass on one key (q = 3 k_target, |k|^2 = d). Too sparse: the targets of all
   rows of all heads, or of a band of 10 % / 2 % of one head's rows, are outside the layout (half a
   sequence away; causal: between the sinks and the window); exact enough: every target inside the
   window. Per setting: share of calls flagged, the true worst-head error over all rows (vs SDPA),
   the guard's estimate, and 1 - (1 - f)^rows (the chance a band of f of the rows is sampled).

Prints markdown tables; writes every number to $OUT/guard.json when $OUT is set (or ``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autosparse import guard  # noqa: E402
from autosparse.guard import Guard, GuardConfig, exact_rows  # noqa: E402
from autosparse.layout import BlockLayout  # noqa: E402
from autosparse.patterns import BlockGeometry, SinkLocal  # noqa: E402
from autosparse.timing import median_ms  # noqa: E402

BLOCKS = (64, 128)
SINKS = 128


def log(*a):
    print(*a, flush=True)


class Shape:
    def __init__(self, name, hq, hkv, d, causal):
        self.name, self.hq, self.hkv, self.d, self.causal = name, hq, hkv, d, causal

    @property
    def group(self) -> int:
        return self.hq // self.hkv


def layout_for(shape: Shape, s: int, window: int, device) -> BlockLayout:
    geometry = BlockGeometry(s, s, *BLOCKS, shape.causal)
    return BlockLayout.from_patterns([SinkLocal(SINKS, window)] * shape.hq, geometry, device)


def sparse_call(layout: BlockLayout, shape: Shape, q, k, v, scale):
    """The op exactly as runtime.serve calls it (model order: no q_rows)."""
    return torch.ops.autosparse.block_sparse_attention(
        q, k, v, layout.kv_indices, layout.kv_counts, None, layout.schedule(shape.group), *BLOCKS, shape.causal,
        scale, None, layout.columns, layout.column_counts, layout.listed)


def sdpa(shape: Shape, q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal, scale=scale, enable_gqa=shape.group > 1)


def random_qkv(shape: Shape, s: int, dtype, device, gen):
    q = torch.randn(1, shape.hq, s, shape.d, device=device, generator=gen).to(dtype)
    k = torch.randn(1, shape.hkv, s, shape.d, device=device, generator=gen).to(dtype)
    v = torch.randn(1, shape.hkv, s, shape.d, device=device, generator=gen).to(dtype)
    return q, k, v


def structured_qkv(shape: Shape, s: int, window: int, setting: str, dtype, device, gen, strength: float = 3.0):
    """Keys with |k|^2 = d, query i of head h = strength * key target[h, i] of its KV head. ``setting``:
    "near" (every target inside the sink + local layout), "far_all" (every row of every head out of
    it), "far_band_<pct>" (a random band of pct % of head 0's rows out of it, the rest near)."""
    hq, hkv, d = shape.hq, shape.hkv, shape.d
    k = torch.randn(1, hkv, s, d, device=device, generator=gen)
    k = (k * (d ** 0.5 / k.norm(dim=-1, keepdim=True))).to(dtype)
    v = torch.randn(1, hkv, s, d, device=device, generator=gen).to(dtype)
    i = torch.arange(s, device=device)
    if shape.causal:
        near = (i - window // 4).clamp(min=0)
        # between the sinks and the window's start (rows too early for that keep a near target)
        lo, hi = SINKS + BLOCKS[1], i - window - 2 * BLOCKS[1]
        u = torch.rand(s, device=device, generator=gen)
        far = torch.where(hi > lo, lo + (u * (hi - lo).clamp(min=1)).long(), near)
    else:
        near = (i + window // 4).clamp(max=s - 1)
        far = (i + s // 2) % s
        far = torch.where(far < SINKS + BLOCKS[1], (far + SINKS + BLOCKS[1]) % s, far)
    target = near.expand(hq, s).clone()
    if setting == "far_all":
        target[:] = far
    elif setting.startswith("far_band_"):  # placed among the rows that have a far target
        n = max(1, round(s * float(setting.removeprefix("far_band_")) / 100))
        first = int((far != near).int().argmax()) if shape.causal else 0
        start = first + int(torch.randint(0, max(1, s - n - first + 1), (1,), device=device, generator=gen))
        target[0, start:start + n] = far[start:start + n]
    elif setting != "near":
        raise ValueError(setting)
    idx = target.view(hkv, shape.group * s)[None, :, :, None].expand(1, hkv, shape.group * s, d)
    q = (strength * k.float().gather(2, idx)).view(1, hq, s, d).to(dtype)
    return q, k, v


def head_errors(out, ref) -> torch.Tensor:
    """Relative L2 error per head over all rows, float32 [H]."""
    diff = (out.float() - ref.float()).square().sum(dim=(0, 2, 3))
    return (diff / ref.float().square().sum(dim=(0, 2, 3)).clamp_min(1e-30)).sqrt()


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
def correctness(shapes, s, args, dtype, device, gen) -> list[dict]:
    rows = []
    for shape in shapes:
        q, k, v = random_qkv(shape, s, dtype, device, gen)
        scale = shape.d ** -0.5
        pos = torch.randint(0, s, (1, args.rows), device=device, generator=gen).sort(dim=1).values
        auto = exact_rows(q, k, v, pos, causal=shape.causal, scale=scale)
        torch_path = exact_rows(q, k, v, pos, causal=shape.causal, scale=scale, impl="torch")
        dense = sdpa(shape, q, k, v, scale)
        sdpa_rows = dense.gather(2, pos[:, None, :, None].expand(1, shape.hq, args.rows, shape.d))
        verdict = guard.check(GuardConfig(rows=args.rows, tol=args.tol), q, k, v, dense, causal=shape.causal,
                              scale=scale, generator=torch.Generator(device).manual_seed(1))
        row = dict(shape=shape.name, S=s, impl="triton" if guard._triton_serves(q, k, v) else "torch",
                   auto_vs_torch=rel(auto, torch_path), auto_vs_sdpa_rows=rel(auto, sdpa_rows),
                   check_on_sdpa_error=verdict.error, check_on_sdpa_ok=verdict.ok)
        rows.append(row)
        # bf16: the Triton path rounds P to bf16 for P @ V (as flash kernels do), ~1e-3 of the output
        row["passed"] = row["auto_vs_torch"] < 1e-2 and row["auto_vs_sdpa_rows"] < 2e-2 and verdict.ok
        log(f"correctness {shape.name} S={s}: {'ok' if row['passed'] else 'FAILED'}: guard path {row['impl']}: vs its "
            f"PyTorch path {row['auto_vs_torch']:.2e}, vs SDPA rows {row['auto_vs_sdpa_rows']:.2e}; "
            f"check(SDPA output): error {verdict.error:.2e}, ok={verdict.ok}")
    return rows


def timing(shapes, lengths, args, dtype, device, gen) -> list[dict]:
    rows = []
    cuda = device.type == "cuda"
    for shape, s in itertools.product(shapes, lengths):
        q, k, v = random_qkv(shape, s, dtype, device, gen)
        scale = shape.d ** -0.5
        window = max(BLOCKS[1], int(args.window_frac * s))
        layout = layout_for(shape, s, window, device)
        g = Guard(GuardConfig(rows=args.rows, tol=args.tol))
        out = sparse_call(layout, shape, q, k, v, scale)
        pos = torch.randint(0, s, (1, args.rows), device=device, generator=gen).sort(dim=1).values

        def sparse_only():
            sparse_call(layout, shape, q, k, v, scale)

        def sparse_and_check():
            o = sparse_call(layout, shape, q, k, v, scale)
            g.check(q, k, v, o, causal=shape.causal, scale=scale)

        def check_only():
            g.check(q, k, v, out, causal=shape.causal, scale=scale)

        def check_torch():
            guard.check(g.config, q, k, v, out, causal=shape.causal, scale=scale, generator=g.generator(device),
                        impl="torch")

        def dense():
            sdpa(shape, q, k, v, scale)

        reps, warm = args.reps, args.warmup
        t_sparse = median_ms(sparse_only, reps, device, warm)
        t_both = median_ms(sparse_and_check, reps, device, warm)
        t_check = median_ms(check_only, reps, device, warm)
        t_torch = median_ms(check_torch, max(3, reps // 4), device, 1)
        t_sdpa = median_ms(dense, max(3, reps // 2), device, 1)
        t_kernels = None
        if cuda:
            from autosparse.timing import gpu_ms

            t_kernels = gpu_ms(lambda: exact_rows(q, k, v, pos, causal=shape.causal, scale=scale))
        overhead = (t_both - t_sparse) / t_sparse
        kv_bytes = (k.numel() + v.numel()) * k.element_size()
        row = dict(shape=shape.name, S=s, density=layout.density(), window=window, sparse_ms=t_sparse,
                   sparse_check_ms=t_both, check_ms=t_check, check_kernels_ms=t_kernels, check_torch_ms=t_torch,
                   sdpa_ms=t_sdpa, overhead=overhead, check_over_sparse=t_check / t_sparse,
                   every_for_3pct=max(1, math.ceil(overhead / 0.03)), kv_gb_s=kv_bytes / (t_check * 1e-3) / 1e9,
                   kv_floor_ms_at_4_8_tb_s=kv_bytes / 4.8e12 * 1e3)
        rows.append(row)
        log(f"timing {shape.name} S={s}: sparse {t_sparse:.3f} ms (density {row['density']:.3f}), +check "
            f"{t_both:.3f} ms -> overhead {100 * overhead:.1f} %; check alone {t_check:.3f} ms"
            + (f" (kernels {t_kernels:.3f} ms)" if t_kernels is not None else "")
            + f", PyTorch path {t_torch:.3f} ms; SDPA {t_sdpa:.3f} ms")
        del q, k, v, out
    return rows


def catch_rates(shapes, s, args, dtype, device, gen) -> list[dict]:
    rows = []
    settings = ["far_all", "far_band_10", "far_band_2", "near"]
    for shape in shapes:
        scale = shape.d ** -0.5
        window = max(BLOCKS[1], int(args.window_frac * s))
        layout = layout_for(shape, s, window, device)
        for setting in settings:
            g = Guard(GuardConfig(rows=args.rows, tol=args.tol, seed=7))
            flagged, true_err, est_err, bad_heads_right = 0, [], [], 0
            begin = time.perf_counter()
            for _ in range(args.calls):
                q, k, v = structured_qkv(shape, s, window, setting, dtype, device, gen)
                out = sparse_call(layout, shape, q, k, v, scale)
                verdict = g.check(q, k, v, out, causal=shape.causal, scale=scale)
                errors = head_errors(out, sdpa(shape, q, k, v, scale))
                flagged += not verdict.ok
                true_err.append(float(errors.max()))
                est_err.append(verdict.error)
                truly_bad = tuple(int(h) for h in torch.nonzero(errors > args.tol).flatten())
                bad_heads_right += set(verdict.heads) <= set(truly_bad)
            frac = {"far_all": 1.0, "near": 0.0}.get(setting)
            frac = float(setting.removeprefix("far_band_")) / 100 if frac is None else frac
            row = dict(shape=shape.name, S=s, setting=setting, calls=args.calls, flagged=flagged / args.calls,
                       sampled_band_chance=1 - (1 - frac) ** args.rows if setting != "near" else 0.0,
                       true_worst_head_error_median=statistics.median(true_err),
                       true_worst_head_error_min=min(true_err), guard_error_median=statistics.median(est_err),
                       flagged_heads_truly_bad=bad_heads_right / args.calls, seconds=time.perf_counter() - begin)
            rows.append(row)
            log(f"catch {shape.name} S={s} {setting}: flagged {flagged}/{args.calls}, true worst-head error median "
                f"{row['true_worst_head_error_median']:.3f} (min {row['true_worst_head_error_min']:.3f}), guard "
                f"estimate median {row['guard_error_median']:.3f}")
    return rows


def sweep(shape: Shape, s: int, args, dtype, device, gen) -> list[dict]:
    from autosparse.timing import gpu_ms

    q, k, v = random_qkv(shape, s, dtype, device, gen)
    scale = shape.d ** -0.5
    pos = torch.randint(0, s, (1, args.rows), device=device, generator=gen).sort(dim=1).values
    ref = exact_rows(q, k, v, pos, causal=shape.causal, scale=scale, impl="torch")
    rows = []
    for block_n, warps, stages, per_sm in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), (1, 2, 4)):
        guard.CONFIG_OVERRIDE = guard.LaunchConfig(64, block_n, warps, stages, per_sm)
        try:
            got = exact_rows(q, k, v, pos, causal=shape.causal, scale=scale, impl="triton")
            ms = gpu_ms(lambda: exact_rows(q, k, v, pos, causal=shape.causal, scale=scale, impl="triton"))
            rows.append(dict(block_n=block_n, warps=warps, stages=stages, programs_per_sm=per_sm, ms=ms,
                             err=rel(got, ref)))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile (shared memory)
            rows.append(dict(block_n=block_n, warps=warps, stages=stages, programs_per_sm=per_sm, ms=None,
                             error=f"{type(exc).__name__}: {str(exc)[:200]}"))
        finally:
            guard.CONFIG_OVERRIDE = None
    rows.sort(key=lambda r: math.inf if r["ms"] is None else r["ms"])
    log(f"\nsweep {shape.name} S={s} (exact_rows kernels, gpu_ms; fastest first)")
    log("| BLOCK_N | warps | stages | programs/SM | ms | rel err vs PyTorch path |")
    log("|---|---|---|---|---|---|")
    for r in rows[:12]:
        if r["ms"] is not None:
            log(f"| {r['block_n']} | {r['warps']} | {r['stages']} | {r['programs_per_sm']} | {r['ms']:.4f} "
                f"| {r['err']:.1e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (exercises the code; numbers mean nothing)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--catch-length", type=int, default=None)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tol", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calls", type=int, default=None, help="calls per catch-rate setting")
    parser.add_argument("--window-frac", type=float, default=0.05)
    parser.add_argument("--sweep", action="store_true", help="also time Triton launch configs of the check")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [Shape("H4 d32", 4, 4, 32, False), Shape("GQA 8/2 d32 causal", 8, 2, 32, True)]
        lengths = args.lengths or [1024, 2048]
        args.reps = args.reps or 3
        args.calls = args.calls or 4
        args.warmup = min(args.warmup, 1)
        args.window_frac = max(args.window_frac, 0.1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [Shape("H12 d128", 12, 12, 128, False), Shape("GQA 32/8 d128 causal", 32, 8, 128, True)]
        lengths = args.lengths or [32768, 65536]
        args.reps = args.reps or 25
        args.calls = args.calls or 50
    catch_length = args.catch_length or lengths[0]
    gen = torch.Generator(device).manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    log(f"torch {torch.__version__}, triton {triton_version}, {name}, {dtype}, rows={args.rows}, tol={args.tol}, "
        f"layout sink_local(sinks={SINKS}, window={args.window_frac}*S), blocks {BLOCKS}")

    results = dict(device=name, torch=torch.__version__, triton=triton_version, dtype=str(dtype), rows=args.rows,
                   tol=args.tol, blocks=BLOCKS, sinks=SINKS, window_frac=args.window_frac, smoke=args.smoke)
    results["correctness"] = correctness(shapes, lengths[0], args, dtype, device, gen)
    results["timing"] = timing(shapes, lengths, args, dtype, device, gen)
    results["catch"] = catch_rates(shapes, catch_length, args, dtype, device, gen)
    if args.sweep and device.type == "cuda":
        results["sweep"] = sweep(shapes[1], lengths[-1], args, dtype, device, gen)

    log(f"\n### cost (B=1, {dtype}, rows={args.rows}; ms: CUDA events, median of {args.reps})")
    log("| shape | S | density | sparse ms | sparse + check ms | overhead | check ms | check kernels ms "
        "| K/V GB/s | check PyTorch path ms | SDPA ms | every for 3 % |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["timing"]:
        kern = f"{r['check_kernels_ms']:.3f}" if r["check_kernels_ms"] is not None else "–"
        log(f"| {r['shape']} | {r['S']} | {r['density']:.3f} | {r['sparse_ms']:.3f} | {r['sparse_check_ms']:.3f} "
            f"| {100 * r['overhead']:.1f} % | {r['check_ms']:.3f} | {kern} | {r['kv_gb_s']:.0f} "
            f"| {r['check_torch_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['every_for_3pct']} |")
    log(f"\n### catch rate (S={catch_length}, {args.calls} calls per setting, fresh structured inputs, tol={args.tol})")
    log("| shape | setting | flagged | P(a sampled row in the band) | true worst-head err (median / min) "
        "| guard estimate (median) | flagged heads truly bad |")
    log("|---|---|---|---|---|---|---|")
    for r in results["catch"]:
        log(f"| {r['shape']} | {r['setting']} | {100 * r['flagged']:.0f} % | {100 * r['sampled_band_chance']:.1f} % "
            f"| {r['true_worst_head_error_median']:.3f} / {r['true_worst_head_error_min']:.3f} "
            f"| {r['guard_error_median']:.3f} | {100 * r['flagged_heads_truly_bad']:.0f} % |")
    if args.out:
        path = Path(args.out) / "guard.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        log(f"\nwrote {path}")


if __name__ == "__main__":
    main()
