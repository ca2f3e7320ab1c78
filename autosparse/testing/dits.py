"""Random-weight diffusion transformers at tiny (CPU tests, examples) and real (GPU benchmarks) shapes.

Random weights give near-uniform attention: these models are for plumbing and speed, never for
judging quality (that needs real weights and the search). Real shapes follow the public configs
(see TARGETS.md); ``layers`` trims depth when only per-layer shapes matter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DiT", "FAMILY_NAMES", "build_dit"]

FAMILY_NAMES = ("wan", "hunyuan_video", "cogvideox", "flux")


@dataclass
class DiT:
    """A model and a function making one forward call's keyword arguments (fresh random tensors)."""

    model: nn.Module
    inputs: Callable[..., dict[str, Any]]
    description: str


def build_dit(family: str, size: str = "tiny", *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, layers: int | None = None, seed: int = 0,
              config: dict[str, Any] | None = None, **shape: Any) -> DiT:
    """Build ``family`` (one of FAMILY_NAMES) at ``size`` "tiny" or "real".

    ``shape`` overrides the token shape of the inputs: ``frames``/``height``/``width`` in latent
    pixels for video (``height``/``width`` for FLUX), ``text`` tokens. ``config`` overrides
    constructor arguments (e.g. Wan2.1-14B: ``num_attention_heads=40, num_layers=40, ffn_dim=13824``).
    The model is created directly on ``device`` (real sizes would take minutes to initialise on a
    CPU; ``"meta"`` builds the structure only, enough for a profile).
    """
    builders = {"wan": _wan, "hunyuan_video": _hunyuan, "cogvideox": _cogvideox, "flux": _flux}
    if family not in builders:
        raise ValueError(f"family: expected one of {FAMILY_NAMES}, got {family!r}")
    if size not in ("tiny", "real"):
        raise ValueError(f"size: expected 'tiny' or 'real', got {size!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        model, make_inputs, description = builders[family](size == "real", layers, shape, config or {})
    if config:  # the shape named in the description is the family's default one
        description += f", config overrides {config}"
    if dtype != torch.float32:
        model = model.to(dtype)
    model = model.eval().requires_grad_(False)

    def inputs(batch: int = 1, timestep: float = 500.0) -> dict[str, Any]:
        keep = ("timestep", "img_ids", "txt_ids")  # float32 as pipelines make them
        return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k not in keep else v)
                for k, v in make_inputs(batch, timestep, torch.device(device)).items()}

    return DiT(model, inputs, description)


def _depth(real: bool, layers: int | None, full: int, tiny: int) -> int:
    return layers if layers is not None else (full if real else tiny)


def _wan(real: bool, layers: int | None, shape: dict[str, Any], config: dict[str, Any]):
    from diffusers import WanTransformer3DModel

    # Wan2.1-T2V-1.3B: 12 heads x 128, ffn 8960, 30 layers; 480p/81f -> latent 21x60x104.
    heads, head_dim = (12, 128) if real else (2, 16)
    model = WanTransformer3DModel(**{**dict(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16 if real else 4,
        out_channels=16 if real else 4, text_dim=4096 if real else 32, freq_dim=256 if real else 32,
        ffn_dim=8960 if real else 64, num_layers=_depth(real, layers, 30, 2), rope_max_seq_len=1024 if real else 64,
    ), **config})
    frames, height, width = (shape.get(k, d) for k, d in zip(("frames", "height", "width"),
                                                              (21, 60, 104) if real else (3, 8, 12)))
    text = shape.get("text", 512 if real else 7)
    channels, text_dim = model.config.in_channels, model.config.text_dim

    def inputs(batch: int, timestep: float, device: torch.device) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(batch, channels, frames, height, width, device=device),
            "timestep": torch.full((batch,), timestep, device=device),
            "encoder_hidden_states": torch.randn(batch, text, text_dim, device=device),
        }

    return model, inputs, f"Wan2.1 {'1.3B-shaped' if real else 'tiny'}: latent {frames}x{height}x{width}, text {text}"


def _hunyuan(real: bool, layers: int | None, shape: dict[str, Any], config: dict[str, Any]):
    from diffusers import HunyuanVideoTransformer3DModel

    # HunyuanVideo: 20 dual + 40 single blocks, 24 heads x 128; 720p/129f -> latent 33x90x160.
    dual, single = (20, 40) if real else (1, 1)
    if layers is not None:
        dual, single = layers // 3, layers - layers // 3
    model = HunyuanVideoTransformer3DModel(**{**dict(
        in_channels=16 if real else 4, out_channels=16 if real else 4, num_attention_heads=24 if real else 2,
        attention_head_dim=128 if real else 16, num_layers=dual, num_single_layers=single,
        num_refiner_layers=2 if real else 1, patch_size=2, patch_size_t=1, text_embed_dim=4096 if real else 32,
        pooled_projection_dim=768 if real else 16, rope_axes_dim=(16, 56, 56) if real else (4, 6, 6),
    ), **config})
    frames, height, width = (shape.get(k, d) for k, d in zip(("frames", "height", "width"),
                                                              (33, 90, 160) if real else (3, 8, 12)))
    text = shape.get("text", 256 if real else 9)
    config = model.config

    def inputs(batch: int, timestep: float, device: torch.device) -> dict[str, Any]:
        valid = torch.ones(batch, text, dtype=torch.long, device=device)
        valid[:, text - text // 3:] = 0  # padded prompt: the last third of the text tokens
        return {
            "hidden_states": torch.randn(batch, config.in_channels, frames, height, width, device=device),
            "timestep": torch.full((batch,), timestep, device=device),
            "encoder_hidden_states": torch.randn(batch, text, config.text_embed_dim, device=device),
            "encoder_attention_mask": valid,
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, device=device),
            "guidance": torch.full((batch,), 6016.0, device=device),
        }

    return model, inputs, f"HunyuanVideo {'13B-shaped' if real else 'tiny'}: latent {frames}x{height}x{width}, text {text}"


