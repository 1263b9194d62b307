"""Programmatic dependent launch (PDL) on and off, on chains of the decode kernels in one CUDA graph (GPU).

Three chains at batch 1, each kernel reading the one before it: (1) 256 RMSNorms of one 4096-wide row
(launch-bound: shows the per-kernel boundary cost); (2) 32 distinct 4096 x 4096 projections with the
residual (the o-projection; 33.5 MB each, so ramp-up and tail are a visible share); (3) 32 layers of the
llama2-7b MLP (gate+up, then down with the activation in its prologue and the residual). ``EESIM_PDL``
is flipped between runs in this process (``kernels._common.pdl`` reads it per launch), runs interleaved
(off, on, off, on), the best of each kept. Floor: weight bytes / 2.98 TB/s.

Usage:  PYTHONPATH=$PWD python benchmarks/pdl_bench.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eesim.kernels import rmsnorm, skinny_linear  # noqa: E402
from eesim.kernels._common import pdl  # noqa: E402

FLOOR_BW = 2.98e12


def main() -> int:
    if not torch.cuda.is_available():
        print("pdl_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing as tt

    dev = torch.device("cuda")
    d, inter = 4096, 11008
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, generator=g, dtype=torch.bfloat16) * scale

    x = rand(1, d)
    ln = rand(d, scale=0.1) + 1
    w_o = [rand(d, d, scale=d ** -0.5) for _ in range(32)]
    w_gu = [rand(2 * inter, d, scale=d ** -0.5) for _ in range(32)]
    w_dn = [rand(d, inter, scale=0.1 * inter ** -0.5) for _ in range(32)]  # small: 32 layers stay finite

    def norms():
        h = x
        for _ in range(256):
            h = rmsnorm(h, ln)
        return h

    def oproj():
        h = x
        for w in w_o:
            h = skinny_linear(h, w, h)
        return h

    def mlp():
        h = x
        for gu_w, dn_w in zip(w_gu, w_dn):
            h = skinny_linear(skinny_linear(h, gu_w), dn_w, h, "silu_mul")
        return h

    chains = [("rmsnorm x256", norms, 256, 0), ("o-proj + residual x32", oproj, 32, 32 * d * d * 2),
              ("MLP x32 (2 GEMVs each)", mlp, 64, 32 * 3 * inter * d * 2)]
    user_setting = os.environ.get("EESIM_PDL")
    os.environ["EESIM_PDL"] = "1"
    print(f"{torch.cuda.get_device_name()}; PDL available: {pdl(dev)}; batch 1, bf16")
    print(f"{'chain':<24} {'kernels':>7} {'off ms':>8} {'on ms':>8} {'off us/kernel':>14} {'on us/kernel':>13} "
          f"{'saved us/kernel':>16} {'off/floor':>10} {'on/floor':>9} {'same output':>12}")
    for name, fn, kernels, nbytes in chains:
        outs, times = {}, {"0": [], "1": []}
        for _ in range(2):
            for mode in ("0", "1"):
                os.environ["EESIM_PDL"] = mode
                outs[mode] = fn()
                times[mode].append(tt.do_bench_cudagraph(fn, rep=200) / 1e3)
        off, on = min(times["0"]), min(times["1"])
        floor = nbytes / FLOOR_BW
        same = torch.equal(outs["0"], outs["1"])
        print(f"{name:<24} {kernels:>7} {off * 1e3:>8.3f} {on * 1e3:>8.3f} {off / kernels * 1e6:>14.2f} "
              f"{on / kernels * 1e6:>13.2f} {(off - on) / kernels * 1e6:>16.2f} "
              f"{(off / floor if floor else float('nan')):>10.3f} {(on / floor if floor else float('nan')):>9.3f} "
              f"{str(same):>12}", flush=True)
    if user_setting is None:
        os.environ.pop("EESIM_PDL")
    else:
        os.environ["EESIM_PDL"] = user_setting
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
