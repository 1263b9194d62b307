"""Rotary on Q and K and the K/V store into the paged cache, in one launch.

Between a decode layer's QKV projection and its attention, ``apply_rotary`` and ``store_kv`` were two
kernels of a few microseconds each, both far below their bytes (a row of Q, K and V is 24 KB at the 7B
shape): at batch 1 their launches cost more than their work. This kernel reads the fused projection's
output ``qkv (n, (H + 2 Hkv) * head_dim)`` once: a program per (row, head) rotates a Q head into
``q_out``, or rotates a K head and copies its V head straight into the cache slot (the rotated K is
never written anywhere else: attention reads it from the cache). Rows whose slot is negative (padding)
write no K/V. Same math as ``apply_rotary`` (fp32, rotate-half) and ``store_kv``.
"""

from __future__ import annotations

import torch

from ._common import gdc_launch_dependents, gdc_wait, pdl, pdl_launch, tl, triton, use_triton
from .kv_store import store_kv_ref
from .rotary import apply_rotary_ref, rotate_head


@triton.jit
def _rope_store_kernel(qkv_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr,
                       stride_n, stride_qon, stride_qoh, stride_kcb, stride_kcs, stride_kch,
                       stride_vcb, stride_vcs, stride_vch, stride_cos, stride_sin,
                       NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                       PAGE: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # nothing here may run before the previous kernel's outputs are visible (_common.pdl)
        gdc_launch_dependents()
        gdc_wait()
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, HALF)
    row = qkv_ptr + n.to(tl.int64) * stride_n
    # Q heads, then K heads: K head j is head NUM_Q_HEADS + j of the row
    r1, r2 = rotate_head(row + h * (2 * HALF), pos_ptr, cos_ptr, sin_ptr, n, stride_cos, stride_sin, HALF)
    if h < NUM_Q_HEADS:
        dst = qo_ptr + n.to(tl.int64) * stride_qon + h * stride_qoh
        tl.store(dst + offs, r1.to(qo_ptr.dtype.element_ty))
        tl.store(dst + HALF + offs, r2.to(qo_ptr.dtype.element_ty))
    else:
        j = h - NUM_Q_HEADS
        slot = tl.load(slot_ptr + n).to(tl.int64)
        ok = (tl.zeros([HALF], tl.int64) + slot) >= 0  # a vector mask: the interpreter rejects scalar ones
        blk = tl.where(slot >= 0, slot, 0) // PAGE
        off = tl.where(slot >= 0, slot, 0) % PAGE
        kdst = kc_ptr + blk * stride_kcb + off * stride_kcs + j * stride_kch
        tl.store(kdst + offs, r1.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(kdst + HALF + offs, r2.to(kc_ptr.dtype.element_ty), mask=ok)
        vsrc = row + (NUM_Q_HEADS + NUM_KV_HEADS + j) * (2 * HALF)
        vdst = vc_ptr + blk * stride_vcb + off * stride_vcs + j * stride_vch
        tl.store(vdst + offs, tl.load(vsrc + offs, mask=ok).to(vc_ptr.dtype.element_ty), mask=ok)
        tl.store(vdst + HALF + offs, tl.load(vsrc + HALF + offs, mask=ok).to(vc_ptr.dtype.element_ty), mask=ok)


def _split(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    n, qd, kvd = qkv.shape[0], num_heads * head_dim, num_kv_heads * head_dim
    return (qkv[:, :qd].view(n, num_heads, head_dim), qkv[:, qd:qd + kvd].view(n, num_kv_heads, head_dim),
            qkv[:, qd + kvd:].view(n, num_kv_heads, head_dim))


def rotary_store_kv_ref(qkv, num_heads, num_kv_heads, positions, cos, sin, k_cache_layer, v_cache_layer,
                        slot_mapping):
    """Torch reference: ``apply_rotary_ref`` then ``store_kv_ref``; returns the rotated Q."""
    q, k, v = _split(qkv, num_heads, num_kv_heads, k_cache_layer.shape[-1])
    q, k = apply_rotary_ref(q, k, positions, cos, sin)
    store_kv_ref(k, v, k_cache_layer, v_cache_layer, slot_mapping)
    return q


def rotary_store_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, k_cache_layer: torch.Tensor, v_cache_layer: torch.Tensor,
                    slot_mapping: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Rotate Q and K of ``qkv (n, (num_heads + 2 num_kv_heads) * head_dim)`` at ``positions (n,)``, write
    K and V into the layer's cache at ``slot_mapping (n,)`` (negative: skip); return Q ``(n, num_heads,
    head_dim)``, rotated."""
    head_dim = k_cache_layer.shape[-1]
    n = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv has shape {tuple(qkv.shape)}, expected (n, {(num_heads + 2 * num_kv_heads) * head_dim})")
    if k_cache_layer.shape[2:] != (num_kv_heads, head_dim) or v_cache_layer.shape != k_cache_layer.shape:
        raise ValueError("k/v caches and (num_kv_heads, head_dim) disagree")
    if positions.shape != (n,) or slot_mapping.shape != (n,):
        raise ValueError("positions and slot_mapping must have shape (n,)")
    half = head_dim // 2
    if cos.shape[-1] != half or sin.shape[-1] != half:
        raise ValueError("cos/sin tables must have shape (max_pos, head_dim // 2)")
    if not use_triton(backend, qkv, k_cache_layer) or half & (half - 1) or n == 0:
        return rotary_store_kv_ref(qkv, num_heads, num_kv_heads, positions, cos, sin, k_cache_layer,
                                   v_cache_layer, slot_mapping)
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    assert k_cache_layer.stride(-1) == 1 and v_cache_layer.stride(-1) == 1
    q_out = torch.empty(n, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    kc, vc = k_cache_layer, v_cache_layer
    use_pdl = pdl(qkv.device)
    _rope_store_kernel[(n, num_heads + num_kv_heads)](
        qkv, q_out, kc, vc, positions.contiguous(), slot_mapping.contiguous(), cos, sin,
        qkv.stride(0), q_out.stride(0), q_out.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), cos.stride(0), sin.stride(0),
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, PAGE=kc.shape[1], PDL=use_pdl,
        **pdl_launch(use_pdl))
    return q_out
