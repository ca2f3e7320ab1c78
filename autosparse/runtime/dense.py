"""The dense answer: ``F.scaled_dot_product_attention`` as torch defines it, in the op's output layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

__all__ = ["ORIGINAL_SDPA", "dense", "dense_heads", "empty_output", "kernel_causal", "softmax_scale"]

# F.scaled_dot_product_attention as torch defines it: the hook capture (diffusers, VGGT) replaces the module
# attribute, and every dense call here must reach the real one.
ORIGINAL_SDPA = F.scaled_dot_product_attention


def empty_output(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, Dv]`` backed by ``[B, S, H, Dv]`` memory: what the kernel writes, and what every
    path returns (a compiled graph plans for one layout)."""
    b, h, s, _ = query.shape
    return query.new_empty(b, s, h, value.shape[-1]).transpose(1, 2)


def dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
          is_causal: bool, scale: float | None) -> torch.Tensor:
    """The call exactly as ``F.scaled_dot_product_attention`` answers it, in the op's output layout."""
    out = empty_output(query, value)
    out.copy_(ORIGINAL_SDPA(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scale,
                            enable_gqa=query.shape[1] != key.shape[1]))
    return out


def dense_heads(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: torch.Tensor,
                kv_heads: torch.Tensor, causal: bool, scale: float) -> None:
    """Write SDPA's answer for query ``heads`` (reading KV ``kv_heads``) into ``out``: the dense heads
    of a mixed layer (cuDNN/flash beat the block-sparse kernel at density 1). ``causal`` is the
    kernel's, bottom-right: with a KV-cache prefix (more keys than queries) torch's lower-right
    causal bias (flash where it can), as SDPA's ``is_causal`` is top-left."""
    mask, is_causal = kernel_causal(query, key, causal)
    answer = ORIGINAL_SDPA(query.index_select(1, heads), key.index_select(1, kv_heads), value.index_select(1, kv_heads),
                           attn_mask=mask, is_causal=is_causal, scale=scale)
    out.transpose(1, 2).index_copy_(2, heads, answer.transpose(1, 2))


def kernel_causal(query: torch.Tensor, key: torch.Tensor, causal: bool) -> tuple[torch.Tensor | None, bool]:
    """SDPA's ``(attn_mask, is_causal)`` for the kernel's ``causal`` (bottom-right): ``is_causal``
    (top-left) where queries and keys are as many, else torch's lower-right causal bias (a chunk
    after a KV-cache prefix; flash where it can, no materialised mask)."""
    if causal and key.shape[2] != query.shape[2]:
        if F.scaled_dot_product_attention is not ORIGINAL_SDPA:
            # The hook capture replaced F.scaled_dot_product_attention: a CausalBias then no longer
            # dispatches (its __torch_function__ checks for that attribute) and would be read as a
            # plain tensor, silently wrong. The same mask, materialised.
            mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
            return mask.tril_(key.shape[2] - query.shape[2]), False
        return causal_lower_right(query.shape[2], key.shape[2]), False
    return None, causal


def softmax_scale(query: torch.Tensor, scale: float | None) -> float:
    """SDPA's scale: the given one, else 1 / sqrt(head_dim)."""
    return scale if scale is not None else query.shape[-1] ** -0.5
