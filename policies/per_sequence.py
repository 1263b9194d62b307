"""Each row stops at its own first confident exit; the batch runs on, smaller, for the rest.
Saves arithmetic but few weight reads, since decode is memory-bound."""

import numpy as np

from eesim.policies import register_exit_rule
from eesim.policies.base import ExitRule


@register_exit_rule
class PerSequence(ExitRule):
    name = "per_sequence"

    def decide(self, confident: np.ndarray, active: np.ndarray, exit_index: int) -> np.ndarray:
        return active & confident


    def decide_all(self, confident: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        num_checks = confident.shape[2]
        hits = confident & eligible[None, :, None]
        exit_index = np.where(hits.any(axis=2), hits.argmax(axis=2), num_checks)
        return exit_index, np.zeros(exit_index.shape, dtype=bool)
