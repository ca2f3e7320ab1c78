"""Write the shipped structural profiles (uncalibrated) for the diffusion transformers in TARGETS.md.

    python profiles/make_structural.py            # rewrites profiles/*.json next to this file

Each model is built on the meta device (structure only, no weights) with its public config; the
window is the largest tile-stepped neighborhood within the block density below at the target
resolution (``autosparse.search.structural.tile_window``), dense for the first denoising steps (about the
first fifth of the default step count). Wan2.1-1.3B at 480p gets 0.20: its 30-row latent grid is not
a multiple of the 8-row tile, and within 0.15 only a 2-frame window fits.
"""

from __future__ import annotations

from pathlib import Path

from autosparse.testing.dits import build_dit
from autosparse.search.structural import structural_profile
from autosparse.patterns.geometry import TokenGeometry

HERE = Path(__file__).resolve().parent
WAN_14B = {"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824}

# file, family, config overrides, token geometry at the target resolution, block density, dense steps, target
TARGETS = [
    ("wan2.1-t2v-1.3b-480p.json", "wan", {}, TokenGeometry((21, 30, 52)), 0.20, 10, "480p (832x480), 81 frames, 50 steps"),
    ("wan2.1-t2v-14b-720p.json", "wan", WAN_14B, TokenGeometry((21, 45, 80)), 0.15, 10, "720p (1280x720), 81 frames, 50 steps"),
    ("hunyuanvideo-720p.json", "hunyuan_video", {}, TokenGeometry((33, 45, 80), suffix=256), 0.15, 10,
     "720p (1280x720), 129 frames, 50 steps, text up to 256 tokens"),
    ("cogvideox1.5-5b.json", "cogvideox", {}, TokenGeometry((11, 48, 85), prefix=226), 0.15, 10,
     "1360x768, 81 frames, 50 steps"),
    ("flux.1-dev-1024.json", "flux", {}, TokenGeometry((64, 64), prefix=512), 0.30, 7, "1024x1024, 28 steps"),
    ("flux.1-dev-2048.json", "flux", {}, TokenGeometry((128, 128), prefix=512), 0.15, 7, "2048x2048, 28 steps"),
]


def main() -> None:
    for name, family, config, tokens, density, dense_steps, target in TARGETS:
        model = build_dit(family, "real", device="meta", config=config).model
        profile = structural_profile(model, tokens, density=density, dense_steps=dense_steps, target=target)
        profile.save(HERE / name)
        search = profile.search
        print(f"{name}: {search['pattern']['window']} stride {search['pattern']['stride']}, "
              f"block density {search['block_density']} at {target}")


if __name__ == "__main__":
    main()
