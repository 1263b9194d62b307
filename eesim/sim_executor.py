"""The simulator's executor: exit decisions from a recorded exit trace, time from a cost model.

Each request is assigned one recorded generation of the trace (the simulator draws the assignment
from its seed, the same for every policy, so policies are compared on the same tokens); its k-th
generated token replays that generation's k-th token (wrapping around a shorter one). Whether a
row is confident at an exit is the measure's trace column against the threshold at that token index.
"""

from __future__ import annotations

import numpy as np

from eesim.cost_model import CostModel
from eesim.errors import EesimError
from eesim.exit_trace import ExitTrace
from eesim.kv_policy import KVPolicy
from eesim.model_spec import ModelSpec
from eesim.plan import IterationOutcome, IterationPlan
from eesim.policies.base import ExitRule, Measure
from eesim.policies.thresholds import Threshold
from eesim.request import Sequence
from eesim.work import WorkCounter


class SimExecutor:
    """Implements eesim.executor.Executor for the simulator."""

    def __init__(self, model: ModelSpec, rule: ExitRule, policy: KVPolicy, measure: Measure,
                 threshold: Threshold, trace: ExitTrace, cost_model: CostModel) -> None:
        model_fractions = np.asarray(model.all_exits) / model.num_layers
        if trace.num_exits != model.num_exits or not np.allclose(trace.exit_fractions, model_fractions):
            raise EesimError(
                f"exit trace has exits {list(trace.exit_layers)} of {trace.num_layers} layers but model "
                f"{model.name!r} has {list(model.all_exits)} of {model.num_layers}; give the model the trace's "
                f"exits (ModelSpec.with_exits(trace.remap_to(num_layers)[:-1]))")
        self.model = model
        self.rule = rule
        self.measure = measure
        self.threshold = threshold
        self.trace = trace
        self.cost_model = cost_model
        self.counter = WorkCounter(model, policy, rule, measure.needs_logits)
        column = trace.agrees if measure.column == "agrees" else trace.values[measure.column]
        # A fixed threshold makes confidence a property of the trace row: decide it once, up front.
        if column.dtype == bool:
            self._confident, self._column = column, None
        elif not threshold.decay:
            self._confident, self._column = measure.confident(column, threshold.value), None
        else:
            self._confident, self._column = None, column
        # The same, at the intermediate exits only and contiguous, so that one take() gathers a step's rows.
        # (The GPU executor's replay mode reads the whole tables above.)
        self._confident_at_checks = None if self._confident is None else np.ascontiguousarray(self._confident[:, :-1])
        self._column_at_checks = None if self._column is None else np.ascontiguousarray(self._column[:, :-1])
        self._num_checks = model.num_segments - 1

    def prepare(self, seq: Sequence, trace_sequence: int) -> None:
        """Bind a request to recorded generation ``trace_sequence`` of the trace."""
        offsets = self.trace.seq_offsets
        seq.trace_offset = int(offsets[trace_sequence])
        seq.trace_len = int(offsets[trace_sequence + 1] - offsets[trace_sequence])

    def execute(self, plan: IterationPlan) -> IterationOutcome:
        seqs, steps = plan.seqs, plan.steps
        token = plan.token_index[None, :] if steps == 1 else plan.token_index + np.arange(steps)[:, None]  # (T, B)
        # (T, B) trace rows: each row's recorded generation, wrapping around a shorter one. (One step, most
        # plans: on Python ints, converted once.)
        if steps == 1:
            rows = np.array([[seq.trace_offset + index % max(seq.trace_len, 1)
                              for seq, index in zip(seqs, plan.token_index.tolist())]], dtype=np.int64)
        else:
            offsets = np.array([seq.trace_offset for seq in seqs], dtype=np.int64)
            rows = offsets + token % np.array([max(seq.trace_len, 1) for seq in seqs], dtype=np.int64)
        if self._confident_at_checks is not None:
            confident = self._confident_at_checks.take(rows, axis=0)  # (T, B, K) at the intermediate exits
        else:
            thresholds = self.threshold.at(token, self.measure)[:, :, None]
            confident = self.measure.confident(self._column_at_checks.take(rows, axis=0), thresholds)
        exit_index, forced = self.rule.decide_all(confident, plan.can_exit)
        agrees = self.trace.agrees[rows, exit_index] | ~plan.emits
        tokens = np.where(plan.emits, self.trace.argmax[rows, exit_index], -1)
        work = self.counter.count(plan, exit_index)
        return IterationOutcome(self.cost_model.iteration_time(work), exit_index, forced, agrees, tokens, work)
