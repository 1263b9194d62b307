"""The configuration of a serving run, shared by the simulator and the GPU executor's driver.

Kept apart from simulator.py so that code paths that never simulate (the GPU executor on a machine
without SimPy) can build one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eesim.exit_trace import ExitTrace
from eesim.hardware import HardwareSpec
from eesim.kv_policy import KVPolicy
from eesim.model_spec import ModelSpec
from eesim.policies.base import ExitRule, Measure
from eesim.policies.thresholds import Threshold
from eesim.scheduler import SchedulerConfig


@dataclass(frozen=True)
class SimConfig:
    model: ModelSpec
    hardware: HardwareSpec
    trace: ExitTrace
    exit_rule: ExitRule | str = "all_confident"
    kv_policy: KVPolicy | str = "fill"
    measure: Measure | str = "max_prob"
    threshold: Threshold | float | str = 0.9
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    replicas: int = 1
    router: str = "round_robin"
    seed: int = 0
    keep_work: int = 2000  # iterations per replica whose full work record is kept (timeline detail)
    max_run_steps: int = 256  # decode steps of an unchanged batch simulated in one go (1: step by step)
    # what prices an iteration: "auto" (the bundled profile of the model's shape measured on this hardware,
    # else the analytical roofline), "analytical", "profile", or a path to a profile parquet (cost_choice.py)
    cost_model: str = "auto"
