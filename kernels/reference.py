"""Pure-PyTorch versions of the block-sparse attention kernel (same semantics, any device/dtype).

* :func:`layout_mask` turns a block layout into the dense token mask it means.
* :func:`dense_attention` is the dense masked-attention oracle (float64-capable, GQA by head mapping).
* :func:`block_sparse_attention_torch` is a real block-sparse execution path: per query block it
  gathers only the listed key blocks, in chunks that bound the extra memory. It is what runs on CPU
  in production, and it has the same signature as ``block_sparse_attention``.

Token semantics (shared by all three and the Triton kernel): query q attends key k iff k's block is
listed for q's block, AND (if causal) k <= q + (Sk - Sq) (bottom-right aligned), AND (if kv_valid)
kv_valid[b, k]. With ``columns``, q also attends the first ``column_counts[b, h, i]`` of its head's
key columns (same causal and padding rules; a column inside a listed block counts once). A query row with no attended key outputs 0 and has lse = -inf. Entries of
``kv_indices`` past ``kv_counts`` are padding and are never read; counts are clamped to
[0, MAXK]; listed indices outside [0, NK) are ignored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["layout_mask", "dense_attention", "block_sparse_attention_torch"]

# Extra memory (bytes) one chunk of block_sparse_attention_torch aims to stay under (scores, their
# exp, gathered K/V). Smaller chunks stay closer to the caches: on 2 CPU cores (fp32, H=12, S=4096,
# D=64) 64 MB ran the dense layout ~1.7x faster than 256 MB and sparse layouts as fast.
MAX_CHUNK_BYTES = 64 * 1024 * 1024


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def layout_mask(kv_indices: Tensor, kv_counts: Tensor, *, q_block: int, kv_block: int, seq_q: int,
                seq_k: int, causal: bool = False, kv_valid: Tensor | None = None, columns: Tensor | None = None,
                column_counts: Tensor | None = None) -> Tensor:
    """Dense token mask of a block layout.

    Parameters
    ----------
    kv_indices : int Tensor [Bl, H, NQ, MAXK] — key blocks listed per query block (padding past count).
    kv_counts : int Tensor [Bl, H, NQ] — number of valid entries per row.
    q_block, kv_block : block sizes in tokens; NQ must equal ceil(seq_q / q_block).
    seq_q, seq_k : sequence lengths Sq, Sk.
    causal : also apply the bottom-right aligned causal rule k <= q + (Sk - Sq).
    kv_valid : optional bool [B, Sk] key-padding mask.
    columns, column_counts : optional int [Bl, H, C] and [Bl, H, NQ]: query block i also attends the
        first ``column_counts[.., i]`` key positions of its head's ``columns``.

    Returns
    -------
    bool Tensor [Bl, H, Sq, Sk] ([B, H, Sq, Sk] when kv_valid is given; Bl must then be 1 or B).
    """
    bl, h, nq, maxk = kv_indices.shape
    nk = _cdiv(seq_k, kv_block)
    if nq != _cdiv(seq_q, q_block):
        raise ValueError(f"kv_indices has NQ={nq} rows, expected ceil({seq_q}/{q_block})={_cdiv(seq_q, q_block)}")
    idx = kv_indices.long()
    counts = kv_counts.long().clamp(0, maxk)
    listed = torch.arange(maxk, device=idx.device) < counts[..., None]
    listed &= (idx >= 0) & (idx < nk)
    idx = torch.where(listed, idx, nk)  # unlisted entries go to a dummy column that is dropped
    blocks = torch.zeros(bl, h, nq, nk + 1, dtype=torch.bool, device=idx.device)
    blocks.scatter_(3, idx, True)
    blocks = blocks[..., :nk]
    mask = blocks.repeat_interleave(kv_block, dim=3)[..., :seq_k]
    if columns is not None:
        slots = torch.arange(columns.shape[-1], device=idx.device)
        taken = slots < column_counts.long().clamp(min=0)[..., None]  # [Bl, H, NQ, C]
        cols = columns.long()[:, :, None, :]
        cols = torch.where(taken & (cols >= 0) & (cols < seq_k), cols, seq_k)  # seq_k: dropped
        mask = torch.nn.functional.pad(mask, (0, 1)).scatter_(3, cols, True)[..., :seq_k]
    mask = mask.repeat_interleave(q_block, dim=2)[:, :, :seq_q]
    if causal:
        qpos = torch.arange(seq_q, device=mask.device)[:, None]
        kpos = torch.arange(seq_k, device=mask.device)[None, :]
        mask = mask & (kpos <= qpos + (seq_k - seq_q))
    if kv_valid is not None:
        mask = mask & kv_valid.to(device=mask.device, dtype=torch.bool)[:, None, None, :]
    return mask


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None,
                    *, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Dense masked attention, computed in the inputs' dtype (use float64 for an oracle).

    Parameters
    ----------
    q : Tensor [B, Hq, Sq, D]
    k, v : Tensor [B, Hkv, Sk, D], Hq % Hkv == 0; query head h reads KV head h // (Hq // Hkv).
    mask : optional bool Tensor broadcastable to [B, Hq, Sq, Sk]; True = attend.
    scale : softmax scale, default 1 / sqrt(D).
    return_lse : also return the natural-log log-sum-exp of the scaled scores [B, Hq, Sq]
        (float32, or float64 for float64 inputs).

    Rows with no attended key give 0 (and lse = -inf).
    """
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a multiple of Hkv={hkv}")
    group = hq // hkv
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v) / torch.where(l > 0, l, torch.ones_like(l))
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = (m + torch.log(l)).squeeze(-1)  # log(0) = -inf for empty rows
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


