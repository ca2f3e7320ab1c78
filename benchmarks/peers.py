"""The peers side by side: every attention kernel we compete with, one process, the same q/k/v, the
same block layout, every output checked.

Why one script: ratios between kernels measured in different runs carry the run-to-run spread of
the machine (several % on the lent H200), and a fast kernel that computes the wrong mask is worth
nothing. So each case builds one bf16 q/k/v ([B, S, H, D] memory, the layout a model's projections
produce; [B, H, S, D] peers get transposed views of it) and one block layout, runs every peer on
them, compares each output with float32 attention on the exact token mask that peer was asked to
compute (sampled query rows, every head), and times it with ``triton.testing.do_bench`` (median).

Rows: cuDNN SDPA, default SDPA, FA4 dense, SageAttention 1.0.6 dense; FlexAttention (Triton and
FLASH backends) on the layout's ``BlockMask``; FA4 block-sparse on the layout; ours (the Triton
kernel through ``KernelCall``) and, where ``autosparse.kernels.backends.choose_backend`` exists, the
backend it picks; FastVideo STA/VSA and FlashInfer where they cannot run, with the reason.

    python3 benchmarks/peers.py --out DIR            # the H200 run (after benchmarks/device_setup.sh)
    python3 benchmarks/peers.py --quick              # tiny shapes: a smoke test on any machine
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from autosparse.kernels import KernelCall
from autosparse.layout import BlockLayout
from autosparse.patterns import BlockGeometry

REASON_CHARS = 150  # an exception's text is kept to this many characters in the table
WRONG_FACTOR = 3.0  # a row whose max abs error exceeds this many times ours is WRONG
SAMPLED_ROWS = 384  # query rows per head compared with float32 attention

# Quoted, not measured here: FastVideo's kernels on the H200 on 2026-12-03 (issue 16), the last time
# fastvideo-kernel could be loaded on the device.
FASTVIDEO_QUOTE = ("numbers of 2026-12-03 (issue 16), not re-measured: Wan 720p (3,3,3) STA ThunderKittens "
                   "8.07 ms vs FA4 7.01 ms and ours 8.85 ms; VSA ThunderKittens 4-13 % slower than ours; "
                   "STA Triton 1.17-1.38x slower than ours")
FASTVIDEO_REGISTRY = ("this workplace's registry has no fastvideo-kernel 0.3.5 wheel for cp312/manylinux "
                      "(pip download --only-binary: 'No matching distribution found for fastvideo-kernel==0.3.5'; "
                      "only the 42 MB sdist, a CUDA/ThunderKittens build)")


# ----------------------------------------------------------------------------------------------------
# cases and layouts
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One set of q/k/v: bf16, B=1, [1, S, H, D]."""

    name: str
    heads: int
    seq: int
    head_dim: int
    causal: bool


@dataclass(frozen=True)
class LayoutSpec:
    """A block layout on a shape: random blocks at ``density`` (of the causally reachable blocks), or
    STA's tile pattern: tokens of a (T, H, W) ``grid`` in ``tile`` order, each query tile keeping the
    ``window`` of tiles around it (centre clamped inside the grid, as STA and NATTEN do)."""

    name: str
    q_block: int = 128
    kv_block: int = 128
    density: float | None = None
    grid: tuple[int, int, int] | None = None
    tile: tuple[int, int, int] = (4, 8, 8)
    window: tuple[int, int, int] = (3, 3, 3)


@dataclass(frozen=True)
class Case:
    shape: Shape
    layouts: tuple[LayoutSpec, ...]


LLM32K = Shape("LLM 32K d128 causal", 32, 32768, 128, True)
WAN = Shape("Wan2.1-1.3B 480p/81f", 12, 21 * 30 * 52, 128, False)
HUNYUAN = Shape("HunyuanVideo 720p/129f", 24, 33 * 45 * 80, 128, False)

