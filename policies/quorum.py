"""Stop the batch at the first exit where a fraction ``q`` of the running rows is confident; the rest
are forced out with that exit's prediction (involuntary exits, counted in the results)."""

import numpy as np

from eesim.errors import require
from eesim.policies import register_exit_rule
from eesim.policies.base import ExitRule, batch_exit


@register_exit_rule
class Quorum(ExitRule):
    name = "quorum"

    def __init__(self, q: float = 0.75) -> None:
        require(0 < q <= 1, f"quorum: q must be in (0, 1], got {q}")
        self.q = float(q)

    def decide(self, confident: np.ndarray, active: np.ndarray, exit_index: int) -> np.ndarray:
        n_active = int(active.sum())
        if n_active and int((confident & active).sum()) >= self.q * n_active:
            return active.copy()
        return np.zeros_like(active)


    def decide_all(self, confident: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_eligible = int(eligible.sum())
        if not n_eligible:
            return super().decide_all(confident, eligible)
        return batch_exit(confident[:, eligible].sum(axis=1) >= self.q * n_eligible, confident, eligible)
