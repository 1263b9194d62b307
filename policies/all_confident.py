"""The seed paper's rule (Miao et al., 2024): the batch stops at the first exit where every
still-running decode row is confident, and all of them emit that exit's prediction."""

import numpy as np

from eesim.policies import register_exit_rule
from eesim.policies.base import ExitRule, batch_exit


@register_exit_rule
class AllConfident(ExitRule):
    name = "all_confident"

    def decide(self, confident: np.ndarray, active: np.ndarray, exit_index: int) -> np.ndarray:
        if active.any() and confident[active].all():
            return active.copy()
        return np.zeros_like(active)


    def decide_all(self, confident: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # rows that cannot exit (prefill) do not hold the batch back
        # (With no eligible row every exit "stops", but batch_exit keeps ineligible rows at the last exit.)
        stop = np.logical_and.reduce(confident | ~eligible[:, None], axis=1)
        return batch_exit(stop, confident, eligible, can_force=False)
