"""Benchmark: the fused fill kernel (``kernels/fused_fill.py``) at the Llama-2-7B shape against its floor.

For ``n`` exited tokens and ``s`` skipped layers the fill must read ``s * 2 * kv_dim * hidden`` weights
(K and V projections; everything else is noise beside them), so its floor is those bytes over the
H100's measured 2.98 TB/s. Each case is timed kernel-only (``triton.testing.do_bench``, median), with
the weights laid out as the executor holds them (K and V rows of one fused QKV weight, strided views),
and printed with achieved TB/s and the ratio to the floor. Beside it, in the same run:
  torch     what a user would write instead: the normalised states of every skipped layer in one
            batched matmul against the stacked K/V weights, torch rotary, one indexed store per cache;
  baseline  (``--baseline FILE``) ``fused_fill`` from another copy of the kernel module, e.g. the
            previous commit's, for a before/after in one run;
  configs   (``--sweep``) the tile configurations tried for the defaults.
Writes ``fill_bench.csv`` to $OUT when set.

Usage (H100):  python benchmarks/fill_bench.py [--baseline old_fused_fill.py] [--sweep]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eesim.kernels import fused_fill, rotary_tables  # noqa: E402

FLOOR_BW = 2.98e12
HIDDEN, KV_HEADS, HEAD_DIM, LAYERS = 4096, 32, 128, 32  # llama2-7b
SWEEP = [(4, 512, 4, 1, 1), (4, 1024, 4, 1, 1), (8, 512, 4, 1, 1), (2, 1024, 4, 1, 1), (4, 256, 4, 2, 1),
         (32, 128, 4, 3, 64), (32, 128, 4, 3, 32), (32, 128, 4, 3, 128), (64, 64, 4, 3, 64), (64, 128, 4, 3, 64),
         (64, 64, 8, 3, 64), (64, 128, 8, 3, 128), (32, 64, 4, 4, 64), (64, 64, 4, 4, 32), (16, 256, 4, 3, 16),
         (32, 256, 4, 3, 32), (64, 64, 4, 3, 128)]


def fits_smem(cfg: tuple, n: int) -> bool:
    """Whether a configuration's pipelined tiles fit the H100's 227 KB of shared memory."""
    p, k, _, stages, max_t = cfg
    t = 1 if n == 1 else min(max(16, max_t), max(16, 1 << (n - 1).bit_length()))
    return (t * k + 2 * p * k) * 2 * stages <= 200_000


def setup(n: int, skipped: int, dev):
    kv = KV_HEADS * HEAD_DIM
    g = torch.Generator(device=dev).manual_seed(n * 100 + skipped)
    wqkv = torch.randn(LAYERS, 3 * kv, HIDDEN, device=dev, dtype=torch.bfloat16, generator=g) / HIDDEN ** 0.5
    wk, wv = wqkv[:, kv:2 * kv], wqkv[:, 2 * kv:]
    norm_w = 1 + 0.1 * torch.randn(LAYERS, HIDDEN, device=dev, dtype=torch.bfloat16, generator=g)
    h = torch.randn(n, HIDDEN, device=dev, dtype=torch.bfloat16, generator=g)
    exit_layer = torch.full((n,), LAYERS - skipped, device=dev, dtype=torch.int32)
    blocks = 2048
    positions = torch.randint(0, 4000, (n,), device=dev, generator=g).to(torch.int32)
    slot = torch.randperm(blocks * 16, device=dev, generator=g)[:n].to(torch.int32)
    cos, sin = rotary_tables(4096, HEAD_DIM, device=dev)
    kc = torch.zeros(LAYERS, blocks, 16, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    return dict(h=h, exit_layer=exit_layer, positions=positions, slot=slot, input_norm_w=norm_w, wk=wk, wv=wv,
                eps=1e-5, cos=cos, sin=sin, k_cache=kc, v_cache=vc)


def torch_fill(a: dict, first: int):
    """The user's version: one bmm over the skipped layers, torch rotary, one indexed store per cache."""
    h, kc, vc = a["h"], a["k_cache"], a["v_cache"]
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + a["eps"])
    xn = (normed[None] * a["input_norm_w"][first:, None].float()).to(h.dtype)  # (s, n, hidden)
    k = torch.bmm(xn, a["wk"][first:].transpose(1, 2)).view(-1, h.shape[0], KV_HEADS, HEAD_DIM)
    v = torch.bmm(xn, a["wv"][first:].transpose(1, 2)).view_as(k)
    pos = a["positions"].long()
    c, s = a["cos"][pos][None, :, None], a["sin"][pos][None, :, None]
    k1, k2 = k[..., :HEAD_DIM // 2].float(), k[..., HEAD_DIM // 2:].float()
    k = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], -1).to(kc.dtype)
    slot = a["slot"].long()
    blk, off = slot // kc.shape[2], slot % kc.shape[2]
    kc[first:, blk, off] = k
    vc[first:, blk, off] = v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,2,8,32,128")
    ap.add_argument("--skipped", default="4,8,16,24,28")
    ap.add_argument("--baseline", default=None, help="a fused_fill.py to time beside this one")
    ap.add_argument("--sweep", action="store_true", help="also time every tile configuration in SWEEP")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("fill_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    import pandas as pd
    import triton.testing as tt

    dev = torch.device("cuda")
    base = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("eesim.kernels._baseline_fill", args.baseline)
        base = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = base
        spec.loader.exec_module(base)
    rows = []
    print(f"{torch.cuda.get_device_name()}; floor = skipped x 2 x {KV_HEADS * HEAD_DIM} x {HIDDEN} bf16 / 2.98 TB/s")
    for skipped in (int(s) for s in args.skipped.split(",")):
        for n in (int(t) for t in args.tokens.split(",")):
            a = setup(n, skipped, dev)
            first = LAYERS - skipped
            floor = skipped * 2 * KV_HEADS * HEAD_DIM * HIDDEN * 2 / FLOOR_BW
            variants = {"eesim": lambda: fused_fill(**a, first_layer=first),
                        "torch": lambda: torch_fill(a, first)}
            if base is not None:
                variants["baseline"] = lambda: base.fused_fill(**a)
            if args.sweep:
                for cfg in SWEEP:
                    if (n == 1) == (cfg[4] == 1) and fits_smem(cfg, n):
                        variants[f"cfg{cfg}"] = (lambda c=cfg: fused_fill(**a, first_layer=first, config=c))
            ref_k = None
            for name, fn in variants.items():
                a["k_cache"].zero_()
                fn()
                torch.cuda.synchronize()
                k = a["k_cache"][first:, a["slot"].long() // 16, a["slot"].long() % 16].float()
                if ref_k is None:
                    ref_k = k
                err = float((k - ref_k).abs().max())
                t = tt.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3
                rows.append(dict(variant=name, tokens=n, skipped=skipped, us=t * 1e6, floor_us=floor * 1e6,
                                 ratio=t / floor, tb_s=floor * FLOOR_BW / t / 1e12, max_abs_diff=err))
                print(f"skipped {skipped:2d} tokens {n:3d} {name:24s} {t * 1e6:8.1f} us  "
                      f"{floor * FLOOR_BW / t / 1e12:5.2f} TB/s  {t / floor:5.2f}x floor  |dK| {err:.3g}", flush=True)
            del a
            torch.cuda.empty_cache()
    frame = pd.DataFrame(rows)
    if os.environ.get("OUT"):
        frame.to_csv(Path(os.environ["OUT"]) / "fill_bench.csv", index=False)
    print(frame.pivot_table(index=["skipped", "tokens"], columns="variant", values="ratio").round(2).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
