"""The discrete-event simulator: a SimPy process per replica drives the shared scheduler with the
simulator's executor; an arrival process routes requests to replicas.

One iteration is one explicit record: ``plan = scheduler.schedule()`` -> ``outcome =
executor.execute(plan)`` -> (simulated time passes by ``outcome.elapsed``) ->
``scheduler.update(plan, outcome)``. The GPU executor drives the same scheduler with wall time.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate

import numpy as np
import simpy

from eesim.config import SimConfig
from eesim.cost_choice import cost_label, resolve_cost_model
from eesim.cost_model import CostModel
from eesim.errors import EesimError
from eesim.metrics import ITERATION_COLUMNS, IterationLog, SimResult, build_result
from eesim.policies import exit_rule, kv_policy, measure
from eesim.policies.thresholds import parse_threshold
from eesim.request import Sequence
from eesim.router import make_router
from eesim.scheduler import Scheduler
from eesim.sim_executor import SimExecutor
from eesim.workload import Workload


class ReplicaSim:
    def __init__(self, env: simpy.Environment, index: int, scheduler: Scheduler, executor: SimExecutor,
                 log: IterationLog, keep_work: int, max_run_steps: int, next_arrival: list[float]) -> None:
        self.env = env
        self.index = index
        self.scheduler = scheduler
        self.executor = executor
        self.log = log
        self.keep_work = keep_work
        self.max_run_steps = max_run_steps
        self.next_arrival = next_arrival  # shared with the arrival process: [time of the next arrival]
        self.work_log: list = []
        self._wake: simpy.Event | None = None
        self.process = env.process(self.run())

    @property
    def outstanding(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    def submit(self, seq: Sequence, trace_sequence: int) -> None:
        self.executor.prepare(seq, trace_sequence)
        self.scheduler.add(seq)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def run(self):
        env, scheduler, executor = self.env, self.scheduler, self.executor
        while True:
            if not scheduler.has_work:
                self._wake = env.event()
                yield self._wake
                self._wake = None
            start = env.now
            plan = scheduler.schedule(start, self.max_run_steps)
            if not plan.seqs:
                raise RuntimeError("scheduler planned an empty iteration with work pending")
            outcome = executor.execute(plan)
            # A run stops with the step during which the next request arrives: step-by-step, the
            # scheduler would see that request at the following step. (Python floats: the same
            # sequential sums as np.cumsum, cheaper for a few hundred steps.)
            step_ends = list(accumulate(outcome.elapsed.tolist(), initial=start))[1:]
            keep = bisect_left(step_ends, self.next_arrival[0]) + 1
            if keep < outcome.steps:
                outcome, step_ends = outcome.head(keep), step_ends[:keep]
            yield env.timeout(step_ends[-1] - start)
            scheduler.update(plan, outcome, step_ends)
            self._record(plan, outcome, start, step_ends)

    def _record(self, plan, outcome, start: float, step_ends: list[float]) -> None:
        self.log.record(self.index, plan, outcome, start, step_ends, self.scheduler)
        if plan.index < self.keep_work:
            self.work_log.append((plan.index, [start, *step_ends[:-1]], step_ends, outcome.work))


def simulate(workload: Workload, config: SimConfig, cost_model: CostModel | None = None) -> SimResult:
    """Serve ``workload`` on ``config.replicas`` simulated replicas; returns per-request and
    per-iteration tables and a run summary. ``cost_model``: prices the iterations; by default the one
    ``config.cost_model`` names (eesim.cost_choice; the summary's ``cost_model`` says which priced the run)."""
    model = config.model
    rule = exit_rule(config.exit_rule)
    policy = kv_policy(config.kv_policy)
    conf_measure = measure(config.measure)
    threshold = parse_threshold(config.threshold, conf_measure)
    if config.replicas < 1:
        raise EesimError(f"replicas must be at least 1, got {config.replicas}")
    cost = cost_model if cost_model is not None else resolve_cost_model(config)
    num_blocks = config.scheduler.num_blocks or config.hardware.kv_blocks(model, config.scheduler.block_size)

    env = simpy.Environment()
    log = IterationLog()
    next_arrival = [float("inf")]
    replicas = []
    for index in range(config.replicas):
        scheduler = Scheduler(config.scheduler, model, policy, num_blocks)
        executor = SimExecutor(model, rule, policy, conf_measure, threshold, config.trace, cost)
        replicas.append(ReplicaSim(env, index, scheduler, executor, log, config.keep_work,
                                   config.max_run_steps, next_arrival))
    router = make_router(config.router)
    sequences = [Sequence(req) for req in workload.requests]
    trace_sequences = np.random.default_rng(config.seed).integers(config.trace.num_sequences, size=len(sequences))

    def arrivals():
        for seq, trace_sequence in zip(sequences, trace_sequences.tolist()):
            next_arrival[0] = seq.request.arrival_time
            delay = seq.request.arrival_time - env.now
            if delay > 0:
                yield env.timeout(delay)
            replicas[router.pick(replicas)].submit(seq, trace_sequence)
        next_arrival[0] = float("inf")

    env.process(arrivals())
    env.run()
    unfinished = [r.index for r in replicas if r.scheduler.has_work]
    if unfinished:
        raise RuntimeError(f"replicas {unfinished} stopped with work pending")
    labels = {"exit_rule": repr(rule), "kv_policy": policy.name, "measure": conf_measure.name,
              "threshold": str(threshold), "model": model.name, "hardware": config.hardware.name,
              "replicas": config.replicas, "router": config.router, "seed": config.seed,
              "workload": workload.source, "cost_model": cost_label(cost), "exit_layers": list(model.all_exits)}
    work_logs = {r.index: r.work_log for r in replicas}
    return build_result(sequences, log.frame(), model, labels, work_logs, cost)


__all__ = ["SimConfig", "simulate", "ITERATION_COLUMNS"]
