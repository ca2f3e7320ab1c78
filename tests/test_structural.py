"""Structural profiles: tile-stepped neighborhoods sized by block density, and the shipped files."""

import json
from pathlib import Path

import pytest
import torch

import autosparse
from autosparse import BlockGeometry, BlockLayout, TokenGeometry
from autosparse.testing.dits import build_dit
from autosparse.search.structural import structural_profile, tile_window

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
WAN_14B = {"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824}
SHIPPED = {  # file -> (family, config overrides)
    "wan2.1-t2v-1.3b-480p.json": ("wan", {}),
    "wan2.1-t2v-14b-720p.json": ("wan", WAN_14B),
    "hunyuanvideo-720p.json": ("hunyuan_video", {}),
    "cogvideox1.5-5b.json": ("cogvideox", {}),
    "flux.1-dev-1024.json": ("flux", {}),
    "flux.1-dev-2048.json": ("flux", {}),
}


@pytest.mark.parametrize("target", [0.1, 0.3])
def test_tile_window_is_full_block_on_a_divisible_grid(target):
    """stride = tile and an odd number of tiles per dim: every computed block is full, so the block
    density is the rule's own token density (the Sliding-Tile speed-of-light case)."""
    tokens = TokenGeometry((4, 16, 32))
    pattern, density = tile_window(tokens, target)
    assert pattern.stride == (2, 8, 8) and density <= target
    assert all((w // s) % 2 == 1 or w == n for w, s, n in zip(pattern.window, pattern.stride, tokens.grid))
    tiled = tokens.with_tile((2, 8, 8))
    layout = BlockLayout.from_patterns([pattern], BlockGeometry(tiled.length, tiled.length, 64, 128, False, tiled))
    token_density = layout.to_dense().double().mean().item()
    assert density == pytest.approx(token_density, abs=1e-9)


def test_tile_window_refuses_an_unreachable_density():
    with pytest.raises(ValueError, match="no tile-stepped window reaches block density <= 0.001"):
        tile_window(TokenGeometry((4, 16, 32)), 0.001)
    with pytest.raises(ValueError, match="density must be in"):
        tile_window(TokenGeometry((4, 16, 32)), 0.0)


def test_structural_profile_metadata_and_dense_steps(tmp_path):
    dit = build_dit("wan", "tiny")
    profile = structural_profile(dit.model, TokenGeometry((4, 16, 32)), density=0.3, dense_steps=3, target="test")
    profile.save(tmp_path / "p.json")
    loaded = autosparse.Profile.load(tmp_path / "p.json")
    assert loaded.search["calibrated"] is False and "autosparse profile" in loaded.search["note"]
    assert loaded.patterns("blocks.0.attn1", 2, step=2) == (autosparse.Dense(),) * 2
    assert loaded.patterns("blocks.0.attn1", 2, step=3)[0].kind == "neighborhood"
    loaded.check_model(dit.model)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profiles_fit_their_models(name):
    family, config = SHIPPED[name]
    model = build_dit(family, "real", device="meta", config=config).model
    profile = autosparse.Profile.load(PROFILES / name)
    profile.check_model(model)
    assert profile.search["calibrated"] is False and profile.steps and profile.steps[0].dense
    data = json.loads((PROFILES / name).read_text())
    assert data["search"]["block_density"] <= 0.3


def test_shipped_profiles_are_listed():
    """Every DiT profile in profiles/ is checked above."""
    shipped = {p.name for p in PROFILES.glob("*.json")} - {"smollm2-135m.json"}
    assert shipped == set(SHIPPED)
