"""Does a decode step slow down when its KV blocks are scattered over the pool? (GPU diagnostic)

The profiler's states used to hold consecutive blocks from block 0; a serving pool hands out whatever blocks
finished sequences gave back, so a served batch's blocks lie scattered over the part of the pool in use. This
times full-depth decode steps (CUDA graphs, Llama-2-7B shape, random weights, a KV pool filling the GPU) with
blocks consecutive (share 0) or drawn at random from the pool's leading share (``BlockAllocator.scatter``),
the shares alternating in rotated order, several rounds.

    PYTHONPATH=$PWD python benchmarks/kv_scatter.py [--shares 0,0.25,1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_decode import decode_plan, time_steps  # noqa: E402
from eesim.exit_trace import synthesize_exit_trace  # noqa: E402
from eesim.gpu.executor import GPUExecutor  # noqa: E402
from eesim.gpu.weights import build_random_model  # noqa: E402
from eesim.model_spec import MODEL_PRESETS  # noqa: E402

SHAPES = [(1, 128), (1, 512), (1, 2048), (2, 512), (4, 1024), (8, 512), (8, 2048), (32, 512), (32, 2048)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shares", default="0,0.25,1", help="comma list: 0 consecutive blocks, else the pool's share")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--headroom-gb", type=float, default=6.0, help="GPU memory left beside the KV pool")
    args = ap.parse_args()
    shares = [float(v) for v in args.shares.split(",")]
    spec = MODEL_PRESETS["llama2-7b"]  # (bf16)
    dev = torch.device("cuda")
    model = build_random_model(spec, dev, torch.bfloat16, seed=0)
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    num_blocks = int((free - args.headroom_gb * 1e9) // (16 * spec.kv_bytes_per_token))
    trace = synthesize_exit_trace(spec.num_layers, spec.all_exits, 64, seed=0)
    ex = GPUExecutor(model, spec, "full", "fill", "max_prob", 0.9, mode="replay", trace=trace, device=dev,
                     dtype=torch.bfloat16, num_blocks=num_blocks, block_size=16, cuda_graphs=True)
    with torch.no_grad():
        ex.k_cache.normal_(0, 1)
        ex.v_cache.normal_(0, 1)
    print(f"{torch.cuda.get_device_name(dev)}; KV pool {num_blocks} blocks "
          f"({2 * ex.k_cache.numel() * ex.k_cache.element_size() / 1e9:.1f} GB)", flush=True)
    times: dict = {}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for share in shares[r % len(shares):] + shares[:r % len(shares)]:  # rotated: no share always first
            for b, c in SHAPES:
                _, plan = decode_plan(ex, b, c, spread=share)
                seconds, _ = time_steps(ex, plan, 3, 15)
                times.setdefault((b, c, share), []).append(seconds * 1e3)
    print("batch x ctx  " + "  ".join(f"{'share ' + str(s):>24s}" for s in shares) + "  change vs the first")
    for b, c in SHAPES:
        cols = [times[(b, c, s)] for s in shares]
        base = np.median(cols[0])
        print(f"{b:>5d} x {c:<5d}" + "  ".join(f"{' '.join(f'{v:6.3f}' for v in col):>24s}" for col in cols) + "  "
              + " ".join(f"{(np.median(col) / base - 1) * 100:+5.1f}%" for col in cols[1:]))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