def block_sparse_attention_torch(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, *,
                                 q_block: int, kv_block: int, causal: bool, scale: float | None = None,
                                 kv_valid: Tensor | None = None, out: Tensor | None = None,
                                 return_lse: bool = False, q_rows: Tensor | None = None,
                                 columns: Tensor | None = None, column_counts: Tensor | None = None
                                 ) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention in plain PyTorch: gathers only the listed key blocks.

    Same signature and semantics as ``kernels.block_sparse_attention`` (which validates the
    arguments before calling this on CPU). Per (batch, head) the query blocks are sorted by their
    number of listed key blocks and processed in chunks of about ``MAX_CHUNK_BYTES``; each chunk
    gathers only its listed key blocks and runs an online softmax over two passes: the blocks that
    are full for every row of the chunk (no element mask built), then the rest with element masks
    (causal diagonal, ragged end, padding slots, kv_valid). A pass is split further when one query
    block's keys alone exceed the budget. Blocks hidden by the causal rule from every query of their
    block are dropped up front. Half-precision inputs are computed in float32. Meant for CPU: it
    reads the per-row counts on the host (a device sync if called on CUDA tensors).

    Parameters
    ----------
    q : Tensor [B, Hq, Sq, D];  k, v : Tensor [B, Hkv, Sk, D]
    kv_indices : int Tensor [Bl, Hq, NQ, MAXK];  kv_counts : int Tensor [Bl, Hq, NQ];  Bl in {1, B}
    kv_valid : optional bool Tensor [B, Sk]
    out : optional Tensor [B, Hq, Sq, D] to write into.
    q_rows : optional int Tensor [Sq], a permutation of ``range(Sq)``: the query at kernel position p
        (the position the layout and the causal rule speak of) is row ``q_rows[p]`` of q, and its
        output and lse go to row ``q_rows[p]`` of out / lse, i.e. q, out and lse are in the caller's
        order while k, v and kv_valid are in kernel order. The rows are gathered and scattered chunk
        by chunk (no permuted copy of q or out). ``kernels.block_sparse_attention`` rejects it with
        ``causal=True``; here causal would compare kernel positions.
    columns, column_counts : optional int Tensors [Bl, Hq, C] and [Bl, Hq, NQ]: key columns visited
        on top of the blocks (see ``kernels.block_sparse_attention``); gathered once per head.

    Returns
    -------
    out [B, Hq, Sq, D] in q's dtype, and with ``return_lse`` the float32 lse [B, Hq, Sq].
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cdtype = _compute_dtype(q.dtype)
    dev = q.device
    bl, _, nq, maxk = kv_indices.shape
    nk = _cdiv(sk, kv_block)
    if out is None:
        out = torch.empty(b, sq, hq, d, dtype=q.dtype, device=dev).transpose(1, 2)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=dev) if return_lse else None

    if sq == 0 or b == 0 or hq == 0:
        return (out, lse) if return_lse else out
    if sk == 0:  # nothing to attend: every row is empty
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out

    # -- layout, resolved once: per row, full blocks first, then blocks needing an element mask,
    #    then padding / bad indices / blocks the causal rule hides from every query of the block ----
    idx_all = kv_indices.to(device=dev, dtype=torch.long)
    cnt_all = kv_counts.to(device=dev, dtype=torch.long).clamp(0, maxk)
    slot = torch.arange(maxk, device=dev)
    listed = (slot < cnt_all[..., None]) & (idx_all >= 0) & (idx_all < nk)
    shift = sk - sq
    partial = torch.zeros_like(listed)
    if causal:
        row = torch.arange(nq, device=dev)[:, None]
        q_first = row * q_block
        q_last = torch.clamp_max((row + 1) * q_block, sq) - 1
        listed &= idx_all * kv_block <= q_last + shift
        partial |= torch.clamp_max((idx_all + 1) * kv_block, sk) - 1 > q_first + shift
    if sk % kv_block != 0:
        partial |= idx_all == nk - 1
    if kv_valid is not None:
        partial |= True
    cls = torch.where(listed, partial.to(torch.int8), 2)  # 0 full, 1 needs a mask, 2 skip
    order = torch.argsort(cls, dim=-1, stable=True)
    idx_all = torch.gather(torch.where(listed, idx_all, 0), -1, order)
    n_listed = listed.sum(-1)  # [Bl, Hq, NQ]
    n_full = (cls == 0).sum(-1)
    n_listed_host = n_listed.cpu()
    n_full_host = n_full.cpu()
    valid_all = kv_valid.to(device=dev, dtype=torch.bool) if kv_valid is not None else None
    col_counts = column_counts.to(device=dev, dtype=torch.long).clamp(min=0) if columns is not None else None
    rows_all = q_rows.to(device=dev, dtype=torch.long) if q_rows is not None else None

    elt = torch.finfo(cdtype).bits // 8
    ar_kv = torch.arange(kv_block, device=dev)
    ar_q = torch.arange(q_block, device=dev)
    for bi in range(b):
        li = bi if bl > 1 else 0
        for h in range(hq):
            hk = h // group
            if h % group == 0:  # K/V of this KV head as [NK, kv_block, D] blocks (a view when possible)
                kblocks = _as_blocks(k[bi, hk], nk, kv_block, cdtype)
                vblocks = _as_blocks(v[bi, hk], nk, kv_block, cdtype)
            qh = q[bi, h]  # [Sq, D] view
            head_cols = None
            if columns is not None and int(col_counts[li, h].max()) > 0:  # this head's column keys, gathered once
                cols = columns[li, h, :int(col_counts[li, h].max())].to(device=dev, dtype=torch.long)
                cols = torch.where((cols >= 0) & (cols < sk), cols, sk)  # bad entries: a dummy key never taken
                rows = cols.clamp_max(sk - 1)
                head_cols = (cols, k[bi, hk].index_select(0, rows).to(cdtype), v[bi, hk].index_select(0, rows).to(cdtype))
            # query blocks sorted by their number of listed blocks: a chunk pads little
            row_order = torch.argsort(n_listed_host[li, h], stable=True)
            counts = n_listed_host[li, h][row_order].tolist()
            fulls = n_full_host[li, h][row_order].tolist()
            row_order = row_order.to(dev)
            r0 = 0
            while r0 < nq:
                # -- choose the chunk of query blocks: bound scores + gathered K/V by the budget ----
                r1 = r0
                while r1 < nq:
                    rows, keys = r1 - r0 + 1, max(counts[r1], 1) * kv_block
                    need = rows * (3 * q_block * keys * elt + 2 * keys * d * elt + 2 * q_block * d * elt)
                    if rows > 1 and need > MAX_CHUNK_BYTES:
                        break
                    r1 += 1
                sel = row_order[r0:r1]  # query-block indices of this chunk
                cmax = counts[r1 - 1]
                qpos = (sel[:, None] * q_block + ar_q).reshape(-1)  # [n * qb] kernel positions
                # rows of q / out they read and write (past the ragged end: a real row, never written)
                qrows = qpos.clamp_max(sq - 1)
                if rows_all is not None:
                    qrows = rows_all.index_select(0, qrows)
                res, res_lse = _chunk(qh, kblocks, vblocks, qpos, qrows, idx_all[li, h, sel, :cmax],
                                      n_listed[li, h, sel], min(fulls[r0:r1]),
                                      valid_all[bi] if valid_all is not None else None,
                                      cmax, q_block, kv_block, sq, sk, shift, causal, scale, cdtype, elt, ar_kv,
                                      head_cols, col_counts[li, h, sel] if head_cols is not None else None)
                keep_rows = qpos < sq
                if bool(keep_rows.all()):
                    out[bi, h].index_copy_(0, qrows, res.reshape(-1, d).to(out.dtype))
                    if lse is not None:
                        lse[bi, h].index_copy_(0, qrows, res_lse.reshape(-1).float())
                else:
                    rows_ok = qrows[keep_rows]
                    out[bi, h].index_copy_(0, rows_ok, res.reshape(-1, d)[keep_rows].to(out.dtype))
                    if lse is not None:
                        lse[bi, h].index_copy_(0, rows_ok, res_lse.reshape(-1)[keep_rows].float())
                r0 = r1
    return (out, lse) if return_lse else out


