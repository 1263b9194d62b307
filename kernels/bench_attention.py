"""Sweep of the paged decode attention's tiles on the decode step's shapes (H100), as the step runs them.

    PYTHONPATH=$PWD python kernels/bench_attention.py [--shapes 1x512,8x512,...] [--kv-heads 32] [--best-out F]

Per (batch x context): a chain of 32 attention calls in one CUDA graph, each reading the previous one's
output as its query (the dependency of a real layer chain, so programmatic dependent launch behaves as in
the executor), over 8-32 layers' distinct caches (150 MB of K/V or more: three times the L2). The sweep of
2026-11-23 used 8 layers: its 8-KV-head 1 x 512 case (17 MB in all) ran from L2, and its 1 x 512 with 32 KV heads
(67 MB) partly. Every configuration is checked against the torch reference first, then timed (median of 7 replays); printed per shape: the executor's
default choice, the best three, and the floor (the K/V bytes at 2.98 TB/s). Configurations: the partition
(split-K with 32-512 keys, or none), keys per step and warps (the sweep of 2026-11-23 also tried V loaded with K:
within 0.2% on average, not kept).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eesim.kernels import paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from eesim.kernels.bench_gemv import bench  # noqa: E402  (a graph of the calls, the median of 7 replays)

FLOOR_BW = 2.98e12
CALLS, PAGE = 32, 16
CACHE_BYTES = 150e6  # the layers' K/V together: three times the H100's 50 MB L2, so that calls read from HBM


def chain_time(fn, q0, layers: int) -> float:
    """Seconds per call of ``fn`` in a graph of CALLS calls, each fed the previous output."""
    def chain(_call):
        q = q0
        for i in range(CALLS):
            q = fn(i % layers, q)
        return q

    return bench(chain, reps=1) / CALLS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x512,1x2048,4x512,8x512,8x2048,16x512,32x512,32x2048,64x512")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--best-out", default="", help="write the best configuration per shape here (JSON)")
    ap.add_argument("--csv-out", default="", help="write every configuration's time here (CSV)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, dt, hd = torch.device("cuda"), torch.bfloat16, 128
    H, Hkv = args.heads, args.kv_heads
    g = torch.Generator(device="cuda").manual_seed(0)
    best, table = {}, []
    for shape in args.shapes.split(","):
        B, ctx = (int(v) for v in shape.split("x"))
        blocks = -(-ctx // PAGE)
        layer_bytes = 2 * B * blocks * PAGE * Hkv * hd * 2
        layers = int(min(CALLS, max(8, -(-CACHE_BYTES // layer_bytes))))
        caches = [(torch.randn(B * blocks, PAGE, Hkv, hd, device=dev, dtype=dt, generator=g),
                   torch.randn(B * blocks, PAGE, Hkv, hd, device=dev, dtype=dt, generator=g)) for _ in range(layers)]
        bt = torch.randperm(B * blocks, device=dev, generator=g).to(torch.int32).view(B, blocks)
        lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)  # as benchmarks/gpu_decode.py's steps
        bound = blocks * PAGE
        q0 = torch.randn(B, H, hd, device=dev, dtype=dt, generator=g)
        nbytes = 2 * int(lens.sum()) * Hkv * hd * 2
        ref = paged_decode_attention_ref(q0, *caches[0], bt, lens).float()
        configs = [dict()]  # the executor's own choice
        for psize, bn, warps in itertools.product((32, 64, 128, 256, 512, 0), (16, 32, 64), (2, 4, 8)):
            if psize and (bn > psize or psize >= bound):
                continue
            configs.append(dict(partition_size=psize or None, split=bool(psize), block_n=bn, num_warps=warps))
        rows, default_t = [], float("nan")
        for cfg in configs:
            out = paged_decode_attention(q0, *caches[0], bt, lens, **cfg)
            if not torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2):
                print(f"  {shape} {cfg or 'default'}: WRONG")
                continue
            t = chain_time(lambda i, q, c=cfg: paged_decode_attention(q, *caches[i], bt, lens, **c), q0, layers)
            if not cfg:
                default_t = t
            rows.append((t, cfg))
            table.append(dict(batch=B, context=ctx, heads=H, kv_heads=Hkv, us=t * 1e6, floor_us=nbytes / FLOOR_BW * 1e6,
                              default=not cfg, **{k: cfg.get(k) for k in ("partition_size", "split", "block_n",
                                                                          "num_warps")}))
        if not rows:
            print(f"{shape}: every configuration WRONG", file=sys.stderr)
            return 1
        rows.sort(key=lambda r: r[0])
        if args.best_out:
            best[shape] = rows[0][1]
        floor = nbytes / FLOOR_BW
        print(f"B={B:3d} ctx={ctx:5d} h{H}/{Hkv}: floor {floor * 1e6:6.1f} us | default {default_t * 1e6:6.1f} us "
              f"({default_t / floor:.2f}x) | best " + ", ".join(
                  f"{t * 1e6:.1f} us ({t / floor:.2f}x) {c or 'default'}" for t, c in rows[:3]), flush=True)
        del caches
        torch.cuda.empty_cache()
    if args.best_out:
        Path(args.best_out).write_text(json.dumps(best, indent=1))
    if args.csv_out:
        import pandas as pd

        pd.DataFrame(table).to_csv(args.csv_out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
