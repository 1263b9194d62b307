"""Exit rules that ignore confidence, for measuring: the profiler and the benchmarks use them to pin
down where a batch stops. Not registered as serving policies (``eesim compare`` does not run them),
but usable anywhere a rule is, e.g. ``--rule eesim.forced_exits.ExitAt:k=1``."""

from __future__ import annotations

import numpy as np

from eesim.policies.base import ExitRule


class ExitAt(ExitRule):
    """Every decode row leaves at exit index ``k``, whatever its confidence: a fixed exit layer."""

    name = "exit_at"

    def __init__(self, k: int) -> None:
        self.k = int(k)

    def decide(self, confident: np.ndarray, active: np.ndarray, exit_index: int) -> np.ndarray:
        return active.copy() if exit_index == self.k else np.zeros_like(active)


class NeverExit(ExitRule):
    """Checks every exit (head, measure, host sync) but lets nobody leave: the cost of the checks."""

    name = "never_exit"

    def decide(self, confident: np.ndarray, active: np.ndarray, exit_index: int) -> np.ndarray:
        return np.zeros_like(active)


class RandomExits(ExitRule):
    """Each running row leaves with probability ``p`` at each exit it reaches, whatever its confidence
    (seeded): exits scattered over rows and iterations, for checking the KV policies' bookkeeping."""

    name = "random_exits"

    def __init__(self, p: float = 0.4, seed: int = 0) -> None:
        self.p = float(p)
        self.rng = np.random.default_rng(seed)

    def decide(self, confident: np.ndarray, active: np.ndarray, exit_index: int) -> np.ndarray:
        return active & (self.rng.random(active.shape) < self.p)
