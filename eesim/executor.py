"""The executor protocol: one call per iteration, plan in, outcome out.

The simulator's executor (sim_executor.py) implements it from a recorded exit trace and a cost model;
the GPU executor implements it by running the model. Both are driven by the same Scheduler:

    plan = scheduler.schedule(now)              # which rows, how many positions, what is owed
    outcome = executor.execute(plan)            # exits per row, emitted tokens, work done, seconds
    scheduler.update(plan, outcome, step_ends)  # positions, KV ledger, tokens, finished sequences

Contract for an implementation:
- rows follow ``plan.seqs``; a row with ``plan.can_exit`` may stop at any exit the exit rule allows
  (``ExitRule.decide`` called exit by exit in order, or ``decide_all`` with the same result); other rows
  run all layers;
- the K/V owed by ``plan.owed`` and by this pass's early exits is produced as the KV policy declares
  (``KVPolicy.work`` and ``KVPolicy.settle``); ``eesim.work.WorkCounter`` counts that work, and an
  executor reports what it ran in ``outcome.work``;
- ``outcome.elapsed`` is seconds per step: simulated for the simulator, measured for the GPU;
- a plan with ``steps`` > 1 (only the simulator asks for such plans) covers that many decode steps.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from eesim.plan import IterationOutcome, IterationPlan


@runtime_checkable
class Executor(Protocol):
    def execute(self, plan: IterationPlan) -> IterationOutcome:
        """Run (or price) the planned iteration and report what happened."""
