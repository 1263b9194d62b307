"""The seed paper's experiment on the GPU executor: all_confident + fill against full depth, batch 1-64.

Miao et al. (2024) report up to 1.25x throughput over vLLM at full depth with all-confident batching
and KV fill. Here: a closed batch of B requests (all arriving at once, B sequences at most per
iteration), each with a 512-token prompt and 128 generated tokens, served by the GPU executor in
replay mode at the Llama-2-7B shape with exits replayed from the project's recorded trace (exits at
layers 8/16/24 of 32), for every exit rule x KV policy; beside each, the simulator's prediction of the
same run (its default cost model, `--cost-model auto`: the bundled H100 profile for this shape; the table in
docs/seed_paper.md predates that default and was priced analytically). Quality is the share of tokens equal to full depth, from the trace
(exact-KV assumption; see docs/quality.md for what each KV policy really costs).

    PYTHONPATH=$PWD python benchmarks/seed_paper.py [--batches 1,2,4,8,16,32,64] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from eesim.config import SimConfig
from eesim.defaults import load_exit_trace
from eesim.hardware import HARDWARE_PRESETS
from eesim.model_spec import MODEL_PRESETS
from eesim.request import Request
from eesim.scheduler import SchedulerConfig
from eesim.workload import Workload

POLICIES = ("full/fill", "all_confident/fill", "all_confident/copy_hidden", "all_confident/recompute",
            "per_sequence/fill", "per_sequence/copy_hidden", "quorum:q=0.75/fill")


def closed_batch(batch: int, prompt: int, output: int) -> Workload:
    requests = tuple(Request(i, 0.0, prompt, output) for i in range(batch))
    return Workload(requests, f"closed batch of {batch}: prompt {prompt}, output {output}")


def base_config(batches: list[int], prompt: int, output: int, threshold: str, tiny: bool = False) -> SimConfig:
    """The experiment's configuration: the Llama-2-7B shape (``small`` with ``tiny``) on the H100 preset, the
    recorded exits, a cache for the largest closed batch, chunks large enough for a whole prompt."""
    model = MODEL_PRESETS["small" if tiny else "llama2-7b"]
    trace, model, _ = load_exit_trace("default", model)
    blocks = max(batches) * -(-(prompt + output) // 16) + 64
    return SimConfig(model, HARDWARE_PRESETS["h100"], trace, threshold=threshold,
                     scheduler=SchedulerConfig(max_num_seqs=max(batches), max_num_batched_tokens=8192,
                                               num_blocks=blocks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--threshold", default="0.9")
    parser.add_argument("--tiny", action="store_true", help="the small preset on CPU (checks the script)")
    parser.add_argument("--no-simulation", action="store_true")
    args = parser.parse_args()

    from eesim.gpu.serve import build_executor, serve

    batches = [int(b) for b in args.batches.split(",")]
    base = base_config(batches, args.prompt, args.output, args.threshold, args.tiny)
    model, trace, blocks = base.model, base.trace, base.scheduler.num_blocks
    device = "cpu" if args.tiny else None
    executor = build_executor(base, "replay", blocks, device=device, backend="torch" if args.tiny else None)
    rows = []
    for batch in batches:
        workload = closed_batch(batch, args.prompt, args.output)
        for pair in args.policies.split(","):
            rule, kv = pair.split("/")
            config = replace(base, exit_rule=rule, kv_policy=kv,
                             scheduler=replace(base.scheduler, max_num_seqs=batch))
            executor.configure(model, rule, kv, config.measure, config.threshold, "replay", trace)
            serve(workload, config, executor)  # warm-up: graph captures, kernel compilation
            started = time.perf_counter()
            measured = serve(workload, config, executor).summary
            wall = time.perf_counter() - started
            row = {"batch": batch, "policy": pair.replace("/", " + "), "tok_s": measured["throughput_tok_s"],
                   "itl_mean_ms": measured["itl_mean"] * 1e3, "layers": measured["mean_layers"],
                   "quality": measured["quality"], "forced": measured["forced_share"], "wall_s": wall}
            if not args.no_simulation:
                from eesim.simulator import simulate

                predicted = simulate(workload, config).summary
                row.update(sim_tok_s=predicted["throughput_tok_s"], sim_itl_mean_ms=predicted["itl_mean"] * 1e3)
            rows.append(row)
            print(f"B={batch:3d} {pair:28s} {row['tok_s']:9.1f} tok/s  ITL {row['itl_mean_ms']:6.2f} ms  "
                  f"layers {row['layers']:5.2f}  quality {row['quality']:.3f}"
                  + (f"  | simulated {row['sim_tok_s']:9.1f} tok/s ITL {row['sim_itl_mean_ms']:6.2f} ms"
                     if "sim_tok_s" in row else ""), flush=True)
    table = pd.DataFrame(rows)
    full = table[table.policy == "full + fill"].set_index("batch")
    table["speedup"] = table["tok_s"] / table["batch"].map(full["tok_s"])
    if "sim_tok_s" in table:
        table["sim_speedup"] = table["sim_tok_s"] / table["batch"].map(full["sim_tok_s"])
        table["sim_error"] = table["sim_tok_s"] / table["tok_s"] - 1
    out = Path(os.environ.get("OUT", "eesim-out"))
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "seed_paper.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
