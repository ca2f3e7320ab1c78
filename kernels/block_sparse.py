"""Block-sparse flash-attention forward, driven by a per-query-block list of key blocks.

Flash attention (online softmax over key tiles, never materialising the score matrix):
  * FlashAttention, Dao et al. 2022, https://arxiv.org/abs/2205.14135
  * FlashAttention-2, Dao 2023, https://arxiv.org/abs/2307.08691
Block-sparse variant: each program owns one query tile of one (batch, head) and visits only the key
blocks listed for its layout row in a look-up table (``kv_indices[b, h, i, :kv_counts[b, h, i]]``), as in
  * Triton's block-sparse attention and FlashAttention's block-sparse forward,
  * FlexAttention's BlockMask, https://pytorch.org/blog/flexattention/

Only ``@triton.jit`` code lives here; the launcher, checks, schedule and tile configuration are in
``block_sparse_op.py``.

* The key tile is the layout's key block (KV_BLOCK = kv_block) or a power-of-two fraction of it
  (BLOCK_N), visited sub-tile by sub-tile: at head_dim 256 the K and V tiles of a 128-key block
  (64 KB each in 16 bits) would leave room for one program per SM. The query tile is the layout's
  query block or a power-of-two fraction of it (BLOCK_M = q_block / Q_SPLIT): the Q_SPLIT tiles of
  one layout row share its key list and run next to each other, so they share its K/V tiles in L2.
* Head dims that are not powers of two (80, 96) run padded to HEAD_DIM_PAD (the next power of two,
  the width ``tl.arange`` and ``tl.dot`` need): pointer loads mask the columns past HEAD_DIM to 0
  and stores skip them; tensor descriptors keep the real width as their shape, so the hardware
  zero-fills those columns on load and drops them on store. Zero columns add 0 to every q.k, so
  the result is exactly that of the real width.
* Programs are dealt out by a schedule (``Sched``, one entry per layout row, heaviest rows first) so a
  launch whose heads differ 10x in work does not end on a tail of long programs.
* Element masks (causal diagonal, ragged last key block, key padding, bad block index) are applied
  only on the key blocks that need them: full blocks run the mask-free path.
* K/V (and Q/O) move either through plain pointer loads or, where the tensors allow it, through
  Hopper's tensor-memory-accelerator descriptors (``USE_TMA``: 4-D descriptors over [B, H, S, D],
  out-of-range rows come back as zeros and stores past the end are dropped by the hardware).
* Query rows in the caller's order (``HAS_Q_ROWS``): the layout is laid out in a kernel order (e.g.
  a video's tokens tile by tile), and K/V must be given in it, since they are streamed block by
  block. Q and O are touched once per program, so instead of permuting them around the kernel, the
  program reads its query rows ``QRows[p]`` straight from Q (in the caller's order) and writes its
  output rows back to the same rows of Out: a pointer gather and scatter of whole rows.
"""

import triton
import triton.language as tl


@triton.jit
def _key_block(Idx_row, it, stride_ik, NK, KV_BLOCK: tl.constexpr):
    """First key of the ``it``-th listed block, and whether its index is valid (a bad index is read as
    block 0 and fully masked)."""
    blk = tl.load(Idx_row + it * stride_ik)
    in_range = (blk >= 0) & (blk < NK)
    return tl.where(in_range, blk, 0) * KV_BLOCK, in_range


