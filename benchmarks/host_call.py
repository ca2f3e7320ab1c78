"""Host time of one served attention call, end to end (GPU machine).

    python3 benchmarks/host_call.py [--profile CASE] [--n 400] [--op]

Per case, a layer plan is registered (as ``patch_model`` registers one) and the call is made N
times as the eager capture routes make it (``runtime.attention``; ``--op``: through
``torch.ops.autosparse.attention``, as a compiled graph calls it) with no synchronisation inside the loop, on shapes small enough that the GPU keeps up: the
loop then measures host time per call (the key padding case also reads its mask: the
first layer of every forward does). The GPU time of one call is printed next to it (when host
time is above GPU time, the host is what a caller waits for). ``--profile CASE`` prints a cProfile
of that case's calls. Each case's output is also checked against float32 dense attention on the
token mask it was served with. Cases: a causal LLM layer (sink + window), the same with two dense heads
(sent to SDPA), key padding, a video grid layer (neighbourhood in tile order: K/V permuted), and a
dynamic layer (block top-k estimated per call).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autosparse import runtime  # noqa: E402
from autosparse.kernels import dense_attention  # noqa: E402
from autosparse.patterns import BlockTopK, Dense, Neighborhood, SinkLocal, TokenGeometry  # noqa: E402
from autosparse.profile import LayerProfile, Profile  # noqa: E402

B, H, D = 1, 4, 128


def _layer(patterns, block_size=(64, 128)):
    profile = Profile(model={"library": "module"}, layers={"attn": LayerProfile(0, len(patterns), tuple(patterns))},
                      block_size=block_size)
    plan = runtime.LayerPlan(name="attn", index=0, num_heads=len(patterns), profile=profile,
                             state=runtime.PatchState(strict=True))
    return plan, runtime.register(plan)


def cases(device: torch.device, through_op: bool) -> dict[str, tuple]:
    """name -> (call, plan, (q, k, v, mask)): ``call()`` makes one op call."""
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def qkv(s: int, heads: int = H):
        return [torch.randn(B, heads, s, D, device=device, dtype=dtype, generator=g) for _ in range(3)]

    entry = torch.ops.autosparse.attention if through_op else runtime.attention

    def op(plan_layer, q, k, v, mask=None, causal=True, tokens=None):
        plan, layer = plan_layer

        def call():
            if tokens is not None:
                plan.state.context.tokens = tokens  # what the model's pre-hook sets per forward
            return entry(q, k, v, layer, mask, causal, None)

        return call, plan, (q, k, v, mask)

    s = 512
    q, k, v = qkv(s)
    mask = torch.ones(B, 1, s, s, dtype=torch.bool, device=device).tril_()
    mask[..., -100:] = False
    tokens = TokenGeometry(grid=(2, 16, 16))
    window = SinkLocal(sinks=64, window=256)
    return {
        "causal sink_local": op(_layer([window] * H), q, k, v),
        "causal, 2 dense heads": op(_layer([window] * (H - 2) + [Dense()] * 2), q, k, v),
        "causal, key padding mask": op(_layer([window] * H), q, k, v, mask=mask, causal=False),
        "grid neighborhood (tile order)": op(_layer([Neighborhood(window=(3, 5, 5))] * H), *qkv(tokens.length),
                                             causal=False, tokens=tokens),
        "dynamic block_topk": op(_layer([BlockTopK(k=4)] * H), q, k, v),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def host_us(fn, n: int, device: torch.device, rounds: int = 20) -> tuple[float, float]:
    """(min, median) over ``rounds`` of the mean host time of ``n // rounds`` back-to-back calls:
    other work on the host only adds time, so the minimum is the call's own cost."""
    for _ in range(3):
        fn()
    per_round = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        for _ in range(max(n // rounds, 1)):
            fn()
        per_round.append((time.perf_counter() - start) / max(n // rounds, 1) * 1e6)
    _sync(device)
    return min(per_round), statistics.median(per_round)


def gpu_us(fn, device: torch.device) -> float:
    if device.type != "cuda":  # a CPU smoke run: the call runs on the host, nothing to time apart
        return float("nan")
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def check(fn, inputs) -> float:
    """Max abs error of one call against float32 dense attention on the token mask it was served
    with (the call plan's layout, or the dynamic estimate), key padding applied, kernel heads only."""
    seen = []
    layout_for = runtime.CallPlan.layout_for
    runtime.CallPlan.layout_for = lambda self, *a: seen.append((self, layout_for(self, *a))) or seen[-1][1]
    try:
        out = fn()
    finally:
        runtime.CallPlan.layout_for = layout_for
    (planned, layout), = seen
    q, k, v, mask = inputs
    tokens = layout.to_dense_model_order()[None]  # [1, H, S, S]
    if mask is not None:
        tokens = tokens & mask[:, :, -1:, :]  # key padding (the causal part is the layout's)
    heads = [h for h in range(q.shape[1]) if h not in planned.skipped]
    ref = dense_attention(q.float(), k.float(), v.float(), tokens)
    return float((out.float() - ref)[:, heads].abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--profile", default=None, help="case name (substring) to cProfile")
    parser.add_argument("--op", action="store_true", help="call torch.ops.autosparse.attention (as a compiled "
                        "graph does) instead of runtime.attention (what the eager capture routes call)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu for a smoke run (the numbers mean nothing)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}")
    with torch.inference_mode():
        for name, (fn, plan, inputs) in cases(device, args.op).items():
            host = host_us(fn, args.n, device)
            stats = plan.state.stats
            served = f"sparse={stats.sparse} dense={dict(stats.dense)} fallback={dict(stats.fallback)}"
            print(f"{name:34s} host {host[0]:6.1f} us/call (median {host[1]:6.1f})   GPU {gpu_us(fn, device):7.1f} us   max err "
                  f"{check(fn, inputs):.2e}   ({served})", flush=True)
            if args.profile and args.profile in name:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(args.n):
                    fn()
                prof.disable()
                _sync(device)
                pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
