"""Skinny GEMM for decode: ``y = act(x) @ w.T (+ residual)`` for a few rows of ``x``.

``w`` is a torch Linear weight ``(N, K)`` (out x in, row-major); ``x (M, K)`` with M small (decode
batches, M <= ``MAX_ROWS``); fp32 accumulation. At decode the weight is read once and dominates the
bytes, so the kernel is a weight stream: one program per ``BLOCK_N`` output rows (enough programs to
fill every SM several times over for the Llama shapes), each walking the reduction dimension in
``BLOCK_K``-wide coalesced tiles of its rows. No split of the reduction (so no second reduce kernel and
no fp32 workspace): with BLOCK_N <= 32 the smallest Llama-7B matrix (O, N=4096) already gives 128+
programs.

Two inner products: ``M == 1`` multiplies elementwise into a (BLOCK_N, BLOCK_K) fp32 accumulator and
reduces once at the end (no tensor cores, no padding of the row dimension); ``M > 1`` pads the rows to
16, 32 or 64 and uses ``tl.dot``. Every program reads all of ``x`` (from L2), so the row limit is where those
re-reads start to cost more than the weight stream saves over cuBLAS (docs/benchmarks.md).

Fused extras (each saves a kernel launch per use in the decode layer):
- ``act="silu_mul"``: ``x`` is ``(M, 2K)`` = [gate | up]; the kernel reads ``silu(gate) * up``
  (rounded to the weight dtype) as its input, so the MLP's activation needs no kernel of its own;
- ``residual``: ``(M, N)`` added in fp32 to the product before the one rounding to the output dtype;
- ``act="glu"``: ``w`` is ``(2N, K)`` = [gate; up] (the MLP's fused gate+up weight) and the output is
  ``silu(x @ gate.T) * (x @ up.T)``, ``(M, N)``: each program streams its BLOCK_N gate rows and the BLOCK_N up
  rows N further, and combines the two fp32 accumulators in the epilogue, rounding once. The MLP's activation
  then needs no kernel of its own at any batch (at M > 1 it was two torch kernels per layer, ~0.2 ms per step
  at batch 8), and the down projection reads it as a plain input.

Launched with programmatic dependent launch on Hopper (``_common.pdl``): the first weight tile is read before
waiting on the previous kernel, and the next kernel is released once the weight stream is done.

``skinny_linear_ref`` is the torch reference (same rounding points).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (OutOfResources, gdc_launch_dependents, gdc_wait, interpreting, next_pow2, pdl, pdl_launch,
                      shared_memory_bytes, tl, triton, use_triton)

MAX_ROWS = 64  # the kernel's row limit (one tl.dot tile of 16, 32 or 64 rows); cuBLAS above


@triton.jit
def _weight_tiles(w_ptrs, u_ptrs, k0, K, offs_k, EVEN_K: tl.constexpr, GLU: tl.constexpr):
    """The program's (BLOCK_N, BLOCK_K) weight tile at ``k0``, and with GLU the matching up rows' tile
    (else the same tile again, unused)."""
    if EVEN_K:
        w = tl.load(w_ptrs + k0)
        if GLU:
            wu = tl.load(u_ptrs + k0)
        else:
            wu = w
    else:
        km = k0 + offs_k < K
        w = tl.load(w_ptrs + k0, mask=km[None, :], other=0.0)
        if GLU:
            wu = tl.load(u_ptrs + k0, mask=km[None, :], other=0.0)
        else:
            wu = w
    return w, wu


@triton.jit
def _row_step(acc, acc_u, w, wu, x_ptr, k0, K, offs_k, EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr,
              GLU: tl.constexpr):
    """One BLOCK_K step of the one-row path: elementwise products into the (BLOCK_N, BLOCK_K) accumulators."""
    if EVEN_K:
        xg = tl.load(x_ptr + k0 + offs_k)
        if SILU_MUL:
            xu = tl.load(x_ptr + K + k0 + offs_k)
    else:
        km = k0 + offs_k < K
        xg = tl.load(x_ptr + k0 + offs_k, mask=km, other=0.0)
        if SILU_MUL:
            xu = tl.load(x_ptr + K + k0 + offs_k, mask=km, other=0.0)
    if SILU_MUL:
        g = xg.to(tl.float32)
        xv = (g / (1.0 + tl.exp(-g)) * xu.to(tl.float32)).to(w.dtype).to(tl.float32)
    else:
        xv = xg.to(tl.float32)
    acc += w.to(tl.float32) * xv[None, :]
    if GLU:
        acc_u += wu.to(tl.float32) * xv[None, :]
    return acc, acc_u


@triton.jit
def _rows_step(acc, acc_u, w, wu, x_ptrs, m_mask, k0, K, offs_k, EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr,
               GLU: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr):
    """One BLOCK_K step of the tl.dot path (rows padded to BLOCK_M). SWAP: the weight tile is the dot's left
    operand, (BLOCK_N x BLOCK_K) @ (BLOCK_K x BLOCK_M) into a (BLOCK_N, BLOCK_M) accumulator, so the MMA's
    large side is the weight rows, not the few rows of x."""
    if EVEN_K:
        xg = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        if SILU_MUL:
            xu = tl.load(x_ptrs + K + k0, mask=m_mask[:, None], other=0.0)
    else:
        km = k0 + offs_k < K
        xg = tl.load(x_ptrs + k0, mask=m_mask[:, None] & km[None, :], other=0.0)
        if SILU_MUL:
            xu = tl.load(x_ptrs + K + k0, mask=m_mask[:, None] & km[None, :], other=0.0)
    if SILU_MUL:
        g = xg.to(tl.float32)
        xv = (g / (1.0 + tl.exp(-g)) * xu.to(tl.float32)).to(w.dtype)
    else:
        xv = xg.to(w.dtype)
    if UPCAST:
        xf = xv.to(tl.float32)
        if SWAP:
            acc += tl.dot(w.to(tl.float32), tl.trans(xf), input_precision="ieee")
            if GLU:
                acc_u += tl.dot(wu.to(tl.float32), tl.trans(xf), input_precision="ieee")
        else:
            acc += tl.dot(xf, tl.trans(w.to(tl.float32)), input_precision="ieee")
            if GLU:
                acc_u += tl.dot(xf, tl.trans(wu.to(tl.float32)), input_precision="ieee")
    elif SWAP:
        acc += tl.dot(w, tl.trans(xv))
        if GLU:
            acc_u += tl.dot(wu, tl.trans(xv))
    else:
        acc += tl.dot(xv, tl.trans(w))
        if GLU:
            acc_u += tl.dot(xv, tl.trans(wu))
    return acc, acc_u


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, r_ptr, M, N, K, stride_xm, stride_wn, stride_ym, stride_rm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SILU_MUL: tl.constexpr, HAS_RES: tl.constexpr, EVEN_K: tl.constexpr,
                   UPCAST: tl.constexpr, GLU: tl.constexpr, SWAP: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    offs_n_safe = tl.where(n_mask, offs_n, 0)  # rows past N read row 0 (never stored): no mask needed
    w_ptrs = w_ptr + offs_n_safe.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    # GLU: the up rows, N below the gate rows (int64 offsets, as the gate rows')
    u_ptrs = w_ptr + (offs_n_safe + N).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    # PDL (_common.pdl): the first weight tile is loaded before the wait (no kernel writes weights), so it
    # overlaps the previous kernel's tail; x and the residual, its outputs, are read only after gdc_wait. The
    # next kernel is released after the weight stream, not at the start: released at the start, launches
    # cascade down the chain and the early programs' waits and prefetches slow a 4096 x 4096 GEMV by 11%
    # (benchmarks/pdl_bench.py: 13.6 -> 15.1 us; released after the stream: 12.9 us).
    w, wu = _weight_tiles(w_ptrs, u_ptrs, 0, K, offs_k, EVEN_K, GLU)
    if PDL:
        gdc_wait()
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc, acc_u = _row_step(acc, acc_u, w, wu, x_ptr, 0, K, offs_k, EVEN_K, SILU_MUL, GLU)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w, wu = _weight_tiles(w_ptrs, u_ptrs, k0, K, offs_k, EVEN_K, GLU)
            acc, acc_u = _row_step(acc, acc_u, w, wu, x_ptr, k0, K, offs_k, EVEN_K, SILU_MUL, GLU)
        if PDL:  # the next kernel may launch once every program is past its weight stream (see below)
            gdc_launch_dependents()
        out = tl.sum(acc, 1)  # (BLOCK_N,)
        if GLU:
            out = out / (1.0 + tl.exp(-out)) * tl.sum(acc_u, 1)
        if HAS_RES:
            out += tl.load(r_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        if SWAP:  # the accumulator is (BLOCK_N, BLOCK_M): y transposed
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            acc_u = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc, acc_u = _rows_step(acc, acc_u, w, wu, x_ptrs, m_mask, 0, K, offs_k, EVEN_K, SILU_MUL, GLU, UPCAST,
                                SWAP)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w, wu = _weight_tiles(w_ptrs, u_ptrs, k0, K, offs_k, EVEN_K, GLU)
            acc, acc_u = _rows_step(acc, acc_u, w, wu, x_ptrs, m_mask, k0, K, offs_k, EVEN_K, SILU_MUL, GLU,
                                    UPCAST, SWAP)
        if PDL:
            gdc_launch_dependents()
        if GLU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_u
        if SWAP:
            out_mask = n_mask[:, None] & m_mask[None, :]
            r_off = offs_m[None, :] * stride_rm + offs_n[:, None]
            y_off = offs_m[None, :] * stride_ym + offs_n[:, None]
        else:
            out_mask = m_mask[:, None] & n_mask[None, :]
            r_off = offs_m[:, None] * stride_rm + offs_n[None, :]
            y_off = offs_m[:, None] * stride_ym + offs_n[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + r_off, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def skinny_linear_ref(x, w, residual=None, act=None):
    """Torch reference: the activation rounded to ``w``'s dtype, fp32 product, residual added in fp32; with
    act="glu" silu(gate) * up in fp32 on the fp32 products, rounded once."""
    if act == "glu":
        n = w.shape[0] // 2
        y = x.float() @ w.float().t()
        return (F.silu(y[..., :n]) * y[..., n:]).to(x.dtype)
    if act == "silu_mul":
        k = x.shape[-1] // 2
        g, u = x[..., :k].float(), x[..., k:].float()
        x = (F.silu(g) * u).to(w.dtype)
    elif act is not None:
        raise ValueError(f"unknown act {act!r}")
    y = x.float() @ w.float().t()
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype if residual is None else residual.dtype)


# Tiles measured on the H100 (kernels/bench_gemv.py --fused --rows 16,32,64, 2026-11-23, docs/benchmarks.md) for the
# Llama-2-7B and Llama-3-8B decode products at 16 / 32 / 64 rows: (rows, n, k) -> (BLOCK_N, BLOCK_K, warps, stages,
# BLOCK_M, SWAP), BLOCK_M 0 for the rows padded to the tile. n is what skinny_linear looks up: half the rows of a glu
# weight.
_TUNED = {
    (16, 12288, 4096): (64, 128, 4, 3, 0, True), (16, 4096, 4096): (32, 256, 4, 4),
    (16, 11008, 4096): (32, 256, 4, 4), (16, 4096, 11008): (64, 256, 4, 4, 0, True),
    (16, 32000, 4096): (64, 128, 4, 4, 0, True),
    # (32, 4096, 4096), the O projection of both models: SWAP from the Llama-3-8B sweep; whole steps at 24-32 rows
    # 1.5-5.8% faster on Llama-2-7B than with that model's own sweep's tile (gpu_decode.py A/B, docs/benchmarks.md)
    (32, 12288, 4096): (64, 128, 4, 3, 0, True), (32, 4096, 4096): (64, 128, 4, 4, 0, True),
    (32, 11008, 4096): (64, 128, 4, 4, 0, True), (32, 4096, 11008): (32, 256, 4, 4),
    (32, 32000, 4096): (128, 128, 4, 3, 0, True),
    (64, 12288, 4096): (128, 128, 4, 3), (64, 4096, 4096): (32, 128, 4, 4),
    (64, 11008, 4096): (128, 64, 4, 4, 0, True), (64, 4096, 11008): (32, 128, 4, 4),
    (64, 32000, 4096): (128, 128, 4, 3),
    # Llama-3-8B (bench_gemv.py --model llama3-8b, 2026-11-23; its O projection is Llama-2-7B's shape, above).
    # At one row the sweep's winners tied the rules alone and ran whole steps 3% slower: the rules stay there.
    (16, 6144, 4096): (64, 256, 4, 4, 0, True), (16, 14336, 4096): (64, 128, 4, 4, 0, True),
    (16, 4096, 14336): (32, 512, 4, 4), (16, 128256, 4096): (128, 128, 4, 4, 0, True),
    (32, 6144, 4096): (64, 128, 4, 4, 0, True), (32, 14336, 4096): (64, 128, 4, 4, 0, True),
    (32, 4096, 14336): (32, 256, 4, 4), (32, 128256, 4096): (128, 128, 4, 4, 0, True),
    (64, 6144, 4096): (64, 128, 4, 4, 0, True), (64, 14336, 4096): (64, 128, 4, 4, 0, True),
    (64, 4096, 14336): (32, 128, 4, 4), (64, 128256, 4096): (128, 128, 4, 3),
}


def tile_rows(m: int) -> int:
    """The rows ``m`` rows of x run as: 1 (the elementwise path), else one tl.dot tile of 16, 32 or 64; also the
    row bucket of the tile table."""
    return 1 if m == 1 else max(16, next_pow2(m))


def _config(m: int, n: int, k: int) -> tuple:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages[, BLOCK_M[, SWAP]]) (BLOCK_M 0 or absent: the rows padded to 1,
    16, 32 or 64; SWAP absent: False): the measured tiles for the Llama-2-7B and Llama-3-8B shapes at 2-64 rows,
    else rules from the sweeps in docs/gpu_decode_results.md and docs/benchmarks.md."""
    if m == 1:  # elementwise path: narrow tiles, long coalesced rows
        if k > 8192:
            return 8, 1024, 4, 1
        return (4, 1024, 4, 1) if n >= 8192 else (8, 512, 4, 1)
    tuned = _TUNED.get((tile_rows(m), n, k))
    if tuned is not None:
        return tuned
    if m > 16:  # tl.dot path, 32 or 64 rows: the weight rows as the MMA's large side
        return (128, 128, 4, 3, 0, True) if n >= 16384 else (64, 128, 4, 4, 0, True)
    if n >= 16384:  # tl.dot path
        return 64, 256, 4, 4
    return (32, 512, 4, 4) if k > 8192 else (32, 256, 4, 4)