# In order of importance: the run stops starting cases once its time budget is spent.
CASES: tuple[Case, ...] = (
    Case(LLM32K, (LayoutSpec("random 0.1, 128x128", density=0.1),
                  LayoutSpec("random 0.1, 64x128", q_block=64, density=0.1))),
    Case(WAN, (LayoutSpec("STA tiles (4,8,8) window (3,3,3)", grid=(21, 30, 52)),)),
    Case(LLM32K, (LayoutSpec("random 0.3, 128x128", density=0.3),
                  LayoutSpec("random 0.3, 64x128", q_block=64, density=0.3))),
    Case(HUNYUAN, (LayoutSpec("STA tiles (4,8,8) window (3,3,3)", grid=(33, 45, 80)),)),
    Case(Shape("LLM 32K d64 causal", 32, 32768, 64, True), (LayoutSpec("random 0.1, 128x128", density=0.1),)),
    Case(Shape("LLM 8K d128 causal", 32, 8192, 128, True), (LayoutSpec("random 0.3, 128x128", density=0.3),)),
    Case(Shape("LLM 128K d128 causal", 32, 131072, 128, True), (LayoutSpec("random 0.1, 128x128", density=0.1),)),
)
QUICK_CASES: tuple[Case, ...] = (
    Case(Shape("quick causal", 2, 512, 64, True), (LayoutSpec("random 0.3, 128x128", density=0.3),
                                                   LayoutSpec("random 0.3, 64x128", q_block=64, density=0.3))),
    Case(Shape("quick grid", 2, 8 * 16 * 16, 64, False), (LayoutSpec("STA tiles (2,4,8) window (3,3,3)",
                                                                     grid=(8, 16, 16), tile=(2, 4, 8)),)),
)


def random_blocks(geometry: BlockGeometry, heads: int, density: float, gen: torch.Generator) -> Tensor:
    """Bool [H, NQ, NK]: each causally reachable block kept with probability ``density``, plus the
    key block of each query block's first row, so that no query row is left with nothing to attend
    (an empty row's output is a convention that differs between kernels, not a measurement)."""
    reachable = geometry.reachable()
    nq, nk = reachable.shape
    keep = torch.rand(heads, nq, nk, generator=gen) < density
    first_key = (torch.arange(nq) * geometry.q_block) // geometry.kv_block
    keep[:, torch.arange(nq), first_key] = True
    return keep & reachable


