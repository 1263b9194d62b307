"""Scatter new K/V rows into one layer of the paged cache at flat slot ids."""

from __future__ import annotations

from ._common import next_pow2, tl, triton, use_triton


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    PAGE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token row: a slot holds all kv heads back to back (num_kv_heads*head_dim
    # contiguous elements), so a row is one contiguous read and one contiguous write per tensor.
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    blk = slot // PAGE
    off = slot % PAGE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # Negative slots are padding rows (vLLM convention): read and write nothing for them.
    # (The scalar is broadcast to a vector first: the interpreter rejects scalar-bool masks.)
    slot_ok = (tl.zeros([BLOCK_H], tl.int64) + slot) >= 0
    mask = ((offs_h < NUM_HEADS) & slot_ok)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + i * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + i * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kdst = kc_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vdst = vc_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kdst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vdst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv_ref(k, v, k_cache_layer, v_cache_layer, slot_mapping):
    block_size = k_cache_layer.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache_layer[slots // block_size, slots % block_size] = k[keep].to(k_cache_layer.dtype)
    v_cache_layer[slots // block_size, slots % block_size] = v[keep].to(v_cache_layer.dtype)


def store_kv(k, v, k_cache_layer, v_cache_layer, slot_mapping, *, backend=None):
    """Write ``k, v (n, num_kv_heads, head_dim)`` in place into the layer's cache at
    ``slot_mapping (n,)`` (int64 ``block * block_size + offset``; negative = skip)."""
    n, num_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache_layer.shape[2:] != (num_heads, head_dim):
        raise ValueError("k/v rows and cache (num_kv_heads, head_dim) disagree")
    if slot_mapping.shape != (n,):
        raise ValueError("slot_mapping must have shape (n,)")
    if n == 0:
        return
    if not use_triton(backend, k, k_cache_layer):
        store_kv_ref(k, v, k_cache_layer, v_cache_layer, slot_mapping)
        return
    assert k_cache_layer.stride(-1) == 1 and v_cache_layer.stride(-1) == 1
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    slot_mapping = slot_mapping.contiguous()
    kc, vc = k_cache_layer, v_cache_layer
    _store_kv_kernel[(n,)](
        k, v, kc, vc, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        PAGE=kc.shape[1], NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_heads), BLOCK_D=next_pow2(head_dim))
