"""What both capture routes share: the name autosparse registers, the attribute carrying a served
module's layer id, and which SDPA-style calls the op can take."""

from __future__ import annotations

import math

import torch

__all__ = ["GRAD_REASON", "IMPLEMENTATION", "LAYER_ATTR", "needs_grad", "sdpa_reason"]

IMPLEMENTATION = "autosparse"
LAYER_ATTR = "_autosparse_layer"  # on each served attention module: its 0-d CPU int64 layer id
GRAD_REASON = "autograd (the kernel has no backward)"


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def sdpa_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float,
                 scale: float | None, enable_gqa: bool) -> str | None:
    """Why the op cannot take this SDPA call (it takes 4-D ``[B, H, S, D]`` with one batch size and
    GQA by head mapping); None if it can."""
    if dropout_p > 0.0:
        return "dropout"
    if needs_grad(query, key, value):
        return GRAD_REASON
    if not query.dim() == key.dim() == value.dim() == 4:
        return f"q/k/v of {query.dim()}/{key.dim()}/{value.dim()} dims (the op takes [B, H, S, D])"
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        return "k/v broadcast over the batch"
    if key.shape[1] != value.shape[1] or query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads over {key.shape[1]}/{value.shape[1]} key/value heads"
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return "query and key heads differ without enable_gqa (torch refuses)"
    if scale is not None and not (math.isfinite(scale) and scale > 0.0):
        return f"scale {scale!r} (the kernel takes a positive finite scale)"
    return None
