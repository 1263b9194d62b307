"""The max_prob exit measure and the argmax of the same logits in one kernel.

``max_prob = softmax(logits).max() = exp(max - logsumexp) = 1 / sum(exp(logits - max))``; one program
per row makes two passes over the row's logits (max and its first index, then the sum of exponentials;
the second pass reads from L2), instead of the float cast, softmax, amax and argmax launches of the torch
path. Returns fp32 confidences and int64 argmax (first index of the maximum, as ``torch.argmax``).
"""

from __future__ import annotations

import torch

from ._common import gdc_launch_dependents, gdc_wait, next_pow2, pdl, pdl_launch, tl, triton, use_triton


@triton.jit
def _max_prob_argmax_kernel(x_ptr, conf_ptr, idx_ptr, V, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # nothing here may run before the previous kernel's outputs are visible (_common.pdl)
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    base = x_ptr + row * stride_x
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    for v0 in range(0, V, BLOCK):
        mask = v0 + offs < V
        x = tl.load(base + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32)
        upd = x > best  # strict: each lane keeps its first maximum
        best = tl.where(upd, x, best)
        best_i = tl.where(upd, v0 + offs, best_i)
    mx = tl.max(best, 0)
    idx = tl.min(tl.where(best == mx, best_i, V), 0)  # the first index holding the maximum
    s = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        mask = v0 + offs < V
        x = tl.load(base + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32)
        s += tl.where(mask, tl.exp(x - mx), 0.0)
    tl.store(conf_ptr + row, 1.0 / tl.sum(s, 0))
    tl.store(idx_ptr + row, idx.to(tl.int64))


def max_prob_argmax_ref(logits):
    return torch.softmax(logits.float(), dim=-1).amax(-1), logits.argmax(-1)


def max_prob_argmax(logits, *, backend=None):
    """``(max softmax probability (fp32), argmax (int64))`` over the last dim of ``logits (..., V)``."""
    if not use_triton(backend, logits):
        return max_prob_argmax_ref(logits)
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    conf = torch.empty(rows, dtype=torch.float32, device=x.device)
    idx = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows:
        use_pdl = pdl(x.device)
        _max_prob_argmax_kernel[(rows,)](x, conf, idx, V, x.stride(0), BLOCK=min(4096, next_pow2(V)),
                                         PDL=use_pdl, num_warps=8, **pdl_launch(use_pdl))
    return conf.reshape(logits.shape[:-1]), idx.reshape(logits.shape[:-1])
