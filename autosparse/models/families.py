"""Per-family knowledge of the models served through hooks: which attention modules to serve, and
the token geometry of their sequences.

A ``Family`` answers two questions a generic capture cannot: which attention modules are self or
joint attention over the image/video tokens (cross-attention and text-only attention stay dense),
and, for one model call, where the grid tokens sit in the attention sequence (the latent grid
T×H×W or H×W in patch units, text before or after it). Everything else is shared. diffusers
families are recognised by class name; a family of plain ``nn.Module`` models (no library, no
``config``) by its structure, and it then also says what identifies the model for a profile. Facts
per model (measured with diffusers 0.42): Wan self-attention is video only (text is in ``attn2``);
FLUX and CogVideoX put the text first; HunyuanVideo puts it last and masks its padding;
HunyuanVideo's token refiner (``context_embedder.*``) is text-only. VGGT alternates frame attention
(one frame) and global attention (all frames, each frame 1 camera + 4 register tokens, then its
patches): only global attention is served.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autosparse.patterns.geometry import TokenGeometry

__all__ = ["Family", "family_of", "structural_family", "vggt_aggregator", "FAMILIES"]

GeometryFn = Callable[[nn.Module, Mapping[str, Any]], TokenGeometry]


@dataclass(frozen=True)
class Family:
    """How autosparse serves one model family.

    Attributes:
        name: short family name (``"wan"``).
        classes: diffusers model class names it covers.
        attention: regular expression a served attention module's qualified name must match.
        geometry: ``(model, forward arguments) -> TokenGeometry`` of the attention sequence of this
            call; None for a model without an adapter (only 1-D patterns apply).
        signature: config fields that decide whether a profile fits the model, or, for a model
            without a ``config``, ``model -> {field: value}`` read from its attributes.
        structure: for plain ``nn.Module`` models: ``model -> bool``, whether the model has this
            family's structure (recognised by attributes, not by class name).
        grid_rank: dims of the token grid ``geometry`` gives (3: T×H×W, 2: H×W); None without a
            grid (no ``geometry``): grid patterns can never run on such a model.
    """

    name: str
    classes: tuple[str, ...]
    attention: str
    geometry: GeometryFn | None
    signature: tuple[str, ...] | Callable[[nn.Module], dict[str, Any]]
    structure: Callable[[nn.Module], bool] | None = None
    grid_rank: int | None = None

    def __post_init__(self) -> None:
        if (self.geometry is None) != (self.grid_rank is None):
            raise ValueError(f"family {self.name!r}: grid_rank must be given exactly when geometry is, "
                             f"got geometry={self.geometry!r}, grid_rank={self.grid_rank!r}")

    def serves(self, name: str) -> bool:
        return re.fullmatch(self.attention, name) is not None

    def signature_fields(self, model: nn.Module) -> dict[str, Any]:
        """The fields a profile records to refuse the wrong model (None: the model has no such field)."""
        if callable(self.signature):
            return self.signature(model)
        config = dict(model.config)
        return {name: config.get(name) for name in self.signature}


def _video_grid(model: nn.Module, latents: torch.Tensor, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent ``[B, C, F, H, W]`` (or CogVideoX's ``[B, F, C, H, W]``, reordered by the caller) over
    the patch size: the token grid the patch embedding makes, raster (frame, row, column)."""
    frames, height, width = latents.shape[-3:]
    grid = (frames // patch[0], height // patch[1], width // patch[2])
    if any(g < 1 for g in grid):
        raise ValueError(f"{type(model).__name__}: latent {tuple(latents.shape)} is smaller than the patch {patch}")
    return grid


def _wan(model: nn.Module, args: Mapping[str, Any]) -> TokenGeometry:
    return TokenGeometry(_video_grid(model, args["hidden_states"], tuple(model.config.patch_size)))


def _hunyuan(model: nn.Module, args: Mapping[str, Any]) -> TokenGeometry:
    config = model.config
    patch = (config.patch_size_t, config.patch_size, config.patch_size)
    grid = _video_grid(model, args["hidden_states"], patch)
    return TokenGeometry(grid, suffix=args["encoder_hidden_states"].shape[1])


def _cogvideox(model: nn.Module, args: Mapping[str, Any]) -> TokenGeometry:
    config = model.config
    latents = args["hidden_states"].transpose(1, 2)  # [B, F, C, H, W] -> [B, C, F, H, W]
    patch = (config.patch_size_t or 1, config.patch_size, config.patch_size)
    return TokenGeometry(_video_grid(model, latents, patch), prefix=args["encoder_hidden_states"].shape[1])


def _flux(model: nn.Module, args: Mapping[str, Any]) -> TokenGeometry:
    """FLUX packs the latent into a sequence; ``img_ids`` holds each token's (0, row, column). The
    grid is read from it once per distinct ``img_ids`` tensor (a pipeline makes one per image)."""
    ids = args["img_ids"]
    ids = ids[0] if ids.dim() == 3 else ids  # older pipelines pass [B, N, 3]
    return TokenGeometry(_flux_grid(ids, args["hidden_states"].shape[1]), prefix=args["encoder_hidden_states"].shape[1])


# The last img_ids checked (a pipeline passes the same tensor at every step): (tensor, version, grid).
_last_flux_ids: tuple[weakref.ref, int, tuple[int, int]] | None = None


def _flux_grid(ids: torch.Tensor, tokens: int) -> tuple[int, int]:
    global _last_flux_ids
    if _last_flux_ids is not None and _last_flux_ids[0]() is ids and _last_flux_ids[1] == ids._version:
        return _last_flux_ids[2]
    rows, cols = (int(x) + 1 for x in ids[:, 1:].amax(0).tolist())
    raster = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    if rows * cols != tokens or not torch.equal(ids[:, 1:].round().long().cpu(), raster):
        raise ValueError(f"FLUX img_ids do not describe a raster {rows}x{cols} grid of {tokens} tokens")
    _last_flux_ids = (weakref.ref(ids), ids._version, (rows, cols))
    return rows, cols


# -- VGGT: recognised by structure (the vggt package is a plain nn.Module, without a config) ----------

_VGGT_ATTRIBUTES = ("frame_blocks", "global_blocks", "patch_start_idx", "patch_size")


def vggt_aggregator(model: nn.Module) -> nn.Module | None:
    """The VGGT aggregator of ``model`` (its ``aggregator``, or the model itself), or None."""
    for candidate in (getattr(model, "aggregator", None), model):
        if isinstance(candidate, nn.Module) and all(hasattr(candidate, a) for a in _VGGT_ATTRIBUTES):
            return candidate
    return None


def _vggt(model: nn.Module, args: Mapping[str, Any]) -> TokenGeometry:
    """Global attention runs over all frames: per frame ``patch_start_idx`` special tokens (camera,
    registers), then its patches in raster order. ``images``: ``[S, 3, H, W]`` or ``[B, S, 3, H, W]``."""
    images, aggregator = args["images"], vggt_aggregator(model)
    if images.dim() not in (4, 5):
        raise ValueError(f"{type(model).__name__}: images of shape {tuple(images.shape)}, expected [B, S, 3, H, W]")
    frames, (height, width), patch = images.shape[-4], images.shape[-2:], aggregator.patch_size
    grid = (frames, height // patch, width // patch)
    if min(grid) < 1:
        raise ValueError(f"{type(model).__name__}: images {tuple(images.shape)} are smaller than the patch {patch}")
    return TokenGeometry(grid, frame_prefix=aggregator.patch_start_idx)


def _vggt_signature(model: nn.Module) -> dict[str, Any]:
    aggregator = vggt_aggregator(model)
    attention = aggregator.global_blocks[0].attn
    return {"depth": len(aggregator.global_blocks), "embed_dim": aggregator.camera_token.shape[-1],
            "num_heads": attention.num_heads, "head_dim": attention.head_dim, "patch_size": aggregator.patch_size,
            "patch_start_idx": aggregator.patch_start_idx, "aa_block_size": getattr(aggregator, "aa_block_size", None),
            "aa_order": list(getattr(aggregator, "aa_order", [])) or None}


FAMILIES = (
    Family("wan", ("WanTransformer3DModel",), r"blocks\.\d+\.attn1", _wan,
           ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "ffn_dim"),
           grid_rank=3),
    Family("hunyuan_video", ("HunyuanVideoTransformer3DModel",), r"(single_)?transformer_blocks\.\d+\.attn", _hunyuan,
           ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "patch_size",
            "patch_size_t", "in_channels"), grid_rank=3),
    Family("cogvideox", ("CogVideoXTransformer3DModel",), r"transformer_blocks\.\d+\.attn1", _cogvideox,
           ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "patch_size_t", "in_channels"),
           grid_rank=3),
    Family("flux", ("FluxTransformer2DModel",), r"(single_)?transformer_blocks\.\d+\.attn", _flux,
           ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "patch_size",
            "in_channels"), grid_rank=2),
    Family("vggt", (), r"(aggregator\.)?global_blocks\.\d+\.attn", _vggt, _vggt_signature,
           structure=lambda model: vggt_aggregator(model) is not None, grid_rank=3),
)

# Any other diffusers model: every attention module is captured, its geometry is unknown (1-D
# patterns only) and calls with query length != key length (cross-attention) run dense.
GENERIC = Family("generic", (), r".*", None,
                 ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "in_channels"))


def family_of(model: nn.Module) -> Family:
    """The family serving ``model``: by class name, else by structure, else ``GENERIC``."""
    by_class = next((f for f in FAMILIES if type(model).__name__ in f.classes), None)
    return by_class or structural_family(model) or GENERIC


def structural_family(model: nn.Module) -> Family | None:
    """The family that recognises ``model`` by its structure (a plain ``nn.Module``), or None."""
    return next((f for f in FAMILIES if f.structure is not None and f.structure(model)), None)