def skinny_linear(x, w, residual=None, act=None, *, out=None, config=None, backend=None):
    """``act(x) @ w.T (+ residual)`` for ``x (..., K)`` (``(..., 2K)`` with act="silu_mul"), ``w (N, K)``.

    Runs the Triton kernel when the backend allows it and the rows fit (``<= MAX_ROWS``), else the
    torch path (``F.linear`` plus the extras, with torch's usual rounding)."""
    k_in = x.shape[-1]
    n, k = w.shape
    if act not in (None, "silu_mul", "glu"):
        raise ValueError(f"unknown act {act!r}")
    if act == "glu":
        if n % 2 or residual is not None:
            raise ValueError("act='glu' needs w of (2N, K) [gate; up] and no residual")
        n //= 2
    if k_in != (2 * k if act == "silu_mul" else k):
        raise ValueError(f"x has {k_in} features, w expects {k}{' (x2 for silu_mul)' if act == 'silu_mul' else ''}")
    x2 = x.reshape(-1, k_in)
    m = x2.shape[0]
    if not use_triton(backend, x, w) or m > MAX_ROWS or m == 0:
        if act == "silu_mul":
            xa = F.silu(x2[:, :k]) * x2[:, k:]
        else:
            xa = x2
        y = F.linear(xa, w)
        if act == "glu":
            y = F.silu(y[:, :n]) * y[:, n:]
        if residual is not None:
            y = residual.reshape(-1, n) + y
        y = y.reshape(*x.shape[:-1], n)
        return y if out is None else out.copy_(y)
    if act == "silu_mul" and m > 1:  # fused only at m == 1 (in the tl.dot path it measured 4x slower)
        x2 = (F.silu(x2[:, :k]) * x2[:, k:])
        act = None
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w_copied = w.stride(-1) != 1
    if w_copied:
        w = w.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    dtype = residual.dtype if residual is not None else x.dtype
    y = torch.empty(m, n, dtype=dtype, device=x.device) if out is None else out.view(m, n)
    cfg = tuple(config or _config(m, n, k))
    block_n, block_k, warps, stages = cfg[:4]
    block_k = min(block_k, max(16, 1 << (k - 1).bit_length()))
    block_m = tile_rows(m)  # (a 5th entry 16 forces tl.dot at m=1)
    if len(cfg) > 4 and cfg[4]:  # never fewer rows than x has: rows past the tile would be left unwritten
        block_m = max(int(cfg[4]), block_m)
    swap = block_m > 1 and len(cfg) > 5 and bool(cfg[5])
    if block_m > 1:  # the tl.dot path's pipeline holds `stages` copies of its tiles in shared memory (H100: 228 KB)
        tiles = ((2 if act == "silu_mul" else 1) * block_m * block_k * x2.element_size()
                 + (2 if act == "glu" else 1) * block_n * block_k * w.element_size())
        stages = max(1, min(stages, shared_memory_bytes(x2.device) // tiles))
    upcast = w.dtype == torch.float32 or interpreting()
    use_pdl = pdl(x2.device) and not w_copied  # a weight written just now must not be read before the wait
    if block_m == 1:
        sxm, sym, srm = 0, 0, 0
    else:
        sxm, sym, srm = x2.stride(0), y.stride(0), (r2.stride(0) if r2 is not None else 0)
    consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SILU_MUL=act == "silu_mul",
                  HAS_RES=r2 is not None, EVEN_K=k % block_k == 0, UPCAST=upcast, GLU=act == "glu", SWAP=swap,
                  PDL=use_pdl, num_warps=warps)
    if _STAGES_FIT:  # (empty unless the estimate above was ever too high: no key built on the decode path)
        stages = min(stages, _STAGES_FIT.get(tuple(consts.items()), stages))
    while True:
        try:
            _skinny_kernel[(triton.cdiv(n, block_n),)](
                x2, w, y, r2 if r2 is not None else y, m, n, k, sxm, w.stride(0), sym, srm,
                num_stages=stages, **consts, **pdl_launch(use_pdl))
            break
        except OutOfResources:  # the estimate above misses the compiler's own buffers: one stage fewer
            if stages == 1:
                raise
            stages = _STAGES_FIT[tuple(consts.items())] = stages - 1
    return y.reshape(*x.shape[:-1], n)


# (kernel constants) -> the most pipeline stages that fit in shared memory, where the estimate was too high
_STAGES_FIT: dict[tuple, int] = {}