def _as_blocks(x: Tensor, nk: int, kv_block: int, cdtype: torch.dtype) -> Tensor:
    """[Sk, D] -> [NK, kv_block, D] in cdtype: a view when Sk % kv_block == 0 and x is cdtype, else a
    zero-padded copy (the padded keys are always masked)."""
    sk, d = x.shape
    if sk == nk * kv_block:
        return x.to(cdtype).unflatten(0, (nk, kv_block))
    padded = x.new_zeros((nk * kv_block, d), dtype=cdtype)
    padded[:sk] = x
    return padded.view(nk, kv_block, d)


def _chunk(qh, kblocks, vblocks, qpos, qrows, idx, cnt, n_full, valid, cmax, q_block, kv_block, sq, sk, shift,
           causal, scale, cdtype, elt, ar_kv, head_cols=None, col_cnt=None):
    """Attention of n query blocks (kernel positions qpos [n * q_block], read from rows qrows of qh) of
    one head over their key blocks.

    idx [n, cmax]: per row the full blocks first, then the ones needing an element mask; cnt [n] listed
    entries per row; slots < n_full are full blocks in every row (no mask built for them).
    head_cols: None, or the head's column keys (positions [C], K rows, V rows), of which row r takes
    the first col_cnt[r] outside its listed blocks.
    Returns out [n, q_block, D] and lse [n, q_block] in cdtype.
    """
    d = qh.shape[-1]
    dev = qh.device
    n = idx.shape[0]
    qpos = qpos.view(n, q_block)
    qg = qh.index_select(0, qrows).view(n, q_block, d).to(cdtype).mul_(scale)
    m = torch.full((n, q_block, 1), float("-inf"), dtype=cdtype, device=dev)
    l = torch.zeros((n, q_block, 1), dtype=cdtype, device=dev)
    acc = torch.zeros((n, q_block, d), dtype=cdtype, device=dev)
    # key slots per pass: all of a segment unless that would exceed the budget (then online softmax)
    per_slot = n * (3 * q_block * kv_block * elt + 2 * kv_block * d * elt)
    step = max(1, MAX_CHUNK_BYTES // max(per_slot, 1))
    passes = [(s0, min(s0 + step, n_full), False) for s0 in range(0, n_full, step)]
    passes += [(s0, min(s0 + step, cmax), True) for s0 in range(n_full, cmax, step)]
    for s0, s1, needs_mask in passes:
        blk = idx[:, s0:s1]  # [n, c]
        kpos = (blk[..., None] * kv_block + ar_kv).reshape(n, -1)  # [n, c*kb]
        blk_flat = blk.reshape(-1)
        kg = kblocks.index_select(0, blk_flat).view(n, -1, d)  # [n, c*kb, D]
        vg = vblocks.index_select(0, blk_flat).view(n, -1, d)
        s = torch.bmm(qg, kg.transpose(1, 2))  # [n, qb, c*kb], scale folded into qg
        if needs_mask:  # -- element mask (padding slots, ragged end, key padding, causal) -------------
            keep = torch.arange(s0, s1, device=dev)[None, :] < cnt[:, None]
            keep = keep[..., None].expand(-1, -1, kv_block).reshape(n, -1) & (kpos < sk)
            # Padding slots (block 0 stands in) are never read: a NaN there must not reach a row as 0 * NaN.
            vg.masked_fill_(~keep[..., None], 0.0)
            if valid is not None:
                keep &= valid[kpos.clamp_max(sk - 1)]
            keep = keep[:, None, :]
            if causal:
                keep = keep & (kpos[:, None, :] <= qpos[:, :, None] + shift)
            s.masked_fill_(~keep, float("-inf"))
        m, l, acc = _online_softmax(s, vg, m, l, acc)
    if head_cols is not None:  # -- the columns, outside the row's listed blocks --------------------------
        cols, kcol, vcol = head_cols
        nk = kblocks.shape[0]
        listed = torch.zeros(n, nk + 1, dtype=torch.bool, device=dev)  # [n, NK + 1]: the last one for bad columns
        listed.scatter_(1, torch.where(torch.arange(cmax, device=dev)[None, :] < cnt[:, None], idx, nk), True)
        listed[:, nk] = True
        keep = (torch.arange(len(cols), device=dev)[None, :] < col_cnt[:, None]) & ~listed[:, torch.where(cols < sk, cols // kv_block, nk)]
        if valid is not None:
            keep &= valid[cols.clamp_max(sk - 1)][None, :]
        keep = keep[:, None, :]
        if causal:
            keep = keep & (cols[None, None, :] <= qpos[:, :, None] + shift)
        s = torch.matmul(qg, kcol.T).masked_fill_(~keep, float("-inf"))  # [n, qb, C]
        m, l, acc = _online_softmax(s, vcol.expand(n, -1, -1), m, l, acc)
    has_any = l > 0
    l_safe = torch.where(has_any, l, torch.ones_like(l))
    out = acc / l_safe
    lse = torch.where(has_any, m + torch.log(l_safe), torch.full_like(l, float("-inf")))
    return out, lse.squeeze(-1)


def _online_softmax(s: Tensor, values: Tensor, m: Tensor, l: Tensor, acc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fold masked scores ``s`` [n, qb, keys] (-inf where not attended; overwritten) and their
    ``values`` [n, keys, D] into the running max, sum and accumulator."""
    m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
    m_use = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    s.sub_(m_use).exp_()
    alpha = torch.exp(m - m_use)
    return m_new, l * alpha + s.sum(dim=-1, keepdim=True), torch.baddbmm(acc * alpha, s, values)
