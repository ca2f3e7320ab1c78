"""patch_model on the GPU: a Llama-3.1-8B-shaped model (random weights, few layers), bf16 prefill.

1. Correctness: patched logits vs the same model run with float32 dense attention on the profile's
   token mask (``BlockLayout.to_dense()``), at a short length, with and without padding.
2. Speed: prefill forward time, dense (SDPA, default backend) vs patched, at long lengths, for a
   uniform sink+local profile; also the attention call alone through the op vs SDPA.

3. With ``--compile``: the forward again under ``torch.compile`` (inductor, dense) and under
   ``torch.compile(model, backend="autosparse", options={"profile": ...})``, same lengths.

    python benchmarks/llm_prefill.py [--layers 2] [--lengths 32768 65536] [--compile]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import autosparse  # noqa: E402
from autosparse import BlockGeometry, BlockLayout, Dense, LayerProfile, Profile  # noqa: E402
from autosparse.models import attention_layers  # noqa: E402
from autosparse.testing.llms import llama  # noqa: E402
from autosparse.testing.reference import transformers_reference  # noqa: E402
from autosparse.tools.timing import median_ms  # noqa: E402


def reference_logits(model, profile: Profile, ids, mask=None) -> torch.Tensor:
    """float32 dense attention on the profile's token mask (with left padding, counted from each
    row's first real token, as the runtime serves it) and the model's own mask."""
    with transformers_reference(model, profile, mask, dtype=torch.float32), torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--compile", action="store_true", help="also time inductor dense and backend='autosparse'")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, GPU {torch.cuda.get_device_name()}")
    model = llama(args.layers)
    spec = {"kind": "sink_local", "sinks": 64, "window": args.window}
    profile = Profile.uniform(model, spec)

    # -- 1. correctness ----------------------------------------------------------------------
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 32000, (2, 3000), device="cuda", generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :777] = 0  # left padding in the second row
    # mixed heads: every fourth head dense (served by SDPA on those heads), the rest sink + local
    small = Profile.uniform(model, {"kind": "sink_local", "sinks": 4, "window": 512})
    for name, layer in small.layers.items():
        heads = tuple(Dense() if h % 4 == 3 else p for h, p in enumerate(layer.heads))
        small.layers[name] = LayerProfile(layer.index, layer.num_heads, heads)
    os.environ["AUTOSPARSE_NEVER_SLOWER"] = "0"  # the sparse numerics at S=3000, where dense may be faster
    for name, attention_mask in (("no padding", None), ("left padding", mask)):
        expected = reference_logits(model, small, ids, attention_mask)
        with torch.inference_mode():
            dense = model(input_ids=ids, attention_mask=attention_mask).logits.float()
        autosparse.patch_model(model, small)
        with torch.inference_mode():
            got = model(input_ids=ids, attention_mask=attention_mask).logits.float()
        calls = autosparse.stats(model)
        autosparse.unpatch_model(model)
        valid = (attention_mask if attention_mask is not None else torch.ones_like(ids)).bool()
        print(f"correctness ({name}, S=3000, bf16): rel err patched vs fp32 masked reference "
              f"{rel(got[valid], expected[valid]):.2e}; dense SDPA vs the same reference "
              f"{rel(dense[valid], expected[valid]):.2e} (the pattern's own effect); {calls}")
        assert torch.isfinite(got[valid]).all()
        assert calls.sparse == args.layers and not calls.fallback

    del os.environ["AUTOSPARSE_NEVER_SLOWER"]

    # -- 2. speed ----------------------------------------------------------------------------
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, 32000, (1, length), device="cuda", generator=gen)
        layer = attention_layers(model)[0]
        geometry = BlockGeometry(length, length, *profile.block_size, causal=True)
        layout = BlockLayout.from_patterns(profile.layers[layer.name].heads, geometry, "cuda")
        q = torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)

        def sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def sparse():
            torch.ops.autosparse.block_sparse_attention(q, k, v, layout.kv_indices, layout.kv_counts, None,
                                                        layout.schedule(4), *profile.block_size, True, 128 ** -0.5)

        def forward():
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)

        attn_dense, attn_sparse = median_ms(sdpa, 5, warmup=1), median_ms(sparse, 5, warmup=1)
        fwd_dense = median_ms(forward, 3, warmup=1)
        autosparse.patch_model(model, profile)
        fwd_sparse = median_ms(forward, 3, warmup=1)
        autosparse.unpatch_model(model)
        rows.append((length, layout.density(), attn_dense, attn_sparse, fwd_dense, fwd_sparse))
    compiled_rows = compiled_forwards(model, profile, args.lengths, gen) if args.compile else []

    print(f"\n{args.layers}-layer Llama-3.1-8B-shaped model (32 q / 8 kv heads, d=128), bf16, B=1, causal prefill, "
          f"profile {spec}, blocks {profile.block_size}")
    print("| S | block density | attention SDPA ms | attention autosparse ms | speedup | ideal 1/d "
          "| forward dense ms | forward patched ms | forward speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length, density, ad, asp, fd, fs in rows:
        print(f"| {length} | {density:.3f} | {ad:.2f} | {asp:.2f} | {ad / asp:.2f}x | {1 / density:.1f}x "
              f"| {fd:.1f} | {fs:.1f} | {fd / fs:.2f}x |")
    if compiled_rows:
        print("\n| S | forward inductor dense ms | forward backend='autosparse' ms | speedup | calls |")
        print("|---|---|---|---|---|")
        for length, dense_ms, sparse_ms, calls in compiled_rows:
            print(f"| {length} | {dense_ms:.1f} | {sparse_ms:.1f} | {dense_ms / sparse_ms:.2f}x | {calls} |")


def compiled_forwards(model, profile: Profile, lengths: list[int], gen) -> list[tuple]:
    """Prefill forward time per length: inductor dense, then the autosparse backend (one compiled
    model each; the second length recompiles once, dynamic)."""
    inputs = {length: torch.randint(0, 32000, (1, length), device="cuda", generator=gen) for length in lengths}
    times = {}
    for name, options in (("dense", None), ("sparse", {"profile": profile})):
        torch._dynamo.reset()
        compiled = torch.compile(model) if options is None else torch.compile(model, backend="autosparse",
                                                                               options=options)
        for length, ids in inputs.items():
            def forward():
                with torch.inference_mode():
                    compiled(input_ids=ids, use_cache=False)

            times[name, length] = median_ms(forward, 3, warmup=2)
    calls = str(autosparse.stats(model))
    autosparse.unpatch_model(model)
    torch._dynamo.reset()
    return [(length, times["dense", length], times["sparse", length], calls) for length in lengths]


if __name__ == "__main__":
    main()
