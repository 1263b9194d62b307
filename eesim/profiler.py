"""``eesim profile``: measure the GPU executor's iteration-time components for one model shape.

The profiler drives the real ``GPUExecutor`` (random weights at the shape, or a checkpoint) with
synthetic plans written by a real ``Scheduler`` holding sequences at chosen context lengths, and times
``execute`` with CUDA events (``perf_counter`` on the CPU, where the timings mean nothing): warm-up
runs first, then ``repeats`` timed runs; median and quartiles go to the profile (profile_data.py).

The states' KV blocks are drawn at random from the pool (``ProfileGrid.block_spread``), as a serving pool that
has seen sequences come and go hands them out, not consecutive from block 0.

Components (coordinates in brackets; policy fill unless said; every decode row may exit):
  decode     [layers, batch, context]  a decode step of ``batch`` rows at ``context`` positions on average
             (spread evenly over context x (1 -/+ ``decode_spread``), as served batches mix contexts;
             the same for the decode rows of check, check_eager, mixed, proj and recompute). At
             layers = L the full-depth rule (no check; one graph plus the final head); at an exit layer e
             a rule that forces every row out at e: the checks at every exit up to e, then the fill of
             the L - e skipped layers. (The cost model takes the checks and the fill back out.)
  check      [batch, context, checks]  S - 1 exits checked, nobody leaves (head, measure, host sync each);
             its difference to decode at layers = L is the cost of the checks
  check_eager  the same on the executor's general path (what copy_hidden and recompute run for a step that
               starts owing K/V)
  check_eager_one  the same with only the first exit checked (checks 1; models of three exits or more): the
               general path's cost is a part per step (host-built metadata, eager boundaries) plus a part per
               check, and the two points tell them apart, so a model with fewer exits than the profile's
               (profile_restrict.py) is priced with the part per step whole, not scaled with the checks
  fill       [layers skipped, batch rows]  one ``fused_fill`` launch as the executor issues it
  prefill    [tokens, context]  one prompt chunk of ``tokens`` after ``context`` cached positions, full rule
  mixed      [batch, tokens, checks]  ``batch`` decode rows at ``mixed_context`` plus a chunk of ``tokens``
             at position 0; checks 0 (full rule) or S - 1 (checked, nobody leaves)
  proj       [layers, batch, tokens, checks]  copy_hidden: ``tokens`` owed positions ride along in the K/V
             projection of the last ``layers`` layers of a decode step of ``batch`` rows at ``owed_context``
             that checks every exit and nobody leaves (S - 1 checks: owed rows exist only under rules that
             check, on the general path; the cost model takes ``check_eager`` out)
  recompute  [layers, batch, tokens, checks]  recompute: ``tokens`` owed positions re-run the last
             ``layers`` layers beside their rows, the step checked as for proj
  leave      [layer, batch, context, checks]  every row forced out at exit ``layer`` (``checks`` exits
             checked, the last one where they leave) under recompute, nobody owing: the graphed path
  leave_owing_proj, leave_owing_recompute  the same step when the batch starts owing K/V (one position per
             row, owed from that exit layer on, so none of it runs in this step), under copy_hidden or
             recompute: the general path. Served, such steps are most of what these policies' early exits
             cost (a row that left owes; its next step often leaves again); their difference to ``leave`` is
             what owing adds to a step
  schedule   [batch]  host seconds of ``Scheduler.schedule`` for ``batch`` running decode sequences
  bookkeeping [batch] host seconds a serving loop spends per iteration after the GPU: the executor's
                      tail after its last kernel (outcome, work count), ``Scheduler.update`` and the
                      iteration log's record, for ``batch`` running decode sequences
  fixed      []  the smallest iteration: one row, 16 positions, full depth

The file is rewritten atomically after each grid point; a rerun skips the points already in it (it
refuses a file of another model shape). The import path stays free of simpy.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from eesim.errors import EesimError, require
from eesim.profile_data import (COORDS, Profile, empty_frame, environment, read_profile, shape_key, shape_name,
                                spec_to_meta, write_profile)

PROFILE_DIR = Path(__file__).resolve().parents[1] / "traces" / "profiles"
LEAVE_COMPONENTS = ("leave", "leave_owing_proj", "leave_owing_recompute")


@dataclass
class ProfileGrid:
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    contexts: tuple[int, ...] = (16, 128, 512, 1024, 2048, 4096)
    decode_layers: tuple[int, ...] = ()  # () : every exit layer and the last
    chunks: tuple[int, ...] = (16, 64, 256, 1024, 2048)
    prefill_contexts: tuple[int, ...] = (0, 512, 2048)
    mixed_batches: tuple[int, ...] = (1, 8, 32, 128)
    mixed_chunks: tuple[int, ...] = (64, 256, 512, 2048)  # 256: short chunks cost about what 64 do (see cost_model_accuracy.md)
    mixed_context: int = 512
    check_context: int = 512
    owed_rows: tuple[int, ...] = (1, 8, 32, 128)
    owed_batch: int = 8
    owed_context: int = 512
    leave_batches: tuple[int, ...] = (1, 2, 4, 8)
    components: tuple[str, ...] = ("schedule", "bookkeeping", "fixed", "decode", "check", "check_eager",
                                   "check_eager_one", "fill", "prefill", "mixed",
                                   "proj", "recompute", "leave", "leave_owing_proj", "leave_owing_recompute")
    warmup: int = 2
    repeats: int = 7
    # decode rows' contexts spread evenly over context x (1 -/+ decode_spread), their mean exact (served
    # batches mix contexts, and a mixed batch runs slower than a uniform one of the same mean: up to 10%,
    # benchmarks/decode_mix.py); 0: every row at the point's context
    decode_spread: float = 0.75
    # the states' KV blocks drawn in a random order from this leading share of the pool, as a pool that has
    # served for a while hands them out (0: consecutive blocks from block 0, as profiles before the third session
    # of 2026-11-23). On the H100 decode steps over scattered blocks ran 1-2.5% slower at batch 1, 0-1.7% at
    # 2-32 rows, in two runs (benchmarks/kv_scatter.py, docs/benchmarks.md)
    block_spread: float = 1.0
    # points whose step waits on the host mid-pass (exit checks, forced exits, owed rows beside the checks)
    # can be measured in several rounds over the sweep, their timings pooled (such a point's time moves with
    # the host for seconds at a time). Off by default: on the H100 (2026-11-23, docs/fidelity.md, sixth
    # measurement) the pooled owed-row points came out ~2 ms below single-round ones and below what served
    # steps with owed rows measured, and the simulator's recompute errors grew from -2..-5% to -10..-18%
    rounds: int = 1
    # the executor's graphed_owing (decode steps owing K/V graphed up to where it rides): a profile prices the
    # executor it measured, so serve with the same setting
    # (profiles without the key in their metadata were measured before it existed: False)
    graphed_owing: bool = True

    def to_meta(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: dict) -> ProfileGrid:
        """The grid a profile's metadata (``meta["grid"]``) records; keys it lacks take their defaults, but
        ``graphed_owing`` False: profiles from before the key measured the executor without it."""
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items() if k in cls.__dataclass_fields__}
        return cls(**{"graphed_owing": False, **known})


GRIDS = {
    "default": ProfileGrid(),
    # the held-out grid of benchmarks/cost_model_accuracy.py: between the default grid's points
    "offset": ProfileGrid(batches=(3, 6, 12, 24, 48, 96), contexts=(64, 256, 768, 1536, 3072),
                          decode_layers=(), chunks=(32, 128, 512, 1536), prefill_contexts=(256, 1024),
                          mixed_batches=(4, 16, 64), mixed_chunks=(128, 1024), owed_rows=(4, 16, 64),
                          components=("decode", "check", "prefill", "mixed")),
    # a few points (the CPU tests; timings meaningless)
    "tiny": ProfileGrid(batches=(1, 4), contexts=(16, 64), chunks=(16, 48), prefill_contexts=(0, 32),
                        mixed_batches=(2,), mixed_chunks=(16,), mixed_context=32, check_context=32, owed_rows=(2,),
                        owed_batch=2, owed_context=32, leave_batches=(1, 2), warmup=1, repeats=2, rounds=2),
}


class Profiler:
    """Measures one shape's components on one executor; results accumulate in ``self.frame``."""

    def __init__(self, spec, executor, grid: ProfileGrid, out: str | Path | None, meta: dict,
                 progress: bool = True, time_limit: float = 0.0) -> None:
        import torch

        self.torch = torch
        self.spec = spec
        self.ex = executor
        self.grid = grid
        self.out = Path(out) if out else None
        self.meta = meta
        self.progress = progress
        self.time_limit = time_limit
        self.frame = empty_frame()
        self.done: set[tuple] = set()
        self.works: dict[tuple, object] = {}  # point -> IterationWork of its last run (the accuracy benchmark)
        self._times: dict[tuple, list[float]] = {}  # point -> timings measured by this run (pooled over rounds)
        self.skipped: list[str] = []
        self.cuda = executor.device.type == "cuda"
        if self.out is not None and self.out.exists():
            old = read_profile(self.out)
            if shape_key(old.model) != shape_key(spec):
                raise EesimError(f"profile {str(self.out)!r} is for shape {old.model.name!r} "
                                 f"({old.model.num_layers} layers, d={old.model.hidden_size}, exits "
                                 f"{list(old.model.exit_layers)}), not {spec.name!r}: choose another --out")
            self.frame = old.frame
            self.done = old.done()
        self.capacity = executor.num_blocks * executor.block_size  # KV positions the cache holds

    # ---- plans -----------------------------------------------------------------------------------
    def contexts(self, ctx: int, batch: int) -> list[int]:
        """The decode rows' contexts of a point at ``ctx``: spread evenly over ctx x (1 -/+ decode_spread),
        within 2 .. max_context, their sum exactly ``batch * ctx`` (so the KV bytes read are the grid's)."""
        half = min(self.grid.decode_spread * ctx, self.spec.max_context - ctx, ctx - 2)
        if batch < 2 or half < 1:
            return [ctx] * batch
        values = np.rint(np.linspace(ctx - half, ctx + half, batch)).astype(np.int64)
        values[-1] += batch * ctx - int(values.sum())
        return values.tolist()

    def state(self, decode_contexts: list[int], prefill: tuple[int, int] | None = None):
        """A scheduler holding decode sequences (``ctx - 1`` positions cached at full depth, the next to
        compute) and optionally one prompt (``p`` positions cached, a chunk of ``n``); and its plan."""
        from eesim.request import Request, Sequence, Status
        from eesim.scheduler import Scheduler, SchedulerConfig

        ex, spec = self.ex, self.spec
        rows = len(decode_contexts) + (prefill[1] if prefill else 0)
        sched = Scheduler(SchedulerConfig(max_num_seqs=len(decode_contexts) + 1, max_num_batched_tokens=max(rows, 1),
                                          block_size=ex.block_size), spec, ex.policy, ex.num_blocks)
        if self.grid.block_spread > 0:
            sched.allocator.scatter(self.grid.block_spread)
        for i, ctx in enumerate(decode_contexts):
            seq = Sequence(Request(i, 0.0, ctx - 1, 1 << 20))
            seq.num_computed, seq.num_generated = ctx - 1, 1
            seq.output_tokens = [i % spec.vocab_size]
            seq.blocks = sched.allocator.allocate(i, sched.allocator.blocks_for(ctx))
            seq.status = Status.RUNNING
            sched.ledger.add(i, ctx + 1)
            sched.ledger.record(i, 0, ctx - 1, spec.num_layers)
            sched.running.append(seq)
        if prefill is not None:
            p, n = prefill
            i = len(decode_contexts)
            seq = Sequence(Request(i, 0.0, p + n, 4))
            seq.num_computed = p
            seq.blocks = sched.allocator.allocate(i, sched.allocator.blocks_for(max(p, 1)))
            seq.status = Status.RUNNING
            sched.ledger.add(i, p + n + 4)
            if p:
                sched.ledger.record(i, 0, p, spec.num_layers)
            sched.running.append(seq)
        plan = sched.schedule()
        return sched, plan

    def fits(self, positions: int, rows: int = 1) -> bool:
        bs = self.ex.block_size
        if positions > rows * self.spec.max_context:
            return False
        return rows * bs + positions + bs <= self.capacity

    # ---- timing ----------------------------------------------------------------------------------
    def time_plan(self, plan, owed=None):
        ex = self.ex
        if owed is not None:
            plan.owed = owed
        times, out = [], None
        for i in range(self.grid.warmup + self.grid.repeats):
            out = ex.execute(plan)
            if i >= self.grid.warmup:
                times.append(float(out.elapsed[0]))
        return times, out.work

    def time_call(self, fn):
        from eesim.gpu.timing import time_call

        return time_call(fn, self.grid.warmup, self.grid.repeats, self.cuda)

    def record(self, point: tuple, times: list[float], work=None) -> None:
        """Write a point's timings; a point measured again (a later round) pools its timings with the earlier."""
        import pandas as pd

        if point in self._times:  # a later round: replace the point's row by the pooled one
            times = self._times[point] + list(times)
            same = np.ones(len(self.frame), dtype=bool)
            for name, value in zip(("component", *COORDS), point):
                same &= (self.frame[name] == value).to_numpy()
            self.frame = self.frame[~same].reset_index(drop=True)
        self._times[point] = list(times)
        q25, q50, q75 = np.percentile(times, [25, 50, 75])
        row = dict(zip(("component", *COORDS), point))
        row.update(median_s=float(q50), p25_s=float(q25), p75_s=float(q75), repeats=len(times))
        self.frame = pd.concat([self.frame, pd.DataFrame([row])], ignore_index=True) if len(self.frame) \
            else pd.DataFrame([row]).astype(self.frame.dtypes.to_dict())
        self.done.add(point)
        if work is not None:
            self.works[point] = work
        if self.out is not None:
            write_profile(self.out, self.frame, self.meta)

    # ---- the sweep -------------------------------------------------------------------------------
    def points(self) -> list[tuple]:
        """Every grid point of the enabled components, in measuring order (grouped by executor setting)."""
        g, spec = self.grid, self.spec
        L, S = spec.num_layers, spec.num_segments
        exits = spec.all_exits
        layers = g.decode_layers or exits
        pts = []
        comps = g.components
        if "schedule" in comps:
            pts += [("schedule", 0, b, 0, 0, 0) for b in g.batches]
        if "bookkeeping" in comps:
            pts += [("bookkeeping", L, b, 0, 0, 0) for b in g.batches]
        if "fixed" in comps:
            pts.append(("fixed", L, 1, 16, 0, 0))
        if "decode" in comps and L in layers:  # full depth first (the checks are priced against it)
            pts += [("decode", L, b, c, 0, 0) for b in g.batches for c in g.contexts if self.fits(b * c, b)]
        if "check" in comps and S > 1:
            pts += [("check", L, b, g.check_context, 0, S - 1) for b in g.batches
                    if self.fits(b * g.check_context, b)]
        if "check_eager" in comps and S > 1:
            pts += [("check_eager", L, b, g.check_context, 0, S - 1) for b in g.batches
                    if self.fits(b * g.check_context, b)]
        if "check_eager_one" in comps and S > 2:
            pts += [("check_eager_one", L, b, g.check_context, 0, 1) for b in g.batches
                    if self.fits(b * g.check_context, b)]
        if "fill" in comps and S > 1:
            pts += [("fill", L - e, b, 0, 0, 0) for e in spec.exit_layers for b in g.batches]
        if "prefill" in comps:
            pts += [("prefill", L, 0, p, n, 0) for n in g.chunks for p in g.prefill_contexts
                    if p + n <= spec.max_context and self.fits(p + n)]
        if "mixed" in comps:
            for k in ((0, S - 1) if S > 1 else (0,)):
                pts += [("mixed", L, d, g.mixed_context, n, k) for d in g.mixed_batches for n in g.mixed_chunks
                        if self.fits(d * g.mixed_context + n, d + 1)]
        for comp in ("proj", "recompute"):
            if comp in comps and S > 1:
                depths = sorted({spec.exit_layers[0], spec.exit_layers[len(spec.exit_layers) // 2],
                                 spec.exit_layers[-1]})
                pts += [(comp, L - d, g.owed_batch, g.owed_context, m, S - 1) for d in depths for m in g.owed_rows
                        if m < g.owed_batch * (g.owed_context - 1) and self.fits(g.owed_batch * g.owed_context,
                                                                                 g.owed_batch)]
        if S > 1:  # per exit layer, the three kinds of leave step one after the other (one configure each)
            pts += [(c, e, b, g.check_context, 0, k + 1) for k, e in enumerate(spec.exit_layers)
                    for c in LEAVE_COMPONENTS if c in comps for b in g.leave_batches
                    if self.fits(b * g.check_context, b)]
        if "decode" in comps:  # the exit layers last: one configure per layer
            for e in sorted(x for x in layers if x != L):
                pts += [("decode", e, b, c, 0, 0) for b in g.batches for c in g.contexts if self.fits(b * c, b)]
        return pts

    def run(self) -> Profile:
        todo = [p for p in self.points() if p not in self.done]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"profile {self.spec.name}", unit="pt", dynamic_ncols=True)
        started = time.perf_counter()
        setting = None
        again = [p for p in todo if self.host_bound(p)]
        passes = [todo] + [again] * (max(1, self.grid.rounds) - 1)
        try:
            for r, points in enumerate(passes):
                for point in points:
                    if self.time_limit and time.perf_counter() - started > self.time_limit:
                        self.skipped.append(f"time limit of {self.time_limit:.0f} s reached in round {r + 1} "
                                            f"of {len(passes)} (rerun to resume the first round)")
                        return Profile(self.frame, self.meta, str(self.out or ""))
                    setting = self.measure(point, setting)
                    if bar is not None and r == 0:
                        bar.update(1)
                        bar.set_postfix_str(f"{point[0]} {point[1:]}")
        finally:
            if bar is not None:
                bar.close()
        return Profile(self.frame, self.meta, str(self.out or ""))

    def host_bound(self, point: tuple) -> bool:
        """Whether a point's step waits on the host mid-pass (measured in ``grid.rounds`` rounds)."""
        comp, layers, _, _, _, checks = point
        return comp in ("check", "check_eager", "check_eager_one", "proj", "recompute", *LEAVE_COMPONENTS) or (comp == "mixed" and checks > 0) or \
            (comp == "decode" and layers < self.spec.num_layers)

    def _configure(self, setting, want):
        if setting != want:
            rule, policy = want
            self.ex.configure(self.spec, rule, policy, "max_prob", 0.9, "model", None)
        return want

    def measure(self, point: tuple, setting):
        """Measure one grid point; returns the executor setting it left in place."""
        comp, layers, batch, ctx, tokens, checks = point
        spec, ex = self.spec, self.ex
        L = spec.num_layers
        from eesim.forced_exits import ExitAt, NeverExit

        if comp == "schedule":
            times = []
            for i in range(self.grid.warmup + max(self.grid.repeats, 5)):
                sched, _ = self.state([512] * batch) if self.fits(512 * batch, batch) else self.state([16] * batch)
                t0 = time.perf_counter()
                sched.schedule()
                if i >= self.grid.warmup:
                    times.append(time.perf_counter() - t0)
            self.record(point, times)
            return setting
        if comp == "bookkeeping":
            from eesim.metrics import IterationLog

            if setting != ("full", "fill"):
                ex.configure(spec, "full", "fill", "max_prob", 0.9, "model", None)
                setting = ("full", "fill")
            ctx = 512 if self.fits(512 * batch, batch) else 16
            times = []
            for i in range(self.grid.warmup + max(self.grid.repeats, 5)):
                sched, plan = self.state([ctx] * batch)
                t0 = time.perf_counter()
                outcome = ex.execute(plan)
                tail = max(0.0, time.perf_counter() - t0 - float(outcome.elapsed[0]))
                t1 = time.perf_counter()
                sched.update(plan, outcome, [1.0])
                IterationLog().record(0, plan, outcome, 0.0, [1.0], sched)
                if i >= self.grid.warmup:
                    times.append(tail + time.perf_counter() - t1)
            self.record(point, times)
            return setting
        if comp in ("fixed", "decode"):
            k = spec.all_exits.index(layers)
            want = ("full", "fill") if layers == L else (f"exit_at:{k}", "fill")
            if setting != want:
                rule = "full" if layers == L else ExitAt(k)
                ex.configure(spec, rule, "fill", "max_prob", 0.9, "model", None)
                setting = want
            _, plan = self.state(self.contexts(ctx, batch))
            times, work = self.time_plan(plan)
            self.record(point, times, work)
            return setting
        if comp in ("check", "check_eager", "check_eager_one"):
            one = comp == "check_eager_one"
            want = ("never1" if one else "never", "fill" if comp == "check" else "copy_hidden")
            if setting != want:  # check_eager_one: the model with only its first exit
                ex.configure(spec.with_exits(spec.exit_layers[:1]) if one else spec, NeverExit(), want[1],
                             "max_prob", 0.9, "model", None)
                setting = want
            _, plan = self.state(self.contexts(ctx, batch))
            # eager: the general path, which copy_hidden and recompute take for a step that starts owing K/V
            ex.graphed_decode = comp == "check"
            try:
                times, work = self.time_plan(plan)
            finally:
                ex.graphed_decode = True
            # check_eager_one's work counts a one-exit model's segments: not priceable by the profile's model
            self.record(point, times, None if one else work)
            return setting
        if comp == "fill":
            self.record(point, self.time_call(self._fill_call(batch, L - layers)))
            return setting
        if comp in ("prefill", "mixed"):
            want = ("full" if checks == 0 else "never", "fill")
            if setting != want:
                ex.configure(spec, "full" if checks == 0 else NeverExit(), "fill", "max_prob", 0.9, "model", None)
                setting = want
            if comp == "prefill":
                _, plan = self.state([], (ctx, tokens))
            else:
                _, plan = self.state(self.contexts(ctx, batch), (0, tokens))
            times, work = self.time_plan(plan)
            self.record(point, times, work)
            return setting
        if comp in ("proj", "recompute"):
            policy = "copy_hidden" if comp == "proj" else "recompute"
            want = ("never" if checks else "full", policy)
            if setting != want:
                ex.configure(spec, NeverExit() if checks else "full", policy, "max_prob", 0.9, "model", None)
                setting = want
            contexts = self.contexts(ctx, batch)
            if min(contexts) - 2 - (tokens - 1) // batch < 0:  # the shortest row cannot hold its owed positions
                contexts = [ctx] * batch
            _, plan = self.state(contexts)
            depth = L - layers
            owed = [[] for _ in range(batch)]
            for j in range(tokens):  # owed positions spread over the rows, the most recent first
                b = j % batch
                owed[b].append((contexts[b] - 2 - j // batch, depth))
            owed = [sorted(o) for o in owed]
            times, work = self.time_plan(plan, owed)
            self.record(point, times, work)
            return setting
        if comp in LEAVE_COMPONENTS:
            policy = "copy_hidden" if comp == "leave_owing_proj" else "recompute"
            k = spec.all_exits.index(layers)
            want = (f"exit_at:{k}", policy)
            if setting != want:
                ex.configure(spec, ExitAt(k), policy, "max_prob", 0.9, "model", None)
                setting = want
            contexts = self.contexts(ctx, batch)
            _, plan = self.state(contexts)
            # each row owes its previous position from this exit on: owing sends the step down the general
            # path, and none of it runs in a step that leaves here
            owed = None if comp == "leave" else [[(c - 2, layers)] for c in contexts]
            times, work = self.time_plan(plan, owed)
            self.record(point, times, work)
            return setting
        raise EesimError(f"profile: unknown component {comp!r}")

    def _fill_call(self, rows: int, exit_layer: int):
        torch, ex, spec = self.torch, self.ex, self.spec
        h = torch.randn(rows, spec.hidden_size, device=ex.device, dtype=ex.dtype)
        layer = np.full(rows, exit_layer)
        pos = np.arange(rows) % max(spec.max_context - 1, 1)
        slots = np.arange(rows) % self.capacity
        return lambda: ex._fill_graphs.run(h, layer, pos, slots, spec.num_layers)  # as the executor launches it


# ---- set-up --------------------------------------------------------------------------------------

def resolve_model(name: str, device, dtype):
    """(spec, model or None): a preset name (random weights) or a checkpoint folder."""
    from eesim.model_spec import MODEL_PRESETS

    path = Path(name)
    if path.is_dir():
        from eesim.model.checkpoint import load_checkpoint

        model = load_checkpoint(path, dtype=dtype, device=device)
        return model.spec, model
    if name not in MODEL_PRESETS:
        raise EesimError(f"profile: {name!r} is neither a model preset ({sorted(MODEL_PRESETS)}) nor a checkpoint folder")
    spec = MODEL_PRESETS[name]
    return spec, None


def build_executor(spec, model, device, dtype, grid: ProfileGrid, headroom_gb: float, backend=None,
                   cuda_graphs: bool | None = None, max_positions: int = 0, block_size: int = 16):
    """An executor whose KV cache holds what the grid needs, as far as memory allows."""
    import torch

    from eesim.gpu.executor import GPUExecutor
    from eesim.gpu.weights import build_random_model

    device = torch.device(device)
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    if spec.dtype != dtype_name:
        spec = replace(spec, dtype=dtype_name)
    if model is None:
        model = build_random_model(spec, device, dtype, seed=0)
    per_pos = spec.kv_bytes_per_token + spec.hidden_size * spec.dtype_bytes  # KV + copy_hidden's kept state
    want = max_positions or max([b * (c + 2 * block_size) for b in grid.batches for c in grid.contexts]
                                + [spec.max_context + 2 * block_size])
    if device.type == "cuda":
        torch.cuda.synchronize()
        free, _ = torch.cuda.mem_get_info()
        have = int((free - headroom_gb * 1e9) // per_pos)
        require(have > spec.max_context, f"profile: too little GPU memory for a KV cache "
                                                  f"({free / 1e9:.1f} GB free, {headroom_gb} GB kept)")
        positions = min(want, have)
    else:
        positions = min(want, int(2e9 // per_pos))
    num_blocks = positions // block_size
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    ex = GPUExecutor(model, spec, "full", "fill", "max_prob", 0.9, mode="model", device=device, dtype=dtype,
                     num_blocks=num_blocks, block_size=block_size, backend=backend, cuda_graphs=cuda_graphs)
    with torch.no_grad():
        ex.k_cache.normal_(0, 1)
        ex.v_cache.normal_(0, 1)
    return spec, ex


def profile(model: str = "llama2-7b", out: str | Path | None = None, grid: ProfileGrid | str = "default",
            device: str | None = None, headroom_gb: float = 6.0, backend: str | None = None,
            progress: bool = True, time_limit: float = 0.0, command: str = "", exits: tuple[int, ...] = ()):
    """Profile ``model`` (a preset name or a checkpoint folder) into ``out``; returns (Profile, Profiler)."""
    import torch

    if isinstance(grid, str):
        require(grid in GRIDS, f"profile: unknown grid {grid!r}; choose one of {sorted(GRIDS)}")
        grid = GRIDS[grid]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    spec, weights = resolve_model(model, device, dtype)
    if exits:
        spec = spec.with_exits(exits)
    spec, ex = build_executor(spec, weights, device, dtype, grid, headroom_gb, backend)
    ex.graphed_owing = grid.graphed_owing
    env = environment()
    meta = {"format": 1, "model": spec_to_meta(spec), "shape": shape_name(spec), **env, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "grid": grid.to_meta(), "command": command,
            "check_context": grid.check_context, "mixed_context": grid.mixed_context,
            "owed_batch": grid.owed_batch, "owed_context": grid.owed_context,
            "kv_positions": ex.num_blocks * ex.block_size, "block_size": ex.block_size}
    if ex.cuda_graphs:  # prompt chunks and decode batches run padded (mixed_graphs.py, batch.MetaStager): the
        from eesim.gpu.batch import DECODE_PADDING  # cost model prices the padded sizes
        from eesim.gpu.mixed_graphs import TOKEN_PADDING

        meta["chunk_padding"] = dict(TOKEN_PADDING)
        meta["decode_padding"] = dict(DECODE_PADDING)
    prof = Profiler(spec, ex, grid, out, meta, progress=progress, time_limit=time_limit)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = prof.run()
    prof.seconds = {"setup": setup, "sweep": time.perf_counter() - t1}
    return result, prof


def default_path(spec) -> Path:
    return PROFILE_DIR / f"{shape_name(spec)}.parquet"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def grid_from_args(args) -> ProfileGrid:
    grid = GRIDS[args.grid] if args.grid in GRIDS else None
    require(grid is not None, f"profile: unknown grid {args.grid!r}; choose one of {sorted(GRIDS)}")
    over = {}
    for name in ("batches", "contexts", "chunks", "components"):
        value = getattr(args, name, "")
        if value:
            over[name] = tuple(value.split(",")) if name == "components" else _ints(value)
    require(args.repeats >= 0 and args.rounds >= 0, f"profile: --repeats and --rounds must not be negative (0: the grid's), got "
                                                    f"{args.repeats} and {args.rounds}")
    if args.repeats:
        over["repeats"] = args.repeats
    if args.warmup >= 0:
        over["warmup"] = args.warmup
    if args.rounds:
        over["rounds"] = args.rounds
    if getattr(args, "no_graphed_owing", False):
        over["graphed_owing"] = False
    return replace(grid, **over)


def cmd_profile(args: argparse.Namespace) -> int:
    from eesim.model_spec import MODEL_PRESETS

    grid = grid_from_args(args)
    out = args.out
    if not out:
        spec = MODEL_PRESETS.get(args.model)
        if spec is None:
            from eesim.model.checkpoint import read_config

            spec = read_config(args.model)["spec"]
            from eesim.profile_data import spec_from_meta

            spec = spec if not isinstance(spec, dict) else spec_from_meta(spec)
        out = default_path(spec)
    command = "eesim profile " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []) or sys.argv[1:])
    result, prof = profile(args.model, out, grid, args.device or None, args.headroom_gb, args.backend or None,
                           progress=not args.quiet, time_limit=args.time_limit, command=command,
                           exits=_ints(args.exits) if args.exits else ())
    print(f"wrote {out}: {len(result.frame)} grid points ({result.meta.get('gpu')}); set-up "
          f"{prof.seconds['setup']:.1f} s, sweep {prof.seconds['sweep']:.1f} s")
    for note in prof.skipped:
        print(f"note: {note}")
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama2-7b", help="model preset (random weights) or a checkpoint folder")
    p.add_argument("--out", default="", help="profile parquet (default: traces/profiles/<shape>.parquet)")
    p.add_argument("--grid", default="default", help=f"grid preset: {', '.join(GRIDS)}")
    p.add_argument("--batches", default="", help="override the grid's decode batch sizes (comma list)")
    p.add_argument("--contexts", default="", help="override the grid's decode contexts (comma list)")
    p.add_argument("--chunks", default="", help="override the grid's prefill chunk sizes (comma list)")
    p.add_argument("--components", default="", help="comma list of components to measure (default: all)")
    p.add_argument("--exits", default="", help="exit layers (default: the model's)")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per point (default: the grid's)")
    p.add_argument("--warmup", type=int, default=-1, help="warm-up runs per point (default: the grid's)")
    p.add_argument("--rounds", type=int, default=0,
                   help="rounds over the sweep for points whose step waits on the host (default: the grid's, 1)")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backend", default="", help="kernel backend: auto (default), torch or triton")
    p.add_argument("--headroom-gb", type=float, default=6.0, help="GPU memory left free beside the KV cache")
    p.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds of sweep (resume later)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-graphed-owing", action="store_true",
                   help="measure the executor with decode steps owing K/V on the general path from their first "
                        "layer (GPUExecutor.graphed_owing off)")


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``eesim profile`` on the CLI's subparsers."""
    p = subparsers.add_parser("profile", help="measure the GPU executor's cost components into a profile (GPU)")
    _add_arguments(p)
    p.set_defaults(func=cmd_profile)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eesim.profiler", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return cmd_profile(args)
    except EesimError as err:
        print(f"eesim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
