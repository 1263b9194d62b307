"""Serve a workload on the GPU executor through the shared scheduler.

Two clocks. By default the executor's own: the clock advances by each iteration's measured time, a
request joins the waiting queue once the clock has passed its arrival, and an idle executor jumps to
the next arrival. With ``realtime=True``, the wall clock, as a server sees it: requests arrive at their
wall-clock times, an idle executor sleeps until the next one, and every host cost between iterations
(scheduling, bookkeeping) is part of the timeline. This is the simulator's
loop with measured instead of priced iterations (and without SimPy, which the GPU machine may lack),
so its results compare with ``simulate`` on the same workload and configuration request by request:
each request replays the same recorded generation in both (same seed, same assignment).

While it serves, the objects alive before the loop are frozen out of Python's cyclic garbage collector
(``gc.freeze``), as long-running servers do after start-up: a full collection otherwise scans the whole
process (torch, pandas, the executor's caches) and stalls the iteration it falls in, a cost no cost model
prices and a tuned server does not pay (docs/fidelity.md, "Fourth measurement", has the numbers).
"""

from __future__ import annotations

import gc
import platform
import time
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from eesim.config import SimConfig
from eesim.errors import EesimError
from eesim.gpu.executor import GPUExecutor
from eesim.metrics import IterationLog, SimResult, build_result
from eesim.policies import exit_rule, kv_policy, measure
from eesim.policies.thresholds import parse_threshold
from eesim.request import Sequence
from eesim.scheduler import Scheduler
from eesim.workload import Workload


def build_executor(config: SimConfig, mode: str, num_blocks: int, checkpoint: str | None = None,
                   device: str | None = None, backend: str | None = None, cuda_graphs: bool = True) -> GPUExecutor:
    """A GPU executor for ``config``: ``replay`` builds random weights at the config's model shape and
    takes exits from the config's trace; ``model`` loads ``checkpoint`` and lets its confidences decide."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if mode == "model":
        from eesim.model.checkpoint import load_checkpoint

        if not checkpoint:
            raise EesimError("model mode needs a checkpoint (--checkpoint traces/small)")
        model = load_checkpoint(checkpoint, dtype=dtype, device=device)
        spec = model.spec
        if spec.num_layers != config.model.num_layers or spec.exit_layers != config.model.exit_layers:
            raise EesimError(f"checkpoint {checkpoint} is {spec.name!r} ({spec.num_layers} layers, exits "
                             f"{list(spec.exit_layers)}); run with --model {spec.name}")
    elif mode == "replay":
        model, spec = None, config.model  # the executor builds random weights of that shape on the device
    else:
        raise EesimError(f"unknown executor mode {mode!r}; choose replay or model")
    return GPUExecutor(model, spec, exit_rule(config.exit_rule), kv_policy(config.kv_policy),
                       measure(config.measure), parse_threshold(config.threshold, measure(config.measure)),
                       mode=mode, trace=config.trace, device=device, dtype=dtype, num_blocks=num_blocks,
                       block_size=config.scheduler.block_size, backend=backend, cuda_graphs=cuda_graphs,
                       seed=config.seed)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@contextmanager
def frozen_heap():
    """The objects alive now out of the garbage collector's scans (``gc.freeze``) until the block ends."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def serve(workload: Workload, config: SimConfig, executor: GPUExecutor, max_iterations: int = 1_000_000,
          realtime: bool = False) -> SimResult:
    """Serve ``workload`` on one replica; returns the same tables as ``simulate`` (times measured)."""
    if config.replicas != 1:
        raise EesimError("the GPU executor serves one replica; run one process per GPU for more")
    with frozen_heap():
        return _serve(workload, config, executor, max_iterations, realtime)


def _serve(workload: Workload, config: SimConfig, executor: GPUExecutor, max_iterations: int,
           realtime: bool) -> SimResult:
    policy = kv_policy(config.kv_policy)
    scheduler = Scheduler(replace(config.scheduler, num_blocks=executor.num_blocks), config.model, policy,
                          executor.num_blocks)
    sequences = [Sequence(request) for request in workload.requests]
    # the simulator's assignment of requests to recorded generations, so both replay the same tokens
    trace_sequences = np.random.default_rng(config.seed).integers(config.trace.num_sequences, size=len(sequences))
    log = IterationLog()
    captures = executor.graph_captures
    clock, arrived = 0.0, 0
    origin = time.perf_counter()
    for _ in range(max_iterations):
        if realtime:
            clock = time.perf_counter() - origin
        while arrived < len(sequences) and sequences[arrived].request.arrival_time <= clock:
            executor.prepare(sequences[arrived], int(trace_sequences[arrived]))
            scheduler.add(sequences[arrived])
            arrived += 1
        if not scheduler.has_work:
            if arrived == len(sequences):
                break
            if realtime:
                time.sleep(max(0.0, sequences[arrived].request.arrival_time - (time.perf_counter() - origin)))
            else:
                clock = sequences[arrived].request.arrival_time  # idle until the next request
            continue
        plan = scheduler.schedule(clock)
        outcome = executor.execute(plan)
        end = time.perf_counter() - origin if realtime else clock + float(outcome.elapsed[0])
        scheduler.update(plan, outcome, [end])
        log.record(0, plan, outcome, clock, [end], scheduler)
        clock = end
    else:
        raise RuntimeError("serve: iteration limit reached with work pending")
    labels = {"exit_rule": repr(exit_rule(config.exit_rule)), "kv_policy": policy.name,
              "measure": measure(config.measure).name, "threshold": str(config.threshold),
              "model": config.model.name, "hardware": f"measured on {device_name(executor.device)}", "replicas": 1,
              "router": "-", "seed": config.seed, "workload": workload.source,
              "exit_layers": list(config.model.all_exits),
              "graph_captures": executor.graph_captures - captures}  # during this run
    return build_result(sequences, log.frame(), config.model, labels)
