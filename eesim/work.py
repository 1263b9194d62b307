"""From a plan and its exit decisions to the work done, per segment: shared by both executors.

The simulator prices this work; the GPU executor carries it out and reports it. The KV policy's
settle rule (kv_policy.py) fixes how deep each owed position is brought in this pass; the scheduler
applies the very same targets to the ledger (``settle_target``), so the work counted and the
bookkeeping cannot disagree.
"""

from __future__ import annotations

import numpy as np

from eesim.kv_policy import KVPolicy
from eesim.model_spec import ModelSpec
from eesim.plan import IterationPlan, IterationWork
from eesim.policies.base import ExitRule

# Query rows per attention tile in a prefill chunk: each tile streams the chunk's context once.
QUERY_TILE = 128


def settle_target(policy: KVPolicy, own_reach: int, batch_reach: int, num_layers: int) -> int:
    """Depth (in layers) to which a sequence's owed positions are brought by the end of this pass."""
    if policy.settle == "iteration_end":
        return num_layers
    if policy.settle == "batch_pass":
        return batch_reach
    return own_reach


class WorkCounter:
    """Counts an iteration's work for one model shape, exit rule and KV policy."""

    def __init__(self, model: ModelSpec, policy: KVPolicy, rule: ExitRule, needs_logits: bool) -> None:
        self.model = model
        self.policy = policy
        self.checks = rule.checks_confidence
        self.needs_logits = needs_logits
        self.num_segments = model.num_segments
        self.segment_ids = np.arange(model.num_segments)
        self.exit_layers = model.all_exits
        self.segment_of_depth = {depth: i for i, depth in enumerate(model.segment_bounds)}
        # Row k of _reach: 1.0 for the segments a row with exit index k ran (0..k); one gather turns
        # exit indices into the (T, B, S) mask (instead of a compare and a cast).
        self._reach = (self.segment_ids[:, None] >= self.segment_ids).astype(np.float64)
        # emitted @ _exact: rows emitting at exactly exit s (those reaching s less those reaching s+1)
        self._exact = np.eye(model.num_segments) - np.eye(model.num_segments, k=-1)
        self._zeros = np.zeros((1, model.num_segments))
        self._zeros.flags.writeable = False  # shared by one-step records that owe nothing
        self._no_debt = self._zeros[:, 0]

    def count(self, plan: IterationPlan, exit_index: np.ndarray) -> IterationWork:
        """Work of each of the plan's steps, given the exit index of every row in every step (T, B)."""
        steps = exit_index.shape[0]
        segs = self.num_segments
        # A row with exit index k ran segments 0..k: one (T, B, S) mask turns every per-row quantity
        # into per-segment sums with a single batched product.
        # (Written quantity-major, so that each (T, S) sum is one contiguous block: cheaper for the cost models.)
        sums = np.empty((6, steps, segs))
        np.matmul(self._per_row(plan, steps), self._reach[exit_index], out=sums.transpose(1, 0, 2))
        full_rows, attn, kv_read, checked, emitted, decode_context = sums
        decode_rows = checked[:, 0].copy()  # every row runs segment 0 (a copy: check_rows below may be checked)
        batch_reach = np.maximum.reduce(exit_index, axis=1)  # (the ufunc's own reduce: .max adds a Python layer)
        owed_rows = owed_context = self._zeros if steps == 1 else np.zeros((steps, segs))
        carried = self._no_debt if steps == 1 else np.zeros(steps)  # owed entries the step started with
        if self.policy.settle == "iteration_end":
            # Nothing is owed across iterations: this pass settles its own early exits. A decode row
            # that exited at exit k is owed every segment after k, i.e. every segment it did not reach.
            # (every row runs segment 0, so column 0 holds the totals over the decode rows)
            owed_rows = checked[:, :1] - checked
            if self.policy.work == "full_layers":
                owed_context = decode_context[:, :1] - decode_context
        elif (owes := any(plan.owed)) or ((exit_index < segs - 1) & plan.can_exit).any():
            assert steps == 1, "debts carried across iterations are counted one step at a time"
            owed_rows, owed_context = np.zeros((1, segs)), np.zeros((1, segs))
            self._count_settlement(plan, exit_index[0], int(batch_reach[0]), owed_rows[0], owed_context[0])
            if owes:
                carried = np.array([float(sum(len(o) for o in plan.owed))])
        check_rows = checked if self.checks else checked * 0.0
        check_rows[:, -1] = 0.0  # the last layer is not a check: every row still running stops there
        logit_rows = emitted @ self._exact  # rows emitting at exactly that exit
        if self.needs_logits and self.checks:
            # checked rows that ran on still paid for that exit's logits
            logit_rows = np.maximum(logit_rows, check_rows, out=logit_rows)
        if self.policy.work == "full_layers":
            proj, recompute = self._zeros if steps == 1 else np.zeros((steps, segs)), owed_rows
            full_rows, attn, kv_read = full_rows + recompute, attn + owed_context, kv_read + owed_context
        else:
            proj, recompute = owed_rows, self._zeros if steps == 1 else np.zeros((steps, segs))
        syncs = np.add.reduce(check_rows > 0, axis=1)
        return IterationWork(full_rows, attn, kv_read, proj, recompute, check_rows, logit_rows, syncs, batch_reach,
                             carried, decode_rows, len(plan.num_new) - decode_rows)

    @staticmethod
    def _per_row(plan: IterationPlan, steps: int) -> np.ndarray:
        """(T, 6, B) per-row quantities of each step: positions computed, positions attended (a causal
        chunk), cached positions read (once per query tile), decode (may exit), emits, and a decode row's
        context (what re-running it costs). Step t of a run computes position start + t, which moves the
        three position-dependent quantities by t times their slope. (Integers, exact in float64.)"""
        num_new, start, decode = plan.num_new, plan.start, plan.can_exit
        tiles = (num_new + (QUERY_TILE - 1)) // QUERY_TILE
        end = start + num_new
        # positions attended: num_new * start + num_new * (num_new + 1) / 2, written with one division
        per_row = np.array([num_new, num_new * (start + end + 1) // 2, end * tiles, decode, plan.emits,
                            (start + 1) * decode], dtype=np.float64)
        if steps == 1:
            return per_row[None]
        zeros = np.zeros(len(num_new))
        slope = np.array([zeros, num_new, tiles, zeros, zeros, decode], dtype=np.float64)
        return per_row + np.arange(steps)[:, None, None] * slope

    def _count_settlement(self, plan: IterationPlan, exit_index: np.ndarray, batch_reach: int,
                          rows: np.ndarray, context: np.ndarray) -> None:
        """Debts settled in a one-step pass (policies that carry them across iterations)."""
        layers = self.exit_layers
        num_layers = self.model.num_layers
        seg_of = self.segment_of_depth
        batch_layer = layers[batch_reach]
        for row, owed in enumerate(plan.owed):
            own_layer = layers[exit_index[row]]
            target = settle_target(self.policy, own_layer, batch_layer, num_layers)
            pending = owed
            if plan.can_exit[row] and own_layer < num_layers:
                # this pass's own token exited early: it is owed the rest from now on
                pending = [*owed, (int(plan.start[row]), own_layer)]
            for position, depth in pending:
                if depth < target:
                    lo, hi = seg_of[depth], seg_of[target]
                    rows[lo:hi] += 1
                    context[lo:hi] += position + 1
