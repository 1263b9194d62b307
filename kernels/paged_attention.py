"""Decode attention (one query token per sequence) over the paged KV cache, for one layer.

Cache layer layout: ``(num_blocks, block_size, num_kv_heads, head_dim)``; token ``p`` of sequence
``b`` lives at ``[block_tables[b, p // block_size], p % block_size]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._common import (check_paged_attention, gdc_launch_dependents, gdc_wait, ieee_dot, next_pow2, num_sms, pdl,
                      pdl_launch, tl, triton, use_triton)

DEFAULT_PARTITION = 512
# Split-K also when the context bound exceeds this, however many rows: without a split one program walks a
# whole row, so a batch of mixed contexts waits for its longest row (on the H100, 48 rows of mean context
# 1000 and longest 5800 took 1.25x the time of 48 uniform rows; benchmarks/decode_mix.py). Split into
# partitions, the long rows spread over many programs. None: split only to fill the SMs.
BALANCE_ABOVE: int | None = 1024


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, m_ptr, l_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btb,
    stride_ob, stride_oh, stride_op,
    stride_mb, stride_mh,
    partition_size, sm_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    # One program = one (sequence, KV head, context partition). All GROUP query heads sharing the
    # KV head ride along as the M dimension of the dots, so each K/V row is read from HBM once.
    # BLOCK_G is padded to >= 16 because tl.dot needs M >= 16 on tensor cores.
    if PDL:  # nothing here may run before the previous kernel's outputs are visible (_common.pdl)
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g

    ctx = tl.load(ctx_ptr + b)
    start = part * partition_size
    # split-K: a partition past the row's context (the reduce never reads it) moves no bytes
    live = mask_g & ((start + offs_g * 0) < ctx)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=live[:, None] & mask_d[None, :], other=0.0)
    end = tl.minimum(start + partition_size, ctx)

    # Finite "minus infinity" keeps exp2(m_old - m_new) NaN-free when a tile is fully masked.
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < end
        # Per-token block lookup: BLOCK_N may span several pages, and each row of head_dim is
        # contiguous, so the gather stays coalesced along head_dim. int64: caches exceed 2**31.
        blk = tl.load(bt_ptr + b * stride_btb + pos // PAGE, mask=mask_n, other=0).to(tl.int64)
        slot = pos % PAGE
        kv_mask = mask_n[None, :] & mask_d[:, None]
        # K is loaded already transposed (head_dim x tokens) to feed the dot directly.
        kt = tl.load(k_ptr + blk[None, :] * stride_kb + slot[None, :] * stride_ks
                     + kvh * stride_kh + offs_d[:, None], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where(mask_n[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs
                    + kvh * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32),
                                                   input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_mask = mask_g[:, None] & mask_d[None, :]
    if SPLIT:
        # Unnormalised partials in fp32; the reduce kernel rescales them by exp2(m - m_max).
        o = out_ptr + b * stride_ob + heads[:, None] * stride_oh + part * stride_op + offs_d[None, :]
        tl.store(o, acc, mask=live[:, None] & mask_d[None, :])
        ml = b * stride_mb + heads * stride_mh + part
        tl.store(m_ptr + ml, m_i, mask=live)
        tl.store(l_ptr + ml, l_i, mask=live)
    else:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty context -> zeros, not NaN
        o = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_reduce_kernel(
    acc_ptr, m_ptr, l_ptr, ctx_ptr, out_ptr,
    stride_ab, stride_ah, stride_ap, stride_mb, stride_mh, stride_ob, stride_oh,
    partition_size,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    # One program per (sequence, query head): all partitions' partials fit in one tile, so the
    # combine is a single masked load + weighted sum (partials are small and L2-resident).
    if PDL:  # nothing here may run before the previous kernel's outputs are visible (_common.pdl)
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    n_parts = (ctx + partition_size - 1) // partition_size
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_p = offs_p < n_parts
    mask_d = offs_d < HEAD_DIM
    ml = b * stride_mb + h * stride_mh + offs_p
    m = tl.load(m_ptr + ml, mask=mask_p, other=float("-inf"))
    l = tl.load(l_ptr + ml, mask=mask_p, other=0.0)
    m_max = tl.maximum(tl.max(m, 0), -1.0e30)
    w = tl.where(mask_p, tl.exp2(m - m_max), 0.0)
    denom = tl.sum(w * l, 0)
    acc = tl.load(acc_ptr + b * stride_ab + h * stride_ah + offs_p[:, None] * stride_ap
                  + offs_d[None, :], mask=mask_p[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=mask_d)


class Tiles(NamedTuple):
    partition: int  # keys per program (the whole bound, rounded to 16, when not split)
    parts: int  # partitions per row
    split: bool
    block_n: int  # keys per step
    warps: int


def decode_tiles(batch: int, num_kv_heads: int, ctx_bound: int, sms: int, partition_size: int | None = None,
                 split: bool | None = None, block_n: int | None = None, num_warps: int | None = None) -> Tiles:
    """How ``paged_decode_attention`` lays out a launch (its arguments of the same names override each choice).

    Rules from kernels/bench_attention.py (the H100, 2026-11-23: 26 batch x context x KV-head shapes, each a chain
    of 32 calls in one graph; the rules' sum 2,838 us against 2,886 for the previous ones and 2,785 for the best
    configuration of each shape, docs/benchmarks.md):
    - split-K when ``batch * num_kv_heads`` gives fewer than two programs per SM (at batch 8 x 512 with 32 KV
      heads a split into 256-key partitions took 28.5 us a layer against 30.1 unsplit), or when the bound
      exceeds ``BALANCE_ABOVE`` (so that a long row does not hold up a batch of mixed contexts);
    - the partition halved from 512 keys down to 32 until about two programs per SM run (without a split, at
      batch 1 x 512 one program walks each row: ~19 us per layer for 8 MB);
    - 64 keys per step where the partition allows (enough bytes in flight per program to hide HBM latency while
      the score tile and two K/V tiles still fit in registers);
    - 2 warps above 64-key partitions and unsplit, 4 at 32-64 keys (2 warps took 1-4% off most of the long
      cases and cost at 32-64 keys; not all: 1 x 2048 at 512 keys ran 12% slower on 2, a partition the rules
      do not pick there).
    """
    if partition_size is None:
        psize = DEFAULT_PARTITION
        while psize > 32 and batch * num_kv_heads * triton.cdiv(ctx_bound, psize) < 2 * sms:
            psize //= 2
    else:
        psize = int(partition_size)
    if psize <= 0 or psize % 16:
        raise ValueError("partition_size must be a positive multiple of 16")
    n_parts = triton.cdiv(ctx_bound, psize)
    if split is None:
        split = n_parts > 1 and (batch * num_kv_heads < 2 * sms
                                 or (BALANCE_ABOVE is not None and ctx_bound > BALANCE_ABOVE))
    if not split:
        psize, n_parts = triton.cdiv(ctx_bound, 16) * 16, 1
    tile = 64 if psize % 64 == 0 else (32 if psize % 32 == 0 else 16)
    if block_n is not None:  # any of these: the kernel masks the keys past its partition
        if block_n not in (16, 32, 64, 128):
            raise ValueError("block_n must be 16, 32, 64 or 128")
        tile = block_n
    return Tiles(psize, n_parts, bool(split), tile, int(num_warps or (4 if psize <= 64 else 2)))


def paged_decode_attention_ref(q, k_cache_layer, v_cache_layer, block_tables, context_lens,
                               scale=None):
    """Plain torch: gather each sequence's K/V, softmax in fp32. Empty context -> zeros."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache_layer.shape[1], k_cache_layer.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        k = k_cache_layer[blocks, pos % block_size].float().repeat_interleave(group, dim=1)
        v = v_cache_layer[blocks, pos % block_size].float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v)
    return out.to(q.dtype)


