"""GPU correctness check and timing table of the block-sparse attention kernel, in one command.

    PYTHONUNBUFFERED=1 python3 benchmarks/kernel_speed.py --out $OUT

1. ceilings: a large bf16 matmul (TFLOP/s) and a device-to-device copy (TB/s), measured here;
2. correctness: bf16 / fp16 / fp32 against ``dense_attention`` on float32-upcast inputs (GQA, causal,
   ragged, kv_valid, head_dim 32/64/128, transposed views), NaN-poisoned outputs, rel-error
   ||out - ref|| / ||ref|| and lse error;
3. head fusion (a mixed dense/sparse layer: one launch, head-major vs heaviest-first, vs the sum of
   its parts, vs patch_model's split), GQA program order, layout build/fetch cost;
4. the table (bf16, fresh random inputs, CUDA-graph timing, best of two): per shape (8K/32K/128K,
   head_dim 64/128, GQA causal), default ``F.scaled_dot_product_attention`` on the same inputs
   (cuDNN on the H200), our kernel on random layouts of block density d in {1, 0.5, 0.25, 0.1, 0.05}
   and two structured ones (window, sink + local), and compiled FlexAttention with the same layout
   (``BlockMask.from_kv_blocks``). Our output is checked against SDPA (d = 1) or FlexAttention.

Prints a markdown table last and writes it (plus JSON with every number) under ``--out``.
``--smoke`` runs the same code paths on tiny shapes on the CPU (PyTorch path, no timing value).
``--sweep`` times kernel variants (tiles, warps, stages, load path, layout blocks) after the checks.
``--shapes`` / ``--no-sections`` / ``--stop-s`` run a part of it within a time limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from autosparse.kernels import block_sparse_op as bso  # noqa: E402  (this repo's kernels/ directory)
from autosparse.kernels import dense_attention, layout_mask  # noqa: E402

block_sparse_attention = bso.block_sparse_attention


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------
def mask_to_layout(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [Bl, H, NQ, NK] -> (kv_indices int32 [Bl, H, NQ, MAXK] ascending, kv_counts int32)."""
    counts = block_mask.sum(-1).to(torch.int32)
    maxk = max(1, int(counts.max()))
    order = torch.argsort((~block_mask).to(torch.int8), dim=-1, stable=True)[..., :maxk]
    return order.to(torch.int32).contiguous(), counts.contiguous()


