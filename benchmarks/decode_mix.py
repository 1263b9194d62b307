"""Why served decode batches run slower than the profile's uniform ones (GPU benchmark).

The profile measures decode at one context for every row, with each sequence's KV blocks contiguous
(a fresh allocator). A served batch differs in two ways: contexts are mixed (same mean, a long tail),
and a sequence's blocks are scattered over the cache (prompts land wherever the free list was, and
decode rows growing together interleave their new blocks). This times one full-depth decode step of the
Llama-2-7B shape for each combination, at the same batch size and the same total KV positions, so the
difference says which of the two the cost model has to see.

Usage:  PYTHONPATH=$PWD python benchmarks/decode_mix.py [--batches 8,48] [--contexts 370,1000]
Prints one table (ms per step, median of repeats; ratio to uniform + contiguous).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eesim.model_spec import MODEL_PRESETS  # noqa: E402
from eesim.profiler import GRIDS, Profiler, build_executor  # noqa: E402


def contexts_for(kind: str, batch: int, mean: int, rng: np.random.Generator) -> list[int]:
    if kind == "uniform":
        return [mean] * batch
    # log-normal spread (sigma 0.8: longest/mean ~2.5-3.5 at 48 rows, as served batches showed), rescaled to
    # the same total
    raw = rng.lognormal(0.0, 0.8, batch)
    ctx = np.maximum(np.round(raw / raw.mean() * mean), 2).astype(int)
    ctx[0] += mean * batch - int(ctx.sum())  # exact total
    if ctx[0] < 2:
        ctx[np.argmax(ctx)] -= 2 - ctx[0]
        ctx[0] = 2
    return ctx.tolist()


def place(seqs, layout: str, num_blocks: int, rng: np.random.Generator) -> None:
    """Re-assign the sequences' blocks: contiguous per sequence, scattered at random over the whole cache,
    or interleaved (block j of every sequence side by side, as rows decoding together allocate)."""
    need = [len(s.blocks) for s in seqs]
    if layout in ("contiguous", "scattered"):
        order = np.arange(num_blocks) if layout == "contiguous" else rng.permutation(num_blocks)
        ends = np.cumsum(need)
        for s, n, end in zip(seqs, need, ends):
            s.blocks = order[end - n:end].tolist()
    else:  # interleaved
        nxt = 0
        out = [[] for _ in seqs]
        for j in range(max(need)):
            for i, n in enumerate(need):
                if j < n:
                    out[i].append(nxt)
                    nxt += 1
        for s, b in zip(seqs, out):
            s.blocks = b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--batches", default="8,48")
    ap.add_argument("--contexts", default="370,1000")
    ap.add_argument("--layouts", default="contiguous", help="comma list of contiguous, interleaved, scattered")
    ap.add_argument("--balance", default="none,1024",
                    help="values of kernels.paged_attention.BALANCE_ABOVE to compare (none: split only to fill SMs)")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    from eesim.kernels import paged_attention

    spec = MODEL_PRESETS[args.model]
    grid = replace(GRIDS["default"], warmup=3, repeats=args.repeats)
    spec, ex = build_executor(spec, None, "cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16, grid,
                              headroom_gb=8.0)
    prof = Profiler(spec, ex, grid, None, {}, progress=False)
    print(f"# {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; {spec.name}, full depth, "
          f"{ex.num_blocks} blocks of {ex.block_size}")
    print("| balance above | batch | mean ctx | contexts | blocks | longest | ms | vs uniform+contiguous, same balance |")
    print("|---|---|---|---|---|---|---|---|")
    for balance in args.balance.split(","):
        paged_attention.BALANCE_ABOVE = None if balance == "none" else int(balance)
        ex._segment_graphs.reset()  # the split is chosen when a graph is captured
        rng = np.random.default_rng(0)  # the same batches for every setting
        for b in [int(x) for x in args.batches.split(",")]:
            for c in [int(x) for x in args.contexts.split(",")]:
                base = None
                for kind in ("uniform", "mixed"):
                    ctx = contexts_for(kind, b, c, rng)
                    if not prof.fits(sum(ctx) + b * 16, b):
                        continue
                    for layout in args.layouts.split(","):
                        _, plan = prof.state(ctx)
                        place(plan.seqs, layout, ex.num_blocks, rng)
                        times, _ = prof.time_plan(plan)
                        ms = 1e3 * float(np.median(times))
                        base = base or ms
                        print(f"| {balance} | {b} | {c} | {kind} | {layout} | {max(ctx)} | {ms:.3f} | "
                              f"{ms / base:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