def _cogvideox(real: bool, layers: int | None, shape: dict[str, Any], config: dict[str, Any]):
    from diffusers import CogVideoXTransformer3DModel

    # CogVideoX1.5-5B: 42 layers, 48 heads x 64, patch 2, patch_t 2, text 226.
    model = CogVideoXTransformer3DModel(**{**dict(
        num_attention_heads=48 if real else 2, attention_head_dim=64 if real else 16, in_channels=16 if real else 4,
        out_channels=16 if real else 4, time_embed_dim=512 if real else 32, ofs_embed_dim=512 if real else None,
        text_embed_dim=4096 if real else 32, num_layers=_depth(real, layers, 42, 2),
        sample_width=170 if real else 12, sample_height=96 if real else 8, sample_frames=81 if real else 9,
        patch_size=2, patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=226 if real else 7,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
    ), **config})
    frames, height, width = (shape.get(k, d) for k, d in zip(("frames", "height", "width"),
                                                              (22, 96, 170) if real else (4, 8, 12)))
    text = shape.get("text", model.config.max_text_seq_length)
    config = model.config

    def inputs(batch: int, timestep: float, device: torch.device) -> dict[str, Any]:
        args = {
            "hidden_states": torch.randn(batch, frames, config.in_channels, height, width, device=device),
            "encoder_hidden_states": torch.randn(batch, text, config.text_embed_dim, device=device),
            "timestep": torch.full((batch,), int(timestep), device=device, dtype=torch.long),
            "image_rotary_emb": _cogvideox_rope(config, frames, height, width, device),
        }
        if config.ofs_embed_dim:
            args["ofs"] = torch.full((batch,), 2.0, device=device)
        return args

    return model, inputs, f"CogVideoX {'1.5-5B-shaped' if real else 'tiny'}: latent {frames}x{height}x{width}, text {text}"


def _cogvideox_rope(config: Any, frames: int, height: int, width: int, device: torch.device):
    """The rotary table the CogVideoX pipeline passes (3-D, over the patch grid)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    grid = (frames // config.patch_size_t, height // config.patch_size, width // config.patch_size)
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=config.attention_head_dim, crops_coords=None, grid_size=(grid[1], grid[2]),
        temporal_size=grid[0], grid_type="slice", max_size=(grid[1], grid[2]), device=device,
    )
    return cos, sin


def _flux(real: bool, layers: int | None, shape: dict[str, Any], config: dict[str, Any]):
    from diffusers import FluxTransformer2DModel

    # FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128, text 512; 1024^2 -> 64x64 tokens.
    double, single = (19, 38) if real else (1, 1)
    if layers is not None:
        double, single = layers // 3, layers - layers // 3
    model = FluxTransformer2DModel(**{**dict(
        patch_size=1, in_channels=64 if real else 16, num_layers=double, num_single_layers=single,
        attention_head_dim=128 if real else 16, num_attention_heads=24 if real else 2,
        joint_attention_dim=4096 if real else 32, pooled_projection_dim=768 if real else 16,
        guidance_embeds=real, axes_dims_rope=(16, 56, 56) if real else (4, 6, 6),
    ), **config})
    height, width = (shape.get(k, d) for k, d in zip(("height", "width"), (64, 64) if real else (4, 6)))
    text = shape.get("text", 512 if real else 5)
    config = model.config

    def inputs(batch: int, timestep: float, device: torch.device) -> dict[str, Any]:
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device)
        args = {
            "hidden_states": torch.randn(batch, height * width, config.in_channels, device=device),
            "encoder_hidden_states": torch.randn(batch, text, config.joint_attention_dim, device=device),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, device=device),
            "timestep": torch.full((batch,), timestep / 1000, device=device),
            "img_ids": img_ids,
            "txt_ids": torch.zeros(text, 3, device=device),
        }
        if config.guidance_embeds:
            args["guidance"] = torch.full((batch,), 3.5, device=device)
        return args

    return model, inputs, f"FLUX.1-dev {'shaped' if real else 'tiny'}: {height}x{width} tokens, text {text}"
