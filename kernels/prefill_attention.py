"""Causal attention of prefill chunks (many query rows per sequence) over the paged KV cache.

Rows of ``C`` sequences are packed back to back: rows ``cu_rows[c]:cu_rows[c + 1]`` of
``q (N, num_heads, head_dim)`` belong to sequence ``c``, whose pages are ``block_tables[c]``.
Row ``r`` sits at ``positions[r]`` of its sequence and attends keys ``0..positions[r]`` inclusive
(usually a run p0..p0+n-1, but recomputed tokens may skip; the kernel needs no order at all, though
a row tile costs keys up to its largest position). Every attended key, the chunk's own included,
must already be in the cache.

Cache layer layout: ``(num_blocks, block_size, num_kv_heads, head_dim)``; token ``p`` of sequence
``c`` lives at ``[block_tables[c, p // block_size], p % block_size]``. Query head ``h`` reads KV
head ``h // (num_heads // num_kv_heads)`` (GQA).
"""

from __future__ import annotations

import math

import torch

from ._common import check_paged_attention, ieee_dot, next_pow2, tl, triton, use_triton

# H100, head_dim 128, bf16 (182 registers, no spills, 81 KiB shared: two programs per SM). Measured
# against 64x128, 128x64 and 128x128 tiles, 8 warps and 2-4 stages: 128x128 (8 warps) is within a
# few percent on long chunks, but 64-row tiles waste less on short chunks and partial tiles.
DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 64
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3


