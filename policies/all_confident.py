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
        if not eligible.any():
            return super().decide_all(confident, eligible)
        return batch_exit(confident[:, eligible].all(axis=1), confident, eligible)
