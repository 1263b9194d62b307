"""Iteration time from the work done: the interface, and an analytical roofline model.

The analytical model prices each segment of layers between exits as a roofline: the larger of its
bytes over the achieved read bandwidth and its FLOPs over the achieved matrix rate. Bytes are the
weights of the layers run (only the K/V projections of a layer that only had K/V projected), the
KV read by attention and the KV written; FLOPs are the matrix products of every row plus attention.
Exit heads are priced the same way; each exit decision adds a host synchronisation and each
iteration a fixed overhead (HardwareSpec). The profile-backed model (profile_cost.py) prices from measurements;
``SimConfig.cost_model`` picks between them (cost_choice.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from eesim.hardware import HardwareSpec
from eesim.model_spec import ModelSpec
from eesim.pairwise_sum import _psum
from eesim.plan import IterationWork


class CostModel(Protocol):
    def iteration_time(self, work: IterationWork) -> np.ndarray:
        """Seconds for each step of the work, shape (T,)."""

    def breakdown(self, work: IterationWork) -> dict[str, float]:
        """Seconds per named component, summed over the work's steps."""


class AnalyticalCostModel:
    label = "analytical"  # how a run's summary names it (eesim.cost_choice)

    def __init__(self, model: ModelSpec, hardware: HardwareSpec) -> None:
        self.model = model
        self.hardware = hardware
        self.bandwidth = hardware.read_bandwidth * hardware.bandwidth_fraction
        self.flop_rate = hardware.peak_flops * hardware.flops_fraction
        self.layers = np.asarray(model.segment_layers, dtype=np.float64)
        self.layer_bytes = float(model.weight_bytes_per_layer)
        self.kv_proj_bytes = float(model.kv_proj_weight_bytes_per_layer)
        self.kv_token_bytes = float(model.kv_bytes_per_token_per_layer)
        self.layer_flops_per_row = 2.0 * model.params_per_layer
        self.kv_proj_flops_per_row = 2.0 * model.kv_proj_params_per_layer
        self.attn_flops_per_position = 4.0 * model.q_dim
        self.head_seconds = model.head_weight_bytes / self.bandwidth
        self.head_row_seconds = 2.0 * model.head_params / self.flop_rate
        self.fixed = hardware.iteration_overhead_s
        self.sync = hardware.exit_sync_s
        self._segment_layers = self.layers.tolist()  # (Python floats, for _one_step_time)

    def _segment_times(self, work: IterationWork) -> tuple[np.ndarray, np.ndarray]:
        """Seconds per (step, segment) and per (step, exit head)."""
        # In-place on fresh temporaries: the arrays are tiny, so allocations cost as much as arithmetic.
        # The operations and their order are those of the formulas in the docstring, bit for bit.
        full, proj = work.full_rows, work.proj_rows
        memory = work.kv_read + full
        memory += proj
        memory *= self.kv_token_bytes
        memory += np.where(full > 0, self.layer_bytes, self.kv_proj_bytes * (proj > 0))  # weights
        memory /= self.bandwidth
        compute = full * self.layer_flops_per_row
        compute += proj * self.kv_proj_flops_per_row
        compute += work.attn_context * self.attn_flops_per_position
        compute /= self.flop_rate
        segment = np.maximum(memory, compute, out=memory)
        segment *= self.layers
        logit_rows = work.logit_rows
        heads = np.maximum(self.head_seconds * (logit_rows > 0), logit_rows * self.head_row_seconds)
        return segment, heads

    def _one_step_time(self, work: IterationWork) -> float:
        """``iteration_time`` of a one-step record (most records) on Python floats: _segment_times'
        operations in the same order, and numpy's own sums over the segments, so the same result bit for
        bit, without two dozen numpy calls on arrays of one row."""
        kv_bytes, layer_bytes, kv_proj_bytes = self.kv_token_bytes, self.layer_bytes, self.kv_proj_bytes
        layer_flops, kv_proj_flops = self.layer_flops_per_row, self.kv_proj_flops_per_row
        attn_flops, bandwidth, flop_rate = self.attn_flops_per_position, self.bandwidth, self.flop_rate
        segment = []
        for full, proj, kv_read, attn, layers in zip(work.full_rows[0].tolist(), work.proj_rows[0].tolist(),
                                                     work.kv_read[0].tolist(), work.attn_context[0].tolist(),
                                                     self._segment_layers):
            weights = layer_bytes if full > 0 else kv_proj_bytes * (proj > 0)
            memory = ((kv_read + full + proj) * kv_bytes + weights) / bandwidth
            compute = (full * layer_flops + proj * kv_proj_flops + attn * attn_flops) / flop_rate
            segment.append((memory if memory >= compute else compute) * layers)
        head_seconds, head_row_seconds = self.head_seconds, self.head_row_seconds
        heads = [max(head_seconds * (rows > 0), rows * head_row_seconds) for rows in work.logit_rows[0].tolist()]
        # numpy's pairwise summation, as over a row of the (T, S) arrays: not Python's left-to-right sum
        return _psum(segment) + _psum(heads) + (self.fixed + work.syncs.item(0) * self.sync)

    def iteration_time(self, work: IterationWork) -> np.ndarray:
        if len(work.syncs) == 1:
            return np.array([self._one_step_time(work)])
        segment, heads = self._segment_times(work)
        total = np.add.reduce(segment, axis=1)  # (the ufunc itself: ndarray.sum adds a Python layer)
        total += np.add.reduce(heads, axis=1)
        total += self.fixed + work.syncs * self.sync
        return total

    def breakdown(self, work: IterationWork) -> dict[str, float]:
        segment, heads = self._segment_times(work)
        segment = segment.sum(axis=0)
        bounds = self.model.segment_bounds
        parts = {f"layers {lo + 1}-{hi}": float(t) for lo, hi, t in zip(bounds[:-1], bounds[1:], segment) if t > 0}
        parts["exit heads"] = float(heads.sum())
        parts["exit syncs"] = float(work.syncs.sum()) * self.sync
        parts["fixed overhead"] = self.fixed * len(work.syncs)
        return parts
