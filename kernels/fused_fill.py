"""Early-exit "fill": for every exited token, compute and cache K/V of every layer it skipped.

Token ``n`` ran layers ``0 .. exit_layer[n]-1``; for each skipped layer ``l >= exit_layer[n]``:
``x = rmsnorm(h[n]) * input_norm_w[l]``, ``k = rope(wk[l] @ x, positions[n])``, ``v = wv[l] @ x``,
written to ``k_cache[l] / v_cache[l]`` at flat slot ``slot[n]``. One launch covers all pairs.

At decode a fill is a weight stream (``2 * kv_dim * hidden`` weights per layer skipped, a few tokens),
so the kernel is laid out as ``gemv.py``'s skinny GEMM, batched over layers: one program per (layer,
``2 * BLOCK_P`` output rows of K or V, token tile) walks the whole reduction in wide coalesced tiles. The
rows of a program are ``BLOCK_P`` rows of one head and the ``BLOCK_P`` rows half a head further on, the
pairs that rotary mixes, so rotary and the cache store stay inside the program. One token: elementwise
products into (BLOCK_P, BLOCK_K) fp32 accumulators, one reduction at the end; more: ``tl.dot`` on
token tiles of 16-128 rows.
"""

from __future__ import annotations

import torch

from ._common import ieee_dot, next_pow2, tl, triton, use_triton


