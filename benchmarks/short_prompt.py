"""Where a short prompt's patched forward loses time when every call runs dense (GPU machine).

    python3 benchmarks/short_prompt.py --out $OUT        # H200: Llama-3.1-8B-shaped, 2 layers, bf16

The length sweep read the patched model at 2K tokens 0.84-0.88x of the unpatched one although the
never-slower rule ran every call dense. Per length: the unpatched and the patched forward (CUDA
events, median of ``--reps``), the host time of ``--reps`` forwards queued back to back (when it
exceeds the GPU time, the host is what the caller waits for), and the profiler's GPU kernels of one
forward of each, side by side: a kernel the patched forward runs and the unpatched does not (or a
slower attention kernel) is the difference.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from collections import Counter
from pathlib import Path

import torch

import autosparse
from autosparse import Profile
from autosparse.testing.llms import llama
from autosparse.tools.timing import median_ms


def kernels(forward, reps: int) -> Counter:
    """GPU kernel name -> ms per forward (profiler)."""
    forward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            forward()
        torch.cuda.synchronize()
    times = Counter()
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            times[e.key[:90]] += e.self_device_time_total / reps / 1e3
    return times


def host_ms(forward, reps: int) -> float:
    """Host time per forward with forwards queued back to back (no sync in between)."""
    forward()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        forward()
    host = (time.perf_counter() - start) / reps * 1e3
    torch.cuda.synchronize()
    return host


def host_profile(forward, reps: int, top: int = 25) -> str:
    """cProfile of ``reps`` forwards (no sync in between): where the host's time goes."""
    forward()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        forward()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cprofile", action="store_true", help="also print a cProfile of each forward's host time")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = llama(args.layers, device="cuda")
    profile = Profile.uniform(model, {"kind": "sink_local", "sinks": 64, "window": 2048})
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda", generator=gen)

        def forward():
            with torch.inference_mode():
                return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        row = {"length": length}
        for name in ("unpatched", "patched"):
            if name == "patched":
                autosparse.patch_model(model, profile)
            forward()
            row[f"{name}_ms"] = median_ms(forward, args.reps, "cuda", 3)
            row[f"{name}_host_ms"] = host_ms(forward, args.reps)
            row[f"{name}_kernels"] = kernels(forward, 5)
            if args.cprofile:
                print(f"--- host profile, S={length}, {name}, {args.reps} forwards ---\n{host_profile(forward, args.reps)}")
            if name == "patched":
                stats = autosparse.stats(model)
                row["calls"] = dict(sparse=stats.sparse, dense=dict(stats.dense), fallback=dict(stats.fallback))
                autosparse.unpatch_model(model)
        rows.append(row)
        print(f"\n{args.layers} layers, S={length}: unpatched {row['unpatched_ms']:.3f} ms (host {row['unpatched_host_ms']:.3f}), "
              f"patched {row['patched_ms']:.3f} ms (host {row['patched_host_ms']:.3f}), "
              f"ratio {row['unpatched_ms'] / row['patched_ms']:.3f}x; calls {row['calls']}")
        names = sorted(set(row["unpatched_kernels"]) | set(row["patched_kernels"]),
                       key=lambda n: -max(row["unpatched_kernels"][n], row["patched_kernels"][n]))
        print("| kernel | unpatched ms | patched ms |\n|---|---:|---:|")
        for n in names[:25]:
            print(f"| {n} | {row['unpatched_kernels'][n]:.4f} | {row['patched_kernels'][n]:.4f} |")
        print(f"| all kernels | {sum(row['unpatched_kernels'].values()):.4f} | {sum(row['patched_kernels'].values()):.4f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "short_prompt.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
