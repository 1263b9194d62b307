"""Micro-benchmark of the eesim kernels on a CUDA GPU (median time via triton.testing.do_bench).

    python -m eesim.kernels.bench_kernels [--dtype bf16] [--quick]

Achieved GB/s counts the bytes each kernel must move at minimum (inputs read once, outputs
written once); decode-time kernels are bandwidth bound, so compare it with the HBM peak
(~3350 GB/s on H100 SXM).
"""

from __future__ import annotations

import argparse
import sys

import torch


def _paged_case(batch, ctx, heads, kv_heads, head_dim, block_size, dtype, split):
    from eesim.kernels import paged_decode_attention

    blocks_per = -(-ctx // block_size)
    num_blocks = batch * blocks_per
    bt = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    kc = torch.randn(shape, device="cuda", dtype=dtype)
    vc = torch.randn(shape, device="cuda", dtype=dtype)
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
    ctx_t = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    nbytes = 2 * batch * ctx * kv_heads * head_dim * kc.element_size() + 2 * q.numel() * q.element_size()
    fn = lambda: paged_decode_attention(q, kc, vc, bt, ctx_t, split=split)  # noqa: E731
    label = "split" if split else ("auto" if split is None else "nosplit")
    return f"paged_attn[{label}]", f"b{batch} ctx{ctx} h{heads}/{kv_heads} d{head_dim}", fn, nbytes


def _store_case(n, kv_heads, head_dim, dtype):
    from eesim.kernels import store_kv

    num_blocks, block_size = 4096, 16
    kc = torch.empty(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    vc = torch.empty_like(kc)
    k = torch.randn(n, kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:n]
    nbytes = 4 * k.numel() * k.element_size() + slots.numel() * 8
    return "store_kv", f"n{n} kv{kv_heads} d{head_dim}", lambda: store_kv(k, v, kc, vc, slots), nbytes


def _fill_case(n, num_layers, hidden, kv_heads, head_dim, min_exit, dtype):
    from eesim.kernels import fused_fill, rotary_tables

    kv_dim = kv_heads * head_dim
    num_blocks, block_size = 1024, 16
    h = torch.randn(n, hidden, device="cuda", dtype=dtype)
    exit_layer = torch.randint(min_exit, num_layers, (n,), device="cuda", dtype=torch.int32)
    positions = torch.randint(0, 4096, (n,), device="cuda")
    slot = torch.randperm(num_blocks * block_size, device="cuda")[:n]
    norm_w = torch.ones(num_layers, hidden, device="cuda", dtype=dtype)
    wk = torch.randn(num_layers, kv_dim, hidden, device="cuda", dtype=dtype) / hidden**0.5
    wv = torch.randn_like(wk)
    cos, sin = rotary_tables(4096, head_dim, device="cuda")
    kc = torch.empty(num_layers, num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    vc = torch.empty_like(kc)
    skipped_layers = num_layers - int(exit_layer.min())
    pairs = int((num_layers - exit_layer).sum())
    el = h.element_size()
    nbytes = (skipped_layers * (2 * kv_dim + 1) * hidden * el + n * hidden * el
              + pairs * 2 * kv_dim * el)
    fn = lambda: fused_fill(h, exit_layer, positions, slot, norm_w, wk, wv, 1e-5, cos, sin, kc, vc)  # noqa: E731
    return "fused_fill", f"n{n} L{num_layers} hid{hidden} kv{kv_dim} exit>={min_exit}", fn, nbytes


def _rmsnorm_case(rows, hidden, dtype):
    from eesim.kernels import rmsnorm

    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    return "rmsnorm", f"{rows}x{hidden}", lambda: rmsnorm(x, w), 2 * x.numel() * x.element_size()


def _rotary_case(n, heads, kv_heads, head_dim, dtype):
    from eesim.kernels import apply_rotary, rotary_tables

    q = torch.randn(n, heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(n, kv_heads, head_dim, device="cuda", dtype=dtype)
    pos = torch.randint(0, 4096, (n,), device="cuda")
    cos, sin = rotary_tables(4096, head_dim, device="cuda")
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + n * head_dim * 4
    return "rotary", f"n{n} h{heads}/{kv_heads} d{head_dim}", lambda: apply_rotary(q, k, pos, cos, sin), nbytes


def _prefill_case(chunk, prefix, heads, kv_heads, head_dim, block_size, dtype):
    """One sequence's prompt chunk of ``chunk`` rows after ``prefix`` cached tokens: the paged kernel,
    and torch SDPA on contiguous K/V (bottom-right causal, the flash path) as the alternative."""
    from eesim.kernels import paged_prefill_attention
    from torch.nn.attention.bias import causal_lower_right

    ctx = prefix + chunk
    blocks_per = -(-ctx // block_size)
    bt = torch.randperm(blocks_per, device="cuda").to(torch.int32).view(1, blocks_per)
    kc = torch.randn(blocks_per, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(chunk, heads, head_dim, device="cuda", dtype=dtype)
    cu = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
    pos = torch.arange(prefix, ctx, dtype=torch.int32, device="cuda")
    paged = lambda: paged_prefill_attention(q, kc, vc, bt, cu, pos, chunk)  # noqa: E731
    # SDPA wants (batch, heads, len, head_dim); K/V come with all query heads (7B is MHA).
    qd = q.transpose(0, 1)[None].contiguous()
    kd = torch.randn(1, heads, ctx, head_dim, device="cuda", dtype=dtype)
    vd = torch.randn_like(kd)
    mask = causal_lower_right(chunk, ctx)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)  # noqa: E731
    flops = 4 * heads * head_dim * sum(p + 1 for p in range(prefix, ctx))
    return f"chunk{chunk} prefix{prefix} h{heads}/{kv_heads} d{head_dim} bs{block_size}", paged, sdpa, flops


def _ensure_importable() -> None:
    # Running from a source checkout: the repository root on sys.path lets eesim (which maps this folder
    # as eesim.kernels) import.
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: CUDA not available; nothing to benchmark.", file=sys.stderr)
        return 0
    import triton.testing

    _ensure_importable()

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    cases = [
        lambda: _paged_case(64, 1024, 32, 8, 128, 16, dtype, None),
        lambda: _paged_case(4, 8192, 32, 8, 128, 16, dtype, False),
        lambda: _paged_case(4, 8192, 32, 8, 128, 16, dtype, None),
        lambda: _store_case(256, 8, 128, dtype),
        lambda: _fill_case(32, 32, 4096, 8, 128, 8, dtype),
        lambda: _fill_case(8, 32, 4096, 8, 128, 24, dtype),
        lambda: _rmsnorm_case(256, 4096, dtype),
        lambda: _rotary_case(256, 32, 8, 128, dtype),
    ]
    if not args.quick:
        cases += [
            lambda: _paged_case(256, 2048, 32, 8, 128, 16, dtype, None),
            lambda: _paged_case(1, 32768, 32, 8, 128, 16, dtype, None),
            lambda: _paged_case(1, 32768, 32, 8, 128, 16, dtype, False),
            lambda: _fill_case(64, 32, 4096, 8, 128, 0, dtype),
        ]
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}")
    print(f"{'kernel':<20} {'shape':<36} {'median us':>10} {'GB/s':>8}")
    for make in cases:
        name, shape, fn, nbytes = make()
        fn()  # compile outside the timed region
        ms = triton.testing.do_bench(fn, return_mode="median")
        print(f"{name:<20} {shape:<36} {ms * 1e3:>10.1f} {nbytes / (ms * 1e-3) / 1e9:>8.0f}")
        del fn
        torch.cuda.empty_cache()

    # Prefill attention is compute bound: report causal TFLOP/s (4 * heads * head_dim * sum over
    # rows of (pos + 1)) next to torch SDPA on contiguous K/V of the same shape.
    prefill = [(512, 0), (512, 1536)] + ([] if args.quick else [(2048, 0), (2048, 1536)])
    print(f"\n{'prefill attention':<44} {'paged ms':>9} {'TFLOP/s':>8} {'sdpa ms':>9} {'TFLOP/s':>8}")
    for chunk, prefix in prefill:
        shape, paged, sdpa, flops = _prefill_case(chunk, prefix, 32, 32, 128, 16, dtype)
        times = []
        for fn in (paged, sdpa):
            fn()  # compile / pick the backend outside the timed region
            times.append(triton.testing.do_bench(fn, return_mode="median"))
        tf = [flops / (ms * 1e-3) / 1e12 for ms in times]
        print(f"{shape:<44} {times[0]:>9.3f} {tf[0]:>8.0f} {times[1]:>9.3f} {tf[1]:>8.0f}")
        del paged, sdpa
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