def allowed_blocks(nq, nk, q_block, kv_block, sq, sk, causal, device):
    """bool [NQ, NK]: key blocks holding at least one key some query of the block may see;
    and bool [NQ, NK]: blocks that need an element mask (the causal diagonal)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    if not causal:
        ones = torch.ones(nq, nk, dtype=torch.bool, device=device)
        return ones, torch.zeros_like(ones)
    shift = sk - sq
    q_first, q_last = i * q_block, torch.clamp_max((i + 1) * q_block, sq) - 1
    allowed = j * kv_block <= q_last + shift
    partial = allowed & (torch.clamp_max((j + 1) * kv_block, sk) - 1 > q_first + shift)
    return allowed, partial


def random_layout(h, nq, nk, density, allowed, partial, gen):
    """Each query block keeps round(density * #allowed) random allowed key blocks (diagonal ones always)."""
    r = torch.rand(h, nq, nk, device=allowed.device, generator=gen)
    r = torch.where(allowed, r, -1.0)
    r = torch.where(partial, 2.0, r)
    n_allowed = allowed.sum(-1)  # [NQ]
    keep = torch.clamp(torch.round(density * n_allowed), min=1).to(torch.long)
    keep = torch.maximum(keep, partial.sum(-1))
    rank = torch.argsort(torch.argsort(-r, dim=-1), dim=-1)
    return (rank < keep[:, None]) & allowed  # [H, NQ, NK]


def structured_layout(h, nq, nk, q_block, kv_block, causal, allowed, sink_blocks, window_tokens):
    """Sink (first `sink_blocks` key blocks) + a local window of `window_tokens` keys centred on
    (non-causal) or ending at (causal) each query block."""
    dev = allowed.device
    i = torch.arange(nq, device=dev)[:, None]
    j = torch.arange(nk, device=dev)[None, :]
    center = (i * q_block + q_block // 2) // kv_block
    w = max(1, window_tokens // kv_block)  # window length in key blocks
    if causal:
        last = ((i + 1) * q_block - 1) // kv_block
        local = (j <= last) & (j > last - w)
    else:
        local = (j >= center - w // 2) & (j < center - w // 2 + w)
    m = (local | (j < sink_blocks)) & allowed
    return m[None].expand(h, -1, -1)


def flex_block_mask(flex, layout_mask_blocks, partial, b, h, sq, sk, q_block, kv_block, causal):
    """FlexAttention BlockMask of the same layout: full blocks without mask_mod, diagonal ones with it."""
    full = layout_mask_blocks & ~partial
    part = layout_mask_blocks & partial

    def lists(m):
        cnt = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return cnt[None].contiguous(), idx[None].contiguous()

    full_cnt, full_idx = lists(full)
    part_cnt, part_idx = lists(part)
    shift = sk - sq

    def causal_mod(b_, h_, q_idx, kv_idx):
        return kv_idx <= q_idx + shift

    return flex.BlockMask.from_kv_blocks(part_cnt, part_idx, full_cnt, full_idx, BLOCK_SIZE=(q_block, kv_block),
                                         mask_mod=causal_mod if causal else None, seq_lengths=(sq, sk))


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------------
def bench(fn, smoke, graph=False):
    """Median ms. ``graph``: replay a CUDA graph of ``fn`` (GPU time, no Python launch cost; falls back
    to eager timing where capture fails), else time eager calls (host cost included when it exceeds
    the GPU time)."""
    if smoke:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    if graph:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=150, return_mode="median"))
        except Exception as e:  # noqa: BLE001
            log(f"graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing eagerly")
            torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def ceilings(dev):
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, False)
    tflops = 2 * n**3 / ms / 1e9
    x = torch.randn(1 << 30, device=dev, dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    ms_c = bench(lambda: y.copy_(x), False)
    tbps = 2 * x.numel() * 2 / ms_c / 1e9
    del a, b, x, y
    return tflops, tbps


# --------------------------------------------------------------------------------------------------
# 1. correctness
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckCase:
    name: str
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    q_block: int
    kv_block: int
    causal: bool
    density: float
    kv_valid: bool = False
    batch_layout: bool = False
    transposed: bool = False


CHECKS = [
    CheckCase("gqa_causal_ragged_d128", 2, 8, 2, 1000, 1000, 128, 128, 64, True, 0.5),
    CheckCase("kv_valid_blB_d64", 2, 4, 4, 777, 1500, 64, 128, 64, False, 0.3, kv_valid=True, batch_layout=True),
    CheckCase("causal_sq_lt_sk_d64", 1, 6, 3, 512, 2048, 64, 64, 32, True, 0.4),
    CheckCase("transposed_views_d128", 1, 4, 2, 1024, 1024, 128, 128, 64, True, 0.6, transposed=True),
    CheckCase("dense_layout_d128", 1, 2, 1, 4096, 4096, 128, 128, 64, False, 1.0),
    CheckCase("small_blocks_d32", 1, 2, 2, 300, 300, 32, 32, 16, True, 0.7),
]
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}


def run_checks(dev, dtypes, smoke, results):
    gen = torch.Generator(device=dev)
    rows = []
    for ci, c in enumerate(CHECKS):
        for dtype in dtypes:
            if dtype == torch.float32 and not smoke and c.name not in ("small_blocks_d32", "gqa_causal_ragged_d128"):
                continue
            try:
                rows.append(_check_one(c, dtype, dev, gen, 1000 * ci + dtypes.index(dtype), smoke))
            except Exception as e:  # noqa: BLE001 - record and go on: the timing table still matters
                traceback.print_exc()
                rows.append(dict(case=c.name, dtype=str(dtype), ok=False, error=f"{type(e).__name__}: {e}"[:500]))
                log(f"check {c.name} {dtype} FAILED with {type(e).__name__}")
    results["checks"] = rows
    return all(r["ok"] for r in rows)


def _check_one(c, dtype, dev, gen, seed, smoke):
    gen.manual_seed(seed)
    B, Hq, Hkv, Sq, Sk, D = c.B, c.Hq, c.Hkv, c.Sq, c.Sk, c.D
    if smoke:
        Sq, Sk = min(Sq, 200), min(Sk, 300)

    def rnd(h, s):
        if c.transposed:
            return torch.randn(B, s, h, D, device=dev, generator=gen, dtype=dtype).transpose(1, 2)
        return torch.randn(B, h, s, D, device=dev, generator=gen, dtype=dtype)

    q, k, v = rnd(Hq, Sq), rnd(Hkv, Sk), rnd(Hkv, Sk)
    nq, nk = math.ceil(Sq / c.q_block), math.ceil(Sk / c.kv_block)
    allowed, partial = allowed_blocks(nq, nk, c.q_block, c.kv_block, Sq, Sk, c.causal, dev)
    bl = B if c.batch_layout else 1
    blocks = torch.stack([random_layout(Hq, nq, nk, c.density, allowed, partial, gen) for _ in range(bl)])
    if c.density < 1.0:  # some empty rows too
        blocks[:, :, ::7] = False
    idx, cnt = mask_to_layout(blocks)
    valid = (torch.rand(B, Sk, device=dev, generator=gen) > 0.2) if c.kv_valid else None
    out = torch.full((B, Hq, Sq, D), float("nan"), device=dev, dtype=dtype)
    res, lse = block_sparse_attention(q, k, v, idx, cnt, q_block=c.q_block, kv_block=c.kv_block,
                                      causal=c.causal, kv_valid=valid, out=out, return_lse=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    m = layout_mask(idx, cnt, q_block=c.q_block, kv_block=c.kv_block, seq_q=Sq, seq_k=Sk, causal=c.causal,
                    kv_valid=valid)
    ref, ref_lse = dense_attention(q.float(), k.float(), v.float(), m, return_lse=True)
    unwritten = int(out.isnan().sum())
    err = rel_err(out, ref)
    finite = torch.isfinite(ref_lse)
    lse_ok = bool(torch.equal(finite, torch.isfinite(lse)))
    lse_err = float((lse[finite] - ref_lse[finite]).abs().max()) if finite.any() else 0.0
    empty_rows = int((~finite).sum())
    ok = unwritten == 0 and err < REL_TOL[dtype] and lse_ok and lse_err < 1e-2 and res is out
    row = dict(case=c.name, dtype=str(dtype).replace("torch.", ""), B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D,
               q_block=c.q_block, kv_block=c.kv_block, causal=c.causal, rel_err=err, lse_max_abs_err=lse_err,
               unwritten=unwritten, empty_rows=empty_rows, ok=ok)
    log(f"check {c.name:24s} {row['dtype']:8s} rel_err={err:.2e} lse_err={lse_err:.1e} "
        f"unwritten={unwritten} empty_rows={empty_rows} {'OK' if ok else 'FAIL'}")
    return row


# --------------------------------------------------------------------------------------------------
# 2. timing
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TimeShape:
    name: str
    B: int
    Hq: int
    Hkv: int
    D: int
    S: int
    causal: bool = False
    q_block: int = 64
    kv_block: int = 128


def _shapes(prefix_lengths):
    rows = []
    for S in prefix_lengths:
        B, H = (2, 24) if S <= 8192 else (1, 12)
        rows += [TimeShape(f"B{B} H{H} d128 S{S // 1024}K", B, H, H, 128, S),
                 TimeShape(f"B{B} H{H} d64 S{S // 1024}K", B, H, H, 64, S)]
    return rows


SHAPES = _shapes((8192, 32768, 131072)) + [TimeShape("GQA 32/8 d128 causal S32K", 1, 32, 8, 128, 32768, True)]
SWEEP_SHAPES = [TimeShape("H12 d128", 1, 12, 12, 128, 32768), TimeShape("H12 d64", 1, 12, 12, 64, 32768),
                TimeShape("GQA 32/8 d128 causal", 1, 32, 8, 128, 32768, True)]
DENSITIES = [1.0, 0.5, 0.25, 0.1, 0.05]


def structured_layouts(shp, nq, nk, allowed):
    """Window (10 % of the keys around each query block) and sink + local (first key block + 5 %)."""
    S = shp.S
    return [("window 0.1·S", structured_layout(shp.Hq, nq, nk, shp.q_block, shp.kv_block, shp.causal, allowed, 0,
                                               int(0.1 * S))),
            ("sink+local 0.05·S", structured_layout(shp.Hq, nq, nk, shp.q_block, shp.kv_block, shp.causal, allowed,
                                                    1, int(0.05 * S)))]


def flex_runner(flex_compiled, flex, blocks, partial, q, k, v, shp):
    """FlexAttention with the same block layout; its tile must divide the layout block."""
    bm = flex_block_mask(flex, blocks, partial.expand_as(blocks), shp.B, shp.Hq, shp.S, shp.S, shp.q_block,
                         shp.kv_block, shp.causal)
    last = None
    for tiles in ((shp.q_block, shp.kv_block), (shp.q_block, min(64, shp.kv_block))):
        fn = functools.partial(flex_compiled, q, k, v, block_mask=bm, enable_gqa=shp.Hq != shp.Hkv,
                               kernel_options={"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]})
        try:
            return fn, fn()
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory at this tile
            last = e
    raise last


def run_timing(dev, smoke, use_flex, results, deadline, stop_at, save, shapes=SHAPES):
    gen = torch.Generator(device=dev)
    gen.manual_seed(1234)
    flex = flex_compiled = None
    if use_flex:
        try:
            import torch.nn.attention.flex_attention as flex

            flex_compiled = torch.compile(flex.flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            log(f"flex unavailable: {e!r}")
            flex = None
    rows = []
    results["timing"] = rows
    for shp in shapes:
        if time.time() > stop_at:
            log(f"timing {shp.name} SKIPPED: past --stop-s")
            continue
        save()
        try:
            if smoke:
                shp = dataclasses.replace(shp, S=min(shp.S // 16, 2048), Hq=max(2, shp.Hq // 8),
                                          Hkv=max(1, shp.Hkv // 8), B=1)
            B, Hq, Hkv, D, S = shp.B, shp.Hq, shp.Hkv, shp.D, shp.S
            dtype = torch.bfloat16
            q = torch.randn(B, Hq, S, D, device=dev, dtype=dtype, generator=gen)
            k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, generator=gen)
            v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, generator=gen)
            g = Hq // Hkv
            k_rep = k.repeat_interleave(g, 1) if g > 1 else k  # SDPA baseline gets materialised GQA heads
            v_rep = v.repeat_interleave(g, 1) if g > 1 else v
            qb, kb = shp.q_block, shp.kv_block
            nq, nk = math.ceil(S / qb), math.ceil(S / kb)
            log(f"\n== {shp.name}: B={B} Hq={Hq} Hkv={Hkv} S={S} D={D} causal={shp.causal} layout {qb}x{kb}")

            # dense baseline: default SDPA (cuDNN on the H200)
            sdpa = lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=shp.causal)  # noqa: E731
            ref_dense = sdpa()
            t_sdpa = min(bench(sdpa, smoke, graph=True), bench(sdpa, smoke, graph=True))
            dense_flops = 4 * B * Hq * S * S * D * (0.5 if shp.causal else 1.0)
            log(f"sdpa: {t_sdpa:.3f} ms, {dense_flops / t_sdpa / 1e9:.0f} TFLOP/s")
            allowed, partial = allowed_blocks(nq, nk, qb, kb, S, S, shp.causal, dev)
            n_allowed = int(allowed.sum()) * Hq
            layouts = [(f"random d={d:g}", random_layout(Hq, nq, nk, d, allowed, partial, gen)) for d in DENSITIES]
            layouts += structured_layouts(shp, nq, nk, allowed)
            out = torch.empty(B, S, Hq, D, device=dev, dtype=dtype).transpose(1, 2)
            for lname, blocks in layouts:
                idx, cnt = mask_to_layout(blocks[None])
                sched = bso.row_schedule(cnt, g)
                listed = int(cnt.sum()) * B
                density = listed / (n_allowed * B)
                flops = 4 * D * qb * kb * listed  # dense-equivalent work of the listed blocks
                run = functools.partial(block_sparse_attention, q, k, v, idx, cnt, q_block=qb, kv_block=kb,
                                        causal=shp.causal, schedule=sched, out=out)
                out.fill_(float("nan"))
                compiled = bso._launch(q, k, v, idx, cnt, None, sched, out, None, qb, kb, shp.causal,
                                       1.0 / math.sqrt(D), None) if not smoke else run()
                unwritten = int(out.isnan().sum())
                t1 = bench(run, smoke, graph=True)
                t2 = bench(run, smoke, graph=True)
                t = min(t1, t2)
                t_eager = bench(run, smoke)
                row = dict(shape=shp.name, layout=lname, density=density, ms=t, ms_runs=(t1, t2), eager_ms=t_eager,
                           tflops=flops / t / 1e9, sdpa_ms=t_sdpa, speedup=t_sdpa / t, ideal=1.0 / density,
                           unwritten=unwritten)
                row["of_ideal"] = row["speedup"] / row["ideal"]
                if compiled is not None and hasattr(compiled, "n_regs"):
                    row.update(n_regs=compiled.n_regs, n_spills=compiled.n_spills,
                               shared=getattr(compiled.metadata, "shared", None))
                if lname == "random d=1":
                    row["err_vs"] = ("sdpa", rel_err(out, ref_dense))
                if flex is not None and time.time() < deadline:
                    try:
                        fx, o_flex = flex_runner(flex_compiled, flex, blocks, partial, q, k, v, shp)
                        t_flex = bench(fx, smoke, graph=True)
                        row.update(flex_ms=t_flex, flex_speedup=t_sdpa / t_flex)
                        if lname != "random d=1":
                            row["err_vs"] = ("flex", rel_err(out, o_flex))
                        del o_flex
                    except Exception as e:  # noqa: BLE001
                        log(f"flex failed on {lname}: {type(e).__name__}: {str(e)[:300]}")
                rows.append(row)
                ev = row.get("err_vs")
                log(f"{lname:18s} d={density:.3f} ours {t:.3f} ms (runs {t1:.3f}, {t2:.3f}; eager call {t_eager:.3f}) "
                    f"{row['tflops']:.0f} TFLOP/s "
                    f"x{row['speedup']:.2f} vs sdpa (ideal {row['ideal']:.2f}, {row['of_ideal']:.2f} of it)"
                    + (f" | flex {row['flex_ms']:.3f} ms x{row['flex_speedup']:.2f}" if "flex_ms" in row else "")
                    + (f" | rel err vs {ev[0]} {ev[1]:.1e}" if ev else "")
                    + (f" | regs {row['n_regs']} spills {row['n_spills']} smem {row['shared']}" if "n_regs" in row else "")
                    + (f" | UNWRITTEN {unwritten}" if unwritten else ""))
            if shp.name == SHAPES[2].name:  # what transformers passes: [B, S, H, D] buffers seen as [B, H, S, D]
                qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
                blocks = next(b for n, b in layouts if n == "random d=0.25")
                idx, cnt = mask_to_layout(blocks[None])
                run_t = functools.partial(block_sparse_attention, qt, kt, vt, idx, cnt, q_block=qb, kv_block=kb,
                                          causal=shp.causal)
                o_t = run_t()
                o_c = block_sparse_attention(q, k, v, idx, cnt, q_block=qb, kv_block=kb, causal=shp.causal)
                t = bench(run_t, smoke, graph=True)
                listed = int(cnt.sum())
                row = dict(shape=shp.name, layout="random d=0.25, [B,S,H,D] views", density=listed / n_allowed, ms=t,
                           tflops=4 * B * D * qb * kb * listed / t / 1e9, sdpa_ms=t_sdpa, speedup=t_sdpa / t,
                           ideal=n_allowed / listed, err_vs=("ours contiguous", rel_err(o_t, o_c)))
                row["of_ideal"] = row["speedup"] / row["ideal"]
                rows.append(row)
                log(f"views d=0.25: {t:.3f} ms x{row['speedup']:.2f} vs sdpa | rel err vs contiguous {row['err_vs'][1]:.1e}")
                del qt, kt, vt, o_t, o_c
            del q, k, v, k_rep, v_rep, out, ref_dense
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - keep the other shapes
            traceback.print_exc()
            log(f"timing {shp.name} FAILED: {type(e).__name__}: {str(e)[:300]}")
    save()
    return rows


def run_mixed_heads(dev, smoke, results):
    """Head fusion: 25 % dense heads + 75 % heads at d = 0.1 in one launch (heaviest-first schedule,
    and the plain head-major order) against the two groups launched separately (sum of the parts)."""
    shp = TimeShape("mixed H12 d128 S32K", 1, 12, 12, 128, 1024 if smoke else 32768)
    gen = torch.Generator(device=dev).manual_seed(7)
    B, H, D, S, qb, kb = shp.B, shp.Hq, shp.D, shp.S, shp.q_block, shp.kv_block
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    nq, nk = math.ceil(S / qb), math.ceil(S / kb)
    allowed, partial = allowed_blocks(nq, nk, qb, kb, S, S, False, dev)
    n_dense = H // 4
    sparse = random_layout(H - n_dense, nq, nk, 0.1, allowed, partial, gen)
    blocks = torch.cat([sparse, allowed[None].expand(n_dense, -1, -1)])  # dense heads last: worst head-major order
    idx, cnt = mask_to_layout(blocks[None])
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v), smoke, graph=True)
    natural = torch.arange(H * nq, device=dev, dtype=torch.int32)
    lpt = bso.row_schedule(cnt)
    kw = dict(q_block=qb, kv_block=kb, causal=False)
    ref = block_sparse_attention(q, k, v, idx, cnt, schedule=natural, **kw)
    t_fused = bench(functools.partial(block_sparse_attention, q, k, v, idx, cnt, schedule=lpt, **kw), smoke, graph=True)
    t_natural = bench(functools.partial(block_sparse_attention, q, k, v, idx, cnt, schedule=natural, **kw), smoke, graph=True)
    same = rel_err(block_sparse_attention(q, k, v, idx, cnt, schedule=lpt, **kw), ref)
    s_idx, s_cnt = mask_to_layout(sparse[None])
    d_idx, d_cnt = mask_to_layout(allowed[None].expand(n_dense, -1, -1)[None])
    qs, qd = q[:, : H - n_dense].contiguous(), q[:, H - n_dense:].contiguous()
    ks, kd = k[:, : H - n_dense].contiguous(), k[:, H - n_dense:].contiguous()
    vs, vd = v[:, : H - n_dense].contiguous(), v[:, H - n_dense:].contiguous()
    t_sparse = bench(functools.partial(block_sparse_attention, qs, ks, vs, s_idx, s_cnt, **kw), smoke, graph=True)
    t_dense = bench(functools.partial(block_sparse_attention, qd, kd, vd, d_idx, d_cnt, **kw), smoke, graph=True)
    t_dense_sdpa = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd), smoke, graph=True)
    # what patch_model does for a mixed layer: the kernel skips the dense heads, SDPA serves them
    dense_heads = torch.arange(H - n_dense, H, device=dev)
    skip_cnt = cnt.clone()
    skip_cnt[:, H - n_dense:] = 0
    skip_sched = bso.row_schedule(skip_cnt)

    def split():
        o = block_sparse_attention(q, k, v, idx, skip_cnt, schedule=skip_sched, **kw).transpose(1, 2)
        d = F.scaled_dot_product_attention(q.index_select(1, dense_heads), k.index_select(1, dense_heads),
                                           v.index_select(1, dense_heads))
        return o.index_copy_(2, dense_heads, d.transpose(1, 2))

    t_split = bench(split, smoke, graph=True)
    split_err = rel_err(split().transpose(1, 2), ref)
    row = dict(shape=shp.name, n_dense=n_dense, density=int(cnt.sum()) / (H * int(allowed.sum())), sdpa_all_ms=t_sdpa,
               fused_lpt_ms=t_fused, fused_head_major_ms=t_natural, parts_ms=t_sparse + t_dense,
               sparse_part_ms=t_sparse, dense_part_ms=t_dense, dense_part_sdpa_ms=t_dense_sdpa,
               split_ms=t_split, split_vs_fused_rel_err=split_err,
               lpt_vs_head_major_rel_err=same)
    log(f"\n== head fusion ({n_dense} dense heads + {H - n_dense} at d=0.1, layer density {row['density']:.3f}): "
        f"one launch {t_fused:.3f} ms (heaviest-first) / {t_natural:.3f} ms (head-major); parts {t_sparse:.3f} + "
        f"{t_dense:.3f} = {t_sparse + t_dense:.3f} ms (dense part by SDPA {t_dense_sdpa:.3f}); all-dense SDPA "
        f"{t_sdpa:.3f} ms; schedules agree to {same:.1e}; patch_model's split (kernel skips dense heads, SDPA "
        f"serves them) {t_split:.3f} ms, rel err vs fused {split_err:.1e}")
    results["mixed_heads"] = row


def run_gqa_order(dev, smoke, results):
    """GQA K/V reuse: the default schedule keeps the query heads of one KV head adjacent (their K/V
    tiles come from L2); compare an order that spreads them across the launch."""
    shp = TimeShape("GQA 32/8 d128 causal S32K", 1, 32, 8, 128, 1024 if smoke else 32768, True)
    gen = torch.Generator(device=dev).manual_seed(8)
    B, Hq, Hkv, D, S, qb, kb = shp.B, shp.Hq, shp.Hkv, shp.D, shp.S, shp.q_block, shp.kv_block
    q = torch.randn(B, Hq, S, D, device=dev, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    nq, nk = math.ceil(S / qb), math.ceil(S / kb)
    allowed, partial = allowed_blocks(nq, nk, qb, kb, S, S, True, dev)
    out = {}
    for density in (1.0, 0.1):
        blocks = structured_layout(Hq, nq, nk, qb, kb, True, allowed, 1, int(density * S)) if density < 1 \
            else allowed[None].expand(Hq, -1, -1)
        idx, cnt = mask_to_layout(blocks[None])
        g = Hq // Hkv
        grouped = bso.row_schedule(cnt, g)
        spread = bso.row_schedule(cnt, 1)  # head-major ties: the 4 heads of a KV head 4 x NQ rows apart
        h = torch.arange(Hq, device=dev)
        by_group_member = torch.argsort((h % g) * Hkv + h // g)  # heads ordered g0 of all kv heads, then g1, ...
        spread = (by_group_member[:, None] * nq + torch.arange(nq, device=dev)[None]).flatten().to(torch.int32) \
            if density == 1.0 else spread
        kw = dict(q_block=qb, kv_block=kb, causal=True)
        t_g = bench(functools.partial(block_sparse_attention, q, k, v, idx, cnt, schedule=grouped, **kw), smoke, graph=True)
        t_s = bench(functools.partial(block_sparse_attention, q, k, v, idx, cnt, schedule=spread, **kw), smoke, graph=True)
        out[f"d={density:g}"] = dict(grouped_ms=t_g, spread_ms=t_s)
        log(f"GQA order d={density:g}: groups together {t_g:.3f} ms, spread {t_s:.3f} ms")
    results["gqa_order"] = out


def run_layout_cost(dev, smoke, results):
    """What a patched call pays for its layout: building it (once per shape, on the device), fetching
    it from the layer's cache (every call), against the kernel time of that call."""
    from autosparse.layout import BlockLayout
    from autosparse.patterns import BlockGeometry, SinkLocal, Window

    out = {}
    for S in ((2048,) if smoke else (8192, 32768, 131072)):
        H, D = 12, 128
        patterns = tuple(SinkLocal(sinks=64, window=S // 8) if h % 3 else Window(window=S // 4) for h in range(H))
        geo = BlockGeometry(S, S, 64, 128, True)
        t0 = time.perf_counter()
        layout = BlockLayout.from_patterns(patterns, geo, dev)
        sched = layout.schedule(1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        build_ms = (time.perf_counter() - t0) * 1e3
        cache = {(S, S, True, dev): layout}
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            lay = cache[(S, S, True, dev)]
            lay.schedule(1)
        fetch_us = (time.perf_counter() - t0) / n * 1e6
        q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        run = functools.partial(block_sparse_attention, q, k, v, layout.kv_indices, layout.kv_counts, q_block=64,
                                kv_block=128, causal=True, schedule=sched)
        kernel_ms = bench(run, smoke, graph=True)
        out[S] = dict(build_ms=build_ms, fetch_us=fetch_us, kernel_ms=kernel_ms,
                      density=layout.density(), fetch_share=fetch_us / (kernel_ms * 1e3))
        log(f"layout cost S={S}: build {build_ms:.1f} ms once (on {dev}), fetch {fetch_us:.2f} us per call = "
            f"{100 * fetch_us / (kernel_ms * 1e3):.3f} % of the kernel's {kernel_ms:.3f} ms (density "
            f"{layout.density():.3f})")
        del q, k, v
    results["layout_cost"] = out


SWEEP_VARIANTS = {  # name -> (layout blocks, TileConfig); runs 4-9 of benchmarks/NOTES.md tried more
    128: [("m64 64x128 w4 s1 (default)", (64, 128), bso.TileConfig(4, 1, block_m=64, use_tma=True)),
          ("m64 64x128 w4 s2", (64, 128), bso.TileConfig(4, 2, block_m=64, use_tma=True)),
          ("m128 128x128 w8 s3", (128, 128), bso.TileConfig(8, 3, use_tma=True)),
          ("m64 128x64 w4 s1", (128, 64), bso.TileConfig(4, 1, block_m=64, use_tma=True)),
          ("v1: ptr m128 128x64 w8 s4", (128, 64), bso.TileConfig(8, 4, use_tma=False))],
    64: [("m64 64x128 w4 s1 (default)", (64, 128), bso.TileConfig(4, 1, block_m=64, use_tma=True)),
         ("m128 128x128 w4 s3", (128, 128), bso.TileConfig(4, 3, use_tma=True)),
         ("m64 128x64 w4 s1", (128, 64), bso.TileConfig(4, 1, block_m=64, use_tma=True)),
         ("v1: ptr m128 128x64 w4 s4", (128, 64), bso.TileConfig(4, 4, use_tma=False))],
}


def occupancy(compiled, num_warps) -> int | None:
    """Programs resident per SM on an H100/H200 (228 KB shared, 64K registers, 64 warps): the smaller
    of the shared-memory and register limits (1 KB reserved per block)."""
    shared, regs = getattr(compiled.metadata, "shared", None), getattr(compiled, "n_regs", None)
    if shared is None or regs is None:
        return None
    by_smem = (228 * 1024) // (shared + 1024)
    by_regs = 65536 // (max(regs, 1) * 32 * num_warps)
    return int(min(by_smem, by_regs, 64 // num_warps))


def run_sweep(dev, smoke, results):
    """Kernel-variant sweep (SWEEP_VARIANTS: tiles, warps, stages, load path, layout blocks) at d = 1
    (and 0.1 on the non-GQA shapes), checked against SDPA (d = 1) or the first variant on the same
    layout."""
    gen = torch.Generator(device=dev)
    gen.manual_seed(99)
    rows = []
    for shp in SWEEP_SHAPES:
        B, Hq, Hkv, D, S = shp.B, shp.Hq, shp.Hkv, shp.D, shp.S
        if smoke:
            S, Hq, Hkv = 1024, max(2, Hq // 8), max(1, Hkv // 8)
        q = torch.randn(B, Hq, S, D, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=gen)
        g = Hq // Hkv
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                             is_causal=shp.causal)
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),  # noqa: E731
                                                              v.repeat_interleave(g, 1), is_causal=shp.causal), smoke, graph=True)
        log(f"\n== sweep {shp.name}: sdpa {t_sdpa:.3f} ms")
        for density in ((1.0, 0.1) if shp is not SWEEP_SHAPES[-1] else (1.0,)):
            layouts, base_outs = {}, {}
            for name, (qb, kb), cfg in SWEEP_VARIANTS[D]:
                if (qb, kb) not in layouts:
                    nq, nk = math.ceil(S / qb), math.ceil(S / kb)
                    allowed, partial = allowed_blocks(nq, nk, qb, kb, S, S, shp.causal, dev)
                    layouts[(qb, kb)] = (*mask_to_layout(random_layout(Hq, nq, nk, density, allowed, partial,
                                                                       gen)[None]), Hq * int(allowed.sum()))
                idx, cnt, n_allowed = layouts[(qb, kb)]
                flops = 4 * B * D * qb * kb * int(cnt.sum())
                try:
                    out = torch.full_like(q, float("nan"))
                    fn = lambda: block_sparse_attention(q, k, v, idx, cnt, q_block=qb, kv_block=kb,  # noqa: E731
                                                        causal=shp.causal, config=cfg, out=out)
                    compiled = bso._launch(q, k, v, idx, cnt, None, None, out, None, qb, kb, shp.causal,
                                           1.0 / math.sqrt(D), cfg) if not smoke else fn()
                    unwritten = int(out.isnan().sum())
                    if density == 1.0:
                        err = rel_err(out, ref)
                    else:  # against the first variant on the same layout
                        first = base_outs.setdefault((qb, kb), out.clone())
                        err = rel_err(out, first)
                    t1, t2 = bench(fn, smoke, graph=True), bench(fn, smoke)
                    row = dict(shape=shp.name, density=density, variant=name, ms=t2, ms_first=t1,
                               tflops=flops / t2 / 1e9, sdpa_ms=t_sdpa, vs_sdpa_rate=None, err=err,
                               unwritten=unwritten)
                    if compiled is not None and hasattr(compiled, "n_regs"):
                        row.update(n_regs=compiled.n_regs, n_spills=compiled.n_spills,
                                   shared=getattr(compiled.metadata, "shared", None),
                                   per_sm=occupancy(compiled, cfg.num_warps))
                    dense_t = t2 / (int(cnt.sum()) / n_allowed)
                    row["vs_sdpa_rate"] = t_sdpa / dense_t
                    log(f"sweep {shp.name:22s} d={density:<5g} {name:24s} {t2:.3f} ms ({t1:.3f}) "
                        f"{row['tflops']:.0f} TFLOP/s rate vs sdpa {row['vs_sdpa_rate']:.2f} err {err:.1e}"
                        f" regs {row.get('n_regs')} spills {row.get('n_spills')} smem {row.get('shared')}"
                        f" per SM {row.get('per_sm')}" + (f" UNWRITTEN {unwritten}" if unwritten else ""))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory, unsupported feature
                    row = dict(shape=shp.name, density=density, variant=name, error=f"{type(e).__name__}: {e}"[:300])
                    log(f"sweep {shp.name:22s} d={density:<5g} {name:24s} FAILED {row['error']}")
                rows.append(row)
        del q, k, v, ref
    results["sweep"] = rows
    return rows


def table(rows):
    lines = ["| shape | layout | block density d | ours ms | ours TFLOP/s (eff.) | SDPA ms | speedup vs SDPA | ideal 1/d "
             "| of ideal | Flex ms | Flex speedup vs SDPA | rel err (vs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = r.get("err_vs")
        flex_ms = f"{r['flex_ms']:.2f}" if "flex_ms" in r else "–"
        flex_x = f"{r['flex_speedup']:.2f}" if "flex_ms" in r else "–"
        err = f"{ev[1]:.1e} ({ev[0]})" if ev else "–"
        lines.append(f"| {r['shape']} | {r['layout']} | {r['density']:.3f} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                     f"{r['sdpa_ms']:.3f} | {r['speedup']:.2f} | {r['ideal']:.2f} | {r['of_ideal']:.2f} | {flex_ms} | "
                     f"{flex_x} | {err} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for table.md and results.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: exercise the script only")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="the kernel-variant sweep, after the checks (no table)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip FlexAttention after this many seconds")
    ap.add_argument("--stop-s", type=float, default=530.0, help="skip the remaining shapes after this many seconds")
    ap.add_argument("--shapes", default="", help="comma-separated substrings: time only the table shapes named "
                    "(in this order), e.g. 'GQA,d64 S128K'")
    ap.add_argument("--no-sections", action="store_true", help="skip head fusion, GQA order and layout cost")
    args = ap.parse_args()
    t0 = time.time()
    dev = torch.device("cpu" if args.smoke else "cuda")
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                gpu=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (smoke)",
                date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv))
    log(json.dumps(info))
    results = {"info": info}
    if dev.type == "cuda":
        tflops, tbps = ceilings(dev)
        results["ceilings"] = dict(bf16_matmul_tflops=tflops, copy_tbps=tbps)
        log(f"ceilings: bf16 matmul 8192^3 {tflops:.0f} TFLOP/s, d2d copy {tbps:.2f} TB/s (read+write)")
    dtypes = [torch.float32] if args.smoke else [torch.bfloat16, torch.float16, torch.float32]
    ok = run_checks(dev, dtypes, args.smoke, results)
    log(f"correctness: {'ALL OK' if ok else 'FAILURES'} ({time.time() - t0:.0f} s)")
    if args.sweep:
        run_sweep(dev, args.smoke, results)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "sweep.json").write_text(json.dumps(results, indent=1, default=str))
        return
    for section in () if args.no_sections else (run_mixed_heads, run_gqa_order, run_layout_cost):
        try:
            section(dev, args.smoke, results)
        except Exception as e:  # noqa: BLE001 - keep the table
            traceback.print_exc()
            log(f"{section.__name__} FAILED: {type(e).__name__}: {str(e)[:300]}")
    def save():
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))

    shapes = SHAPES
    if args.shapes:
        shapes = [s for key in args.shapes.split(",") for s in SHAPES if key.strip() in s.name]
    rows = run_timing(dev, args.smoke, not args.no_flex, results, t0 + args.budget_s, t0 + args.stop_s, save, shapes)
    md = table(rows)
    header = (f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}, bf16, layout blocks 64x128, default "
              f"tile config; correctness {'ALL OK' if ok else 'FAILURES'}; total {time.time() - t0:.0f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(header + "\n\n" + md + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    log("\n" + header + "\n")
    log(md)


if __name__ == "__main__":
    main()
