"""What a candidate pattern costs at one layer shape, relative to dense attention.

On a CUDA GPU: measured. The kernel runs the candidate on every head of a layer of this shape
(random q/k/v, the layout in the order the runtime uses), against ``F.scaled_dot_product_attention``
(cuDNN/flash) at the same shape, both as GPU time with calls queued back to back (``gpu_ms``); the ratio is cached per device, software and shape class in
``$AUTOSPARSE_CACHE_DIR/layout_costs.json``, so a shape is timed once per machine. Elsewhere: the
key blocks computed over those dense attention computes (the CPU model of kernel time). A ratio of
1 or more means the pattern is not faster than dense here: the search then keeps the head dense.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from autosparse.kernels import cache
from autosparse.layout import BlockLayout, block_mask
from autosparse.patterns.basic import BlockGeometry, Pattern
from autosparse.runtime import ORIGINAL_SDPA
from autosparse.kernels.tuning import gpu_ms

__all__ = ["LayerShape", "relative_costs"]

_CACHE = "layout_costs.json"


@dataclass(frozen=True)
class LayerShape:
    """One attention call's shape as the kernel sees it."""

    geometry: BlockGeometry
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def key(self, device: torch.device) -> str:
        import triton

        g = self.geometry
        index = device.index if device.index is not None else torch.cuda.current_device()
        tokens = "" if g.tokens is None else f" tokens {g.tokens}"
        return (f"{torch.cuda.get_device_name(index)} torch {torch.__version__} triton {triton.__version__} | "
                f"{g.q_len}x{g.kv_len} {'causal' if g.causal else 'full'} blocks {g.q_block}x{g.kv_block} "
                f"h{self.heads}/{self.kv_heads} d{self.head_dim} {str(self.dtype).replace('torch.', '')}{tokens}")


def relative_costs(candidates: Sequence[Pattern], shape: LayerShape, device: torch.device,
                   time_fn: Callable[[Callable[[], object]], float] | None = None) -> list[float]:
    """Per candidate: its time over dense attention's at ``shape`` (measured on CUDA; key blocks
    elsewhere). ``time_fn`` (ms of a call) replaces the GPU timer, for tests."""
    if device.type != "cuda" and time_fn is None:
        dense_blocks = float(shape.geometry.reachable().sum())
        return [float(block_mask(p, shape.geometry).sum()) / dense_blocks for p in candidates]
    time_fn = time_fn or gpu_ms
    key = shape.key(device) if device.type == "cuda" else None
    known = dict(cache.entries(_CACHE).get(key, {})) if key else {}
    q, k, v = _inputs(shape, device)
    if "dense" not in known:
        # torch's own function: during calibration F.scaled_dot_product_attention may be autosparse's
        known["dense"] = time_fn(lambda: ORIGINAL_SDPA(q, k, v, is_causal=shape.geometry.causal,
                                                       enable_gqa=shape.heads != shape.kv_heads))
    for pattern in candidates:
        name = pattern.short_str()
        if name not in known:
            known[name] = known["dense"] if pattern.is_dense else time_fn(_kernel_call(pattern, shape, q, k, v))
    if key:
        cache.store(_CACHE, key, known)
    return [known[p.short_str()] / known["dense"] for p in candidates]


def _inputs(shape: LayerShape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = shape.geometry
    q = torch.randn(1, shape.heads, g.q_len, shape.head_dim, device=device, dtype=shape.dtype)
    k = torch.randn(1, shape.kv_heads, g.kv_len, shape.head_dim, device=device, dtype=shape.dtype)
    return q, k, torch.randn_like(k)


def _kernel_call(pattern: Pattern, shape: LayerShape, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> Callable[[], object]:
    g = shape.geometry
    layout = BlockLayout.from_patterns([pattern] * shape.heads, g, q.device)
    schedule = layout.schedule(shape.heads // shape.kv_heads)

    def call() -> object:
        return torch.ops.autosparse.block_sparse_attention(q, k, v, layout.kv_indices, layout.kv_counts, None,
                                                           schedule, g.q_block, g.kv_block, g.causal,
                                                           shape.head_dim ** -0.5, None)

    return call
