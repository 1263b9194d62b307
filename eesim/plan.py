"""The explicit record of one iteration: plan -> execute -> outcome -> update.

The scheduler writes an ``IterationPlan``; an executor (the simulator's or the GPU's) turns it into an
``IterationOutcome``; the scheduler applies the outcome. Per-row arrays follow the plan's row order.

A plan may cover ``steps`` > 1 consecutive iterations when they are pure decode steps of an unchanged
batch (the simulator fast-forwards such runs; the GPU executor always gets steps = 1). Outcome and
work arrays then carry a leading step axis: (T, B) per row, (T, S) per segment; T = 1 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eesim.request import Sequence


@dataclass(slots=True)
class IterationPlan:
    index: int
    seqs: list[Sequence]
    num_new: np.ndarray  # (B,) positions computed this pass: a prefill chunk, or 1 for a decode step
    start: np.ndarray  # (B,) first position computed
    can_exit: np.ndarray  # (B,) bool: decode rows may exit early; prefill rows run full depth
    emits: np.ndarray  # (B,) bool: the pass completes the sequence's positions and samples a token
    owed: list  # per row: the (position, depth) pairs owed before this pass (the ledger's view)
    token_index: np.ndarray  # (B,) index of the generated token this row emits (if it emits)
    preempted: list[int] = field(default_factory=list)
    steps: int = 1  # consecutive decode iterations covered: row b's step t computes position start[b] + t

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def num_batched_tokens(self) -> int:
        return int(self.num_new.sum())

    @property
    def num_decode(self) -> int:
        return int(self.can_exit.sum())


@dataclass(slots=True)
class IterationWork:
    """What ran, per segment of layers between exits (S segments) and per exit (S exits).

    Every layer of segment s saw the same rows, because depths sit on exit boundaries.
    """

    full_rows: np.ndarray  # (T, S) rows run through every layer of the segment (recompute rows included)
    attn_context: np.ndarray  # (T, S) positions attended, summed over those rows, per layer (FLOPs)
    kv_read: np.ndarray  # (T, S) cached positions read per layer (bytes): a prefill chunk re-reads its
    #                      context once per query tile, a decode row reads its context once
    proj_rows: np.ndarray  # (T, S) rows that only had K/V projected (fill, lazy projection)
    recompute_rows: np.ndarray  # (T, S) owed rows re-run in full (subset of full_rows)
    check_rows: np.ndarray  # (T, S) rows whose exit confidence was checked at exit s
    logit_rows: np.ndarray  # (T, S) rows whose full-vocabulary logits were computed at exit s
    syncs: np.ndarray  # (T,) host synchronisations for exit decisions
    batch_reach: np.ndarray  # (T,) index of the deepest exit any row reached
    # (T,) owed (position, depth) entries the step started with: with none, the GPU executor runs a decode
    # step of copy_hidden or recompute on its graphed path
    carried: np.ndarray
    # (T,) the plan's decode rows, and its other rows (prompt chunks: several prompts' chunks can share a step,
    # which the totals above cannot tell from one long chunk); None in records made without them
    decode_rows: np.ndarray | None = None
    prompt_chunks: np.ndarray | None = None

    def step(self, t: int) -> "IterationWork":
        """The work of step t alone, as a one-step record."""
        return IterationWork(*(None if (v := getattr(self, name)) is None else v[t:t + 1] for name in self.__slots__))


@dataclass(slots=True)
class IterationOutcome:
    elapsed: np.ndarray  # (T,) seconds per step
    exit_index: np.ndarray  # (T, B) index into model.all_exits where each row stopped
    forced: np.ndarray  # (T, B) bool: exited though not confident (quorum's involuntary exits)
    agrees: np.ndarray  # (T, B) bool: the emitted token equals the full model's
    tokens: np.ndarray  # (T, B) emitted token id, -1 where none or unknown
    work: IterationWork

    @property
    def steps(self) -> int:
        return len(self.elapsed)

    def head(self, steps: int) -> "IterationOutcome":
        """The first ``steps`` steps (the simulator cuts a run short when a request arrives)."""
        work = IterationWork(*(None if (v := getattr(self.work, name)) is None else v[:steps]
                               for name in IterationWork.__slots__))
        return IterationOutcome(self.elapsed[:steps], self.exit_index[:steps], self.forced[:steps],
                                self.agrees[:steps], self.tokens[:steps], work)