def tile_blocks(seq: int, q_block: int, kv_block: int, grid: Sequence[int], tile: Sequence[int],
                window: Sequence[int]) -> Tensor:
    """Bool [NQ, NK] of STA's pattern in tile order: a query block attends a key block if some token
    of one lies in the window of tiles around a token's tile of the other. Tiles at the grid's far
    edges are partial when the grid is not a multiple of the tile, so blocks may straddle tiles."""
    if math.prod(grid) != seq:
        raise ValueError(f"grid {tuple(grid)} holds {math.prod(grid)} tokens, expected seq={seq}")
    axes = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    tile_of = [a.flatten() // t for a, t in zip(axes, tile)]  # per token (raster order), per dim
    inner = [a.flatten() % t for a, t in zip(axes, tile)]
    counts = [-(-n // t) for n, t in zip(grid, tile)]
    tile_id = (tile_of[0] * counts[1] + tile_of[1]) * counts[2] + tile_of[2]
    key = ((tile_id * tile[0] + inner[0]) * tile[1] + inner[1]) * tile[2] + inner[2]
    tile_id = tile_id[torch.argsort(key)]  # tile order: tile by tile, raster inside each
    # tile window: per dim, the w tiles starting at clamp(c - w // 2, 0, n - w)
    near = torch.ones(1, 1, dtype=torch.bool)
    for n, w in zip(counts, window):
        c = torch.arange(n)
        start = (c - w // 2).clamp(0, max(n - w, 0))
        dim = (c[None, :] >= start[:, None]) & (c[None, :] < start[:, None] + w)
        near = (near[:, None, :, None] & dim[None, :, None, :]).flatten(0, 1).flatten(1, 2)
    ntiles = math.prod(counts)

    def incidence(block: int) -> Tensor:  # [blocks, tiles]: which tiles a block's tokens lie in
        blocks = torch.arange(seq) // block
        m = torch.zeros(int(blocks[-1]) + 1, ntiles)
        m[blocks, tile_id] = 1.0
        return m

    return (incidence(q_block) @ near.float() @ incidence(kv_block).T) > 0


def build_layout(shape: Shape, spec: LayoutSpec, gen: torch.Generator) -> BlockLayout:
    geometry = BlockGeometry(shape.seq, shape.seq, spec.q_block, spec.kv_block, shape.causal)
    if spec.grid is not None:
        blocks = tile_blocks(shape.seq, spec.q_block, spec.kv_block, spec.grid, spec.tile, spec.window)
        blocks = blocks[None].expand(shape.heads, -1, -1)
    else:
        blocks = random_blocks(geometry, shape.heads, spec.density, gen)
    return BlockLayout.from_block_mask(blocks.contiguous(), geometry)


def layout_blocks(layout: BlockLayout) -> Tensor:
    """Bool [H, NQ, NK] of the listed blocks."""
    g = layout.geometry
    counts, idx = layout.kv_counts[0].long(), layout.kv_indices[0].long()
    live = torch.arange(idx.shape[-1], device=idx.device) < counts[..., None]
    out = torch.zeros(*idx.shape[:2], g.num_kv_blocks + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(2, torch.where(live, idx, g.num_kv_blocks), True)
    return out[..., :-1]


# ----------------------------------------------------------------------------------------------------
# the layout in each peer's format
# ----------------------------------------------------------------------------------------------------
def fa4_block_sparse(layout: BlockLayout) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """FA4's ``(mask_block_cnt [1, H, M], mask_block_idx [1, H, M, N], (q_block, kv_block))`` of the
    layout as it is (no re-blocking: the peer as a user would call it; ``kernels.backends``)."""
    from autosparse.kernels.backends import fa4_lists

    g = layout.geometry
    return fa4_lists(layout.kv_counts, layout.kv_indices, g.q_block, g.kv_block, g.kv_len, reblock=False)


def flex_block_mask(layout: BlockLayout, flex=None):
    """FlexAttention's ``BlockMask`` of the layout. Blocks the causal rule leaves whole are full
    blocks (no mask_mod: the work Flex is best at), those it cuts are partial. The mask_mod is the
    whole token mask (listed block and causal rule, bottom-right aligned as ours), not the causal
    rule alone: eager flex_attention ignores the block lists and applies only the mask_mod to every
    score (torch 2.13 ``_math_attention_inner``), and the compiled kernel calls it on partial blocks."""
    if flex is None:
        import torch.nn.attention.flex_attention as flex
    g = layout.geometry
    blocks = layout_blocks(layout)
    shift = g.kv_len - g.q_len
    if g.causal:
        first_q = torch.arange(g.num_q_blocks, device=blocks.device) * g.q_block + shift
        last_k = (torch.arange(g.num_kv_blocks, device=blocks.device) + 1) * g.kv_block - 1
        whole = last_k[None, :] <= first_q[:, None]
    else:
        whole = torch.ones(g.num_q_blocks, g.num_kv_blocks, dtype=torch.bool, device=blocks.device)

    def lists(m: Tensor) -> tuple[Tensor, Tensor]:
        cnt = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # listed first, ascending
        return cnt[None].contiguous(), idx[None].contiguous()

    full_cnt, full_idx = lists(blocks & whole)
    part_cnt, part_idx = lists(blocks & ~whole)
    last_q, last_k = g.num_q_blocks - 1, g.num_kv_blocks - 1

    def token_mask(b, h, q_idx, kv_idx):
        # clamped: the compiled kernel may ask about padding positions past the ragged end
        listed = blocks[h, torch.clamp(q_idx // g.q_block, max=last_q), torch.clamp(kv_idx // g.kv_block, max=last_k)]
        return listed & (kv_idx <= q_idx + shift) if g.causal else listed

    return flex.BlockMask.from_kv_blocks(part_cnt, part_idx, full_cnt, full_idx, BLOCK_SIZE=(g.q_block, g.kv_block),
                                         mask_mod=token_mask, seq_lengths=(g.q_len, g.kv_len))


# ----------------------------------------------------------------------------------------------------
# checking
# ----------------------------------------------------------------------------------------------------
def token_mask_rows(layout: BlockLayout | None, rows: Tensor, seq: int, causal: bool, heads: int) -> Tensor:
    """Bool [H, R, S]: the keys each sampled query row attends (``layout`` None: dense)."""
    if layout is None:
        mask = torch.ones(heads, rows.numel(), seq, dtype=torch.bool, device=rows.device)
    else:
        g = layout.geometry
        mask = layout_blocks(layout)[:, rows // g.q_block].repeat_interleave(g.kv_block, dim=-1)[..., :seq]
    if causal:
        mask = mask & (torch.arange(seq, device=rows.device)[None, :] <= rows[:, None])
    return mask


def reference_rows(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, rows: Tensor, scale: float,
                   heads_per_chunk: int = 4) -> Tensor:
    """Float32 attention of the sampled query rows, [H, R, D], from [1, S, H, D] q/k/v and a
    [H, R, S] mask (a few heads at a time: [4, R, 128K] scores are 0.8 GB)."""
    out = []
    for h in range(0, q.shape[2], heads_per_chunk):
        hs = slice(h, h + heads_per_chunk)
        qs = q[0, rows, hs].transpose(0, 1).float()
        s = qs @ k[0, :, hs].transpose(0, 1).float().transpose(1, 2) * scale
        p = torch.softmax(s.masked_fill(~mask[hs], float("-inf")), dim=-1)
        out.append(p @ v[0, :, hs].transpose(0, 1).float())
    return torch.cat(out)


def errors(out_rows: Tensor, ref_rows: Tensor) -> tuple[float, float]:
    """(max abs error, mean abs error); NaN anywhere gives NaN."""
    diff = (out_rows.float() - ref_rows.float()).abs()
    return float(diff.max()), float(diff.mean())


def verdict(max_err: float | None, yardstick: float | None) -> str:
    """"ok", or "WRONG (...)" when the error is not finite or over WRONG_FACTOR times ours."""
    if max_err is None:
        return ""
    if not math.isfinite(max_err):
        return "WRONG (non-finite output)"
    if yardstick is not None and yardstick > 0 and max_err > WRONG_FACTOR * yardstick:
        return f"WRONG (max err {max_err / yardstick:.1f}x ours)"
    return "ok"


def reason(err: BaseException) -> str:
    """The exception's type and text on one line, banners (``=====``) dropped, cut to REASON_CHARS:
    Inductor wraps a template's failure in a line of 80 '=' that would fill the whole cell."""
    text = " ".join(re.sub(r"([=\-*#~_])\1{3,}", " ", f"{type(err).__name__}: {err}").split())
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 1] + "…"


class Skip(Exception):
    """A peer that is not tried here, for the reason given (not an error the peer raised)."""


# ----------------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    shape: str
    layout: str  # "dense" for the dense baselines
    peer: str
    density: float = 1.0
    ms: float | None = None
    max_err: float | None = None
    mean_err: float | None = None
    first_s: float | None = None  # the first call: compilation and warm-up
    note: str = ""  # why it did not run, or a remark


@dataclass
class Inputs:
    """One case's tensors: q/k/v [1, S, H, D]; ``bhsd`` gives the [1, H, S, D] views."""

    q: Tensor
    k: Tensor
    v: Tensor
    causal: bool
    scale: float
    layout: BlockLayout | None = None

    def bhsd(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2)


def time_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Median time of ``fn``: ``triton.testing.do_bench`` on CUDA, the host clock elsewhere."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=20 if quick else 100,
                                             return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(row: Row, build: Callable[[Inputs], Callable[[], Tensor]], inputs: Inputs, rows: Tensor,
            ref: Tensor, quick: bool) -> Row:
    """Fill ``row``: build the peer's call, check its output's sampled rows against ``ref``, time it.
    Whatever it raises becomes the row's note; a peer never stops the run."""
    device = inputs.q.device
    try:
        t0 = time.perf_counter()
        fn = build(inputs)
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row.first_s = time.perf_counter() - t0
        row.max_err, row.mean_err = errors(out[0][:, rows], ref)
        del out
        row.ms = time_ms(fn, device, quick)
    except Skip as err:
        row.note = f"not run: {err}"
    except Exception as err:  # noqa: BLE001 - the table reports every peer that fails, with its message
        row.note = reason(err)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _needs_cuda(inputs: Inputs, what: str) -> None:
    if inputs.q.device.type != "cuda":
        raise Skip(f"{what} runs on CUDA only; this run is on {inputs.q.device.type}")


def cudnn_sdpa(inputs: Inputs) -> Callable[[], Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = inputs.bhsd()

    def fn() -> Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=inputs.causal, scale=inputs.scale)
    return fn


def default_sdpa(inputs: Inputs) -> Callable[[], Tensor]:
    q, k, v = inputs.bhsd()
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=inputs.causal, scale=inputs.scale)


def _fa4():
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    return flash_attn_func, BlockSparseTensorsTorch


def _out(result: Tensor | tuple) -> Tensor:
    """FA4's output [B, S, H, D] as a [B, H, S, D] view (it returns ``(out, lse)``)."""
    return (result[0] if isinstance(result, tuple) else result).transpose(1, 2)


def fa4_dense(inputs: Inputs) -> Callable[[], Tensor]:
    flash_attn_func, _ = _fa4()
    return lambda: _out(flash_attn_func(inputs.q, inputs.k, inputs.v, softmax_scale=inputs.scale, causal=inputs.causal))


def sage_dense(inputs: Inputs) -> Callable[[], Tensor]:
    from sageattention import sageattn
    k = inputs.k.clone()  # sageattn subtracts k's mean in place (smooth_k); attention is unchanged by it
    return lambda: sageattn(inputs.q, k, inputs.v, tensor_layout="NHD", is_causal=inputs.causal,
                            sm_scale=inputs.scale).transpose(1, 2)


def fa4_sparse(inputs: Inputs) -> Callable[[], Tensor]:
    from autosparse.kernels.backends import fa4_tensors
    flash_attn_func, _ = _fa4()
    blocks = fa4_tensors(*fa4_block_sparse(inputs.layout))
    return lambda: _out(flash_attn_func(inputs.q, inputs.k, inputs.v, softmax_scale=inputs.scale,
                                        causal=inputs.causal, block_sparse_tensors=blocks))


_FLEX_COMPILED: dict[str, Callable] = {}


def _flex(inputs: Inputs, kernel_options: dict | None) -> Callable[[], Tensor]:
    import torch.nn.attention.flex_attention as flex
    q, k, v = inputs.bhsd()
    mask = flex_block_mask(inputs.layout, flex)
    if inputs.q.device.type != "cuda":  # eager: what runs on the CPU without a compiler
        return lambda: flex.flex_attention(q, k, v, block_mask=mask, scale=inputs.scale)
    if "compiled" not in _FLEX_COMPILED:
        torch._dynamo.config.cache_size_limit = 64  # one graph per shape and block size: a script's setting
        _FLEX_COMPILED["compiled"] = torch.compile(flex.flex_attention, dynamic=False)
    compiled = _FLEX_COMPILED["compiled"]
    return lambda: compiled(q, k, v, block_mask=mask, scale=inputs.scale, kernel_options=kernel_options)


def flex_triton(inputs: Inputs) -> Callable[[], Tensor]:
    # its tile must divide the layout's block; 64 keys: 128x128 tiles at d128 exceed shared memory
    g = inputs.layout.geometry
    return _flex(inputs, {"BLOCK_M": min(g.q_block, 128), "BLOCK_N": 64})


def flex_flash(inputs: Inputs) -> Callable[[], Tensor]:
    _needs_cuda(inputs, "the FLASH backend (compiled)")
    return _flex(inputs, {"BACKEND": "FLASH"})


def _kernel_call(inputs: Inputs) -> KernelCall:
    q, k, v = inputs.bhsd()
    g = inputs.layout.geometry
    return KernelCall.prepare(q, k, v, inputs.layout.kv_indices, inputs.layout.kv_counts, q_block=g.q_block,
                              kv_block=g.kv_block, causal=g.causal, scale=inputs.scale)


def ours(inputs: Inputs) -> Callable[[], Tensor]:
    call = _kernel_call(inputs)
    q, k, v = inputs.bhsd()
    return lambda: call.run(q, k, v)


def chosen_backend(inputs: Inputs) -> tuple[str, Callable[[], Tensor]]:
    """(the backend's name, its call) from ``autosparse.kernels.backends.choose_backend``, which
    measures its candidates on these inputs the first time it sees such a call."""
    from autosparse.kernels import backends
    if not hasattr(backends, "choose_backend"):
        raise Skip("autosparse.kernels.backends has no choose_backend")
    call = _kernel_call(inputs)
    q, k, v = inputs.bhsd()
    # On CUDA the PyTorch path (the CPU backend) is left out: timing it would spend seconds of the
    # lease per layout to confirm that it loses.
    candidates = [b for b in backends.BACKENDS if inputs.q.device.type != "cuda" or b.name != "torch"]
    chosen = backends.choose_backend(call, q, k, v, backends=candidates)
    return chosen.name, lambda: chosen.run(q, k, v, call)


def fastvideo() -> str:
    """Why FastVideo's STA/VSA kernels are not measured here."""
    try:
        import fastvideo_kernel  # noqa: F401
    except Exception as err:  # noqa: BLE001 - the import error is the row's message
        return f"{reason(err)}; {FASTVIDEO_REGISTRY}"
    return "fastvideo_kernel imports here, but this script has no STA/VSA call written for it"


def flashinfer() -> str:
    """Why FlashInfer's block-sparse wrapper is not measured here."""
    try:
        import flashinfer  # noqa: F401
    except Exception as err:  # noqa: BLE001 - the import error is the row's message
        nvcc = shutil.which("nvcc")
        return (f"{reason(err)}; not in the device image and not carried (its kernels are JIT-built; "
                f"nvcc {'at ' + nvcc if nvcc else 'absent'}: no JIT build attempted in this run)")
    return "flashinfer imports here, but its block-sparse wrapper is not wired into this script"


DENSE_PEERS: tuple[tuple[str, Callable[[Inputs], Callable[[], Tensor]]], ...] = (
    ("cuDNN SDPA dense", cudnn_sdpa),
    ("SDPA default dense", default_sdpa),
    ("FA4 dense", fa4_dense),
    ("SageAttention 1.0.6 dense (8-bit QK)", sage_dense),
)
SPARSE_PEERS: tuple[tuple[str, Callable[[Inputs], Callable[[], Tensor]]], ...] = (
    ("FlexAttention Triton", flex_triton),
    ("FlexAttention FLASH", flex_flash),
    ("FA4 block-sparse", fa4_sparse),
    ("ours (Triton kernel)", ours),
)
CUDNN = DENSE_PEERS[0][0]
OURS = "ours (Triton kernel)"
CPU_NOTES = {OURS: "on the CPU: the PyTorch path (no Triton there)",
             "FlexAttention Triton": "on the CPU: eager flex_attention (no compile)"}


def run_case(label: str, case: Case, device: torch.device, quick: bool, deadline: float, seed: int,
             report: Callable[[list[Row]], None]) -> list[Row]:
    """All peers on one shape's q/k/v: the dense ones once, the sparse ones per layout. Rows are
    filed under ``label`` (a shape may come in two cases, with fresh inputs each)."""
    shape = case.shape
    gen = torch.Generator().manual_seed(seed)
    rows: list[Row] = []
    if time.time() > deadline:
        return [Row(label, spec.name, "all peers", note="not run: the time budget was spent")
                for spec in case.layouts]
    dev_gen = torch.Generator(device).manual_seed(seed)
    qkv = torch.randn(3, 1, shape.seq, shape.heads, shape.head_dim, generator=dev_gen, device=device,
                      dtype=torch.bfloat16)
    inputs = Inputs(qkv[0], qkv[1], qkv[2], shape.causal, 1.0 / math.sqrt(shape.head_dim))
    sample = torch.randperm(shape.seq, generator=gen)[:SAMPLED_ROWS - 1]
    sample = torch.cat([sample, torch.tensor([shape.seq - 1])]).sort().values.to(device)
    dense_ref = reference_rows(inputs.q, inputs.k, inputs.v,
                               token_mask_rows(None, sample, shape.seq, shape.causal, shape.heads), sample, inputs.scale)
    for name, build in DENSE_PEERS:
        rows.append(measure(Row(label, "dense", name), build, inputs, sample, dense_ref, quick))
        report(rows)
    del dense_ref
    for spec in case.layouts:
        if time.time() > deadline:
            rows.append(Row(label, spec.name, "all sparse peers", note="not run: the time budget was spent"))
            continue
        layout = build_layout(shape, spec, gen).to(device)
        d = layout.density()
        lay_inputs = dataclasses.replace(inputs, layout=layout)
        ref = reference_rows(inputs.q, inputs.k, inputs.v,
                             token_mask_rows(layout, sample, shape.seq, shape.causal, shape.heads), sample, inputs.scale)
        for name, build in SPARSE_PEERS:
            row = measure(Row(label, spec.name, name, d), build, lay_inputs, sample, ref, quick)
            if device.type != "cuda" and name in CPU_NOTES and row.ms is not None:
                row.note = CPU_NOTES[name]
            rows.append(row)
            report(rows)
        chosen = Row(label, spec.name, "ours (chosen backend)", d)
        try:
            backend_name, fn = chosen_backend(lay_inputs)
            chosen.peer = f"ours (chosen backend: {backend_name})"
            measure(chosen, lambda _: fn, lay_inputs, sample, ref, quick)
        except Skip as err:
            chosen.note = f"not run: {err}"
        except Exception as err:  # noqa: BLE001 - an import or choice that fails is the row's message
            chosen.note = reason(err)
        rows.append(chosen)
        report(rows)
        del ref, layout, lay_inputs
    del qkv, inputs
    return rows


# ----------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------
def fastest_dense(rows: Sequence[Row], shape: str) -> Row | None:
    """The fastest dense row of ``shape`` that ran and is not WRONG."""
    ok = [r for r in rows if r.shape == shape and r.layout == "dense" and r.ms is not None
          and verdict(r.max_err, yardstick(rows, r)) == "ok"]
    return min(ok, key=lambda r: r.ms, default=None)


def yardstick(rows: Sequence[Row], row: Row) -> float | None:
    """Ours' max abs error on the row's layout (dense rows: on the shape's first layout that ran);
    cuDNN's where ours did not run."""
    def first(pred) -> float | None:
        return next((r.max_err for r in rows if pred(r) and r.max_err is not None), None)
    same_shape_ours = (lambda r: r.shape == row.shape and r.peer == OURS
                       and (row.layout == "dense" or r.layout == row.layout))
    found = first(same_shape_ours)
    if found is None:
        found = first(lambda r: r.shape == row.shape and r.peer == CUDNN)
    return found


def table(rows: Sequence[Row], absent: Sequence[tuple[str, str]] = ()) -> str:
    """Markdown: one block per shape, every ratio against cuDNN and against the fastest dense."""
    out = []
    for shape in dict.fromkeys(r.shape for r in rows):
        mine = [r for r in rows if r.shape == shape]
        cudnn = next((r for r in mine if r.peer == CUDNN and r.ms is not None), None)
        best = fastest_dense(rows, shape)
        out.append(f"\n**{shape}** — fastest dense: " + (f"{best.peer} {best.ms:.3f} ms" if best else "none ran"))
        out.append("\n| layout | density | peer | ms | vs cuDNN | vs fastest dense | fraction of 1/d (vs cuDNN) "
                   "| max abs err | mean abs err | first call s | status |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in mine:
            if r.ms is None:
                out.append(f"| {r.layout} | {r.density:.3f} | {r.peer} | – | – | – | – | – | – | – | {r.note} |")
                continue
            vs_cudnn = f"{cudnn.ms / r.ms:.2f}x" if cudnn else "–"
            vs_best = f"{best.ms / r.ms:.2f}x" if best else "–"
            frac = f"{cudnn.ms / r.ms * r.density:.2f}" if cudnn else "–"
            status = "; ".join(s for s in (verdict(r.max_err, yardstick(rows, r)), r.note) if s)
            out.append(f"| {r.layout} | {r.density:.3f} | {r.peer} | {r.ms:.3f} | {vs_cudnn} | {vs_best} | {frac} "
                       f"| {r.max_err:.2e} | {r.mean_err:.2e} | {r.first_s:.1f} | {status} |")
    out.append("\nNot run:")
    out += [f"- {name}: {why}" for name, why in absent]
    out.append(f"- FastVideo STA/VSA, {FASTVIDEO_QUOTE}.")
    return "\n".join(out)


def summary(rows: Sequence[Row]) -> str:
    """One short line per measured row (the reply of a remote run keeps only its last lines)."""
    lines = []
    for r in rows:
        if r.ms is None:
            continue
        cudnn = next((c for c in rows if c.shape == r.shape and c.peer == CUDNN and c.ms is not None), None)
        best = fastest_dense(rows, r.shape)
        ratios = ([f"{cudnn.ms / r.ms:.2f}x cuDNN", f"{cudnn.ms / r.ms * r.density:.2f} of 1/d"] if cudnn else [])
        ratios += [f"{best.ms / r.ms:.2f}x best dense"] if best else []
        lines.append(f"{r.shape[:14]} | {r.layout[:20]} | {r.peer[:28]} | {r.ms:.3f} ms | {', '.join(ratios)} | "
                     f"{r.max_err:.1e} {verdict(r.max_err, yardstick(rows, r))}")
    return "\n".join(lines)


def versions(device: torch.device) -> str:
    def ver(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"
    parts = [f"torch {torch.__version__}", f"triton {ver('triton')}",
             f"cuDNN {torch.backends.cudnn.version()}", f"flash-attn-4 {ver('flash-attn-4')}",
             f"nvidia-cutlass-dsl {ver('nvidia-cutlass-dsl')}", f"sageattention {ver('sageattention')}"]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{gpu}; " + ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, short timings: a smoke test")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="where peers.md goes")
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no case or layout after this many seconds")
    ap.add_argument("--cases", type=int, nargs="*", help="indices into the case list (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        cases = tuple(cases[i] for i in args.cases)
    t0 = time.time()
    head = f"{time.strftime('%Y-%m-%d')}, {versions(device)}"
    print(head, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    absent = [("FastVideo STA / VSA", fastvideo()), ("FlashInfer block-sparse", flashinfer())]
    for name, why in absent:
        print(f"{name}: {why}", flush=True)
    done: list[Row] = []

    def report(rows: list[Row]) -> None:
        r = rows[-1]
        print(f"[{time.time() - t0:5.0f} s] {r.shape} | {r.layout} | {r.peer}: "
              + (f"{r.ms:.3f} ms, max err {r.max_err:.1e}, first {r.first_s:.1f} s" if r.ms is not None
                 else r.note[:110]), flush=True)
        (args.out / "peers.md").write_text(f"{head}\n{table(done + rows, absent)}\n")

    for i, case in enumerate(cases):
        done += run_case(f"{i}: {case.shape.name}", case, device, args.quick, t0 + args.budget_s, args.seed + i,
                         report)
    (args.out / "peers.md").write_text(f"{head}\n{table(done, absent)}\n")
    print(summary(done))
    print(f"total {time.time() - t0:.1f} s; the table: {args.out / 'peers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
