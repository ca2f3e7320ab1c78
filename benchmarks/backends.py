"""The kernel backends side by side on the calls the runtime serves, against dense SDPA, in one command.

    source benchmarks/device_setup.sh && PYTHONUNBUFFERED=1 python3 benchmarks/backends.py --out $OUT   # H200
    python3 benchmarks/backends.py --quick                                                          # CPU: the code

Per case (bf16, B=1, random block layouts at a given density, or a grid call's query order): dense
SDPA under cuDNN and FA4 dense on the same q/k/v (the fastest dense kernel is the second baseline);
each backend that can run the call (``kernels.backends``: our Triton kernel, FA4 block-sparse) run
on the prepared ``KernelCall``; its output checked against float32 attention on the exact token
mask for 256 sampled query rows per head (max abs error); then its GPU time (``do_bench`` median).
Reported: ms, speed vs cuDNN, the fraction of 1/density reached vs cuDNN (1.0: time scales with
the listed blocks) and vs the fastest dense, the error, and the backend ``choose_backend`` picks.
Writes ``backends.md`` and ``backends.json`` under ``--out`` after every case.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autosparse.kernels import KernelCall, backends
from autosparse.kernels.tuning import gpu_ms


@dataclass(frozen=True)
class Case:
    seq: int
    heads: int
    head_dim: int
    density: float
    blocks: tuple[int, int]
    causal: bool = False
    q_rows: bool = False  # a grid call: queries read and written through a token order
    skipped_heads: int = 0  # heads left to SDPA (zero blocks): the mixed layers of a profile
    paired: bool = False  # 64-row query blocks agreeing in pairs (windows counted in 128-key blocks)

    @property
    def name(self) -> str:
        extra = "".join(s for s, on in ((" causal", self.causal), (" grid", self.q_rows),
                                        (f" {self.skipped_heads} heads skipped", self.skipped_heads),
                                        (" paired", self.paired)) if on)
        return (f"S={self.seq // 1024}K H={self.heads} d={self.head_dim} {self.blocks[0]}x{self.blocks[1]} "
                f"density {self.density:g}{extra}")


def gpu_cases() -> list[Case]:
    cases = [Case(32768, 16, 128, d, b) for b in ((128, 128), (64, 128)) for d in (1.0, 0.5, 0.25, 0.1, 0.05)]
    cases += [Case(8192, 16, 128, d, b) for b in ((128, 128), (64, 128)) for d in (0.25, 0.1)]
    cases += [Case(32768, 16, 128, 0.25, (128, 128), causal=True), Case(32768, 16, 128, 0.25, (64, 128), paired=True),
              Case(32768, 16, 128, 0.25, (128, 128), skipped_heads=4),
              Case(32760, 12, 128, 0.125, (64, 128), q_rows=True), Case(32760, 12, 128, 0.125, (64, 128), q_rows=True,
                                                                          paired=True)]
    cases += [Case(32768, 16, 64, d, (128, 128)) for d in (1.0, 0.25, 0.1)]
    cases += [Case(32768, 16, 96, 0.25, (128, 128)), Case(32768, 8, 256, 0.25, (128, 64)),
              Case(32768, 8, 256, 0.25, (64, 128)), Case(131072, 8, 128, 0.1, (128, 128))]
    return cases


def quick_cases() -> list[Case]:
    return [Case(512, 2, 64, 0.5, (64, 64)), Case(512, 2, 64, 0.5, (64, 128), causal=True),
            Case(500, 2, 64, 0.5, (64, 64), q_rows=True, skipped_heads=1)]


def layout(case: Case, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Bool ``[H, NQ, NK]`` block mask: ``density`` of the blocks, every row's diagonal block kept
    (causal: of the blocks the causal rule allows)."""
    qb, kb = case.blocks
    nq, nk = math.ceil(case.seq / qb), math.ceil(case.seq / kb)
    rows = nq // 2 if case.paired else nq
    mask = torch.rand(case.heads, rows, nk, device=device, generator=gen) < case.density
    if case.paired:
        mask = mask.repeat_interleave(2, dim=1)[:, :nq]
    diagonal = torch.arange(nq, device=device) * qb // kb
    mask[:, torch.arange(nq, device=device), diagonal] = True
    if case.causal:
        last_query = torch.clamp(torch.arange(1, nq + 1, device=device) * qb, max=case.seq) - 1
        mask &= (torch.arange(nk, device=device) * kb)[None, :] <= last_query[:, None]
    if case.skipped_heads:
        mask[:case.skipped_heads] = False
    return mask


def lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_indices [1, H, NQ, MAXK]`` (ascending) and ``kv_counts [1, H, NQ]`` of a block mask."""
    counts = mask.sum(-1, dtype=torch.int32)
    width = max(int(counts.max()), 1)
    order = torch.sort(torch.where(mask, torch.arange(mask.shape[-1], device=mask.device), mask.shape[-1]), -1).values
    return order[..., :width].clamp(max=mask.shape[-1] - 1).to(torch.int32)[None].contiguous(), counts[None].contiguous()


def max_error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, case: Case,
              rows: torch.Tensor, q_rows: torch.Tensor | None, scale: float) -> float:
    """Max abs difference from float32 attention on the exact token mask, over query ``rows``
    (kernel positions) of every live head."""
    qb, kb = case.blocks
    model_rows = rows if q_rows is None else q_rows.long()[rows]
    allowed = mask[:, rows // qb].repeat_interleave(kb, dim=-1)[..., :case.seq]  # [H, R, S]
    if case.causal:
        allowed &= torch.arange(case.seq, device=q.device)[None, :] <= rows[:, None]
    live = slice(case.skipped_heads, None)
    scores = (q[0, live][:, model_rows].float() @ k[0, live].float().transpose(-1, -2)) * scale
    want = torch.softmax(scores.masked_fill(~allowed[live], -math.inf), -1) @ v[0, live].float()
    return float((out[0, live][:, model_rows].float() - want).abs().max())


def run_case(case: Case, device: torch.device, time_fn) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(case.seq + case.heads + case.head_dim)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # [B, S, H, D] memory seen as [B, H, S, D]: what a model's projections give
    q, k, v = (torch.randn(1, case.seq, case.heads, case.head_dim, device=device, dtype=dtype, generator=gen)
               .transpose(1, 2) for _ in range(3))
    mask = layout(case, device, gen)
    kv_indices, kv_counts = lists(mask)
    q_rows = torch.randperm(case.seq, device=device, generator=gen).to(torch.int32) if case.q_rows else None
    scale = case.head_dim ** -0.5
    call = KernelCall.prepare(q, k, v, kv_indices, kv_counts, q_block=case.blocks[0], kv_block=case.blocks[1],
                              causal=case.causal, scale=scale, q_rows=q_rows)
    reachable = case.seq * (case.seq + case.blocks[1]) / 2 if case.causal else case.seq ** 2
    live_heads = case.heads - case.skipped_heads
    token_density = float(mask.float().sum()) * case.blocks[0] * case.blocks[1] / (live_heads * reachable)
    result: dict[str, Any] = dict(case=case.name, density=round(min(token_density, 1.0), 4), rows={})

    def dense_cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, scale=scale)

    dense = {"cuDNN SDPA": dense_cudnn}
    if device.type == "cuda":
        fa4 = backends._fa4()
        if not isinstance(fa4, Exception):
            dense["FA4 dense"] = lambda: fa4[0](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                softmax_scale=scale, causal=case.causal)
    else:
        dense = {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, scale=scale)}
    for name, fn in dense.items():
        try:
            fn()
            result["rows"][name] = dict(ms=time_fn(fn))
        except Exception as err:  # noqa: BLE001 - the table says why
            result["rows"][name] = dict(error=f"{type(err).__name__}: {str(err)[:150]}")
    timed = [r["ms"] for r in result["rows"].values() if "ms" in r]
    base = next(iter(result["rows"].values())).get("ms")
    fastest = min(timed) if timed else None
    sample = torch.randperm(case.seq, device=device, generator=gen)[:256]
    for b in backends.BACKENDS:
        reason = b.can_run(call)
        if reason is not None:
            result["rows"][b.name] = dict(error=f"cannot run: {reason}")
            continue
        try:
            out = torch.full_like(q, float("nan"))
            out.copy_(b.run(q, k, v, call))
            error = max_error(out, q, k, v, mask, case, sample, q_rows, scale)
            ms = time_fn(lambda b=b: b.run(q, k, v, call))
        except Exception as err:  # noqa: BLE001
            result["rows"][b.name] = dict(error=f"{type(err).__name__}: {str(err)[:150]}")
            continue
        row = dict(ms=ms, max_err=error)
        if base:
            row["vs_cudnn"] = base / ms
            row["of_1/d_vs_cudnn"] = base / ms * result["density"]
            row["of_1/d_vs_fastest"] = fastest / ms * result["density"]
        result["rows"][b.name] = row
    try:
        backends.forget_choices()
        result["chosen"] = backends.choose_backend(call, q, k, v, measure=device.type == "cuda").name
    except Exception as err:  # noqa: BLE001
        result["chosen"] = f"{type(err).__name__}: {err}"
    return result


def markdown(results: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| case | density | backend | ms | vs cuDNN | of 1/d vs cuDNN | of 1/d vs fastest dense | "
                         "max abs err | chosen |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        for name, row in r["rows"].items():
            if "error" in row:
                cells = [row["error"], "", "", "", "", ""]
            else:
                def f(key, fmt):
                    return format(row[key], fmt) if key in row else ""
                cells = [f("ms", ".3f"), f("vs_cudnn", ".2f"), f("of_1/d_vs_cudnn", ".2f"), f("of_1/d_vs_fastest", ".2f"),
                         f("max_err", ".2e"), ""]
            cells[-1] = "chosen" if name == r["chosen"] else ""
            lines.append(f"| {r['case']} | {r['density']:.3f} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny cases on this machine's device (CPU: the code)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=400.0, help="skip cases not started after this")
    parser.add_argument("--match", default=None, help="only the cases whose name contains this text")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = quick_cases() if args.quick or device.type == "cpu" else gpu_cases()
    cases = [c for c in cases if args.match is None or args.match in c.name]
    time_fn = gpu_ms if device.type == "cuda" else (lambda fn: _cpu_ms(fn))
    versions = (f"torch {torch.__version__}, triton {backends._version('triton')}, "
                f"flash-attn-4 {backends._version('flash-attn-4')}, cuDNN {torch.backends.cudnn.version()}")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    header = (f"{time.strftime('%Y-%m-%d')}, {gpu}, {versions}; `python3 benchmarks/backends.py "
              f"{shlex.join(argv if argv is not None else sys.argv[1:])}`")
    print(header, flush=True)
    results, start = [], time.time()
    for case in cases:
        if time.time() - start > args.budget_s:
            print(f"skipped (budget): {case.name}", flush=True)
            continue
        with torch.no_grad():
            results.append(run_case(case, device, time_fn))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "backends.json").write_text(json.dumps(results, indent=1))
            (args.out / "backends.md").write_text(markdown(results, header))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(results, header), flush=True)


def _cpu_ms(fn) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


if __name__ == "__main__":
    main()