@triton.jit
def _attend_key_tiles(
    acc, l_i, m_i, q, pos_m,
    k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb, stride_vs,
    lo, hi, sm_scale_log2,
    offs_n, offs_d, mask_d,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    # Online softmax over keys lo..hi-1. CAUSAL=False is the bulk below every row's position:
    # no key or causal masks there. CAUSAL=True walks the diagonal band: masked tails and
    # key_pos <= row_pos per element.
    for n0 in range(lo, hi, BLOCK_N):
        kp = n0 + offs_n
        # Per-token block lookup (BLOCK_N may span several pages; pages may be tiny or odd).
        # int64 before the multiply: caches exceed 2**31 elements.
        if CAUSAL:
            mask_n = kp < hi
            blk = tl.load(bt_row + kp // PAGE, mask=mask_n, other=0).to(tl.int64)
            kv_mask = mask_n[:, None] & mask_d[None, :]
        else:
            blk = tl.load(bt_row + kp // PAGE).to(tl.int64)
            kv_mask = mask_d[None, :]  # broadcast by tl.load: only head_dim padding to mask
        # Each token's head_dim row is contiguous, so the gathers stay coalesced along head_dim.
        kv_off = blk * stride_kb + (kp % PAGE).to(tl.int64) * stride_ks
        k = tl.load(k_base + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if CAUSAL:
            s = tl.where(kp[None, :] <= pos_m[:, None], s, float("-inf"))
        # Raw scores in the max, the scale folded into one FMA per element before exp2.
        m_new = tl.maximum(m_i, tl.max(s, 1) * sm_scale_log2)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * sm_scale_log2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = blk * stride_vb + (kp % PAGE).to(tl.int64) * stride_vs
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, pos_ptr, out_ptr,
    stride_qn, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btc,
    stride_on, stride_oh,
    num_m_tiles, sm_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    # One program = one (query head, tile of BLOCK_M rows, sequence); launch order follows the
    # grid's x, y, z. Heads vary fastest, so the GROUP heads sharing a KV head run side by side.
    # Sequences vary slowest, so the programs in flight share one sequence's K/V in L2 (with the
    # sequence outermost, measured 1.2-1.5x faster on H100 for batches of prefixed chunks whose
    # K/V exceed L2). Row tiles go last-first: later tiles see the longest causal prefix, and
    # starting them first shortens the launch's tail.
    h = tl.program_id(0)
    tile = num_m_tiles - 1 - tl.program_id(1)
    c = tl.program_id(2)
    row_begin = tl.load(cu_ptr + c)
    n_rows = tl.load(cu_ptr + c + 1) - row_begin
    m0 = tile * BLOCK_M
    # The grid is sized from a max_rows bucket (CUDA graphs): tiles past this sequence's rows,
    # and sequences with no rows at all, have nothing to do.
    if m0 >= n_rows:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_rows
    mask_d = offs_d < HEAD_DIM
    rows = (row_begin + offs_m).to(tl.int64)
    # Padding rows get position -1: they attend nothing in the causal band and are not stored.
    pos_m = tl.load(pos_ptr + rows, mask=mask_m, other=-1).to(tl.int32)
    max_pos = tl.max(pos_m, 0)
    min_pos = tl.min(tl.where(mask_m, pos_m, max_pos), 0)

    q = tl.load(q_ptr + rows[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    kvh = h // GROUP
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    bt_row = bt_ptr + c.to(tl.int64) * stride_btc

    # Finite "minus infinity" keeps exp2(m_old - m_new) NaN-free when a row's tile is fully
    # masked (padding rows, or rows whose position precedes the whole key tile).
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys 0..min_pos are visible to every row of the tile: whole BLOCK_N tiles of them need no
    # masking. The rest, up to the tile's largest position, is the causal band. Work is therefore
    # proportional to the causal triangle, not to the block table's width.
    full_end = (min_pos + 1) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attend_key_tiles(
        acc, l_i, m_i, q, pos_m, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb,
        stride_vs, 0, full_end, sm_scale_log2, offs_n, offs_d, mask_d,
        PAGE=PAGE, BLOCK_N=BLOCK_N, CAUSAL=False, IEEE=IEEE)
    acc, l_i, m_i = _attend_key_tiles(
        acc, l_i, m_i, q, pos_m, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb,
        stride_vs, full_end, max_pos + 1, sm_scale_log2, offs_n, offs_d, mask_d,
        PAGE=PAGE, BLOCK_N=BLOCK_N, CAUSAL=True, IEEE=IEEE)

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o = out_ptr + rows[:, None] * stride_on + h * stride_oh + offs_d[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu_rows: torch.Tensor,
                                positions: torch.Tensor, max_rows: int) -> torch.Tensor:
    """Plain torch: per sequence, gather keys 0..max position, masked SDPA in float32.

    Rows not covered by ``cu_rows`` (beyond ``cu_rows[-1]``) come back as zeros.
    """
    num_rows, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_rows, num_heads, head_dim, dtype=torch.float32, device=q.device)
    bounds = [int(x) for x in cu_rows.tolist()]
    for c in range(len(bounds) - 1):
        r0, r1 = bounds[c], bounds[c + 1]
        if r1 <= r0:
            continue
        if r1 - r0 > max_rows:
            raise ValueError(f"sequence {c} has {r1 - r0} rows > max_rows {max_rows}")
        row_pos = positions[r0:r1].long()
        key_pos = torch.arange(int(row_pos.max()) + 1, device=q.device)
        blocks = block_tables[c, key_pos // block_size].long()
        slots = key_pos % block_size
        # (keys, kv_heads, D) -> (H, keys, D)
        k = k_cache[blocks, slots].float().transpose(0, 1).repeat_interleave(group, dim=0)
        v = v_cache[blocks, slots].float().transpose(0, 1).repeat_interleave(group, dim=0)
        mask = key_pos[None, :] <= row_pos[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(
            q[r0:r1].float().transpose(0, 1), k, v, attn_mask=mask)  # (H, rows, D)
        out[r0:r1] = o.transpose(0, 1)
    return out.to(q.dtype)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_rows: torch.Tensor,
                            positions: torch.Tensor, max_rows: int, *, backend: str | None = None,
                            block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Causal prefill attention for ``q (N, num_heads, head_dim)``; returns the same shape/dtype.

    ``max_rows`` bounds every sequence's row count and sizes the grid (with no device sync), so
    it can be a fixed CUDA-graph bucket. Rows beyond ``cu_rows[-1]`` are left unwritten by the
    Triton path (zeros in the reference). ``block_m`` / ``block_n`` (powers of two >= 16)
    override the row / key tile sizes, e.g. to keep interpreter tests small.
    """
    num_rows = q.shape[0]
    num_heads, head_dim, block_size, num_kv_heads = check_paged_attention(q, k_cache, v_cache)
    if cu_rows.dim() != 1 or cu_rows.numel() != block_tables.shape[0] + 1:
        raise ValueError("cu_rows must have one entry more than block_tables has rows")
    if positions.shape != (num_rows,):
        raise ValueError(f"positions must have shape ({num_rows},), got {tuple(positions.shape)}")
    if not use_triton(backend, q, k_cache):
        return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_rows, positions,
                                           max_rows)
    BLOCK_M = DEFAULT_BLOCK_M if block_m is None else int(block_m)
    BLOCK_N = DEFAULT_BLOCK_N if block_n is None else int(block_n)
    for name, b in (("block_m", BLOCK_M), ("block_n", BLOCK_N)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {b}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_seqs = block_tables.shape[0]
    if num_rows == 0 or num_seqs == 0 or max_rows <= 0:
        return out
    group = num_heads // num_kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    cu_rows = cu_rows.to(torch.int32).contiguous()
    positions = positions.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1

    num_m_tiles = triton.cdiv(int(max_rows), BLOCK_M)
    if max(num_m_tiles, num_seqs) > 65535:  # CUDA's limit on grid dims y and z
        raise ValueError(f"too many row tiles ({num_m_tiles}) or sequences ({num_seqs}) for one launch")
    kc, vc = k_cache, v_cache
    _paged_prefill_kernel[(num_heads, num_m_tiles, num_seqs)](
        q, kc, vc, block_tables, cu_rows, positions, out,
        q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        num_m_tiles, 1.0 / math.sqrt(head_dim) * 1.4426950408889634,  # softmax via exp2
        GROUP=group, HEAD_DIM=head_dim, PAGE=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, next_pow2(head_dim)), IEEE=ieee_dot(q.dtype),
        num_warps=DEFAULT_NUM_WARPS, num_stages=DEFAULT_NUM_STAGES)
    return out
