"""Sweep of the skinny-GEMM kernel against cuBLAS (F.linear) on the Llama-2-7B decode shapes (H100).

    PYTHONPATH=$PWD python kernels/bench_gemv.py [--rows 1,4,8,16] [--fused] [--model llama3-8b]

Checks every config against the torch reference first, then times each (CUDA-graph replay of 20
launches, median) and prints per shape and row count: cuBLAS, the default config, the best config.
"""

from __future__ import annotations

import argparse
import json
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


def preset_shapes(name: str) -> dict:
    """The decode products (n, k) of a model preset, as the executor's fused weights have them."""
    from eesim.model_spec import MODEL_PRESETS

    spec = MODEL_PRESETS[name]
    d, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {"qkv": (q + 2 * kv, d), "o": (d, q), "gate_up": (2 * spec.mlp_size, d), "down": (d, spec.mlp_size),
            "head": (spec.vocab_size, d)}


def bench(fn, reps=20):
    """Seconds per call of ``fn(i)`` (a CUDA graph of ``reps`` calls, ``i`` the call's index, e.g. to cycle
    through weight copies; median of 7 replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
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
    ap.add_argument("--cm", default="", help="configs for 2-16 rows: 'default' (the previous sweep's own list and "
                    "the SWAP ones) or 'short' (the default config and the SWAP ones)")
    ap.add_argument("--best-out", default="", help="write the best config per (rows, n, k) here (JSON, n as "
                    "skinny_linear's config lookup sees it: half the rows of a glu weight)")
    ap.add_argument("--fused", action="store_true", help="time what the decode layer runs at m > 1: O and down with "
                    "their residual, gate+up with silu * up in its epilogue (cuBLAS: the same in torch ops)")
    ap.add_argument("--model", default="", help="a model preset's shapes (default: Llama-2-7B's)")
    ap.add_argument("--copies", type=int, default=1, help="distinct weight copies the timed calls cycle through "
                    "(1: one weight replayed, which stays in L2 when it fits; 4 keeps every Llama product out of it)")
    ap.add_argument("--shapes", default="", help="comma list of products to time (default: all)")
    args = ap.parse_args()
    shapes = preset_shapes(args.model) if args.model else SHAPES
    dev = "cuda"
    torch.manual_seed(0)
    c1 = [(bn, bk, w, 1) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8) if bn * bk <= 16384]
    c1 += [(bn, bk, 4, st, 16) for bn, bk in ((16, 256), (32, 256), (16, 512), (64, 128)) for st in (3, 4)]
    cm = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4,) for st in (3, 4)
          if bn * bk <= 16384]
    # the weight tile as the dot's left operand (SWAP: the MMA's large side is the weight rows), any row count
    swap = [(bn, bk, 4, st, 0, True) for bn in (64, 128) for bk in (64, 128, 256) for st in (3, 4)]
    cm = cm + swap
    cw = [(32, 128, 4, 3), (32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3)] + swap
    # max_prob + argmax check
    lg = torch.randn(3, 32000, device=dev, dtype=torch.bfloat16) * 3
    c, i = max_prob_argmax(lg)
    cr, ir = max_prob_argmax_ref(lg)
    print(f"max_prob_argmax vs ref: conf err {(c - cr).abs().max().item():.2e}, argmax equal {torch.equal(i, ir)}")
    lg1 = lg[:1]
    t_k = bench(lambda i: max_prob_argmax(lg1))
    t_r = bench(lambda i: (torch.softmax(lg1.float(), -1).amax(-1), lg1.argmax(-1)))
    print(f"max_prob_argmax B=1: kernel {t_k * 1e6:.1f} us, torch {t_r * 1e6:.1f} us")
    if args.cm == "short":
        cm = swap
    best = {}
    for m in [int(r) for r in args.rows.split(",")]:
        for name, (n, k) in shapes.items():
            if args.shapes and name not in args.shapes.split(","):
                continue
            ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(max(1, args.copies))]
            w = ws[0]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            # what the decode layer runs at m > 1: residual into O and down, silu(gate) * up in gate+up's epilogue
            act = "glu" if (args.fused and m > 1 and name == "gate_up") else None
            r = torch.randn(m, n, device=dev, dtype=torch.bfloat16) if (args.fused and name in ("o", "down")) else None
            ref = skinny_linear_ref(x, w, r, act)
            h = n // 2
            nw = len(ws)
            if act == "glu":
                cublas = lambda i: (lambda y: F.silu(y[:, :h]) * y[:, h:])(F.linear(x, ws[i % nw]))  # noqa: E731
            elif r is not None:
                cublas = lambda i: r + F.linear(x, ws[i % nw])  # noqa: E731
            else:
                cublas = lambda i: F.linear(x, ws[i % nw])  # noqa: E731
            t_cub = bench(cublas)
            nbytes = n * k * 2
            res = []
            n_eff = n // 2 if act == "glu" else n  # what skinny_linear passes to _config
            for cfg in [_config(m, n_eff, k)] + (c1 if m == 1 else (cm if m <= 16 else cw)):
                y = skinny_linear(x, w, r, act, config=cfg)
                err = (y.float() - ref.float()).abs().max().item()
                if err > 0.01 * ref.float().abs().max().item() + 0.01:  # bf16 rounding of the largest outputs
                    print(f"  {name} m={m} cfg {cfg}: WRONG err {err}")
                    continue
                res.append((bench(lambda i: skinny_linear(x, ws[i % nw], r, act, config=cfg)), cfg))
            res.sort()
            t_def = bench(lambda i: skinny_linear(x, ws[i % nw], r, act))
            if res:
                best[f"{m},{n_eff},{k}"] = list(res[0][1])
            label = name + ("+glu" if act else "+res" if r is not None else "")
            print(f"m={m:2d} {label:8s} ({n}x{k}): cuBLAS {t_cub * 1e6:6.1f} us {nbytes / t_cub / 1e12:4.2f} TB/s | "
                  f"default {_config(m, n_eff, k)} {t_def * 1e6:6.1f} us {nbytes / t_def / 1e12:4.2f} TB/s | best "
                  + ", ".join(f"{c} {t * 1e6:.1f}us {nbytes / t / 1e12:.2f}" for t, c in res[:3]), flush=True)
        # fused silu_mul + residual (down) vs torch's three ops
        n, k = shapes["down"]
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        gu = torch.randn(m, 2 * k, device=dev, dtype=torch.bfloat16)
        r = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        err = (skinny_linear(gu, w, r, "silu_mul").float() - skinny_linear_ref(gu, w, r, "silu_mul").float()).abs().max()
        t_f = bench(lambda i: skinny_linear(gu, w, r, "silu_mul"))
        t_t = bench(lambda i: r + F.linear(F.silu(gu[:, :k]) * gu[:, k:], w))
        print(f"m={m:2d} down+silu_mul+residual: fused {t_f * 1e6:.1f} us (err {err:.3f}), torch {t_t * 1e6:.1f} us")
        if args.best_out:  # after every row count, so that a run cut short keeps what it measured
            Path(args.best_out).write_text(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
