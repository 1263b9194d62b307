"""The decode MLP's three ways of computing silu(gate) * up, timed as the executor runs them (GPU).

Per layer of the llama2-7b shape: (1) previous: gate+up GEMM, then the activation (torch's silu and mul at
M > 1; fused into the down GEMM's prologue at M = 1), then down with the residual; (2) ``act="glu"``: the
activation in the gate+up GEMM's epilogue, down reads it plainly. 32 layers' distinct weights (so L2 holds
none of them), the whole MLP stack replayed in one CUDA graph (``triton.testing.do_bench_cudagraph``),
ratio to the byte floor (the MLP weights / 2.98 TB/s).

Usage:  PYTHONPATH=$PWD python benchmarks/mlp_bench.py [--rows 1,2,8,16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eesim.kernels import skinny_linear  # noqa: E402

FLOOR_BW = 2.98e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,8,16")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("mlp_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing as tt

    d, inter, L = 4096, 11008, args.layers
    g = torch.Generator(device="cuda").manual_seed(0)
    w_gu = [torch.randn(2 * inter, d, device="cuda", generator=g, dtype=torch.bfloat16) * d ** -0.5 for _ in range(L)]
    w_dn = [torch.randn(d, inter, device="cuda", generator=g, dtype=torch.bfloat16) * inter ** -0.5 for _ in range(L)]
    floor = L * 3 * inter * d * 2 / FLOOR_BW
    print(f"{torch.cuda.get_device_name()}; {L} layers of the llama2-7b MLP, bf16; floor {floor * 1e3:.3f} ms")
    print(f"{'rows':>4} {'previous ms':>12} {'glu ms':>8} {'previous/floor':>15} {'glu/floor':>10} "
          f"{'max |diff| (1 layer)':>21}")
    for m in (int(r) for r in args.rows.split(",")):
        x = torch.randn(m, d, device="cuda", generator=g, dtype=torch.bfloat16)

        def previous():
            h = x
            for gu_w, dn_w in zip(w_gu, w_dn):
                gu = skinny_linear(h, gu_w)
                if m == 1:
                    h = skinny_linear(gu, dn_w, h, "silu_mul")
                else:
                    h = skinny_linear(F.silu(gu[:, :inter]) * gu[:, inter:], dn_w, h)
            return h

        def glu():
            h = x
            for gu_w, dn_w in zip(w_gu, w_dn):
                h = skinny_linear(skinny_linear(h, gu_w, act="glu"), dn_w, h)
            return h

        h1 = skinny_linear(x, w_gu[0])  # one layer's activation both ways (32 random layers overflow bf16)
        a_prev = F.silu(h1[:, :inter]) * h1[:, inter:]
        diff = (a_prev.float() - skinny_linear(x, w_gu[0], act="glu").float()).abs().max().item()
        times = {previous: [], glu: []}
        for _ in range(2):  # interleaved, the best of two each: drift between them does not favour either
            for fn in (previous, glu):
                times[fn].append(tt.do_bench_cudagraph(fn, rep=200) / 1e3)
        t_prev, t_glu = min(times[previous]), min(times[glu])
        print(f"{m:>4} {t_prev * 1e3:>12.3f} {t_glu * 1e3:>8.3f} {t_prev / floor:>15.3f} {t_glu / floor:>10.3f} "
              f"{diff:>21.3g}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
