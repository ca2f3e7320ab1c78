"""Where a DiT forward spends its GPU time, dense vs patched (torch.profiler, CUDA kernels by total).

    python3 benchmarks/dit_profile.py --family wan --window 4 16 16     # H200, bf16, real shape
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import autosparse
from autosparse import Neighborhood, Profile
from autosparse.testing.dits import build_dit

parser = argparse.ArgumentParser()
parser.add_argument("--family", default="wan")
parser.add_argument("--window", type=int, nargs="+", default=[4, 16, 16])
parser.add_argument("--layers", type=int, default=None)
parser.add_argument("--rows", type=int, default=12)
args = parser.parse_args()

dit = build_dit(args.family, "real", device="cuda", dtype=torch.bfloat16, layers=args.layers)
model, inputs = dit.model, dit.inputs()


def run() -> None:
    with torch.no_grad():
        model(**inputs)
    torch.cuda.synchronize()


for label in ("dense", "patched"):
    if label == "patched":
        autosparse.patch_model(model, Profile.uniform(model, Neighborhood(tuple(args.window))))
    run(); run()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"== {label}: GPU kernel time {gpu_total:.1f} ms")
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
print(autosparse.stats(model))
