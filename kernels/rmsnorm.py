"""RMSNorm with weight (Llama convention: statistics in fp32, y = x * rsqrt(mean(x^2) + eps) * w)."""

from __future__ import annotations

import torch

from ._common import gdc_launch_dependents, gdc_wait, next_pow2, pdl, pdl_launch, tl, triton, use_triton


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, n_cols, eps,
                    BLOCK: tl.constexpr, PDL: tl.constexpr):
    # One program per row. Two passes over the row (sum of squares, then scale): for hidden sizes
    # up to BLOCK this is one tile per pass and the second read hits L1/L2, and it still works for
    # rows wider than the largest tile we want to hold in registers.
    if PDL:  # nothing here may run before the previous kernel's outputs are visible (_common.pdl)
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ss = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        x = tl.load(x_ptr + row * stride_x + c0 + offs, mask=c0 + offs < n_cols, other=0.0)
        x = x.to(tl.float32)
        ss += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / n_cols + eps)
    for c0 in range(0, n_cols, BLOCK):
        mask = c0 + offs < n_cols
        x = tl.load(x_ptr + row * stride_x + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + c0 + offs, (x * rstd * w).to(y_ptr.dtype.element_ty),
                 mask=mask)


def rmsnorm_ref(x, weight, eps=1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def rmsnorm(x, weight, eps=1e-6, *, out=None, backend=None):
    """RMSNorm over the last dim of ``x (..., hidden)`` with ``weight (hidden,)``; same dtype out."""
    if weight.shape != x.shape[-1:]:
        raise ValueError("weight must have shape (hidden,)")
    if not use_triton(backend, x, weight):
        res = rmsnorm_ref(x, weight, eps)
        return res if out is None else out.copy_(res)
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    if out is not None:
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if out is None else out.view(x2.shape)
    if x2.shape[0]:
        use_pdl = pdl(x.device)
        # Cap at 4096 fp32 per tile: a 4-warp program then holds 32 floats per thread.
        _rmsnorm_kernel[(x2.shape[0],)](x2, weight.contiguous(), y, x2.stride(0), y.stride(0),
                                        hidden, eps, BLOCK=min(4096, next_pow2(hidden)), PDL=use_pdl,
                                        **pdl_launch(use_pdl))
    return y.reshape(x.shape)
