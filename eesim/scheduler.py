"""Iteration-level continuous batching over a paged KV cache (in the manner of vLLM's v1 scheduler).

Each iteration: running sequences first, oldest first (a decode step, or the next prefill chunk),
then waiting ones in arrival order while the token budget, the sequence cap and the free blocks
allow. When a running sequence needs a block and none is free, the most recently admitted one is
preempted: its blocks are freed and it is recomputed from scratch later (prompt and generated
tokens, as one prefill). ``schedule`` writes the plan; ``update`` applies an executor's outcome.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from eesim.block_allocator import BlockAllocator
from eesim.errors import EesimError, require
from eesim.kv_ledger import KVLedger
from eesim.kv_policy import KVPolicy
from eesim.model_spec import ModelSpec
from eesim.plan import IterationOutcome, IterationPlan
from eesim.request import Sequence, Status
from eesim.work import settle_target


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_blocks: int = 0  # 0: as many as the hardware's memory holds (see HardwareSpec.kv_blocks)

    def __post_init__(self) -> None:
        require(self.max_num_seqs > 0, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        require(self.max_num_batched_tokens > 0,
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        require(self.block_size > 0, f"block_size must be positive, got {self.block_size}")
        require(self.num_blocks >= 0, f"num_blocks must be non-negative, got {self.num_blocks}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, model: ModelSpec, policy: KVPolicy, num_blocks: int) -> None:
        self.config = config
        self.model = model
        self.policy = policy
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        self.ledger = KVLedger(model.num_layers, policy)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_iterations = 0
        self.num_preemptions = 0
        self._exit_layer_array = np.asarray(model.all_exits)
        self.blocks_used: list[int] = []

    # ---- intake -----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        req = seq.request
        total = req.prompt_len + req.output_len
        if total > self.model.max_context:
            raise EesimError(f"request {req.request_id}: prompt {req.prompt_len} + output {req.output_len} "
                             f"tokens exceed the model's context of {self.model.max_context}")
        if self.allocator.blocks_for(total) > self.allocator.num_blocks:
            raise EesimError(f"request {req.request_id} needs {total} tokens of KV, more than the whole cache "
                             f"({self.allocator.num_blocks} blocks of {self.config.block_size})")
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- plan ---------------------------------------------------------------------------------------
    def schedule(self, now: float = 0.0, max_steps: int = 1) -> IterationPlan:
        """Plan the next iteration. With ``max_steps`` > 1 the plan may cover a run of identical
        decode steps (see ``_run_length``); the caller may apply fewer of them."""
        config = self.config
        budget = config.max_num_batched_tokens
        rows: list[tuple[Sequence, int]] = []
        preempted: list[int] = []

        # Running sequences keep their places; a block shortage evicts the newest admitted ones.
        allocator, block_size, running = self.allocator, config.block_size, self.running
        index = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            count = seq.request.prompt_len + seq.num_generated - seq.num_computed
            if count > budget:
                count = budget
            need = -(-(seq.num_computed + count) // block_size) - len(seq.blocks)
            if need > 0:
                while need > allocator.num_free and running[-1] is not seq:
                    preempted.append(self._preempt(running.pop()))
                if need > allocator.num_free:
                    preempted.append(self._preempt(running.pop()))  # the sequence itself
                    break
                seq.blocks.extend(allocator.allocate(seq.seq_id, need))
            rows.append((seq, count))
            budget -= count
            index += 1

        # Admit waiting sequences in arrival order; none jumps a blocked one, and none while evicting.
        while (self.waiting and budget > 0 and not preempted
               and len(running) < config.max_num_seqs):
            seq = self.waiting[0]
            count = min(seq.remaining_to_compute, budget)
            need = allocator.blocks_for(seq.num_computed + count)
            if need > allocator.num_free:
                break
            self.waiting.popleft()
            seq.blocks = allocator.allocate(seq.seq_id, need)
            seq.status = Status.RUNNING
            if seq.first_scheduled_time < 0:
                seq.first_scheduled_time = now
            self.ledger.add(seq.seq_id, seq.request.prompt_len + seq.request.output_len)
            running.append(seq)
            rows.append((seq, count))
            budget -= count

        # The per-row columns, worked out on Python ints and converted once each: a batch is a handful
        # of rows, for which a dozen numpy operations cost more than this loop.
        seqs: list[Sequence] = []
        num_new, start, generated, emits, can_exit = [], [], [], [], []
        for seq, count in rows:
            computed, num_generated = seq.num_computed, seq.num_generated
            completes = computed + count == seq.request.prompt_len + num_generated  # samples a token
            seqs.append(seq)
            num_new.append(count)
            start.append(computed)
            generated.append(num_generated)
            emits.append(completes)
            can_exit.append(completes and count == 1 and num_generated > 0)  # a decode step
        settles_now = self.policy.settle == "iteration_end"
        if settles_now:
            owed = [()] * len(seqs)  # such policies leave nothing owed between iterations
        else:
            owed = [self.ledger.owed(seq.seq_id) for seq in seqs]
        plan = IterationPlan(self.num_iterations, seqs, np.array(num_new, dtype=np.int64),
                             np.array(start, dtype=np.int64), np.array(can_exit, dtype=bool),
                             np.array(emits, dtype=bool), owed, np.array(generated, dtype=np.int64), preempted)
        if max_steps > 1 and settles_now and not preempted and len(seqs) == len(running) and all(can_exit):
            plan.steps = self._run_length(plan, max_steps)
        self.num_iterations += 1
        return plan

    def _run_length(self, plan: IterationPlan, max_steps: int) -> int:
        """How many identical decode steps follow: none of them can admit, preempt, finish a sequence
        before the last, or find a block missing. Only for KV policies that leave no debt across
        iterations; the others step one iteration at a time."""
        if self.waiting and len(self.running) < self.config.max_num_seqs \
                and len(plan.seqs) < self.config.max_num_batched_tokens:
            head = self.waiting[0]
            room = self.config.max_num_batched_tokens - len(plan.seqs)
            if self.allocator.blocks_for(head.num_computed + min(head.remaining_to_compute, room)) \
                    <= self.allocator.num_free:
                return 1  # the queue head could be admitted at the next step
        remaining = min(seq.request.output_len - seq.num_generated for seq in plan.seqs)
        steps = min(max_steps, remaining)
        if steps > 1:
            # The run stops before the step whose new block would be one more than the free ones.
            crossings = self._run_crossings(plan, steps)
            if len(crossings) > self.allocator.num_free:
                steps = crossings[self.allocator.num_free][0]
        return steps

    def _run_crossings(self, plan: IterationPlan, steps: int) -> list[tuple[int, int]]:
        """(step, row) of every new block that steps 1..steps-1 of a run need, step-major then row order.
        Step t >= 1 writes position start + t: a new block when that lands on a block boundary, i.e. at
        t = block_size - start % block_size and every block_size steps after. (Python ints: a batch is
        a handful of rows, and (steps, rows) numpy masks cost more than this.)"""
        size = self.config.block_size
        crossings = [(t, row) for row, start in enumerate(plan.start.tolist())
                     for t in range(size - start % size, steps, size)]
        crossings.sort()
        return crossings

    def _preempt(self, seq: Sequence) -> int:
        self.allocator.free(seq.seq_id, seq.blocks)
        seq.blocks = []
        self.ledger.drop(seq.seq_id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        return seq.seq_id

    # ---- update -------------------------------------------------------------------------------------
    def update(self, plan: IterationPlan, outcome: IterationOutcome, step_ends: list[float]) -> list[Sequence]:
        """Apply the executed steps (``outcome.steps`` <= ``plan.steps``), ending at ``step_ends``;
        returns the sequences that finished. Records blocks in use after each step in ``blocks_used``."""
        steps = outcome.steps
        exit_layers = self._exit_layer_array[outcome.exit_index]  # (T, B) layers each row ran
        num_layers = self.model.num_layers
        ledger, allocator = self.ledger, self.allocator
        self.blocks_used = [allocator.num_used] * steps
        if steps > 1:
            self._allocate_run_blocks(plan, steps)
        seqs, starts = plan.seqs, plan.start.tolist()
        counts = [steps] * len(seqs) if steps > 1 else plan.num_new.tolist()  # a run: one position per step
        if self.policy.settle == "iteration_end":
            # early exits are settled this iteration: every position computed is at full depth
            ledger.record_full_depth([seq.seq_id for seq in seqs], starts, counts)
        else:
            batch_layer = int(self._exit_layer_array[outcome.work.batch_reach[0]])
            for seq, start, count, own_layer in zip(seqs, starts, counts, exit_layers[0].tolist()):
                ledger.record(seq.seq_id, start, count, own_layer)
                if ledger.num_owed(seq.seq_id):
                    ledger.settle(seq.seq_id, settle_target(self.policy, own_layer, batch_layer, num_layers))
        finished: list[Sequence] = []
        rows = zip(seqs, starts, counts, plan.emits.tolist(), exit_layers.T.tolist(), outcome.agrees.T.tolist(),
                   outcome.forced.T.tolist(), outcome.tokens.T.tolist())
        for seq, start, count, emits, layers, agrees, forced, tokens in rows:
            seq.num_computed = start + count
            if emits:
                seq.num_generated += steps
                seq.token_times.extend(step_ends)
                seq.exit_layers.extend(layers)
                seq.agrees.extend(agrees)
                seq.forced.extend(forced)
                seq.output_tokens.extend(tokens)
                if seq.num_generated >= seq.request.output_len:
                    finished.append(seq)
        for seq in finished:
            seq.status = Status.FINISHED
            allocator.free(seq.seq_id, seq.blocks)
            seq.blocks = []
            ledger.drop(seq.seq_id)
        if finished:
            self.running = [seq for seq in self.running if seq.status is Status.RUNNING]
        self.blocks_used[-1] = allocator.num_used
        self.num_iterations += steps - 1
        return finished

    def _allocate_run_blocks(self, plan: IterationPlan, steps: int) -> None:
        """Blocks for steps 1.. of a run, in the order step-by-step scheduling would take them."""
        new_blocks = [0] * steps
        for t, row in self._run_crossings(plan, steps):
            seq = plan.seqs[row]
            seq.blocks.extend(self.allocator.allocate(seq.seq_id, 1))
            new_blocks[t] += 1
        self.blocks_used = list(accumulate(new_blocks, initial=self.blocks_used[0]))[1:]
