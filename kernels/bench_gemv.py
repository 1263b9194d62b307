"""Sweep of the skinny-GEMM kernel against cuBLAS (F.linear) on the Llama-2-7B decode shapes (H100).

    PYTHONPATH=$PWD python kernels/bench_gemv.py [--quick]

Checks every config against the torch reference first, then times each (CUDA-graph replay of 20
launches, median) and prints per shape and row count: cuBLAS, the default config, the best config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eesim.kernels  # noqa: E402,F401
from eesim.kernels.confidence import max_prob_argmax, max_prob_argmax_ref  # noqa: E402
from eesim.kernels.gemv import _config, skinny_linear, skinny_linear_ref  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "head": (32000, 4096)}


def bench(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ts = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / reps * 1e-3)
    return sorted(ts)[3]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,8,16")
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    c1 = [(bn, bk, w, 1) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8) if bn * bk <= 16384]
    c1 += [(bn, bk, 4, st, 16) for bn, bk in ((16, 256), (32, 256), (16, 512), (64, 128)) for st in (3, 4)]
    cm = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4,) for st in (3, 4)
          if bn * bk <= 16384]
    # max_prob + argmax check
    lg = torch.randn(3, 32000, device=dev, dtype=torch.bfloat16) * 3
    c, i = max_prob_argmax(lg)
    cr, ir = max_prob_argmax_ref(lg)
    print(f"max_prob_argmax vs ref: conf err {(c - cr).abs().max().item():.2e}, argmax equal {torch.equal(i, ir)}")
    lg1 = lg[:1]
    t_k = bench(lambda: max_prob_argmax(lg1))
    t_r = bench(lambda: (torch.softmax(lg1.float(), -1).amax(-1), lg1.argmax(-1)))
    print(f"max_prob_argmax B=1: kernel {t_k * 1e6:.1f} us, torch {t_r * 1e6:.1f} us")
    for m in [int(r) for r in args.rows.split(",")]:
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = skinny_linear_ref(x, w)
            t_cub = bench(lambda: F.linear(x, w))
            nbytes = n * k * 2
            res = []
            for cfg in (c1 if m == 1 else cm):
                y = skinny_linear(x, w, config=cfg)
                err = (y.float() - ref.float()).abs().max().item()
                if err > 0.05:
                    print(f"  {name} m={m} cfg {cfg}: WRONG err {err}")
                    continue
                res.append((bench(lambda: skinny_linear(x, w, config=cfg)), cfg))
            res.sort()
            t_def = bench(lambda: skinny_linear(x, w))
            print(f"m={m:2d} {name:8s} ({n}x{k}): cuBLAS {t_cub * 1e6:6.1f} us {nbytes / t_cub / 1e12:4.2f} TB/s | "
                  f"default {_config(m, n, k)} {t_def * 1e6:6.1f} us {nbytes / t_def / 1e12:4.2f} TB/s | best "
                  + ", ".join(f"{c} {t * 1e6:.1f}us {nbytes / t / 1e12:.2f}" for t, c in res[:3]), flush=True)
        # fused silu_mul + residual (down) vs torch's three ops
        n, k = SHAPES["down"]
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        gu = torch.randn(m, 2 * k, device=dev, dtype=torch.bfloat16)
        r = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        err = (skinny_linear(gu, w, r, "silu_mul").float() - skinny_linear_ref(gu, w, r, "silu_mul").float()).abs().max()
        t_f = bench(lambda: skinny_linear(gu, w, r, "silu_mul"))
        t_t = bench(lambda: r + F.linear(F.silu(gu[:, :k]) * gu[:, k:], w))
        print(f"m={m:2d} down+silu_mul+residual: fused {t_f * 1e6:.1f} us (err {err:.3f}), torch {t_t * 1e6:.1f} us")


if __name__ == "__main__":
    main()
