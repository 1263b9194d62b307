"""Never exit: the baseline every speedup is measured against."""

import numpy as np

from eesim.policies import register_exit_rule
from eesim.policies.base import ExitRule


@register_exit_rule
class Full(ExitRule):
    name = "full"
    checks_confidence = False

    def decide(self, confident: np.ndarray, active: np.ndarray, exit_index: int) -> np.ndarray:
        return np.zeros_like(active)


    def decide_all(self, confident: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = confident.shape[:2]
        return np.full(shape, confident.shape[2], dtype=np.int64), np.zeros(shape, dtype=bool)
