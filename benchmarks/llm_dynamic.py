"""Dynamic patterns on long-context LLM prefill (issue 7): vertical_slash and block_topk on the H200.

    PYTHONUNBUFFERED=1 python3 benchmarks/llm_dynamic.py --out $OUT          # H200, bf16
    python3 benchmarks/llm_dynamic.py --small --lengths 1024 --prefill-layers 1  # CPU smoke run

Llama-3.1-8B shapes (32 query / 8 KV heads, head_dim 128, hidden 4096, MLP 14336), B=1, bf16.

1. Correctness: one call through ``torch.ops.autosparse.attention`` (estimate, layout with gathered
   columns, kernel) against float32 dense attention on the token mask of the layout it used.
2. Attention: one layer's call at each length on *structured* q/k (below): dense SDPA
   (``is_causal=True, enable_gqa=True``) vs the whole op path (estimate + layout + kernel), the
   estimate + layout alone, the kernel alone, block density (key tiles over the causal blocks) and
   the output's relative error against dense.
3. Prefill: a ``--prefill-layers`` model, dense SDPA vs ``patch_model`` with the dynamic profile,
   ``logits_to_keep=1`` (a prefill needs the last position's logits only); with ``--compile`` also
   ``torch.compile(backend="autosparse")`` against inductor dense at the first length.

Structured inputs. Random q/k attend uniformly, and a pattern estimated on them keeps random
diagonals and columns (vertical_slash is then block-dense). Real long-context heads attend mostly
locally, with a few keys (sinks, delimiters) everyone reads (MInference's vertical-slash). The
attention inputs here have that shape: q and k carry rotary position features (wavelengths 512 to
16384) whose dot product decays with the distance ``i - j`` (local diagonals: most of the mass within
a few hundred tokens), 1 key in 300 carries a feature every query reads (+8 logits: vertical
columns), plus unit noise. For the prefill, the model's weights are random but
tied so the same holds inside the model: every token embedding is one shared vector plus noise,
and each query head's projection equals its KV head's key projection plus noise, so
``q_i . k_j`` is a sum of cosines of RoPE frequencies times ``i - j`` (largest at 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import autosparse  # noqa: E402
from autosparse import Profile  # noqa: E402
from autosparse.capture import LAYER_ATTR  # noqa: E402
from autosparse.models import attention_layers  # noqa: E402
from autosparse.runtime import ORIGINAL_SDPA, plan_of  # noqa: E402
from autosparse.kernels import last_rows_op  # noqa: E402
from autosparse.runtime.classify import classify  # noqa: E402
from autosparse.runtime.plan import CallPlan, call_plan  # noqa: E402
from autosparse.testing.reference import attention  # noqa: E402
from autosparse.tools.timing import gpu_ms, median_ms  # noqa: E402

os.environ.setdefault("AUTOSPARSE_NEVER_SLOWER", "0")  # the patterns themselves, wherever they lose too
_LAYOUT_FOR = CallPlan.layout_for
KERNEL_TAKES = last_rows_op._kernel_takes
PROFILE = False  # --profile-estimate: list the estimate's kernels
SPECS = ({"kind": "vertical_slash", "vertical": 1000, "slash": 6096},
         {"kind": "vertical_slash", "vertical": 1000, "slash": 6096, "mass": 0.95},
         {"kind": "block_topk", "k": 32})


def llama(layers: int, small: bool, device: str) -> LlamaForCausalLM:
    """Llama-3.1-8B shapes (``small``: a 4-head toy for CPU smoke runs), random weights tied as the
    module docstring says (shared embedding direction; q projection = its KV head's k projection)."""
    size = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64) \
        if small else dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128)
    config = LlamaConfig(vocab_size=32000, num_hidden_layers=layers, max_position_embeddings=262144,
                         rope_theta=500000.0, attn_implementation="sdpa", **size)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        shared = torch.randn(config.hidden_size, device=device)
        model.model.embed_tokens.weight.mul_(0.1).add_(shared)
        group, d = config.num_attention_heads // config.num_key_value_heads, config.head_dim
        for layer in model.model.layers:
            attn = layer.self_attn
            k_rows = attn.k_proj.weight.view(config.num_key_value_heads, 1, d, -1)
            q_rows = attn.q_proj.weight.view(config.num_key_value_heads, group, d, -1)
            q_rows.mul_(0.1).add_(k_rows)
    return model.to(torch.bfloat16 if device == "cuda" else torch.float32)


