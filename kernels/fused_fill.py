"""Early-exit "fill": for every exited token, compute and cache K/V of every layer it skipped.

Token ``n`` ran layers ``0 .. exit_layer[n]-1``; for each skipped layer ``l >= exit_layer[n]``:
``x = rmsnorm(h[n]) * input_norm_w[l]``, ``k = rope(wk[l] @ x, positions[n])``, ``v = wv[l] @ x``,
written to ``k_cache[l] / v_cache[l]`` at flat slot ``slot[n]``. One launch covers all pairs.
"""

from __future__ import annotations

import torch

from ._common import ieee_dot, next_pow2, tl, triton, use_triton


@triton.jit
def _fused_fill_kernel(
    h_ptr, exit_ptr, pos_ptr, slot_ptr, nw_ptr, wk_ptr, wv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
    n_tokens, hidden, eps,
    stride_hn, stride_nwl, stride_wkl, stride_wkr, stride_wvl, stride_wvr, stride_cos, stride_sin,
    stride_kcl, stride_kcb, stride_kcs, stride_kch, stride_vcl, stride_vcb, stride_vcs, stride_vch,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    # Grid (layer, kv head, token tile). The kv-dim tile is exactly one head so that rotary, which
    # pairs dim i with i + head_dim/2, stays inside the program: K is accumulated as two half-head
    # accumulators. A layer's weight tile is streamed once per token tile (one tile holds all
    # exited tokens in practice), which is the dominant traffic: L*2*kv_dim*hidden weights.
    l = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tokens
    ex = tl.load(exit_ptr + offs_t, mask=mask_t, other=2147483647)
    active = mask_t & (ex <= l)
    # Layers no token in this tile skipped do no work and read no weights (zero-trip loops).
    k_end = tl.where(tl.sum(active.to(tl.int32), 0) > 0, hidden, 0)
    l64 = l.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_hn

    ss = tl.zeros([BLOCK_T], tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        mk = (k0 + offs_k) < hidden
        x = tl.load(h_rows + k0 + offs_k[None, :], mask=active[:, None] & mk[None, :], other=0.0)
        x = x.to(tl.float32)
        ss += tl.sum(x * x, 1)
    rstd = 1.0 / tl.sqrt(ss / hidden + eps)

    offs_r = tl.arange(0, HALF)
    offs_v = tl.arange(0, HEAD_DIM)
    rows1 = kvh * HEAD_DIM + offs_r
    wk_base = wk_ptr + l64 * stride_wkl
    wv_base = wv_ptr + l64 * stride_wvl
    acc_k1 = tl.zeros([BLOCK_T, HALF], tl.float32)
    acc_k2 = tl.zeros([BLOCK_T, HALF], tl.float32)
    acc_v = tl.zeros([BLOCK_T, HEAD_DIM], tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < hidden
        x = tl.load(h_rows + kk[None, :], mask=active[:, None] & mk[None, :], other=0.0)
        nw = tl.load(nw_ptr + l64 * stride_nwl + kk, mask=mk, other=0.0).to(tl.float32)
        # Normalised activations are rounded to the weight dtype so the dots run on tensor cores.
        xn = (x.to(tl.float32) * rstd[:, None] * nw[None, :]).to(wk_ptr.dtype.element_ty)
        # Weights (out x in, row-major) are loaded as (in x out) tiles: contiguous along `in`.
        wk1 = tl.load(wk_base + rows1[None, :] * stride_wkr + kk[:, None], mask=mk[:, None], other=0.0)
        wk2 = tl.load(wk_base + (rows1 + HALF)[None, :] * stride_wkr + kk[:, None],
                      mask=mk[:, None], other=0.0)
        wv = tl.load(wv_base + (kvh * HEAD_DIM + offs_v)[None, :] * stride_wvr + kk[:, None],
                     mask=mk[:, None], other=0.0)
        if IEEE:
            xf = xn.to(tl.float32)
            acc_k1 += tl.dot(xf, wk1.to(tl.float32), input_precision="ieee")
            acc_k2 += tl.dot(xf, wk2.to(tl.float32), input_precision="ieee")
            acc_v += tl.dot(xf, wv.to(xn.dtype).to(tl.float32), input_precision="ieee")
        else:
            acc_k1 += tl.dot(xn, wk1)
            acc_k2 += tl.dot(xn, wk2)
            acc_v += tl.dot(xn, wv.to(xn.dtype))

    pos = tl.load(pos_ptr + offs_t, mask=active, other=0).to(tl.int64)
    cos = tl.load(cos_ptr + pos[:, None] * stride_cos + offs_r[None, :], mask=active[:, None],
                  other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos[:, None] * stride_sin + offs_r[None, :], mask=active[:, None],
                  other=0.0).to(tl.float32)
    k1 = acc_k1 * cos - acc_k2 * sin
    k2 = acc_k2 * cos + acc_k1 * sin

    slot = tl.load(slot_ptr + offs_t, mask=active, other=0).to(tl.int64)
    kdst = (kc_ptr + l64 * stride_kcl + (slot // PAGE) * stride_kcb + (slot % PAGE) * stride_kcs
            + kvh * stride_kch)[:, None]
    vdst = (vc_ptr + l64 * stride_vcl + (slot // PAGE) * stride_vcb + (slot % PAGE) * stride_vcs
            + kvh * stride_vch)[:, None]
    kty = kc_ptr.dtype.element_ty
    tl.store(kdst + offs_r[None, :], k1.to(kty), mask=active[:, None])
    tl.store(kdst + HALF + offs_r[None, :], k2.to(kty), mask=active[:, None])
    tl.store(vdst + offs_v[None, :], acc_v.to(vc_ptr.dtype.element_ty), mask=active[:, None])


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


def fused_fill(h, exit_layer, positions, slot, input_norm_w, wk, wv, eps, cos, sin,
               k_cache, v_cache, *, end_layer=None, backend=None):
    """In place on ``k_cache, v_cache (L, num_blocks, block_size, kv_heads, head_dim)``.

    ``h (n, hidden)``, ``exit_layer (n,)`` int32, ``positions (n,)`` / ``slot (n,)`` int64,
    ``input_norm_w (L, hidden)``, ``wk, wv (L, kv_heads*head_dim, hidden)``, ``cos, sin
    (max_pos, head_dim // 2)``. ``end_layer``: fill layers ``exit_layer[n] .. end_layer - 1`` only
    (copy_hidden: the layers the rest of the batch ran in this pass); default every layer to the last.
    """
    n, hidden = h.shape
    num_layers, _, block_size, kv_heads, head_dim = k_cache.shape
    if end_layer is not None and not 0 <= end_layer <= num_layers:
        raise ValueError(f"end_layer must be in 0..{num_layers}, got {end_layer}")
    if wk.shape != (num_layers, kv_heads * head_dim, hidden) or wv.shape != wk.shape:
        raise ValueError(f"wk/wv must be {(num_layers, kv_heads * head_dim, hidden)}")
    if input_norm_w.shape != (num_layers, hidden) or v_cache.shape != k_cache.shape:
        raise ValueError("input_norm_w / v_cache shapes disagree with k_cache")
    end = num_layers if end_layer is None else int(end_layer)
    if n == 0 or end == 0:
        return
    if not use_triton(backend, h, k_cache) or head_dim & (head_dim - 1) or head_dim < 32:
        # Triton path needs power-of-two head_dim with half >= 16 (tl.dot minimum N).
        fused_fill_ref(h, exit_layer, positions, slot, input_norm_w, wk, wv, eps, cos, sin,
                       k_cache, v_cache, end)
        return
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    h = h if h.stride(-1) == 1 else h.contiguous()
    # wk / wv may be strided views (the executor's K and V rows of a fused QKV weight): the kernel
    # takes both strides, so only the innermost dim must be contiguous (no 2 GB copy per call).
    wk = wk if wk.stride(-1) == 1 else wk.contiguous()
    wv = wv if wv.stride(-1) == 1 else wv.contiguous()
    input_norm_w = input_norm_w.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    # Tokens per tile: >= 16 for tl.dot; up to 64 so a decode step's exits share one weight pass.
    BLOCK_T = min(64, max(16, next_pow2(n)))
    # 64-wide K chunks: three weight tiles of 64 x head_dim bf16 per step stay in registers.
    BLOCK_K = 64
    grid = (end, kv_heads, triton.cdiv(n, BLOCK_T))  # one program row per layer filled
    kc, vc = k_cache, v_cache
    _fused_fill_kernel[grid](
        h, exit_layer.to(torch.int32).contiguous(), positions.contiguous(), slot.contiguous(),
        input_norm_w, wk, wv, cos, sin, kc, vc,
        n, hidden, eps,
        h.stride(0), input_norm_w.stride(0), wk.stride(0), wk.stride(1), wv.stride(0), wv.stride(1),
        cos.stride(0), sin.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3),
        vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3),
        PAGE=block_size, HEAD_DIM=head_dim, HALF=head_dim // 2,
        BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, IEEE=ieee_dot(wk.dtype))
