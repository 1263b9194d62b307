"""Does a decode step slow down when its KV blocks are scattered over the pool? (GPU diagnostic)

The profiler's states used to hold consecutive blocks from block 0; a serving pool hands out whatever blocks
finished sequences gave back, so a served batch's blocks lie scattered over the part of the pool in use. This
times full-depth decode steps (CUDA graphs, Llama-2-7B shape, random weights; the profiler's executor, its KV
pool filling the GPU) with
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
from eesim.model_spec import MODEL_PRESETS  # noqa: E402
from eesim.profiler import ProfileGrid, build_executor  # noqa: E402

SHAPES = [(1, 128), (1, 512), (1, 2048), (2, 512), (4, 1024), (8, 512), (8, 2048), (32, 512), (32, 2048)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shares", default="0,0.25,1", help="comma list: 0 consecutive blocks, else the pool's share")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--headroom-gb", type=float, default=6.0, help="GPU memory left beside the KV pool")
    args = ap.parse_args()
    shares = [float(v) for v in args.shares.split(",")]
    # the profiler's own executor, its KV pool as large as memory allows (max_positions past any GPU's)
    _, ex = build_executor(MODEL_PRESETS["llama2-7b"], None, "cuda", torch.bfloat16, ProfileGrid(), args.headroom_gb,
                           max_positions=1 << 40)
    dev, num_blocks = ex.device, ex.num_blocks
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
