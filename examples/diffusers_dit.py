"""Sparse attention on a diffusers transformer: Wan2.1, HunyuanVideo, CogVideoX or FLUX.

    python examples/diffusers_dit.py wan                # tiny random-weight model on CPU, out of the box
    python examples/diffusers_dit.py wan --compile      # the same through torch.compile(backend="autosparse")
    python examples/diffusers_dit.py flux --weights /models/FLUX.1-dev --profile profiles/flux.1-dev-1024.json

Without ``--weights`` a tiny random-weight transformer of the family runs one forward dense and one
patched with a neighborhood profile, and prints both times and the output difference (random
weights attend almost uniformly, so the difference is large and says nothing about quality). With
``--weights`` (a local diffusers pipeline folder: ``from_pretrained(path)``) the real pipeline
generates once dense and once patched from the same seed, on CUDA, and prints times and the
difference of the outputs. ``--compile`` compiles both runs: dense with inductor, sparse with
``backend="autosparse"`` (whole model for the tiny one; ``compile_repeated_blocks`` for a pipeline).
"""

from __future__ import annotations

import argparse
import time

import torch

import autosparse
from autosparse.testing.dits import FAMILY_NAMES, build_dit
from autosparse.models.families import family_of

# Tiny token shapes with a few blocks per sequence, so the neighborhood skips some.
TINY_SHAPES = {
    "wan": dict(frames=2, height=32, width=96),
    "hunyuan_video": dict(frames=2, height=32, width=96, text=9),
    "cogvideox": dict(frames=4, height=32, width=96),
    "flux": dict(height=32, width=48, text=5),
}
TINY_WINDOWS = {"wan": [1, 5, 5], "hunyuan_video": [1, 5, 5], "cogvideox": [1, 5, 5], "flux": [5, 5]}
# Generation settings of the real pipelines (short: a demonstration, not a benchmark).
PIPELINE_ARGS = {
    "wan": dict(height=480, width=832, num_frames=33),
    "hunyuan_video": dict(height=720, width=1280, num_frames=33),
    "cogvideox": dict(height=768, width=1360, num_frames=33),
    "flux": dict(height=1024, width=1024),
}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def uncompile(model: torch.nn.Module) -> None:
    """Undo ``compile_repeated_blocks`` (and forget compiled graphs)."""
    torch._dynamo.reset()
    for module in model.modules():
        module._compiled_call_impl = None


def tiny(family: str, use_compile: bool) -> None:
    dit = build_dit(family, "tiny", **TINY_SHAPES[family])
    profile = autosparse.Profile.uniform(dit.model, {"kind": "neighborhood", "window": TINY_WINDOWS[family]},
                                         block_size=(16, 32))
    inputs = dit.inputs()
    tokens = family_of(dit.model).geometry(dit.model, inputs)
    if use_compile:
        dense_model = torch.compile(dit.model)
        sparse_model = torch.compile(dit.model, backend="autosparse", options={"profile": profile})
    else:
        dense_model = sparse_model = dit.model
    with torch.no_grad():
        if use_compile:  # the first call compiles: keep it out of the timing
            dense_model(**inputs)
            sparse_model(**inputs)
        start = time.perf_counter()
        dense = dense_model(**inputs).sample
        dense_s = time.perf_counter() - start
        if not use_compile:
            autosparse.patch_model(dit.model, profile)
        start = time.perf_counter()
        sparse = sparse_model(**inputs).sample
        sparse_s = time.perf_counter() - start
    print(f"{dit.description}: {tokens.length} tokens (grid {tokens.grid}, text {tokens.prefix + tokens.suffix})")
    print(f"dense {dense_s * 1e3:.1f} ms, patched {sparse_s * 1e3:.1f} ms (CPU, tiny: not a speed measurement)")
    print(f"output difference vs dense: {relative_difference(sparse, dense):.3f} (random weights)")
    print(autosparse.stats(dit.model))


def real(family: str, weights: str, profile_path: str | None, steps: int, prompt: str, use_compile: bool) -> None:
    from diffusers import DiffusionPipeline

    if not torch.cuda.is_available():
        raise SystemExit("a real pipeline needs a CUDA GPU")
    pipe = DiffusionPipeline.from_pretrained(weights, torch_dtype=torch.bfloat16).to("cuda")
    if profile_path is None:
        raise SystemExit("--profile is required with --weights (see profiles/)")
    args = dict(prompt=prompt, num_inference_steps=steps, output_type="pt", **PIPELINE_ARGS[family])

    def generate() -> tuple[torch.Tensor, float]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = pipe(**args, generator=torch.Generator("cuda").manual_seed(0))
        torch.cuda.synchronize()
        frames = out.frames if hasattr(out, "frames") else out.images
        return torch.as_tensor(frames).float(), time.perf_counter() - start

    if use_compile:  # the first generation of each includes compiling: one untimed generation first
        pipe.transformer.compile_repeated_blocks()
        generate()
    dense, dense_s = generate()
    if use_compile:
        uncompile(pipe.transformer)
        pipe.transformer.compile_repeated_blocks(backend="autosparse", options={"profile": profile_path})
        generate()
    else:
        autosparse.patch_model(pipe.transformer, profile_path)
    sparse, sparse_s = generate()
    print(f"dense {dense_s:.1f} s, patched {sparse_s:.1f} s: {dense_s / sparse_s:.2f}x")
    print(f"output difference vs dense: {relative_difference(sparse, dense):.4f}")
    print(autosparse.stats(pipe.transformer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=FAMILY_NAMES)
    parser.add_argument("--weights", help="local diffusers pipeline folder (runs the real pipeline on CUDA)")
    parser.add_argument("--profile", help="profile JSON for the real pipeline, e.g. profiles/wan2.1-t2v-1.3b-480p.json")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="dense with inductor, sparse with backend='autosparse'")
    parser.add_argument("--prompt", default="A red fox runs through fresh snow at dawn, cinematic lighting.")
    args = parser.parse_args()
    if args.weights:
        real(args.family, args.weights, args.profile, args.steps, args.prompt, args.compile)
    else:
        tiny(args.family, args.compile)


if __name__ == "__main__":
    main()