@triton.jit
def _load(ptrs, row_ok, d_ok, ROWS: tl.constexpr, PAD_D: tl.constexpr):
    """``tl.load(ptrs)`` with rows masked by ``row_ok`` (when ROWS) and the padding columns by
    ``d_ok`` (when PAD_D); both masks broadcast to the tile, masked entries read as 0. The masks are
    chosen at compile time so power-of-two widths keep their unmasked loads."""
    if ROWS and PAD_D:
        x = tl.load(ptrs, mask=row_ok & d_ok, other=0.0)
    elif ROWS:
        x = tl.load(ptrs, mask=row_ok, other=0.0)
    elif PAD_D:
        x = tl.load(ptrs, mask=d_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store(ptrs, tile, row_ok, d_ok, PAD_D: tl.constexpr):
    """``tl.store`` of the rows with ``row_ok`` and, when PAD_D, only the real columns ``d_ok``."""
    if PAD_D:
        tl.store(ptrs, tile, mask=row_ok & d_ok)
    else:
        tl.store(ptrs, tile, mask=row_ok)


@triton.jit
def _gather_rows(base, rows, stride_row, offs_d, row_ok, d_ok, PAD_D: tl.constexpr):
    """[BLOCK_M, HEAD_DIM_PAD] tile whose i-th row is row ``rows[i]`` of the matrix at ``base`` (rows
    ``stride_row`` apart, last dim contiguous); rows with ``row_ok`` False read as 0."""
    return _load(base + rows[:, None] * stride_row + offs_d[None, :], row_ok[:, None], d_ok[None, :], True, PAD_D)


@triton.jit
def _scatter_rows(base, rows, stride_row, offs_d, row_ok, d_ok, tile, PAD_D: tl.constexpr):
    """Write the i-th row of ``tile`` to row ``rows[i]`` of the matrix at ``base`` (rows with
    ``row_ok`` False are not written)."""
    _store(base + rows[:, None] * stride_row + offs_d[None, :], tile, row_ok[:, None], d_ok[None, :], PAD_D)


@triton.jit
def _scores(q, start_n, K_head, k_desc, off_b, off_hkv, stride_kn, Sk, offs_n, offs_d, d_ok,  #
            BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAD_D: tl.constexpr, EVEN_N: tl.constexpr,  #
            DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """q @ k^T for the key tile starting at ``start_n`` (unscaled, fp32)."""
    if USE_TMA:
        k = k_desc.load([off_b, off_hkv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)
        return tl.dot(q, k.T, input_precision=DOT_PRECISION)
    k_ptrs = K_head + start_n.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None]
    kT = _load(k_ptrs, (start_n + offs_n)[None, :] < Sk, d_ok[:, None], not EVEN_N, PAD_D)
    return tl.dot(q, kT, input_precision=DOT_PRECISION)


@triton.jit
def _online_softmax(acc, l_i, m_i, qk, qk_scale):
    """Fold masked scores ``qk`` (-inf where not attended) into the running (acc, l_i, m_i); returns
    the probabilities to multiply with V and the rescaled state.

    Scores are kept in the log2 domain (``qk_scale`` = scale * log2(e)). A row that has seen no
    allowed key keeps m_i = -inf, l_i = 0, acc = 0 (the epilogue writes 0 for it).
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, acc * alpha[:, None], l_i, m_new


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, start_n, in_range,  #
                V_head, v_desc, off_b, off_hkv, KvValid_row, stride_vn,  #
                q_start, causal_shift, Sk, qk_scale, offs_m, offs_n, offs_d, d_ok,  #
                BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAD_D: tl.constexpr,  #
                CAUSAL: tl.constexpr, HAS_KV_VALID: tl.constexpr, EVEN_N: tl.constexpr,  #
                DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Fold one key tile's scores into the running (acc, l_i, m_i): mask, online softmax, P @ V."""
    # -- element mask, only on blocks that need one -----------------------------------------------
    needs_mask = ~in_range
    if not EVEN_N:
        needs_mask = needs_mask | (start_n + BLOCK_N > Sk)
    if CAUSAL:
        # the block's last key is beyond the first query row's causal limit
        needs_mask = needs_mask | (start_n + BLOCK_N - 1 > q_start + causal_shift)
    if needs_mask:
        offs_k = start_n + offs_n
        keep = ((offs_k < Sk) & in_range)[None, :]
        if CAUSAL:
            keep = keep & (offs_k[None, :] <= (offs_m + causal_shift)[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    if HAS_KV_VALID:
        offs_k = start_n + offs_n
        valid = tl.load(KvValid_row + offs_k, mask=offs_k < Sk, other=0) != 0
        qk = tl.where(valid[None, :], qk, float("-inf"))
    p, acc, l_i, m_i = _online_softmax(acc, l_i, m_i, qk, qk_scale)
    # -- P @ V ------------------------------------------------------------------------------------
    if USE_TMA:
        v = v_desc.load([off_b, off_hkv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)
    else:
        v_ptrs = V_head + start_n.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
        v = _load(v_ptrs, (start_n + offs_n)[:, None] < Sk, d_ok[None, :], not EVEN_N, PAD_D)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_columns(acc, l_i, m_i, q, K_head, V_head, KvValid_row, Cols_head, ncols, Listed_row,  #
                      stride_kn, stride_vn, causal_shift, Sk, qk_scale, offs_m, offs_n, offs_d, d_ok,  #
                      BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr, PAD_D: tl.constexpr, CAUSAL: tl.constexpr,  #
                      HAS_KV_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Visit the first ``ncols`` of the head's key columns (ascending key positions), BLOCK_N at a
    time, gathering their K/V rows: scattered keys (vertical lines) cost their tokens, not their
    blocks. A column inside a key block the row already visited (``Listed_row[block]``) is skipped,
    so every key is attended once."""
    for c0 in range(0, ncols, BLOCK_N):
        slot = c0 + offs_n
        cols = tl.load(Cols_head + slot, mask=slot < ncols, other=-1)
        in_range = (cols >= 0) & (cols < Sk)  # padding and bad entries are skipped
        take = in_range & (tl.load(Listed_row + cols // KV_BLOCK, mask=in_range, other=1) == 0)
        kT = _load(K_head + cols.to(tl.int64)[None, :] * stride_kn + offs_d[:, None], take[None, :], d_ok[:, None],
                   True, PAD_D)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        keep = take[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= (offs_m + causal_shift)[:, None])
        if HAS_KV_VALID:
            keep = keep & (tl.load(KvValid_row + cols, mask=take, other=0) != 0)[None, :]
        p, acc, l_i, m_i = _online_softmax(acc, l_i, m_i, tl.where(keep, qk, float("-inf")), qk_scale)
        v = _load(V_head + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :], take[:, None], d_ok[None, :],
                  True, PAD_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q,  #
                    K_head, V_head, k_desc, v_desc, off_b, off_hkv,  #
                    KvValid_row, Idx_row, count,  #
                    stride_kn, stride_vn, stride_ik,  #
                    q_start, causal_shift, Sk, qk_scale,  #
                    offs_m, offs_n, offs_d, d_ok,  #
                    BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAD_D: tl.constexpr,  #
                    CAUSAL: tl.constexpr, HAS_KV_VALID: tl.constexpr, EVEN_N: tl.constexpr,  #
                    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Visit the ``count`` listed key blocks of one query tile, each in KV_BLOCK // BLOCK_N key tiles;
    returns (acc, l_i, m_i). A tile past the sequence end is fully masked like any ragged tile.

    The loop is deliberately plain (one stage, no score prefetch, no conditional rescale): on the
    H200 three or four resident programs per SM overlap each other's loads, softmax and tensor-core
    work better than deeper pipelines, prefetched scores or branches, which all cost registers and
    so resident programs (benchmarks/NOTES.md, runs 4-9).
    """
    NK = tl.cdiv(Sk, KV_BLOCK)
    for it in range(0, count):
        start_blk, in_range = _key_block(Idx_row, it, stride_ik, NK, KV_BLOCK)
        for sub in tl.static_range(KV_BLOCK // BLOCK_N):
            start_n = start_blk + sub * BLOCK_N
            qk = _scores(q, start_n, K_head, k_desc, off_b, off_hkv, stride_kn, Sk, offs_n, offs_d, d_ok,
                         BLOCK_N, HEAD_DIM_PAD, PAD_D, EVEN_N, DOT_PRECISION, USE_TMA)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, start_n, in_range,
                                        V_head, v_desc, off_b, off_hkv, KvValid_row, stride_vn,
                                        q_start, causal_shift, Sk, qk_scale, offs_m, offs_n, offs_d, d_ok,
                                        BLOCK_N, HEAD_DIM_PAD, PAD_D, CAUSAL, HAS_KV_VALID, EVEN_N, DOT_PRECISION,
                                        USE_TMA)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, KvIdx, KvCnt, KvValid, Sched, QRows, Cols, ColCnt, Listed,  #
              q_desc, k_desc, v_desc, o_desc,  #
              stride_qb, stride_qh, stride_qm,  #
              stride_kb, stride_kh, stride_kn,  #
              stride_vb, stride_vh, stride_vn,  #
              stride_ob, stride_oh, stride_om,  #
              stride_lb, stride_lh,  #
              stride_ib, stride_ih, stride_iq, stride_ik,  #
              stride_cb, stride_ch, stride_cq,  #
              stride_valid_b,  #
              stride_colb, stride_colh, stride_ccb, stride_cch, stride_lib, stride_lih, stride_liq,  #
              sm_scale, GROUP, Sq, Sk, MAXK, NQ,  #
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  #
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr, Q_SPLIT: tl.constexpr,  #
              CAUSAL: tl.constexpr, HAS_KV_VALID: tl.constexpr, STORE_LSE: tl.constexpr,  #
              EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,  #
              HAS_Q_ROWS: tl.constexpr, HAS_COLS: tl.constexpr):
    """One program = one query tile (BLOCK_M rows) of one layout row (head h, query block i) of one
    batch entry; the row comes from the schedule: ``Sched[program_id(0) // Q_SPLIT] = h * NQ + i``.

    Q [B, Hq, Sq, HEAD_DIM], K/V [B, Hkv, Sk, HEAD_DIM] (last dim contiguous), Out like Q; tiles are
    HEAD_DIM_PAD wide (the next power of two), keys KV_BLOCK (the layout's) in tiles of BLOCK_N,
    Lse fp32 [B, Hq, Sq], KvIdx int32 [Bl, Hq, NQ, MAXK], KvCnt int32 [Bl, Hq, NQ] (stride_ib/cb = 0
    when Bl = 1), KvValid uint8 [B, Sk], Sched int32 [Hq * NQ]. Query head h reads KV head h // GROUP.
    With USE_TMA the four descriptors cover Q/K/V/Out as 4-D [B, H, S, HEAD_DIM] tensors, in blocks
    [1, 1, rows, HEAD_DIM_PAD].

    HAS_Q_ROWS: QRows int32 [Sq], a permutation of [0, Sq). The query at kernel position p (the
    position the layout, causal rule and K/V order speak of) is row QRows[p] of Q, and its output
    (and lse) goes to row QRows[p] of Out (and Lse). Q and Out are then read and written through
    pointers (q_desc/o_desc are unused), while K/V keep USE_TMA.

    HAS_COLS: after its blocks, the row also visits key columns: the first ``ColCnt[b, h, i]``
    entries of Cols int32 [Bl, Hq, C] (the head's columns, ascending), except those inside a block
    the row lists (Listed uint8 [Bl, Hq, NQ, NK], the layout's blocks as a mask).
    """
    tl.static_assert(BLOCK_M >= 16, "BLOCK_M must be >= 16 for tl.dot")
    tl.static_assert(BLOCK_N >= 16, "BLOCK_N (key tile) must be >= 16 for tl.dot")
    tl.static_assert(KV_BLOCK % BLOCK_N == 0, "BLOCK_N must divide KV_BLOCK")
    tl.static_assert(HEAD_DIM_PAD >= 16, "HEAD_DIM_PAD must be >= 16 for tl.dot")
    tl.static_assert((HEAD_DIM_PAD & (HEAD_DIM_PAD - 1)) == 0, "HEAD_DIM_PAD must be a power of two")
    tl.static_assert((HEAD_DIM <= HEAD_DIM_PAD) & (2 * HEAD_DIM > HEAD_DIM_PAD), "HEAD_DIM_PAD: next power of two")

    pid = tl.program_id(0)
    off_b = tl.program_id(1)
    row = tl.load(Sched + pid // Q_SPLIT)
    off_h = row // NQ
    block_m = row % NQ  # layout query block
    off_hkv = off_h // GROUP
    q_start = block_m * (BLOCK_M * Q_SPLIT) + (pid % Q_SPLIT) * BLOCK_M

    K_head = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    V_head = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    Idx_row = KvIdx + off_b.to(tl.int64) * stride_ib + off_h.to(tl.int64) * stride_ih + block_m.to(tl.int64) * stride_iq
    cnt_ptr = KvCnt + off_b.to(tl.int64) * stride_cb + off_h.to(tl.int64) * stride_ch + block_m.to(tl.int64) * stride_cq
    KvValid_row = KvValid + off_b.to(tl.int64) * stride_valid_b

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM  # the real columns (all of them unless HEAD_DIM is padded)
    row_ok = offs_m < Sq

    # -- load the query tile once ------------------------------------------------------------------
    if HAS_Q_ROWS:
        # the tile's queries are scattered over Q (caller's order): gather them row by row
        q_rows = tl.load(QRows + offs_m, mask=row_ok, other=0).to(tl.int64)
        Q_head = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        q = _gather_rows(Q_head, q_rows, stride_qm, offs_d, row_ok, d_ok, HEAD_DIM < HEAD_DIM_PAD)
    elif USE_TMA:
        q = q_desc.load([off_b, off_h, q_start, 0]).reshape(BLOCK_M, HEAD_DIM_PAD)
    else:
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
        q = _load(q_base + offs_mb[:, None] * stride_qm + offs_d[None, :], row_ok[:, None], d_ok[None, :], True,
                  HEAD_DIM < HEAD_DIM_PAD)

    count = tl.load(cnt_ptr)
    count = tl.minimum(tl.maximum(count, 0), MAXK)  # never read padding or past the row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504088896340736  # 1 / ln(2): exp(x) = exp2(x * log2(e))
    causal_shift = Sk - Sq  # bottom-right aligned causal: key k allowed for query q iff k <= q + shift

    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q,  #
                                    K_head, V_head, k_desc, v_desc, off_b, off_hkv,  #
                                    KvValid_row, Idx_row, count,  #
                                    stride_kn, stride_vn, stride_ik,  #
                                    q_start, causal_shift, Sk, qk_scale,  #
                                    offs_m, offs_n, offs_d, d_ok,  #
                                    BLOCK_N, KV_BLOCK, HEAD_DIM_PAD, HEAD_DIM < HEAD_DIM_PAD,  #
                                    CAUSAL, HAS_KV_VALID, EVEN_N, DOT_PRECISION, USE_TMA)
    if HAS_COLS:
        off_bl_c = off_b.to(tl.int64) * stride_colb + off_h.to(tl.int64) * stride_colh
        ncols = tl.load(ColCnt + off_b.to(tl.int64) * stride_ccb + off_h.to(tl.int64) * stride_cch + block_m)
        Listed_row = Listed + off_b.to(tl.int64) * stride_lib + off_h.to(tl.int64) * stride_lih \
            + block_m.to(tl.int64) * stride_liq
        acc, l_i, m_i = _attn_fwd_columns(acc, l_i, m_i, q, K_head, V_head, KvValid_row, Cols + off_bl_c, ncols,
                                          Listed_row, stride_kn, stride_vn, causal_shift, Sk, qk_scale,
                                          offs_m, offs_n, offs_d, d_ok, BLOCK_N, KV_BLOCK, HEAD_DIM < HEAD_DIM_PAD,
                                          CAUSAL, HAS_KV_VALID, DOT_PRECISION)

    # epilogue: rows with no attended key (l_i == 0) give 0 and lse = -inf
    has_any = l_i > 0.0
    l_safe = tl.where(has_any, l_i, 1.0)
    acc = acc / l_safe[:, None]
    if HAS_Q_ROWS:
        # each output row goes to the row its query came from. The rows are read again (an L2 hit)
        # rather than kept from the Q load: kept, they stay live through the key loop (ptxas, sm_90,
        # fp16, D=128, 64-row tiles, 4 warps, TMA K/V: 179 registers instead of 166, i.e. two
        # resident programs per SM instead of three; 158 without q_rows). The cache modifier makes
        # this load differ from the first, so the compiler cannot merge the two.
        q_rows = tl.load(QRows + offs_m, mask=row_ok, other=0, cache_modifier=".cg").to(tl.int64)
        O_head = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
        _scatter_rows(O_head, q_rows, stride_om, offs_d, row_ok, d_ok, acc.to(Out.type.element_ty),
                      HEAD_DIM < HEAD_DIM_PAD)
    elif USE_TMA:
        o_desc.store([off_b, off_h, q_start, 0], acc.to(Out.type.element_ty).reshape(1, 1, BLOCK_M, HEAD_DIM_PAD))
    else:
        o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
        _store(o_base + offs_mb[:, None] * stride_om + offs_d[None, :], acc.to(Out.type.element_ty), row_ok[:, None],
               d_ok[None, :], HEAD_DIM < HEAD_DIM_PAD)
    if STORE_LSE:
        lse = tl.where(has_any, (m_i + tl.math.log2(l_safe)) * 0.69314718055994530942, float("-inf"))
        lse_head = Lse + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh
        if HAS_Q_ROWS:
            tl.store(lse_head + q_rows, lse, mask=row_ok)
        else:
            tl.store(lse_head + offs_m, lse, mask=row_ok)
