"""Thresholds: fixed, or decaying with the token's position (CALM, Schuster et al. 2022).

CALM's decaying form relaxes the threshold as generation goes on:
``lambda_t = 0.9 * lambda + 0.1 * lambda * exp(-tau * t / N)`` with tau = 4 and N the generation horizon.
For measures where lower is confident (entropy), the same relaxation moves the threshold upward:
``lambda_t = 1.1 * lambda - 0.1 * lambda * exp(-tau * t / N)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eesim.errors import EesimError, require
from eesim.policies import parse_spec
from eesim.policies.base import Measure


@dataclass(frozen=True)
class Threshold:
    value: float
    decay: bool = False
    tau: float = 4.0
    horizon: int = 256

    def __post_init__(self) -> None:
        require(self.tau >= 0, f"threshold: tau must be non-negative, got {self.tau}")
        require(self.horizon > 0, f"threshold: horizon must be positive, got {self.horizon}")

    def at(self, token_index: np.ndarray, measure: Measure) -> np.ndarray:
        """The threshold for each generated-token index."""
        t = np.asarray(token_index, dtype=np.float64)
        if not self.decay:
            return np.full(t.shape, self.value)
        relax = 0.1 * self.value * np.exp(-self.tau * t / self.horizon)
        if measure.higher_is_confident:
            return 0.9 * self.value + relax
        return 1.1 * self.value - relax

    def __str__(self) -> str:
        return f"decay:{self.value:g},tau={self.tau:g},N={self.horizon}" if self.decay else f"{self.value:g}"


def parse_threshold(text: str | float | Threshold, measure: Measure) -> Threshold:
    """``0.9`` (fixed), ``decay:0.9[,tau=4,horizon=256]``, or ``calibrated:PATH`` (a threshold certified by
    ``eesim calibrate`` for this measure); checked against the measure's domain."""
    if isinstance(text, Threshold):
        threshold = text
    elif isinstance(text, str) and text.strip().startswith("calibrated:"):
        from eesim.calibrate import load_calibrated

        threshold = Threshold(load_calibrated(text.strip()[len("calibrated:"):], measure.name))
    elif isinstance(text, (int, float)):
        threshold = Threshold(float(text))
    else:
        name, _, rest = str(text).partition(":")
        try:
            if name == "decay":
                value, *extra = rest.split(",")
                _, params = parse_spec("decay:" + ",".join(extra))
                threshold = Threshold(float(value), decay=True, **params)
            else:
                require(not rest, f"bad threshold {text!r}")
                threshold = Threshold(float(name))
        except (ValueError, TypeError):
            raise EesimError(f"bad threshold {text!r}: give a number, or decay:0.9[,tau=4,horizon=256]") from None
    measure.check_threshold(threshold.value)
    return threshold