def paged_decode_attention(q, k_cache_layer, v_cache_layer, block_tables, context_lens,
                           scale=None, partition_size=None, *, split=None, out=None,
                           backend=None, block_n=None, num_warps=None):
    """Decode attention for ``q (batch, num_heads, head_dim)``; returns the same shape and dtype.

    The launch's layout (split-K or not, partition, keys per step, warps) is ``decode_tiles``'s, from the
    context bound ``block_tables.shape[1] * block_size`` (no device sync: trim block_tables to the batch's
    longest sequence); ``partition_size`` (a multiple of 16), ``split``, ``block_n`` (keys per step: 16, 32,
    64 or 128) and ``num_warps`` override its choices. ``out`` (optional, same shape/dtype as q) receives the
    result.
    """
    batch = q.shape[0]
    num_heads, head_dim, block_size, num_kv_heads = check_paged_attention(q, k_cache_layer, v_cache_layer)
    if not use_triton(backend, q, k_cache_layer):
        res = paged_decode_attention_ref(q, k_cache_layer, v_cache_layer, block_tables,
                                         context_lens, scale)
        return res if out is None else out.copy_(res)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = num_heads // num_kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    context_lens = context_lens.to(torch.int32).contiguous()
    assert k_cache_layer.stride(-1) == 1 and v_cache_layer.stride(-1) == 1

    ctx_bound = max(1, block_tables.shape[1] * block_size)
    tiles = decode_tiles(batch, num_kv_heads, ctx_bound, num_sms(q.device), partition_size, split, block_n, num_warps)
    psize, n_parts, split, BLOCK_N = tiles.partition, tiles.parts, tiles.split, tiles.block_n
    BLOCK_G = max(16, next_pow2(group))
    BLOCK_D = next_pow2(head_dim)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    use_pdl = pdl(q.device)
    common = dict(GROUP=group, HEAD_DIM=head_dim, PAGE=block_size, BLOCK_G=BLOCK_G,
                  BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, IEEE=ieee_dot(q.dtype), PDL=use_pdl,
                  num_warps=tiles.warps, **pdl_launch(use_pdl))
    kc, vc = k_cache_layer, v_cache_layer
    kv_strides = (kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2))
    scale_log2 = scale * 1.4426950408889634  # softmax via exp2
    if not split:
        _paged_decode_kernel[(batch, num_kv_heads, 1)](
            q, kc, vc, block_tables, context_lens, out, out, out,
            q.stride(0), q.stride(1), *kv_strides, block_tables.stride(0),
            out.stride(0), out.stride(1), 0, 0, 0,
            psize, scale_log2, SPLIT=False, **common)
        return out
    acc = torch.empty(batch, num_heads, n_parts, head_dim, dtype=torch.float32, device=q.device)
    m = torch.empty(batch, num_heads, n_parts, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _paged_decode_kernel[(batch, num_kv_heads, n_parts)](
        q, kc, vc, block_tables, context_lens, acc, m, l,
        q.stride(0), q.stride(1), *kv_strides, block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
        psize, scale_log2, SPLIT=True, **common)
    _split_reduce_kernel[(batch, num_heads)](
        acc, m, l, context_lens, out,
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
        out.stride(0), out.stride(1), psize,
        HEAD_DIM=head_dim, BLOCK_P=max(2, next_pow2(n_parts)), BLOCK_D=BLOCK_D, PDL=use_pdl,
        **pdl_launch(use_pdl))
    return out
