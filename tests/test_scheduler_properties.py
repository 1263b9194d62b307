"""Stateful property tests of the scheduler, the block allocator and the KV ledger.

Random arrivals, exits, finishes and preemptions (a deliberately tiny cache forces them). After every
iteration: no block is owned twice, free + used = total, every running sequence's blocks cover its
positions, nothing leaks when all finish, attention never reads a missing K/V, the work counted for
skipped layers equals the K/V the ledger gained, and each KV policy's contract holds.
"""

import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from eesim.model_spec import ModelSpec
from eesim.plan import IterationOutcome
from eesim.policies import exit_rule, kv_policy
from eesim.request import Request, Sequence, Status
from eesim.scheduler import Scheduler, SchedulerConfig
from eesim.work import WorkCounter

MODEL = ModelSpec("tiny", num_layers=8, hidden_size=64, num_heads=4, num_kv_heads=2, mlp_size=128,
                  vocab_size=100, exit_layers=(2, 4, 6), max_context=512)


class CacheMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(["fill", "copy_hidden", "recompute"]),
                rule_name=st.sampled_from(["full", "all_confident", "per_sequence", "quorum"]),
                num_blocks=st.integers(8, 40), block_size=st.sampled_from([2, 4, 8]),
                max_seqs=st.integers(1, 6), budget=st.integers(4, 48), max_steps=st.sampled_from([1, 1, 4, 16]))
    def setup(self, policy, rule_name, num_blocks, block_size, max_seqs, budget, max_steps):
        self.policy = kv_policy(policy)
        self.rule = exit_rule(rule_name)
        self.scheduler = Scheduler(SchedulerConfig(max_seqs, budget, block_size), MODEL, self.policy, num_blocks)
        self.counter = WorkCounter(MODEL, self.policy, self.rule, needs_logits=True)
        self.max_steps = max_steps
        self.arrived: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.rng = np.random.default_rng(0)
        self.now = 0.0

    @rule(prompt=st.integers(1, 40), output=st.integers(1, 12))
    def arrive(self, prompt, output):
        request = Request(len(self.arrived), self.now, prompt, output)
        total_blocks = self.scheduler.allocator.num_blocks
        if self.scheduler.allocator.blocks_for(prompt + output) > total_blocks:
            return  # the scheduler refuses such a request up front (tested separately)
        seq = Sequence(request)
        self.scheduler.add(seq)
        self.arrived.append(seq)

    @precondition(lambda self: self.scheduler.has_work)
    @rule(confident_share=st.floats(0, 1), seed=st.integers(0, 2**16))
    def iterate(self, confident_share, seed):
        scheduler, ledger = self.scheduler, self.scheduler.ledger
        plan = scheduler.schedule(self.now, self.max_steps)
        assert plan.seqs, "work pending but nothing planned"
        assert len({s.seq_id for s in plan.seqs}) == len(plan.seqs), "a sequence scheduled twice"
        for seq, owed in zip(plan.seqs, plan.owed):
            # every owed position rides along with its sequence's pass (recompute: "gets scheduled")
            assert list(owed) == ledger.owed(seq.seq_id)
        rng = np.random.default_rng(seed)
        confident = rng.random((plan.steps, plan.batch_size, MODEL.num_segments - 1)) < confident_share
        exit_index, forced = self.rule.decide_all(confident, plan.can_exit)
        assert (exit_index[:, ~plan.can_exit] == MODEL.num_segments - 1).all(), "a prefill row exited"
        work = self.counter.count(plan, exit_index)
        steps = int(rng.integers(1, plan.steps + 1))  # the simulator may apply fewer steps of a run
        outcome = IterationOutcome(np.full(plan.steps, 1e-3), exit_index, forced,
                                   np.ones(exit_index.shape, bool), np.zeros(exit_index.shape, int), work)
        outcome = outcome.head(steps)
        before = {s.seq_id: ledger.depths(s.seq_id).copy() for s in plan.seqs}
        ends = [self.now + 1e-3 * (t + 1) for t in range(steps)]
        self.finished += scheduler.update(plan, outcome, ends)
        self.now = ends[-1]
        self._check_work_matches_ledger(plan, outcome, before)

    def _check_work_matches_ledger(self, plan, outcome, before):
        """Layers of K/V the policy's settle work produced == layers the ledger gained beyond what
        the pass itself computed."""
        ledger = self.scheduler.ledger
        layers = np.asarray(MODEL.segment_layers)
        settled_work = float(((outcome.work.proj_rows + outcome.work.recompute_rows) * layers).sum())
        gained = 0
        for row, seq in enumerate(plan.seqs):
            if seq.status is Status.FINISHED or seq.seq_id not in ledger:
                return  # a finished sequence's cache is gone; its last pass cannot be audited
            depths = ledger.depths(seq.seq_id)
            old = before[seq.seq_id]
            gained += int((depths[: len(old)].astype(int) - old).sum())
            steps = outcome.steps
            count = steps if steps > 1 else int(plan.num_new[row])
            own = np.asarray(MODEL.all_exits)[outcome.exit_index[:steps, row]]
            new = depths[len(old): len(old) + count].astype(int)
            gained += int((new - (own if steps > 1 else own[0])).sum())
            # attention safety: what this row attended (positions before its last) has K/V as deep as it ran
            last = len(old) + count - 1
            assert (depths[:last] >= (own.min() if steps > 1 else own[0])).all(), "attended a missing K/V"
        assert gained == settled_work, (gained, settled_work)

    @invariant()
    def blocks_consistent(self):
        if not hasattr(self, "scheduler"):
            return
        allocator = self.scheduler.allocator
        owners = allocator.owners()
        assert allocator.num_free + len(owners) == allocator.num_blocks
        assert len(set(allocator._free)) == allocator.num_free, "a block is free twice"
        assert not set(allocator._free) & set(owners), "a block is both free and owned"
        held = [b for s in self.scheduler.running for b in s.blocks]
        assert len(held) == len(set(held)), "a block is owned twice"
        assert sorted(held) == sorted(owners), "owners and sequences disagree"
        for seq in self.scheduler.running:
            assert all(owners[b] == seq.seq_id for b in seq.blocks)
            assert len(seq.blocks) >= allocator.blocks_for(seq.num_computed)
        for seq in self.scheduler.waiting:
            assert not seq.blocks

    @invariant()
    def policy_contract(self):
        if not hasattr(self, "scheduler"):
            return
        ledger = self.scheduler.ledger
        for seq in self.scheduler.running:
            depths = ledger.depths(seq.seq_id)
            assert len(depths) == seq.num_computed
            assert (depths >= MODEL.exit_layers[0]).all()
            missing = np.flatnonzero(depths < MODEL.num_layers).tolist()
            if self.policy.name == "fill":
                assert not missing, "fill left layers without K/V at iteration end"
            else:
                # copy_hidden: a pending hidden state; recompute: an owed re-run, for every missing position
                assert [p for p, _ in ledger.owed(seq.seq_id)] == missing

    @invariant()
    def conservation(self):
        if not hasattr(self, "scheduler"):
            return
        live = list(self.scheduler.waiting) + self.scheduler.running
        ids = [s.seq_id for s in live] + [s.seq_id for s in self.finished]
        assert len(ids) == len(set(ids)), "a request is duplicated"
        assert len(ids) == len(self.arrived), "a request was lost"
        for seq in self.finished:
            assert seq.num_generated == seq.request.output_len
            assert len(seq.token_times) == seq.request.output_len

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        for _ in range(10_000):
            if not self.scheduler.has_work:
                break
            self.iterate(0.5, 0)
        assert not self.scheduler.has_work
        assert self.scheduler.allocator.num_free == self.scheduler.allocator.num_blocks, "blocks leaked"
        assert not self.scheduler.ledger.seq_ids, "ledger entries leaked"


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestCache = CacheMachine.TestCase


