"""The two policy kinds a user subclasses or instantiates: exit rules and confidence measures."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from eesim.errors import require


def batch_exit(stop: np.ndarray, confident: np.ndarray, eligible: np.ndarray,
               can_force: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Closed form for rules where the eligible rows leave together, in each step t, at the first exit
    where ``stop[t]`` holds. ``stop``: (T, K); ``confident``: (T, B, K). A rule that stops only where
    every row is confident (``can_force`` False) forces nobody out."""
    steps, num_rows, num_checks = confident.shape
    has_stop = np.logical_or.reduce(stop, axis=1)  # (the ufuncs' own reduce: ndarray.any adds a Python layer)
    first = np.where(has_stop, stop.argmax(axis=1), num_checks)
    # where no exit stops the step, first is already num_checks: the eligible rows take it as they are
    exit_index = np.where(eligible, first[:, None], num_checks)
    if not can_force:
        return exit_index, np.zeros(exit_index.shape, dtype=bool)
    leaving = has_stop[:, None] & eligible
    picked = confident[np.arange(steps)[:, None], np.arange(num_rows), np.minimum(first, num_checks - 1)[:, None]]
    return exit_index, leaving & ~picked


class ExitRule:
    """Decides, exit by exit, which still-running decode rows stop here.

    ``decide`` is called at each intermediate exit in order (``exit_index`` 0, 1, ...), with the rows'
    confidence at that exit and the rows still running. It returns the rows that exit there (a subset
    of ``active``). The
    GPU executor calls it as the pass goes; the simulator calls it over recorded confidences: the
    same decisions either way.
    """

    name: ClassVar[str] = "base"
    checks_confidence: ClassVar[bool] = True  # False: no exit head runs at all (the full-depth rule)

    def decide(self, confident: np.ndarray, active: np.ndarray, exit_index: int) -> np.ndarray:
        raise NotImplementedError

    def decide_all(self, confident: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every exit of every step at once: ``confident`` (T, B, K) holds each row's confidence at
        each intermediate exit in each of T decode steps (T = 1 for one iteration).

        Returns each row's exit index per step (K = ran to the last layer) and whether it was forced
        out while not confident, both (T, B). This default applies ``decide`` exit by exit, exactly as
        a pass on the GPU does; a rule may override it with a closed form that must give identical
        results (tests/test_policies.py checks every registered rule).
        """
        steps, num_rows, num_checks = confident.shape
        exit_index = np.full((steps, num_rows), num_checks, dtype=np.int64)
        forced = np.zeros((steps, num_rows), dtype=bool)
        if not self.checks_confidence:
            return exit_index, forced
        for t in range(steps):
            active = eligible.copy()
            for k in range(num_checks):
                if not active.any():
                    break
                leaving = self.decide(confident[t, :, k], active, k) & active
                if leaving.any():
                    exit_index[t, leaving] = k
                    forced[t] |= leaving & ~confident[t, :, k]
                    active &= ~leaving
        return exit_index, forced

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}({params})" if params else self.name


@dataclass(frozen=True)
class Measure:
    """A confidence measure: which trace column it reads and which way is confident."""

    name: str
    column: str
    higher_is_confident: bool
    needs_logits: bool  # needs the full-vocabulary logits at every checked exit (costly at small batch)
    low: float = -math.inf
    high: float = math.inf

    def check_threshold(self, value: float) -> None:
        require(self.low <= value <= self.high and math.isfinite(value),
                f"threshold {value} is outside the domain of measure {self.name!r} [{self.low}, {self.high}]")

    def confident(self, values: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
        return values >= threshold if self.higher_is_confident else values <= threshold
