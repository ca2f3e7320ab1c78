"""The run-time accuracy guard (``autosparse.guard``): its cost next to the sparse call, and its catch rate.

    PYTHONUNBUFFERED=1 python benchmarks/guard.py [--sweep]       # GPU: S = 32K and 64K, bf16, B = 1
    python benchmarks/guard.py --smoke                             # CPU, tiny shapes (PyTorch paths)
    TRITON_INTERPRET=1 python benchmarks/guard.py --smoke --lengths 1024 --calls 2   # + the Triton code

1. correctness: the guard's exact rows (Triton on CUDA) vs its PyTorch path and vs the same rows of
   F.scaled_dot_product_attention; its per-row sums (merge + compare pass) vs the PyTorch path's; the
   guard's verdict on SDPA's own output (must pass, error ~bf16), on every head and on a head window.
2. cost, per shape (12 heads d128 non-causal; 32 q / 8 kv heads d128 causal) and S: the sparse op
   ``torch.ops.autosparse.block_sparse_attention`` called as ``runtime.serve`` calls it, on a
   sink + local layout (blocks 64 x 128, window ``--window-frac`` x S), alone and followed by the
   guard as ``serve`` runs it (``Guard.due`` + ``Guard.check``; CUDA events, warm-up, median of
   ``--reps``): with every head on every call, then with ``GuardConfig.heads = n`` for n = Hkv,
   Hkv/2, Hkv/3, ...; for each n the smallest ``every`` whose amortised overhead is <= 3 %, and "the
   3 % config": the (n, every) that checks every head within the fewest served calls (its overhead
   measured again over ``every`` served calls); where one check's host time goes. Also: the
   check alone (host work and its sync included), its device work alone (``gpu_ms``: split-KV pass
   + merge/compare pass, no sync) and the split-KV pass alone, the PyTorch path, default SDPA.
   Overhead = (sparse + check - sparse) / sparse (target <= 3 %); K/V GB/s = one read of the
   checked heads' K and V (the floor of any exact check) over the device work's time.
3. catch rate (``--calls`` calls per setting, fresh structured inputs each): every query puts almost
   all its attention mass on one key (q = 3 k_target, |k|^2 = d). Too sparse: the targets of all
   rows of all heads, of all rows of one head, or of a band of 10 % / 2 % of one head's rows, are
   outside the layout (half a sequence away; causal: between the sinks and the window); exact enough:
   every target inside the window. Every head checked: share of calls flagged, the true worst-head
   error over all rows (vs SDPA), the guard's estimate, 1 - (1 - f)^rows (a lower bound of the chance
   that the stratified rows hit a band of f of the rows). The 3 % config: ``--trials`` layers (a
   fresh Guard each, started at a random phase of its rotation) too sparse on one random head, served
   call after call (fresh inputs): after how many served calls it is first flagged (share flagged within ceil(Hkv / n) calls, median and max calls),
   and the false alarms on exact-enough calls.

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
from autosparse.guard import Guard, GuardConfig, compare_rows, exact_rows, sample_rows  # noqa: E402
from autosparse.layout import BlockLayout  # noqa: E402
from autosparse.patterns import BlockGeometry, SinkLocal  # noqa: E402
from autosparse.tools.timing import median_ms  # noqa: E402

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


def structured_qkv(shape: Shape, s: int, window: int, setting: str, dtype, device, gen, strength: float = 3.0,
                   bad_head: int = 0):
    """Keys with |k|^2 = d, query i of head h = strength * key target[h, i] of its KV head. ``setting``:
    "near" (every target inside the sink + local layout), "far_all" (every row of every head out of
    it), "far_head" (every row of query head ``bad_head`` out of it, the rest near), "far_band_<pct>"
    (a random band of pct % of head ``bad_head``'s rows out of it, the rest near)."""
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
    elif setting == "far_head":
        target[bad_head] = far
    elif setting.startswith("far_band_"):  # placed among the rows that have a far target
        n = max(1, round(s * float(setting.removeprefix("far_band_")) / 100))
        first = int((far != near).int().argmax()) if shape.causal else 0
        start = first + int(torch.randint(0, max(1, s - n - first + 1), (1,), device=device, generator=gen))
        target[bad_head, start:start + n] = far[start:start + n]
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


def head_options(hkv: int) -> list[int]:
    """GuardConfig.heads values to try, most heads first: Hkv, Hkv // 2, Hkv // 3, ..., 1."""
    return sorted({max(1, hkv // n) for n in range(1, hkv + 1)}, reverse=True)


# --------------------------------------------------------------------------------------------------
def correctness(shapes, s, args, dtype, device, gen) -> list[dict]:
    rows = []
    for shape in shapes:
        q, k, v = random_qkv(shape, s, dtype, device, gen)
        scale = shape.d ** -0.5
        pos = sample_rows(1, s, args.rows, device, torch.Generator().manual_seed(3))
        auto = exact_rows(q, k, v, pos, causal=shape.causal, scale=scale)
        torch_path = exact_rows(q, k, v, pos, causal=shape.causal, scale=scale, impl="torch")
        dense = sdpa(shape, q, k, v, scale)
        sdpa_rows = dense.gather(2, pos[:, None, :, None].expand(1, shape.hq, args.rows, shape.d))
        noisy = dense + 0.02 * torch.randn(dense.shape, device=device, generator=gen, dtype=dense.dtype)
        window = (shape.hkv - 1, min(2, shape.hkv))
        sums = compare_rows(q, k, v, noisy, pos, causal=shape.causal, scale=scale, kv_heads=window)
        sums_torch = compare_rows(q, k, v, noisy, pos, causal=shape.causal, scale=scale, kv_heads=window,
                                  impl="torch")
        verdict = guard.check(GuardConfig(rows=args.rows, tol=args.tol), q, k, v, dense, causal=shape.causal,
                              scale=scale, generator=torch.Generator(device).manual_seed(1))
        sampled = guard.check(GuardConfig(rows=args.rows, tol=args.tol, heads=2), q, k, v, dense, causal=shape.causal,
                              scale=scale, call=3)
        row = dict(shape=shape.name, S=s, impl="triton" if guard._triton_serves(q, k, v) else "torch",
                   auto_vs_torch=rel(auto, torch_path), auto_vs_sdpa_rows=rel(auto, sdpa_rows),
                   sums_vs_torch=rel(sums[..., :2], sums_torch[..., :2]),
                   rows_with_keys_equal=bool(torch.equal(sums[..., 2], sums_torch[..., 2])),
                   check_on_sdpa_error=verdict.error, check_on_sdpa_ok=verdict.ok,
                   sampled_check_heads=list(sampled.checked), sampled_check_ok=sampled.ok)
        rows.append(row)
        # bf16: the Triton path rounds P to bf16 for P @ V (as flash kernels do), ~1e-3 of the output
        row["passed"] = (row["auto_vs_torch"] < 1e-2 and row["auto_vs_sdpa_rows"] < 2e-2 and verdict.ok
                         and sampled.ok and row["sums_vs_torch"] < 2e-2 and row["rows_with_keys_equal"]
                         and len(sampled.checked) == 2 * shape.group)
        log(f"correctness {shape.name} S={s}: {'ok' if row['passed'] else 'FAILED'}: guard path {row['impl']}: vs its "
            f"PyTorch path {row['auto_vs_torch']:.2e}, vs SDPA rows {row['auto_vs_sdpa_rows']:.2e}; per-row sums vs "
            f"PyTorch path {row['sums_vs_torch']:.2e}; check(SDPA output): error {verdict.error:.2e}, ok={verdict.ok}; "
            f"heads=2 call 3: heads {sampled.checked}, ok={sampled.ok}")
    return rows


def timing(shapes, lengths, args, dtype, device, gen) -> list[dict]:
    rows = []
    cuda = device.type == "cuda"
    for shape, s in itertools.product(shapes, lengths):
        q, k, v = random_qkv(shape, s, dtype, device, gen)
        scale = shape.d ** -0.5
        window = max(BLOCKS[1], int(args.window_frac * s))
        layout = layout_for(shape, s, window, device)
        out = sparse_call(layout, shape, q, k, v, scale)
        pos = sample_rows(1, s, args.rows, device, torch.Generator().manual_seed(2))
        reps, warm = args.reps, args.warmup

        def sparse_only():
            sparse_call(layout, shape, q, k, v, scale)

        def served(g):
            def run():
                o = sparse_call(layout, shape, q, k, v, scale)
                if g.due("layer", device):
                    g.check(q, k, v, o, causal=shape.causal, scale=scale)
            return run

        full = Guard(GuardConfig(rows=args.rows, tol=args.tol))
        t_sparse = median_ms(sparse_only, reps, device, warm)
        t_both = median_ms(served(full), reps, device, warm)
        t_check = median_ms(lambda: full.check(q, k, v, out, causal=shape.causal, scale=scale), reps, device, warm)
        t_torch = median_ms(lambda: guard.check(full.config, q, k, v, out, causal=shape.causal, scale=scale,
                                                impl="torch"), max(3, reps // 4), device, 1)
        t_sdpa = median_ms(lambda: sdpa(shape, q, k, v, scale), max(3, reps // 2), device, 1)
        t_kernels = t_split = None
        if cuda:
            from autosparse.tools.timing import gpu_ms

            t_kernels = gpu_ms(lambda: compare_rows(q, k, v, out, pos, causal=shape.causal, scale=scale))
            t_split = gpu_ms(lambda: guard._split_pass(q, k, v, pos, shape.causal, scale, None, 0, shape.hkv))
        overhead = (t_both - t_sparse) / t_sparse
        kv_bytes = (k.numel() + v.numel()) * k.element_size()
        options = []
        for n in head_options(shape.hkv):
            if n == shape.hkv:
                t_n = t_both
            else:
                t_n = median_ms(served(Guard(GuardConfig(rows=args.rows, tol=args.tol, heads=n))), reps, device, warm)
            o = (t_n - t_sparse) / t_sparse
            every = max(1, math.ceil(o / 0.03))  # unchecked calls cost a dict lookup: overhead / every
            options.append(dict(heads=n, sparse_check_ms=t_n, overhead=o, every_for_3pct=every,
                                calls_to_cover=every * math.ceil(shape.hkv / n)))
        # the 3 % config: every head checked within the fewest served calls (ties: more heads per check)
        pick = min(options, key=lambda o: (o["calls_to_cover"], -o["heads"]))
        chosen = dict(heads=pick["heads"], every=pick["every_for_3pct"], calls_to_cover=pick["calls_to_cover"])
        cfg = GuardConfig(rows=args.rows, tol=args.tol, heads=pick["heads"], every=pick["every_for_3pct"])

        def served_run(g, n):
            def run():
                for _ in range(n):
                    served(g)()
            return run

        e = chosen["every"]  # measured: e served calls (the first one checked) against e sparse calls
        t_cfg = median_ms(served_run(Guard(cfg), e), max(5, reps // e), device, warm) / e
        chosen["overhead"] = (t_cfg - t_sparse) / t_sparse
        host = host_breakdown(shape, q, k, v, out, scale, args, device) if cuda else None
        row = dict(shape=shape.name, S=s, hkv=shape.hkv, density=layout.density(), window=window, sparse_ms=t_sparse,
                   sparse_check_ms=t_both, check_ms=t_check, check_kernels_ms=t_kernels, split_pass_ms=t_split,
                   check_torch_ms=t_torch, sdpa_ms=t_sdpa, overhead=overhead, check_over_sparse=t_check / t_sparse,
                   every_for_3pct=max(1, math.ceil(overhead / 0.03)),
                   kv_gb_s=kv_bytes / (t_kernels * 1e-3) / 1e9 if t_kernels else None,
                   kv_floor_ms_at_4_3_tb_s=kv_bytes / 4.3e12 * 1e3, heads_options=options, chosen=chosen,
                   host_breakdown=host)
        rows.append(row)
        log(f"timing {shape.name} S={s}: sparse {t_sparse:.3f} ms (density {row['density']:.3f}), +check "
            f"{t_both:.3f} ms -> overhead {100 * overhead:.1f} %; check alone {t_check:.3f} ms"
            + (f" (device work {t_kernels:.3f} ms, split pass {t_split:.3f} ms)" if t_kernels is not None else "")
            + f", PyTorch path {t_torch:.3f} ms; SDPA {t_sdpa:.3f} ms; heads: "
            + ", ".join(f"{o['heads']} -> {100 * o['overhead']:.1f} %" for o in options)
            + f"; 3 % config heads={chosen['heads']} every={chosen['every']}: {100 * chosen['overhead']:.1f} %"
            + (f"; host (ms): {host}" if host else ""))
        del q, k, v, out
    return rows


def host_breakdown(shape, q, k, v, out, scale, args, device, reps: int = 20) -> dict:
    """Where one check's time goes (host clock, GPU idle before each: medians in ms): the row key
    (rows are hashed inside the kernels: no draw, no upload), enqueuing the device work (the two
    launches, cached plan), waiting for it (the reduction + the one sync: device work + round trip),
    the whole ``Guard.check``; and the round trip of a trivial sync. Also: the hashed-row check's
    errors on the Triton path vs the PyTorch path (same rows), max abs difference."""
    g = Guard(GuardConfig(rows=args.rows, tol=args.tol))
    parts = {"sample": [], "enqueue": [], "sync": [], "check": [], "trivial_sync": []}
    tiny = torch.zeros(3, device=device)
    hkv, rows = k.shape[1], min(args.rows, q.shape[2])
    for i in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        key = guard.rows_key(0, i)
        t1 = time.perf_counter()
        part, sums = guard._compare_triton(q, k, v, out, None, shape.causal, scale, None, 0, hkv,
                                           hashed=(rows, key), reuse=True)
        t2 = time.perf_counter()
        torch.sum(part, dim=(0, 2), out=sums).tolist()
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        g.check(q, k, v, out, causal=shape.causal, scale=scale)
        t5 = time.perf_counter()
        torch.cuda.synchronize()
        t6 = time.perf_counter()
        tiny.tolist()
        t7 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t7 - t6)):
            parts[name].append(dt * 1e3)
    res = {name: round(statistics.median(ts), 4) for name, ts in parts.items()}
    cfg = GuardConfig(rows=args.rows, tol=args.tol)
    key = guard.rows_key(0, 12345)
    a = guard.check(cfg, q, k, v, out, causal=shape.causal, scale=scale, rows_key=key, impl="triton")
    b = guard.check(cfg, q, k, v, out, causal=shape.causal, scale=scale, rows_key=key, impl="torch")
    res["hashed_triton_vs_torch_max_abs_err_diff"] = max(abs(x - y) for x, y in zip(a.errors, b.errors))
    res["hashed_rows_same_count"] = a.rows == b.rows
    return res


def catch_rates(shapes, s, args, dtype, device, gen) -> list[dict]:
    """Every head checked, every call."""
    rows = []
    settings = ["far_all", "far_head", "far_band_10", "far_band_2", "near"]
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
            frac = {"far_all": 1.0, "far_head": 1.0, "near": 0.0}.get(setting)
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


def rotation_catch(shapes, s, chosen: dict, args, dtype, device, gen) -> list[dict]:
    """The 3 % config (GuardConfig.heads / every = chosen[shape]): a layer too sparse on one random
    query head, served call after call (fresh inputs), each trial a fresh Guard; after how many served
    calls is it flagged? (An unchecked call cannot flag: only checked ones are computed.)"""
    rows = []
    for shape in shapes:
        n, every = chosen.get(shape.name, {}).get("heads", shape.hkv), chosen.get(shape.name, {}).get("every", 1)
        period = every * math.ceil(shape.hkv / n)  # served calls within which every head is checked
        scale = shape.d ** -0.5
        window = max(BLOCKS[1], int(args.window_frac * s))
        layout = layout_for(shape, s, window, device)
        for setting in ("far_head", "far_band_10", "near"):
            first_flag, wrong_heads, alarms, calls_made = [], 0, 0, 0
            begin = time.perf_counter()
            for trial in range(args.trials):
                bad = int(torch.randint(0, shape.hq, (1,), generator=torch.Generator().manual_seed(100 + trial)))
                g = Guard(GuardConfig(rows=args.rows, tol=args.tol, seed=trial, heads=n, every=every))
                # a random phase: the layer has served 0 ... period - 1 fine calls before it goes bad
                for _ in range(int(torch.randint(0, period, (1,), generator=torch.Generator().manual_seed(trial)))):
                    if g.due("layer", device):
                        g._checks["layer"] = g._checks.get("layer", 0) + 1  # a passed check: the rotation moves on
                found = None
                for call in range(1, (2 * period if setting != "near" else period) + 1):
                    if not g.due("layer", device):
                        continue
                    q, k, v = structured_qkv(shape, s, window, setting, dtype, device, gen, bad_head=bad)
                    out = sparse_call(layout, shape, q, k, v, scale)
                    verdict = g.check(q, k, v, out, causal=shape.causal, scale=scale)
                    calls_made += 1
                    if not verdict.ok:
                        alarms += setting == "near"
                        wrong_heads += setting != "near" and verdict.heads != (bad,)
                        found = call
                        if setting != "near":
                            break
                first_flag.append(found)
            caught = [c for c in first_flag if c is not None]
            row = dict(shape=shape.name, S=s, setting=setting, heads=n, every=every, hkv=shape.hkv, period=period,
                       trials=args.trials, calls=calls_made,
                       flagged_within_period=sum(c <= period for c in caught) / args.trials,
                       flagged_within_2_periods=len(caught) / args.trials,
                       calls_to_flag_median=statistics.median(caught) if caught else None,
                       calls_to_flag_max=max(caught) if caught else None, false_alarms=alarms,
                       wrong_heads_named=wrong_heads, seconds=time.perf_counter() - begin)
            rows.append(row)
            log(f"rotation catch {shape.name} S={s} heads={n} every={every} {setting}: " + (
                f"{alarms} false alarms in {calls_made} checked calls" if setting == "near" else
                f"flagged within {period} calls in {100 * row['flagged_within_period']:.0f} % of {args.trials} trials, "
                f"within {2 * period}: {100 * row['flagged_within_2_periods']:.0f} %; calls to flag median "
                f"{row['calls_to_flag_median']}, max {row['calls_to_flag_max']}"))
    return rows


def sweep(shapes, s, args, dtype, device, gen) -> list[dict]:
    """Launch configs of the device work (split-KV + merge/compare), B = 1: every head, and a quarter
    of the KV heads (GuardConfig.heads = Hkv // 4)."""
    import triton.testing

    rows = []
    for shape, n in itertools.product(shapes, (None, "quarter")):
        n = shape.hkv if n is None else max(1, shape.hkv // 4)
        q, k, v = random_qkv(shape, s, dtype, device, gen)
        scale = shape.d ** -0.5
        out = sdpa(shape, q, k, v, scale)
        pos = sample_rows(1, s, args.rows, device, torch.Generator().manual_seed(2))
        ref = compare_rows(q, k, v, out, pos, causal=shape.causal, scale=scale, kv_heads=(0, n), impl="torch")
        kv_bytes = (k.numel() + v.numel()) * k.element_size() * n // shape.hkv
        found = []
        for block_n, warps, stages, per_sm, min_split in itertools.product(
                (64, 128), (4, 8), (2, 3), (2, 4, 8), (512, 1024, 2048)):
            guard.CONFIG_OVERRIDE = guard.LaunchConfig(64, block_n, warps, stages, per_sm, min_split)
            try:
                fn = lambda: compare_rows(q, k, v, out, pos, causal=shape.causal, scale=scale,  # noqa: E731
                                          kv_heads=(0, n), impl="triton")
                got = fn()
                ms = float(triton.testing.do_bench(fn, warmup=3, rep=12, return_mode="median"))
                found.append(dict(shape=shape.name, S=s, heads=n, block_n=block_n, warps=warps, stages=stages,
                                  programs_per_sm=per_sm, min_split=min_split, ms=ms,
                                  kv_gb_s=kv_bytes / (ms * 1e-3) / 1e9, err=rel(got[..., :2], ref[..., :2])))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile (shared memory)
                found.append(dict(shape=shape.name, S=s, heads=n, block_n=block_n, warps=warps, stages=stages,
                                  programs_per_sm=per_sm, min_split=min_split, ms=None,
                                  error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            finally:
                guard.CONFIG_OVERRIDE = None
        found.sort(key=lambda r: math.inf if r["ms"] is None else r["ms"])
        default = guard._launch_config(shape.d, shape.d, args.rows * shape.group)
        log(f"\nsweep {shape.name} S={s} heads={n} of {shape.hkv} (device work of the check; fastest first; "
            f"default {tuple(default)})")
        log("| BLOCK_N | warps | stages | programs/SM | min split | ms | K/V GB/s | rel err vs PyTorch path |")
        log("|---|---|---|---|---|---|---|---|")
        for r in found[:8]:
            if r["ms"] is not None:
                log(f"| {r['block_n']} | {r['warps']} | {r['stages']} | {r['programs_per_sm']} | {r['min_split']} "
                    f"| {r['ms']:.4f} | {r['kv_gb_s']:.0f} | {r['err']:.1e} |")
        rows += found
        del q, k, v, out
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
    parser.add_argument("--calls", type=int, default=None, help="calls per catch-rate setting (every head checked)")
    parser.add_argument("--trials", type=int, default=None, help="trials per setting of the 3 %% config's catch")
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
        args.trials = args.trials or 3
        args.warmup = min(args.warmup, 1)
        args.window_frac = max(args.window_frac, 0.1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [Shape("H12 d128", 12, 12, 128, False), Shape("GQA 32/8 d128 causal", 32, 8, 128, True)]
        lengths = args.lengths or [32768, 65536]
        args.reps = args.reps or 25
        args.calls = args.calls or 20
        args.trials = args.trials or 20
    catch_length = args.catch_length or lengths[0]
    gen = torch.Generator(device).manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    log(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {' '.join(sys.argv)}")
    log(f"torch {torch.__version__}, triton {triton_version}, {name}, {dtype}, rows={args.rows}, tol={args.tol}, "
        f"layout sink_local(sinks={SINKS}, window={args.window_frac}*S), blocks {BLOCKS}")

    results = dict(device=name, torch=torch.__version__, triton=triton_version, dtype=str(dtype), rows=args.rows,
                   tol=args.tol, blocks=BLOCKS, sinks=SINKS, window_frac=args.window_frac, smoke=args.smoke,
                   date=time.strftime('%Y-%m-%d %H:%M:%S %Z'), argv=sys.argv)
    results["correctness"] = correctness(shapes, lengths[0], args, dtype, device, gen)
    if args.sweep and device.type == "cuda":
        results["sweep"] = sweep(shapes, lengths[0], args, dtype, device, gen)
    results["timing"] = timing(shapes, lengths, args, dtype, device, gen)
    chosen = {r["shape"]: r["chosen"] for r in results["timing"] if r["S"] == catch_length}
    results["catch"] = catch_rates(shapes, catch_length, args, dtype, device, gen)
    results["rotation_catch"] = rotation_catch(shapes, catch_length, chosen, args, dtype, device, gen)

    log(f"\n### cost, every head every call (B=1, {dtype}, rows={args.rows}; ms: CUDA events, median of {args.reps})")
    log("| shape | S | density | sparse ms | sparse + check ms | overhead | check alone ms | device work ms "
        "| split pass ms | K/V GB/s | check PyTorch path ms | SDPA ms | every for 3 % |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["timing"]:
        kern = f"{r['check_kernels_ms']:.3f}" if r["check_kernels_ms"] is not None else "–"
        split = f"{r['split_pass_ms']:.3f}" if r["split_pass_ms"] is not None else "–"
        gbs = f"{r['kv_gb_s']:.0f}" if r["kv_gb_s"] is not None else "–"
        log(f"| {r['shape']} | {r['S']} | {r['density']:.3f} | {r['sparse_ms']:.3f} | {r['sparse_check_ms']:.3f} "
            f"| {100 * r['overhead']:.1f} % | {r['check_ms']:.3f} | {kern} | {split} | {gbs} "
            f"| {r['check_torch_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['every_for_3pct']} |")
    log("\n### cost with GuardConfig.heads = n (rotating KV heads) and every = e; the 3 % config: every head "
        "checked within the fewest served calls, its overhead measured over e served calls")
    log("| shape | S | sparse ms | overhead, every head every call | heads n (every call): overhead | 3 % config "
        "| its overhead (measured) | every head checked within |")
    log("|---|---|---|---|---|---|---|---|")
    for r in results["timing"]:
        tried = ", ".join(f"{o['heads']}: {100 * o['overhead']:.1f} %" for o in r["heads_options"])
        c = r["chosen"]
        log(f"| {r['shape']} | {r['S']} | {r['sparse_ms']:.3f} | {100 * r['overhead']:.1f} % | {tried} "
            f"| heads={c['heads']}, every={c['every']} | {100 * c['overhead']:.1f} % | {c['calls_to_cover']} calls |")
    if any(r["host_breakdown"] for r in results["timing"]):
        log("\n### one check's host clock (ms, medians, GPU idle before each part)")
        log("| shape | S | row key (rows hashed in the kernels) | enqueue device work | reduction + the sync "
            "(device work + round trip) | whole Guard.check | a trivial sync | hashed rows: Triton vs PyTorch errors |")
        log("|---|---|---|---|---|---|---|---|")
        for r in results["timing"]:
            h = r["host_breakdown"]
            if h:
                log(f"| {r['shape']} | {r['S']} | {h['sample']:.3f} | {h['enqueue']:.3f} | {h['sync']:.3f} "
                    f"| {h['check']:.3f} | {h['trivial_sync']:.3f} "
                    f"| {h['hashed_triton_vs_torch_max_abs_err_diff']:.2e} (rows equal: {h['hashed_rows_same_count']}) |")
    log(f"\n### catch rate, every head every call (S={catch_length}, {args.calls} calls per setting, fresh structured "
        f"inputs, tol={args.tol})")
    log("| shape | setting | flagged | P(a sampled row in the band) >= | true worst-head err (median / min) "
        "| guard estimate (median) | flagged heads truly bad |")
    log("|---|---|---|---|---|---|---|")
    for r in results["catch"]:
        log(f"| {r['shape']} | {r['setting']} | {100 * r['flagged']:.0f} % | {100 * r['sampled_band_chance']:.1f} % "
            f"| {r['true_worst_head_error_median']:.3f} / {r['true_worst_head_error_min']:.3f} "
            f"| {r['guard_error_median']:.3f} | {100 * r['flagged_heads_truly_bad']:.0f} % |")
    log(f"\n### catch rate of the 3 % config (S={catch_length}; {args.trials} trials per setting: a fresh Guard, one "
        f"random bad query head, fresh inputs every call; calls = served calls)")
    log("| shape | heads | every | setting | flagged within every x ceil(Hkv/n) calls | within 2x "
        "| served calls to flag (median / max) | wrong heads named | false alarms (checked calls) |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in results["rotation_catch"]:
        if r["setting"] == "near":
            log(f"| {r['shape']} | {r['heads']} | {r['every']} | near | – | – | – | – "
                f"| {r['false_alarms']} ({r['calls']}) |")
        else:
            log(f"| {r['shape']} | {r['heads']} | {r['every']} | {r['setting']} "
                f"| {100 * r['flagged_within_period']:.0f} % ({r['period']} calls) "
                f"| {100 * r['flagged_within_2_periods']:.0f} % | {r['calls_to_flag_median']} / {r['calls_to_flag_max']} "
                f"| {r['wrong_heads_named']} | – |")
    if args.out:
        path = Path(args.out) / "guard.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        log(f"\nwrote {path}")


if __name__ == "__main__":
    main()