def structured_qk(heads: int, kv_heads: int, length: int, dim: int, device: str, dtype: torch.dtype,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, heads, S, D], k and v [1, kv_heads, S, D]: local diagonals + 1-in-300 vertical keys + noise."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    half = dim // 4  # the first dim/2 dims: rotary features at log-spaced wavelengths 512 .. 16384
    freqs = 2 * math.pi / torch.logspace(math.log10(512), math.log10(16384), half, device=device)
    rotary = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], -1) * 2.5  # [S, dim/2]: logit 18 at i = j

    def draw(h: int) -> torch.Tensor:
        x = torch.randn(1, h, length, dim, device=device, generator=gen)
        x[..., :dim // 2] += rotary
        return x

    q, k = draw(heads), draw(kv_heads)
    heavy = torch.randperm(length, device=device, generator=gen)[: max(1, length // 300)]
    boost = 8.0  # the logit every query adds for a heavy key
    q[..., dim // 2] += 2.0
    k[..., heavy, dim // 2] += boost * math.sqrt(dim) / 2.0
    v = torch.randn(1, kv_heads, length, dim, device=device, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def patched_layer(model, spec: dict) -> tuple[torch.Tensor, object]:
    """Patch ``model`` with ``spec`` on every head; returns the first layer's id and plan."""
    profile = Profile.uniform(model, spec)
    autosparse.patch_model(model, profile)
    layer = getattr(attention_layers(model)[0].module, LAYER_ATTR)
    return layer, plan_of(layer)


def attention_rows(model, lengths: list[int], device: str, dtype: torch.dtype) -> list[dict]:
    config = model.config
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    scale = dim ** -0.5
    rows = []
    for length in lengths:
        q, k, v = structured_qk(heads, kv_heads, length, dim, device, dtype)
        dense_out = ORIGINAL_SDPA(q, k, v, is_causal=True, enable_gqa=True)
        dense = call_ms(lambda: ORIGINAL_SDPA(q, k, v, is_causal=True, enable_gqa=True), device)
        for spec in SPECS:
            layer, plan = patched_layer(model, spec)
            layout = call_layout(plan, q, k, v, scale)
            out, syncs = count_syncs(lambda: torch.ops.autosparse.attention(q, k, v, layer, None, True, scale))
            whole = call_ms(lambda: torch.ops.autosparse.attention(q, k, v, layer, None, True, scale), device)
            build = lambda: call_layout(plan, q, k, v, scale).schedule(heads // kv_heads)  # noqa: E731
            if PROFILE:
                print(f"  estimate + layout kernels, S={length}, {short(spec)}:")
            estimate, estimate_gpu = call_ms(build, device), kernel_time(build, device, table=PROFILE)
            torch_path_gpu = None
            if spec["kind"] == "vertical_slash":  # the same estimate from torch ops (the [B, H, 64, S] attention)
                if PROFILE:
                    print("  ... the same with the last rows' sums from torch ops:")
                last_rows_op._kernel_takes = lambda *_: False
                torch_path_gpu = kernel_time(build, device, table=PROFILE)
                last_rows_op._kernel_takes = KERNEL_TAKES
            kernel = call_ms(lambda: torch.ops.autosparse.block_sparse_attention(
                q, k, v, layout.kv_indices, layout.kv_counts, None, layout.schedule(heads // kv_heads), *plan.profile.block_size, True,
                scale, None, layout.columns, layout.column_counts, layout.listed), device)
            autosparse.unpatch_model(model)
            columns = 0 if layout.columns is None else float(layout.column_counts[..., -1].float().mean())
            rows.append(dict(length=length, pattern=spec, dense_ms=dense, autosparse_ms=whole, estimate_layout_ms=estimate,
                             estimate_layout_gpu_ms=estimate_gpu, estimate_layout_gpu_ms_torch_sums=torch_path_gpu,
                             kernel_ms=kernel, density=layout.density(), columns_last_row=columns,
                             rel_err=rel(out, dense_out), host_syncs=syncs))
            print(json.dumps(rows[-1]), flush=True)
        del q, k, v, dense_out
    return rows


def kernel_time(fn, device: str, reps: int = 5, table: bool = False) -> float | None:
    """GPU kernel time of one ``fn()`` in ms (profiler, summed over its kernels): what it costs
    inside a forward, where the host runs ahead of the GPU and its launch time is hidden. With
    ``table``, prints the kernels that take the most."""
    if device != "cuda":
        return None
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    if table:
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
            print(f"    {e.self_device_time_total / reps / 1e3:7.3f} ms  x{e.count // reps:<3d} {e.key[:110]}")
    return sum(e.self_device_time_total for e in events) / reps / 1e3


def count_syncs(fn):
    """``fn()`` and the number of times it made the host wait for the GPU (CUDA sync debug mode)."""
    if not torch.cuda.is_available():
        return fn(), None
    fn()  # first call: caches (static masks, index tensors) are filled here
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return result, sum("synchroniz" in str(w.message) for w in caught)


def check_correctness(model, device: str, dtype: torch.dtype, length: int) -> str:
    """The op on structured inputs (vertical_slash with gathered columns) against float32 dense
    attention on the token mask of the layout it used."""
    config = model.config
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q, k, v = structured_qk(heads, kv_heads, length, dim, device, dtype, seed=1)
    layer, plan = patched_layer(model, {"kind": "vertical_slash", "vertical": 64, "slash": 256})
    layout = call_layout(plan, q, k, v, dim ** -0.5)
    out = torch.ops.autosparse.attention(q, k, v, layer, None, True, dim ** -0.5)
    autosparse.unpatch_model(model)
    assert layout.columns is not None, "expected gathered columns on these inputs"
    expected = attention(q, k, v, layout.to_dense()[None], scale=dim ** -0.5, dtype=torch.float32)
    err = rel(out, expected)
    line = (f"correctness S={length} {str(dtype)}: vertical_slash(64, 256), {layout.columns.shape[-1]} columns per head, "
            f"density {layout.density():.3f}: rel err vs fp32 dense on the layout's token mask {err:.2e}")
    assert torch.isfinite(out).all() and err < (2e-2 if dtype == torch.bfloat16 else 1e-4), line
    return line


def check_sums(model, device: str, dtype: torch.dtype, length: int) -> str:
    """The last rows' sums (what vertical_slash ranks) from the kernel in ``dtype`` against the
    torch path in float64 on the same structured inputs."""
    config = model.config
    q, k, _ = structured_qk(config.num_attention_heads, config.num_key_value_heads, length, config.head_dim, device,
                            dtype, seed=2)
    q = q[:, :, -64:]
    rows = last_rows_op.last_rows(q, k, config.head_dim ** -0.5)
    exact = last_rows_op._TorchRows(q.double(), k.double(), config.head_dim ** -0.5)
    got, want = rows.lines(), exact.lines()
    kept = want[0] > want[0].median()
    got, want = (*got, rows.columns_off(kept)), (*want, exact.columns_off(kept))
    errs = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(got, want)]
    line = (f"last-rows sums S={length} {str(dtype)} ({type(rows).__name__}): max error / max of diagonals "
            f"{errs[0]:.1e}, columns {errs[1]:.1e}, columns off kept diagonals {errs[2]:.1e}")
    assert max(errs) < 1e-2, line
    return line


def prefill_rows(layers: int, lengths: list[int], small: bool, device: str, compile_first: bool) -> list[dict]:
    model = llama(layers, small, device)
    rows = []
    for length in lengths:
        ids = torch.randint(1, 32000, (1, length), device=device)
        ids[0, 0] = 0

        def forward(m=model):
            with torch.inference_mode():
                return m(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        dense_logits = forward()
        dense = median_ms(forward, 3, device, warmup=1)
        for spec in SPECS[:2]:
            autosparse.patch_model(model, Profile.uniform(model, spec))
            densities = record_densities()
            logits = forward()
            CallPlan.layout_for = _LAYOUT_FOR
            density = float(torch.stack(densities).mean())
            patched = median_ms(forward, 3, device, warmup=1)
            calls = autosparse.stats(model)
            autosparse.unpatch_model(model)
            rows.append(dict(length=length, layers=layers, pattern=spec, route="patch_model", dense_ms=dense,
                             autosparse_ms=patched, density=density, logits_rel_err=rel(logits, dense_logits),
                             calls=str(calls)))
            print(json.dumps(rows[-1]), flush=True)
        if compile_first and length == lengths[0]:
            rows.append(compiled_row(model, ids, SPECS[0], device))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def call_layout(plan, q, k, v, scale: float):
    """The layout the op estimates for this causal call of ``plan``'s layer (its call plan's)."""
    heads = plan.heads_at(None)
    call = classify(plan.state.context, plan.index, heads, q, k, v, None, True, scale)
    return call_plan(heads, plan.profile, call, q, k, v).layout_for(q, k, scale)


def record_densities() -> list[torch.Tensor]:
    """Every dynamic layout's per-head density a patched model estimates until the next call
    (device tensors: recording adds no sync)."""
    densities = []

    def recording(self, *args, **kwargs):
        layout = _LAYOUT_FOR(self, *args, **kwargs)
        densities.append(layout.head_density)
        return layout

    CallPlan.layout_for = recording
    return densities


def compiled_row(model, ids, spec: dict, device: str) -> dict:
    times = {}
    for name, options in (("inductor", None), ("autosparse", {"profile": Profile.uniform(model, spec)})):
        torch._dynamo.reset()
        compiled = torch.compile(model) if options is None else torch.compile(model, backend="autosparse",
                                                                               options=options)

        def forward():
            with torch.inference_mode():
                return compiled(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        times[name] = median_ms(forward, 3, device, warmup=2)
    calls = str(autosparse.stats(model))
    autosparse.unpatch_model(model)
    torch._dynamo.reset()
    return dict(length=ids.shape[1], layers=model.config.num_hidden_layers, pattern=spec, route="compile",
                dense_ms=times["inductor"], autosparse_ms=times["autosparse"], calls=calls)


def call_ms(fn, device: str) -> float:
    """ms per call: GPU time with calls queued back to back on CUDA, wall time on the CPU."""
    return gpu_ms(fn) if device == "cuda" else median_ms(fn, 1, device, warmup=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--prefill-layers", type=int, default=4)
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=None, help="default: --lengths")
    parser.add_argument("--compile", action="store_true", help="also backend='autosparse' vs inductor (first length)")
    parser.add_argument("--small", action="store_true", help="a 4-head toy model (CPU smoke run)")
    parser.add_argument("--profile-estimate", action="store_true", help="list the estimate's costliest kernels")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile_estimate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}", flush=True)
    one_layer = llama(1, args.small, device)
    result = {"correctness": check_correctness(one_layer, device, dtype, 4096 if device == "cuda" else 1024)}
    print(result["correctness"], flush=True)
    result["sums"] = check_sums(one_layer, device, dtype, 4096 if device == "cuda" else 1024)
    print(result["sums"], flush=True)
    result["attention"] = attention_rows(one_layer, args.lengths, device, dtype)
    del one_layer
    torch.cuda.empty_cache() if device == "cuda" else None
    result["prefill"] = prefill_rows(args.prefill_layers, args.prefill_lengths or args.lengths, args.small, device,
                                     args.compile) if args.prefill_layers > 0 else []
    print("\n| S | pattern | dense SDPA ms | autosparse ms (all) | speedup | estimate + layout ms (host-bound) "
          "| estimate + layout GPU ms | GPU share of dense | kernel ms | density | rel err | host syncs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["attention"]:
        print(f"| {r['length']} | {short(r['pattern'])} | {r['dense_ms']:.2f} | {r['autosparse_ms']:.2f} | "
              f"{r['dense_ms'] / r['autosparse_ms']:.2f}x | {r['estimate_layout_ms']:.2f} | "
              f"{r['estimate_layout_gpu_ms'] or float('nan'):.2f} | "
              f"{(r['estimate_layout_gpu_ms'] or float('nan')) / r['dense_ms']:.1%} | {r['kernel_ms']:.2f} | "
              f"{r['density']:.3f} | "
              f"{r['rel_err']:.3f} | {r['host_syncs']} |")
    print("\n| S | layers | pattern | route | dense ms | autosparse ms | speedup | density | last-logits rel err | calls |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in result["prefill"]:
        print(f"| {r['length']} | {r['layers']} | {short(r['pattern'])} | {r['route']} | {r['dense_ms']:.1f} | "
              f"{r['autosparse_ms']:.1f} | {r['dense_ms'] / r['autosparse_ms']:.2f}x | "
              f"{r.get('density', float('nan')):.3f} | {r.get('logits_rel_err', float('nan')):.3f} | {r['calls']} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "llm_dynamic.json").write_text(json.dumps(result, indent=1))


def short(spec: dict) -> str:
    return f"{spec['kind']}(" + ", ".join(str(v) for k, v in spec.items() if k != "kind") + ")"


if __name__ == "__main__":
    main()
