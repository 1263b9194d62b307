"""Rotary position embedding, rotate-half convention (Hugging Face Llama):
``x_embed = x * cos + rotate_half(x) * sin``, with ``rotate_half(x) = cat(-x2, x1)`` and cos/sin
tables of shape ``(max_pos, head_dim // 2)`` duplicated across the two halves."""

from __future__ import annotations

import torch

from ._common import tl, triton, use_triton


def rotary_tables(max_pos, head_dim, base=10000.0, dtype=torch.float32, device=None):
    """cos, sin tables ``(max_pos, head_dim // 2)`` for the standard inverse-frequency schedule."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)
                               / head_dim))
    ang = torch.arange(max_pos, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


@triton.jit
def rotate_head(src, pos_ptr, cos_ptr, sin_ptr, n, stride_cos, stride_sin, HALF: tl.constexpr):
    """Row ``n``'s head at ``src`` (two halves of HALF) rotated at the row's position: fp32 (first, second)
    halves. Shared with kernels/rope_store.py."""
    offs = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + n).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_cos + offs).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + offs).to(tl.float32)
    x1 = tl.load(src + offs).to(tl.float32)
    x2 = tl.load(src + HALF + offs).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr,
                   stride_qn, stride_qh, stride_kn, stride_kh,
                   stride_qon, stride_qoh, stride_kon, stride_koh, stride_cos, stride_sin,
                   NUM_Q_HEADS: tl.constexpr, HALF: tl.constexpr):
    # Grid (token, q heads + k heads): q and k go in one launch. Each program reads its row's
    # cos/sin once and touches the two halves of one head; HALF is a power of two (64 or 32 for
    # head_dim 128/64), so there is no masking at all.
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, HALF)
    if h < NUM_Q_HEADS:
        src = q_ptr + n * stride_qn + h * stride_qh
        dst = qo_ptr + n * stride_qon + h * stride_qoh
    else:
        src = k_ptr + n * stride_kn + (h - NUM_Q_HEADS) * stride_kh
        dst = ko_ptr + n * stride_kon + (h - NUM_Q_HEADS) * stride_koh
    r1, r2 = rotate_head(src, pos_ptr, cos_ptr, sin_ptr, n, stride_cos, stride_sin, HALF)
    tl.store(dst + offs, r1.to(dst.dtype.element_ty))
    tl.store(dst + HALF + offs, r2.to(dst.dtype.element_ty))


def _rotate_ref(x, cos, sin):
    half = x.shape[-1] // 2
    xf = x.float()
    c = torch.cat([cos, cos], -1).float()[:, None, :]
    s = torch.cat([sin, sin], -1).float()[:, None, :]
    rot = torch.cat([-xf[..., half:], xf[..., :half]], -1)
    return (xf * c + rot * s).to(x.dtype)


def apply_rotary_ref(q, k, positions, cos, sin):
    pos = positions.long()
    return _rotate_ref(q, cos[pos], sin[pos]), _rotate_ref(k, cos[pos], sin[pos])


def apply_rotary(q, k, positions, cos, sin, *, out=None, backend=None):
    """Rotate ``q (n, num_heads, head_dim)`` and ``k (n, num_kv_heads, head_dim)`` at
    ``positions (n,)``; returns ``(q_embed, k_embed)`` (math in fp32, inputs' dtypes out), written
    into ``out = (q_out, k_out)`` when given (may alias q, k: each element is read before written)."""
    n, num_q, head_dim = q.shape
    if k.shape[0] != n or k.shape[2] != head_dim or positions.shape != (n,):
        raise ValueError("q, k, positions disagree")
    if q.dtype != k.dtype:
        raise ValueError("q and k must share a dtype (one launch serves both)")
    half = head_dim // 2
    if cos.shape[-1] != half or sin.shape[-1] != half:
        raise ValueError("cos/sin tables must have shape (max_pos, head_dim // 2)")
    if not use_triton(backend, q, k) or half & (half - 1) or half < 1:
        # Non-power-of-two half dims (rare) take the reference path rather than masked tiles.
        qr, kr = apply_rotary_ref(q, k, positions, cos, sin)
        return (qr, kr) if out is None else (out[0].copy_(qr), out[1].copy_(kr))
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    qo, ko = (torch.empty_like(q), torch.empty_like(k)) if out is None else out
    assert qo.shape == q.shape and ko.shape == k.shape and qo.stride(-1) == ko.stride(-1) == 1
    if n:
        _rotary_kernel[(n, num_q + k.shape[1])](
            q, k, qo, ko, positions.contiguous(), cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0), sin.stride(0),
            NUM_Q_HEADS=num_q, HALF=half)
    return qo, ko