@triton.jit
def _fused_fill_kernel(
    h_ptr, exit_ptr, pos_ptr, slot_ptr, nw_ptr, wk_ptr, wv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
    n_tokens, hidden, first_layer, eps,
    stride_hn, stride_nwl, stride_wkl, stride_wkr, stride_wvl, stride_wvr, stride_cos, stride_sin,
    stride_kcl, stride_kcb, stride_kcs, stride_kch, stride_vcl, stride_vcb, stride_vcs, stride_vch,
    KV_HEADS: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    l = first_layer + tl.program_id(0)
    l64 = l.to(tl.int64)
    per_head: tl.constexpr = HALF // BLOCK_P
    head = tl.program_id(1) // per_head  # 0 .. 2 * KV_HEADS - 1: the K heads, then the V heads
    i0 = (tl.program_id(1) % per_head) * BLOCK_P
    is_k = head < KV_HEADS
    kvh = tl.where(is_k, head, head - KV_HEADS).to(tl.int64)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tokens
    ex = tl.load(exit_ptr + offs_t, mask=mask_t, other=2147483647)
    active = mask_t & (ex <= l)
    # Layers no token of this tile skipped read no weights (zero-trip loops).
    k_end = tl.where(tl.sum(active.to(tl.int32), 0) > 0, hidden, 0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_hn

    ss = tl.zeros([BLOCK_T], tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        x = tl.load(h_rows + k0 + offs_k[None, :], mask=active[:, None] & ((k0 + offs_k) < hidden)[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, 1)
    rstd = 1.0 / tl.sqrt(ss / hidden + eps)

    # The program's rows of K (or V): i0 .. i0+BLOCK_P-1 of the head and the same half a head further.
    w_base = tl.where(is_k, wk_ptr + l64 * stride_wkl, wv_ptr + l64 * stride_wvl)
    stride_r = tl.where(is_k, stride_wkr, stride_wvr).to(tl.int64)
    rows1 = kvh * HEAD_DIM + i0 + offs_p
    w1 = w_base + rows1[:, None] * stride_r + offs_k[None, :]
    w2 = w1 + HALF * stride_r
    nw_row = nw_ptr + l64 * stride_nwl
    if BLOCK_T == 1:
        acc1 = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        h_row = h_ptr + offs_k
        for k0 in range(0, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(h_row + k0)
                nw = tl.load(nw_row + k0 + offs_k)
                wa = tl.load(w1)
                wb = tl.load(w2)
            else:
                mk = (k0 + offs_k) < hidden
                x = tl.load(h_row + k0, mask=mk, other=0.0)
                nw = tl.load(nw_row + k0 + offs_k, mask=mk, other=0.0)
                wa = tl.load(w1, mask=mk[None, :], other=0.0)
                wb = tl.load(w2, mask=mk[None, :], other=0.0)
            # Normalised activations rounded to the weight dtype, as the layers' GEMMs see them.
            xn = (x.to(tl.float32) * rstd * nw.to(tl.float32)).to(wk_ptr.dtype.element_ty).to(tl.float32)
            acc1 += wa.to(tl.float32) * xn[None, :]
            acc2 += wb.to(tl.float32) * xn[None, :]
            w1 += BLOCK_K
            w2 += BLOCK_K
        a1 = tl.sum(acc1, 1)[None, :]  # (1, BLOCK_P)
        a2 = tl.sum(acc2, 1)[None, :]
    else:
        a1 = tl.zeros([BLOCK_T, BLOCK_P], tl.float32)
        a2 = tl.zeros([BLOCK_T, BLOCK_P], tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            mk = (k0 + offs_k) < hidden
            x = tl.load(h_rows + k0 + offs_k[None, :], mask=active[:, None] & mk[None, :], other=0.0)
            nw = tl.load(nw_row + k0 + offs_k, mask=mk, other=0.0)
            xn = (x.to(tl.float32) * rstd[:, None] * nw.to(tl.float32)[None, :]).to(wk_ptr.dtype.element_ty)
            wa = tl.load(w1, mask=mk[None, :], other=0.0)
            wb = tl.load(w2, mask=mk[None, :], other=0.0)
            if IEEE:
                a1 += tl.dot(xn.to(tl.float32), tl.trans(wa.to(tl.float32)), input_precision="ieee")
                a2 += tl.dot(xn.to(tl.float32), tl.trans(wb.to(tl.float32)), input_precision="ieee")
            else:
                a1 += tl.dot(xn, tl.trans(wa))
                a2 += tl.dot(xn, tl.trans(wb))
            w1 += BLOCK_K
            w2 += BLOCK_K

    # Rotary on K only (V: cos 1, sin 0).
    pos = tl.load(pos_ptr + offs_t, mask=active, other=0).to(tl.int64)
    cs = tl.load(cos_ptr + pos[:, None] * stride_cos + i0 + offs_p[None, :], mask=active[:, None],
                 other=1.0).to(tl.float32)
    sn = tl.load(sin_ptr + pos[:, None] * stride_sin + i0 + offs_p[None, :], mask=active[:, None],
                 other=0.0).to(tl.float32)
    cs = tl.where(is_k, cs, 1.0)
    sn = tl.where(is_k, sn, 0.0)
    o1 = a1 * cs - a2 * sn
    o2 = a2 * cs + a1 * sn

    slot = tl.load(slot_ptr + offs_t, mask=active, other=0).to(tl.int64)
    blk, off = slot // PAGE, slot % PAGE
    kdst = kc_ptr + l64 * stride_kcl + blk * stride_kcb + off * stride_kcs + kvh * stride_kch
    vdst = vc_ptr + l64 * stride_vcl + blk * stride_vcb + off * stride_vcs + kvh * stride_vch
    dst = tl.where(is_k, kdst, vdst)[:, None] + i0 + offs_p[None, :]
    ty = kc_ptr.dtype.element_ty
    tl.store(dst, o1.to(ty), mask=active[:, None])
    tl.store(dst + HALF, o2.to(ty), mask=active[:, None])


def fused_fill_ref(h, exit_layer, positions, slot, input_norm_w, wk, wv, eps, cos, sin,
                   k_cache, v_cache, end_layer=None):
    """Loop reference with the kernel's rounding points: fp32 norm, cast to the weight dtype,
    fp32 matmul + rotary, cast to the cache dtype."""
    num_layers = k_cache.shape[0] if end_layer is None else end_layer
    block_size, kv_heads, head_dim = k_cache.shape[2:]
    half = head_dim // 2
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    for n in range(h.shape[0]):
        blk, off = int(slot[n]) // block_size, int(slot[n]) % block_size
        p = int(positions[n])
        c, s = cos[p].float(), sin[p].float()
        for l in range(int(exit_layer[n]), num_layers):
            x = (normed[n] * input_norm_w[l].float()).to(wk.dtype).float()
            k = (wk[l].float() @ x).view(kv_heads, head_dim)
            v = (wv[l].float() @ x).view(kv_heads, head_dim)
            k1, k2 = k[:, :half], k[:, half:]
            k = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], -1)
            k_cache[l, blk, off] = k.to(k_cache.dtype)
            v_cache[l, blk, off] = v.to(v_cache.dtype)


def _config(n: int, hidden: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_P, BLOCK_K, num_warps, num_stages, largest token tile), from the H100 sweep of
    ``benchmarks/fill_bench.py`` (docs/gpu_decode_results.md): one token streams like the skinny GEMM's
    M = 1 path (8 rows x 512 wide); up to 16 share one tl.dot tile of 64 rows x 256; beyond that, whole
    heads (128 rows) per program, so that the token tile is re-read by few programs."""
    k = max(16, next_pow2(hidden))
    if n == 1:
        return 4, min(512, k), 4, 1, 1
    if n <= 16:
        return 32, min(256, k), 4, 3, 16
    if n <= 64:
        return 64, min(128, k), 8, 3, 128
    return 64, min(64, k), 4, 3, 128


def fused_fill_uses_kernel(h, k_cache, backend=None) -> bool:
    """Whether ``fused_fill`` runs the Triton kernel (else the torch reference, which reads its indices on the
    host and so cannot be captured in a CUDA graph). The kernel needs a power-of-two head_dim of at least 32
    (half a head >= 16: tl.dot's minimum N)."""
    head_dim = k_cache.shape[-1]
    return use_triton(backend, h, k_cache) and not head_dim & (head_dim - 1) and head_dim >= 32


def fused_fill(h, exit_layer, positions, slot, input_norm_w, wk, wv, eps, cos, sin,
               k_cache, v_cache, *, end_layer=None, first_layer=0, config=None, backend=None):
    """In place on ``k_cache, v_cache (L, num_blocks, block_size, kv_heads, head_dim)``.

    ``h (n, hidden)``, ``exit_layer (n,)``, ``positions (n,)``, ``slot (n,)`` (any integer dtype),
    ``input_norm_w (L, hidden)``, ``wk, wv (L, kv_heads*head_dim, hidden)``, ``cos, sin
    (max_pos, head_dim // 2)``. ``end_layer``: fill layers ``exit_layer[n] .. end_layer - 1`` only
    (copy_hidden: the layers the rest of the batch ran in this pass); default every layer to the last.
    ``first_layer``: a lower bound of ``exit_layer`` the caller knows (the launch starts there instead of
    at layer 0; it must not exceed any token's exit layer). ``config``: (BLOCK_P, BLOCK_K, warps, stages,
    largest token tile), to override ``_config``'s choice.
    """
    n, hidden = h.shape
    num_layers, _, block_size, kv_heads, head_dim = k_cache.shape
    if end_layer is not None and not 0 <= end_layer <= num_layers:
        raise ValueError(f"end_layer must be in 0..{num_layers}, got {end_layer}")
    if wk.shape != (num_layers, kv_heads * head_dim, hidden) or wv.shape != wk.shape:
        raise ValueError(f"wk/wv must be {(num_layers, kv_heads * head_dim, hidden)}")
    if input_norm_w.shape != (num_layers, hidden) or v_cache.shape != k_cache.shape:
        raise ValueError("input_norm_w / v_cache shapes disagree with k_cache")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache dtypes differ ({k_cache.dtype}, {v_cache.dtype})")
    if wv.dtype != wk.dtype:
        raise ValueError(f"wk and wv dtypes differ ({wk.dtype}, {wv.dtype})")
    end = num_layers if end_layer is None else int(end_layer)
    first = int(first_layer)
    if first < 0:
        raise ValueError(f"first_layer must be >= 0, got {first_layer}")
    if n == 0 or end <= first:
        return
    if not fused_fill_uses_kernel(h, k_cache, backend):
        fused_fill_ref(h, exit_layer, positions, slot, input_norm_w, wk, wv, eps, cos, sin,
                       k_cache, v_cache, end)
        return
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    h = h if h.stride(-1) == 1 else h.contiguous()
    # wk / wv may be strided views (the executor's K and V rows of a fused QKV weight): the kernel
    # takes both strides, so only the innermost dim must be contiguous (no 2 GB copy per call).
    wk = wk if wk.stride(-1) == 1 else wk.contiguous()
    wv = wv if wv.stride(-1) == 1 else wv.contiguous()
    input_norm_w = input_norm_w if input_norm_w.stride(-1) == 1 else input_norm_w.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    block_p, block_k, warps, stages, max_t = config or _config(n, hidden)
    half = head_dim // 2
    block_p = min(block_p, half)
    block_t = 1 if n == 1 else min(max(16, max_t), max(16, next_pow2(n)))
    grid = (end - first, 2 * kv_heads * half // block_p, triton.cdiv(n, block_t))
    kc, vc = k_cache, v_cache
    _fused_fill_kernel[grid](
        h, exit_layer.contiguous(), positions.contiguous(), slot.contiguous(),
        input_norm_w, wk, wv, cos, sin, kc, vc,
        n, hidden, first, eps,
        h.stride(0), input_norm_w.stride(0), wk.stride(0), wk.stride(1), wv.stride(0), wv.stride(1),
        cos.stride(0), sin.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3),
        vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3),
        KV_HEADS=kv_heads, PAGE=block_size, HEAD_DIM=head_dim, HALF=half,
        BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_K=block_k, EVEN_K=hidden % block_k == 0,
        IEEE=ieee_dot(wk.dtype), num_warps=warps, num_stages=stages)
