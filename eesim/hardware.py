"""The accelerator the simulator prices work against.

Figures for the H100 preset are those measured on the lent H100 (shared/docs/BACKGROUND.md,
2026-11-22): 2.98 TB/s read bandwidth, 768 TFLOP/s bf16 matrix rate. The achieved fractions and the
fixed overheads are assumptions of the analytical cost model, stated here so they can be changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from eesim.errors import EesimError, require
from eesim.model_spec import ModelSpec

GB = 1e9


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    memory_bytes: float
    read_bandwidth: float  # bytes/s, measured
    peak_flops: float  # matrix FLOP/s in the model dtype, measured
    bandwidth_fraction: float = 0.85  # share of read_bandwidth a good decode kernel reaches
    flops_fraction: float = 0.65  # share of peak_flops a good prefill GEMM reaches
    iteration_overhead_s: float = 60e-6  # host scheduling + launch (graph replay) per iteration
    exit_sync_s: float = 15e-6  # a device-to-host sync to read an exit decision
    memory_utilization: float = 0.90  # share of memory the engine may use (vLLM's default)
    activation_reserve_bytes: float = 2 * GB

    def __post_init__(self) -> None:
        where = f"hardware {self.name!r}"
        for attr in ("memory_bytes", "read_bandwidth", "peak_flops"):
            require(getattr(self, attr) > 0, f"{where}: {attr} must be positive")
        for attr in ("bandwidth_fraction", "flops_fraction", "memory_utilization"):
            value = getattr(self, attr)
            require(0 < value <= 1, f"{where}: {attr} must be in (0, 1], got {value}")
        for attr in ("iteration_overhead_s", "exit_sync_s", "activation_reserve_bytes"):
            require(getattr(self, attr) >= 0, f"{where}: {attr} must be non-negative")

    def kv_capacity_bytes(self, model: ModelSpec) -> float:
        """Memory left for the KV cache once the weights and activations are in place."""
        free = self.memory_bytes * self.memory_utilization - model.weight_bytes - self.activation_reserve_bytes
        if free <= 0:
            raise EesimError(
                f"model {model.name!r} ({model.weight_bytes / GB:.1f} GB of weights) does not fit in "
                f"{self.name!r} ({self.memory_bytes / GB:.0f} GB at {self.memory_utilization:.0%} use, "
                f"{self.activation_reserve_bytes / GB:.0f} GB kept for activations)")
        return free

    def kv_blocks(self, model: ModelSpec, block_size: int) -> int:
        blocks = int(self.kv_capacity_bytes(model) // (block_size * model.kv_bytes_per_token))
        if blocks < 1:
            raise EesimError(f"no KV block of {block_size} tokens fits beside {model.name!r} on {self.name!r}")
        return blocks


HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    "h100": HardwareSpec("h100", memory_bytes=80 * GB, read_bandwidth=2.98e12, peak_flops=768e12),
    "h200": HardwareSpec("h200", memory_bytes=141 * GB, read_bandwidth=4.3e12, peak_flops=790e12),
}


def hardware_preset(name: str) -> HardwareSpec:
    if name not in HARDWARE_PRESETS:
        raise EesimError(f"unknown hardware preset {name!r}; choose one of {sorted(HARDWARE_PRESETS)}")
    return HARDWARE_PRESETS[name]