def test_preemption_happens_and_everything_finishes():
    scheduler = Scheduler(SchedulerConfig(8, 64, 4), MODEL, kv_policy("copy_hidden"), num_blocks=10)
    counter = WorkCounter(MODEL, scheduler.policy, exit_rule("all_confident"), True)
    seqs = [Sequence(Request(i, 0.0, 12, 8)) for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    rng = np.random.default_rng(3)
    for _ in range(500):
        if not scheduler.has_work:
            break
        plan = scheduler.schedule()
        exit_index, forced = exit_rule("all_confident").decide_all(
            rng.random((1, plan.batch_size, 3)) < 0.5, plan.can_exit)
        outcome = IterationOutcome(np.ones(1), exit_index, forced, np.ones((1, plan.batch_size), bool),
                                   np.zeros((1, plan.batch_size), int), counter.count(plan, exit_index))
        scheduler.update(plan, outcome, [0.0])
    assert not scheduler.has_work
    assert scheduler.num_preemptions > 0
    assert all(s.num_generated == 8 for s in seqs)


def test_allocator_scatter_hands_out_the_leading_share_in_a_random_order():
    import pytest

    from eesim.block_allocator import BlockAllocator
    from eesim.errors import EesimError

    def scattered():
        a = BlockAllocator(100, 16)
        a.allocate(9, 2)  # blocks 0 and 1 already taken: scatter reorders only the free ones
        a.scatter(0.3, seed=1)
        return a

    a = scattered()
    first = a.allocate(0, 28)
    assert sorted(first) == list(range(2, 30)) and first != sorted(first)
    assert a.allocate(1, 5) == [30, 31, 32, 33, 34]  # then the rest of the pool, in the usual order
    assert scattered().allocate(0, 28) == first  # deterministic for a seed
    a.free(0, first)
    assert a.num_free == 100 - 2 - 5 and set(a.owners().values()) == {1, 9}
    with pytest.raises(EesimError, match="scatter share"):
        a.scatter(0.0)
