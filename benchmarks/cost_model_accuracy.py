"""Benchmark: how well the profile-backed cost model predicts the GPU executor (GPU; runs on CPU too).

(a) held-out grid points: the profiler's ``offset`` grid (batches, contexts, chunks between those of
    the default grid) is measured on the executor; each point's work is priced by ProfileCostModel
    fitted on ``--profile`` only; relative error of the prediction against the measured median.
(b) whole iterations: a workload (prompts 32..1024 tokens log-uniform, outputs 16..256, all queued at
    the start, at most ``--max-seqs`` running, chunked prefill of ``--chunk`` tokens) is served by the
    real Scheduler and the GPU executor (replay mode on a synthetic exit trace, all_confident + fill,
    max_prob >= 0.9: real exits and fills). Every plan is executed twice and the second run timed (the
    first may capture CUDA graphs for a new batch shape); the prediction is compared with that
    ``elapsed`` (host scheduling time is reported beside it, not added). Errors overall, by kind of
    iteration (decode, decode with exits (fill), mixed prefill + decode), and the worst cases.
(c) the noise floor (``--repeat-time`` > 0, right after (a)): a random sample of ``--profile``'s own grid
    points (the held-out components) measured again on this executor, against the profile's medians. No cost
    model can price a held-out point closer than the machine repeats its own grid points between two sweeps;
    meaningful when ``--profile`` was measured on this machine earlier in the same session.

Goals: held-out median <= 2 %, p95 <= 6 %; whole iterations median <= 3 %, p95 <= 8 %.
Writes cost_model_accuracy.md, heldout.csv, iterations.csv, repeat.csv (and the held-out profile) to $OUT, and
heldout_work.npz / iterations_work.npz: the IterationWork of every CSV row, in order (``load_works``), so
a changed cost model can be re-scored offline against the measured_ms columns without a GPU.
iterations.csv also records each iteration's prompt chunks (starts, tokens) and the longest decode
context (the paged-attention block-table width follows it, not the mean).

Usage:  PYTHONPATH=$PWD python benchmarks/cost_model_accuracy.py --profile traces/profiles/llama2-7b.parquet
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eesim.plan import IterationWork  # noqa: E402
from eesim.profile_cost import ProfileCostModel, load_profile  # noqa: E402
from eesim.profile_data import environment, spec_to_meta  # noqa: E402
from eesim.profiler import GRIDS, Profiler, ProfileGrid, build_executor, resolve_model  # noqa: E402


def stats(err: np.ndarray) -> str:
    if not len(err):
        return "n=0"
    a = np.abs(err)
    return (f"n={len(a)}, median {np.median(a):.2%}, p95 {np.percentile(a, 95):.2%}, max {a.max():.2%}, "
            f"mean signed {np.mean(err):+.2%}")


def kind(work) -> str:
    if float(work.attn_context[0, 0] - work.kv_read[0, 0]) > 0.5:
        return "mixed"
    if work.proj_rows.any():
        return "decode+fill"
    return "decode"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--model", default="", help="preset or checkpoint (default: the profile's shape name)")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--max-seqs", type=int, default=48)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--heldout-time", type=float, default=60.0, help="seconds for the held-out sweep")
    parser.add_argument("--device", default="")
    parser.add_argument("--backend", default="")
    parser.add_argument("--grid", default="offset")
    parser.add_argument("--headroom-gb", type=float, default=6.0)
    parser.add_argument("--repeat-time", type=float, default=0.0,
                        help="seconds for (c): the profile's own points measured again (0: skip)")
    parser.add_argument("--repeat-points", type=int, default=80, help="grid points sampled for (c)")
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT") or "eesim-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_begin = time.perf_counter()

    prof = load_profile(args.profile)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec, weights = resolve_model(args.model or prof.meta.get("shape") or prof.model.name, device, dtype)
    spec = spec.with_exits(prof.model.exit_layers)
    grid = GRIDS[args.grid] if args.grid in GRIDS else GRIDS["offset"]
    spec, ex = build_executor(spec, weights, device, dtype, grid, args.headroom_gb, args.backend or None)
    cost = ProfileCostModel(prof, spec, kv_policy="fill", include_schedule=False)
    lines = [f"# Cost model accuracy: {spec.name}", "",
             f"Profile: `{args.profile}` ({len(prof.frame)} points, measured on {prof.meta.get('gpu')}, "
             f"{prof.meta.get('date')}). This run: {environment()}.", "",
             f"Command: `{' '.join(sys.argv)}`", ""]

    # ---- (a) held-out grid points ----
    meta = {"format": 1, "model": spec_to_meta(spec), "grid": grid.to_meta(), **environment()}
    held = Profiler(spec, ex, grid, out_dir / "heldout.parquet", meta, progress=False, time_limit=args.heldout_time)
    if held.out.exists():
        held.out.unlink()
        held.frame = held.frame.iloc[:0]
        held.done = set()
    held.run()
    rows = []
    for point, work in held.works.items():
        meas = float(held.frame.set_index(["component", "layers", "batch", "context", "tokens", "checks"])
                     .loc[point, "median_s"])
        cost.reset_counters()
        pred = float(cost.iteration_time(work)[0])
        rows.append(dict(component=point[0], layers=point[1], batch=point[2], context=point[3], tokens=point[4],
                         checks=point[5], measured_ms=meas * 1e3, predicted_ms=pred * 1e3, error=pred / meas - 1,
                         extrapolated=cost.extrapolated > 0))
    ho = pd.DataFrame(rows)
    ho.to_csv(out_dir / "heldout.csv", index=False)
    save_works(out_dir / "heldout_work.npz", list(held.works.values()))
    lines += ["## (a) Held-out grid points", "",
              f"Grid `{args.grid}` measured now ({len(ho)} points in {args.heldout_time:.0f} s at most; "
              f"{', '.join(held.skipped) or 'complete'}); goal median <= 2 %, p95 <= 6 %.", ""]
    if len(ho):
        lines.append(f"- all: {stats(ho['error'].to_numpy())}")
        inside = ho[~ho["extrapolated"]]
        lines.append(f"- inside the measured grid (no extrapolation): {stats(inside['error'].to_numpy())}")
        for comp, sub in ho.groupby("component"):
            lines.append(f"- {comp}: {stats(sub['error'].to_numpy())}")
        worst = ho.reindex(ho["error"].abs().sort_values(ascending=False).index).head(8)
        lines += ["", "Worst held-out points:", "", _table(worst)]
    print("\n".join(lines[-12:]), flush=True)
    if args.repeat_time > 0:
        lines += repeat_floor(prof, spec, ex, grid, meta, out_dir, args.repeat_time, args.repeat_points)
        print("\n".join(lines[-8:]), flush=True)

    # ---- (b) whole iterations from a workload ----
    from eesim.exit_trace import synthesize_exit_trace
    from eesim.request import Request, Sequence
    from eesim.scheduler import Scheduler, SchedulerConfig

    trace = synthesize_exit_trace(spec.num_layers, spec.all_exits, 256, seed=0)
    ex.configure(spec, "all_confident", "fill", "max_prob", 0.9, "replay", trace)
    rng = np.random.default_rng(0)
    limit = min(spec.max_context, 2048)
    sched = Scheduler(SchedulerConfig(max_num_seqs=args.max_seqs, max_num_batched_tokens=args.chunk,
                                      block_size=ex.block_size), spec, ex.policy, ex.num_blocks)
    for i in range(args.requests):
        prompt = int(np.exp(rng.uniform(np.log(32), np.log(min(1024, limit // 2)))))
        output = int(np.exp(rng.uniform(np.log(16), np.log(256))))
        seq = Sequence(Request(i, 0.0, prompt, output))
        ex.prepare(seq, i % trace.num_sequences)
        sched.add(seq)
    recs, works = [], []
    now = 0.0
    started = time.perf_counter()
    from eesim.gpu.serve import frozen_heap

    with frozen_heap():  # as a serving loop runs (eesim/gpu/serve.py): no full garbage collection mid-iteration
        while sched.has_work and len(recs) < args.iterations:
            t0 = time.perf_counter()
            plan = sched.schedule(now)
            host = time.perf_counter() - t0
            ex.execute(plan)  # may capture CUDA graphs for a new shape
            outcome = ex.execute(plan)
            elapsed = float(outcome.elapsed[0])
            now += elapsed
            sched.update(plan, outcome, [now])
            work = outcome.work
            cost.reset_counters()
            pred = float(cost.iteration_time(work)[0])
            works.append(work)
            ctx = plan.start[plan.can_exit] + 1
            chunks = ~plan.can_exit
            recs.append(dict(iteration=plan.index, kind=kind(work), batch=plan.batch_size, tokens=plan.num_batched_tokens,
                             prompt_chunks=int(chunks.sum()), chunk_starts=" ".join(map(str, plan.start[chunks].tolist())),
                             chunk_tokens=" ".join(map(str, plan.num_new[chunks].tolist())),
                             max_context=int(ctx.max()) if len(ctx) else 0,
                             decode_rows=plan.num_decode, exits=int((outcome.exit_index < spec.num_segments - 1).sum()),
                             reach=int(work.batch_reach[0]), mean_context=float(plan.start[plan.can_exit].mean() + 1)
                             if plan.num_decode else 0.0, measured_ms=elapsed * 1e3, predicted_ms=pred * 1e3,
                             schedule_us=host * 1e6, error=pred / elapsed - 1, extrapolated=cost.extrapolated > 0))
    it = pd.DataFrame(recs)
    it.to_csv(out_dir / "iterations.csv", index=False)
    save_works(out_dir / "iterations_work.npz", works)
    lines += ["", "## (b) Whole iterations served through the Scheduler", "",
              f"{len(it)} iterations of a queued workload ({args.requests} requests, prompts 32..1024, outputs "
              f"16..256, max {args.max_seqs} sequences, chunk {args.chunk} tokens), all_confident + fill, "
              f"max_prob >= 0.9 on a synthetic exit trace (replay); {time.perf_counter() - started:.0f} s. "
              f"Goal median <= 3 %, p95 <= 8 %.", ""]
    if len(it):
        lines.append(f"- all: {stats(it['error'].to_numpy())}")
        for k, sub in it.groupby("kind"):
            lines.append(f"- {k}: {stats(sub['error'].to_numpy())}")
        lines.append(f"- extrapolated iterations: {int(it['extrapolated'].sum())}")
        lines.append(f"- host scheduling time (not in the comparison): median {it['schedule_us'].median():.0f} us")
        worst = it.reindex(it["error"].abs().sort_values(ascending=False).index).head(10)
        lines += ["", "Worst iterations:", "", _table(worst)]
    lines += ["", f"Total {time.perf_counter() - t_begin:.0f} s."]
    text = "\n".join(lines) + "\n"
    (out_dir / "cost_model_accuracy.md").write_text(text)
    print("\n".join(lines[-20:]))
    print(f"wrote {out_dir}/cost_model_accuracy.md, heldout.csv, iterations.csv")


def repeat_floor(prof, spec, ex, held_grid: ProfileGrid, meta: dict, out_dir: Path, seconds: float,
                 points: int) -> list[str]:
    """(c): a random sample of the profile's grid points (the held-out grid's components) measured again now;
    the relative difference of the profile's median to the new one, as (a) reports a prediction's. Writes
    repeat.csv; returns the report's lines."""
    grid = replace(ProfileGrid.from_meta(prof.meta.get("grid", {})), components=held_grid.components, rounds=1)
    again = Profiler(spec, ex, grid, None, meta, progress=False, time_limit=seconds)
    known = prof.frame.set_index(["component", "layers", "batch", "context", "tokens", "checks"])["median_s"]
    candidates = [p for p in again.points() if p in known.index]
    rng = np.random.default_rng(1)
    keep = {candidates[i] for i in rng.choice(len(candidates), min(points, len(candidates)), replace=False)}
    again.done = set(again.points()) - keep
    again.run()
    rows = [dict(zip(("component", "layers", "batch", "context", "tokens", "checks"), point),
                 profile_ms=known.loc[point] * 1e3, measured_ms=med * 1e3, error=known.loc[point] / med - 1)
            for point, med in again.frame.set_index(["component", "layers", "batch", "context", "tokens",
                                                     "checks"])["median_s"].items()]
    rep = pd.DataFrame(rows)
    rep.to_csv(out_dir / "repeat.csv", index=False)
    lines = ["", "## (c) The noise floor: the profile's own points measured again", "",
             f"{len(rep)} of the profile's grid points (sampled at random from the held-out grid's components; "
             f"{', '.join(again.skipped) or 'complete'}), measured right after (a); the profile's median against "
             "the new one. A held-out error much below this is luck.", ""]
    if len(rep):
        lines.append(f"- all: {stats(rep['error'].to_numpy())}")
        for comp, sub in rep.groupby("component"):
            lines.append(f"- {comp}: {stats(sub['error'].to_numpy())}")
    return lines


def save_works(path: Path, works: list) -> None:
    """The IterationWork of every row of the matching CSV, stacked in order (one step each), so that the
    predictions can be recomputed offline (``load_works``) when the cost model changes."""
    if works:
        np.savez_compressed(path, **{name: np.concatenate([getattr(w, name) for w in works])
                                     for name in IterationWork.__slots__ if getattr(works[0], name) is not None})


def load_works(path) -> "IterationWork":
    """The works ``save_works`` wrote, as one record of T steps (``cost.iteration_time`` prices them all)."""
    data = np.load(path)
    steps = len(data["syncs"])  # records saved before ``carried`` existed carried nothing
    optional = ("decode_rows", "prompt_chunks")  # records saved before them: None (one chunk at most assumed)
    return IterationWork(*(data[name] if name in data else (None if name in optional else np.zeros(steps))
                           for name in IterationWork.__slots__))


def _table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
