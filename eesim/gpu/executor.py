"""The GPU executor: runs an early-exit Llama over a paged KV cache, one scheduler plan per call.

It implements ``eesim.executor.Executor`` and is driven by the same ``Scheduler`` as the simulator:

    plan = scheduler.schedule(now)
    outcome = executor.execute(plan)          # runs the model; measured seconds in outcome.elapsed
    scheduler.update(plan, outcome, [now + float(outcome.elapsed[0])])

One iteration (``plan.steps`` is always 1 here):

- every row's new positions form one flat token batch: rows with one new position (decode steps) first,
  then the tokens of prefill chunks; they are embedded and run segment by segment (the layers between
  two exits) and layer by layer. Each layer writes its K/V with ``store_kv``; one-token rows attend with
  ``paged_decode_attention``; prefill chunks (and re-run owed positions) attend causally over their
  cached prefix with a torch path (K/V gathered from the paged cache, ``scaled_dot_product_attention``
  per sequence).
- at each intermediate exit where decode rows that may exit are still running: the exit head (per-exit
  norm + shared head, or the classifier / cosine) and the confidence measure over those rows, one host
  sync, then ``rule.decide(confident, active, k)``; leaving rows emit that exit's argmax and the rest
  continue (the batch shrinks by an index-select).
- owed K/V is produced as the KV policy declares (see ``_Entries`` below and kv_policy.py):
  ``kv_projection`` + ``iteration_end`` (fill): one ``fused_fill`` launch after the last layer, over every
  exited token and every layer it skipped; ``batch_pass`` (copy_hidden): the kept exit hidden states of
  the batch's sequences (``plan.owed`` and this pass's own exits) ride along in the K/V projection of
  every layer the batch runs; ``own_pass`` with ``full_layers`` (recompute): owed positions run as extra
  rows through the layers they skipped, beside their sequence's row, up to the depth that row reaches,
  written before that row's attention. The combinations the built-ins do not use work the same way.
  Exit hidden states (and for ``full_layers`` the residual carried so far) are kept in a buffer indexed
  by KV slot, so a sequence's blocks own its pending states too.

Graphed decode path (``cuda_graphs=True``): a plan of one-token decode rows only (exits settled by
fill, or no exits and nothing owed) skips the general loop below: ``batch.MetaStager`` ships its
metadata in one copy and ``segments.SegmentGraphs`` runs each stretch between exits checked (the whole
depth when none is) as one CUDA graph with the exit's head and confidence, or the final head, inside.

Matrix products go through ``_linear``: up to ``skinny_rows`` (16) rows the skinny-GEMM kernel
(kernels/gemv.py; residual adds and, at one row, the MLP's silu * up fused in), cuBLAS above. The exit
heads use it too (``_exit_logits``); the graphed max_prob check computes confidence and argmax in one
kernel (kernels/confidence.py).

Modes. ``model``: the confidences decide, emitted tokens are the model's argmax, ``agrees`` is reported
True (whether an early exit agrees with full depth would need the full-depth pass it skipped; it is
not computed). ``replay`` (random weights at any shape): the exit decisions come from a recorded
exit trace exactly as ``SimExecutor`` makes them (bind requests with ``prepare``), while the exit heads
and confidences are still computed and synced so that their cost is real; emitted tokens are the
trace's argmax (the model's where the trace has none), ``agrees`` comes from the trace.

Timing: ``outcome.elapsed`` is the wall time of ``execute`` from entry to the last result on the host:
CUDA events on the GPU, ``perf_counter`` on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from eesim.errors import EesimError, require
from eesim.exit_trace import ExitTrace
from eesim.kernels import (SKINNY_MAX_ROWS, apply_rotary, fused_fill, max_prob_argmax, paged_decode_attention, rmsnorm,
                           rotary_tables, skinny_linear, store_kv)
from eesim.kv_policy import KVPolicy
from eesim.model import confidence as C
from eesim.model.transformer import EarlyExitLlama
from eesim.model_spec import ModelSpec
from eesim.plan import IterationOutcome, IterationPlan
from eesim.policies import exit_rule as _exit_rule
from eesim.policies import kv_policy as _kv_policy
from eesim.policies import measure as _measure
from eesim.policies.base import ExitRule, Measure
from eesim.policies.thresholds import Threshold, parse_threshold
from eesim.request import Sequence
from eesim.sim_executor import SimExecutor
from eesim.work import WorkCounter

from eesim.gpu.batch import MetaStager
from eesim.gpu.segments import SegmentGraphs
from eesim.gpu.weights import FusedWeights, build_random_model

MODES = ("model", "replay")
LOGIT_COLUMNS = ("max_prob", "margin", "entropy", "classifier", "agrees")


def synthetic_token(seq_id: int, position: int, vocab_size: int) -> int:
    """Prompt token of a request without real token ids (deterministic, spread over the vocabulary)."""
    return (seq_id * 1_000_003 + position * 7_919 + 12_345) % vocab_size


@dataclass
class _Group:
    """Query rows of one sequence attending causally through the torch path."""

    q_idx: Tensor  # (n,) rows of the token batch
    key_slots: Tensor  # (m,) KV slots of positions 0..m-1
    mask: Tensor  # (n, m) bool: key position <= query position


@dataclass
class _SegmentMeta:
    positions: Tensor  # (N,) positions of the batch rows
    slots: Tensor  # (N + M,) KV slots of the batch rows, then of the projected entries
    num_paged: int
    block_tables: Tensor | None
    context_lens: Tensor | None
    groups: list[_Group]
    proj_hidden: Tensor | None  # (M, d) hidden states of owed positions projected in this segment
    proj_positions: Tensor | None


@dataclass
class _Entries:
    """Owed positions handled in this pass: from ``plan.owed`` and from this pass's early exits.

    ``depth`` is how far each position's K/V reaches so far (it rises as the entry rides along);
    ``hidden`` the state the policy works from: the exit hidden state (kv_projection) or the residual
    after ``depth`` layers (full_layers)."""

    row: list[int] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    slot: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    hidden: list[Tensor] = field(default_factory=list)  # (d,) each, stacked lazily

    def add(self, row: int, position: int, slot: int, depth: int, hidden: Tensor) -> None:
        self.row.append(row)
        self.position.append(position)
        self.slot.append(slot)
        self.depth.append(depth)
        self.hidden.append(hidden)

    def __len__(self) -> int:
        return len(self.row)


class GPUExecutor:
    """Implements eesim.executor.Executor by running the model (see the module docstring)."""

    def __init__(self, model: EarlyExitLlama | None, spec: ModelSpec, rule: ExitRule | str,
                 kv_policy: KVPolicy | str, measure: Measure | str = "max_prob",
                 threshold: Threshold | float | str = 0.9, mode: str = "model", trace: ExitTrace | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 num_blocks: int = 1024, block_size: int = 16, *, backend: str | None = None,
                 share_weights: bool = True, keep_logits: bool = False, cuda_graphs: bool = False,
                 seed: int = 0) -> None:
        self.backend = backend
        self.keep_logits = keep_logits
        if device is None:
            device = model.embed_tokens.weight.device if model is not None else (
                "cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if dtype is None:
            dtype = model.embed_tokens.weight.dtype if model is not None else (
                torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.dtype = dtype
        if model is None:
            model = build_random_model(spec, self.device, dtype, seed=seed)
        else:
            p = model.embed_tokens.weight
            if p.device != self.device or p.dtype != dtype:
                model = model.to(device=self.device, dtype=dtype)
        self.model = model.eval()
        self.hidden_pool = None
        self.num_blocks, self.block_size = num_blocks, block_size
        self.configure(spec, rule, kv_policy, measure, threshold, mode, trace)
        self.weights = FusedWeights.from_model(model, share=share_weights)
        L, kvh, hd = spec.num_layers, spec.num_kv_heads, spec.head_dim
        shape = (L, num_blocks, block_size, kvh, hd)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self._ensure_hidden_pool()
        self.cos, self.sin = rotary_tables(spec.max_context, hd, spec.rope_theta, torch.float32, self.device)
        self.eps = spec.norm_eps
        # cuda_graphs: pure-decode plans take the graphed path (segments.py; on CPU the same code runs
        # eagerly); other plans run eagerly, their pure-decode segments as graphs on CUDA.
        self.cuda_graphs = cuda_graphs
        self._graphs: dict = {}
        self._graph_pool = None
        self._stager = MetaStager(self.device, block_size)
        self._segment_graphs = SegmentGraphs(self)
        self.last_logits: dict[int, Tensor] = {}  # row -> emitted logits (V,), with keep_logits
        self.last_hidden: dict[int, Tensor] = {}  # row -> exit hidden state of early-exited rows, with keep_logits
        # Matrix products of at most this many rows use the skinny-GEMM kernel (kernels/gemv.py), more
        # rows cuBLAS: on the H100 the kernel wins at 1 row by 4-35% and ties or wins slightly to 16.
        self.skinny_rows = SKINNY_MAX_ROWS

    def configure(self, spec: ModelSpec, rule: ExitRule | str, kv_policy: KVPolicy | str,
                  measure: Measure | str = "max_prob", threshold: Threshold | float | str = 0.9,
                  mode: str = "model", trace: ExitTrace | None = None) -> None:
        """Set (or change, keeping the weights and the KV cache) the exits, the exit rule, the KV policy,
        the measure and the mode. ``spec`` must have the model's shape; its exits a subset of the model's."""
        require(mode in MODES, f"GPU executor: mode must be one of {MODES}, got {mode!r}")
        model = self.model
        self.spec = spec
        self.rule = _exit_rule(rule)
        self.policy = _kv_policy(kv_policy)
        self.measure = _measure(measure)
        self.threshold = parse_threshold(threshold, self.measure)
        self.mode = mode
        mspec = model.spec
        require((mspec.num_layers, mspec.hidden_size, mspec.num_heads, mspec.num_kv_heads, mspec.head_dim,
                 mspec.mlp_size, mspec.vocab_size) == (spec.num_layers, spec.hidden_size, spec.num_heads,
                                                       spec.num_kv_heads, spec.head_dim, spec.mlp_size,
                                                       spec.vocab_size),
                f"GPU executor: model shape {mspec.name!r} differs from spec {spec.name!r}")
        missing = [e for e in spec.exit_layers if e not in mspec.exit_layers]
        require(not missing, f"GPU executor: exits {missing} of the spec have no exit head in the model "
                             f"(model exits {list(mspec.exit_layers)})")
        # executor exit index -> the model's exit index (the spec may use a subset of the model's exits)
        self._model_exit = [mspec.all_exits.index(e) for e in spec.all_exits]
        if mode == "model" and self.measure.column == "agrees":
            raise EesimError("GPU executor: the oracle measure needs the full-depth argmax; use mode='replay'")
        if mode == "replay":
            require(trace is not None, "GPU executor: replay mode needs an exit trace")
            # SimExecutor checks the trace against the exits and turns its column into decisions;
            # the cost model is not used.
            self._replay = SimExecutor(spec, self.rule, self.policy, self.measure, self.threshold, trace, None)
        self.trace = trace
        self.counter = WorkCounter(spec, self.policy, self.rule, self.measure.needs_logits)

        if hasattr(self, "k_cache"):
            self._ensure_hidden_pool()
            self._segment_graphs.reset()

    def _ensure_hidden_pool(self) -> None:
        # Kept exit hidden states (and carried residuals), one row per KV slot.
        if self.policy.settle != "iteration_end" and self.hidden_pool is None:
            self.hidden_pool = torch.zeros(self.num_blocks * self.block_size, self.spec.hidden_size,
                                           dtype=self.dtype, device=self.device)

    # ---- requests ------------------------------------------------------------------------------------
    def prepare(self, seq: Sequence, trace_sequence: int) -> None:
        """Bind a request to recorded generation ``trace_sequence`` of the trace (replay mode)."""
        require(self.trace is not None, "GPU executor: prepare needs an exit trace")
        SimExecutor.prepare(self, seq, trace_sequence)  # uses self.trace only

    def token_at(self, seq: Sequence, position: int) -> int:
        """Input token at ``position``: the prompt's, then the tokens the sequence emitted."""
        req = seq.request
        if position < req.prompt_len:
            if req.prompt_tokens is not None:
                return int(req.prompt_tokens[position])
            return synthetic_token(req.request_id, position, self.spec.vocab_size)
        return int(seq.output_tokens[position - req.prompt_len]) % self.spec.vocab_size

    def slots_of(self, seq: Sequence, positions: np.ndarray) -> np.ndarray:
        blocks = np.asarray(seq.blocks, dtype=np.int64)
        return blocks[positions // self.block_size] * self.block_size + positions % self.block_size

    # ---- one iteration -------------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, plan: IterationPlan) -> IterationOutcome:
        require(plan.steps == 1, "GPU executor: plans cover one step")
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            ev_start, ev_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev_start.record()
        else:
            t_start = time.perf_counter()
        if self._graphed_decode_ok(plan):
            exit_index, forced, tokens = self._run_decode(plan)
        else:
            exit_index, forced, tokens = self._run(plan)
        if on_cuda:
            ev_end.record()
            ev_end.synchronize()
            elapsed = ev_start.elapsed_time(ev_end) / 1e3
        else:
            elapsed = time.perf_counter() - t_start

        if self.mode == "replay":
            rows = self._trace_rows(plan)
            agrees = self.trace.agrees[rows, exit_index] | ~plan.emits
            recorded = self.trace.argmax[rows, exit_index]
            tokens = np.where(recorded >= 0, recorded, tokens)
        else:
            agrees = np.ones(len(plan.seqs), dtype=bool)  # not measured: see the module docstring
        tokens = np.where(plan.emits, tokens, -1)
        work = self.counter.count(plan, exit_index[None])
        return IterationOutcome(np.array([elapsed]), exit_index[None], forced[None], agrees[None], tokens[None], work)

    def _trace_rows(self, plan: IterationPlan) -> np.ndarray:
        bound = np.array([(s.trace_offset, s.trace_len) for s in plan.seqs], dtype=np.int64).reshape(-1, 2)
        return bound[:, 0] + plan.token_index % np.maximum(bound[:, 1], 1)

    def _replay_confident(self, plan: IterationPlan) -> np.ndarray:
        """(B, K) confidence at the intermediate exits, exactly as SimExecutor reads it."""
        rep = self._replay
        rows = self._trace_rows(plan)
        if rep._confident is not None:
            return rep._confident[rows, :-1]
        thresholds = self.threshold.at(plan.token_index, self.measure)[:, None]
        return self.measure.confident(rep._column[rows, :-1], thresholds)

    # ---- the graphed decode path --------------------------------------------------------------------
    def _graphed_decode_ok(self, plan: IterationPlan) -> bool:
        """Plans the graphed path covers: every row a one-token decode step; exits (if checked) settled by
        fill at the end of the iteration, or no exits and nothing owed; no kept logits."""
        if not self.cuda_graphs or self.keep_logits or not len(plan.seqs) or (plan.num_new != 1).any():
            return False
        policy = self.policy
        checks = self.rule.checks_confidence and plan.can_exit.any()
        if checks and not plan.can_exit.all():
            return False
        if policy.settle == "iteration_end" and policy.work == "kv_projection":
            return True
        return not checks and not any(len(o) for o in plan.owed)

    def _run_decode(self, plan: IterationPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decode step of every row through ``SegmentGraphs``: one stretch per exit checked (one
        with no checks), a host read of the confidences after each, the batch shrinking as rows leave."""
        spec, model, dev, bs = self.spec, self.model, self.device, self.block_size
        seqs = plan.seqs
        B, S, bounds, L = len(seqs), spec.num_segments, spec.segment_bounds, spec.num_layers
        exit_index = np.full(B, S - 1, dtype=np.int64)
        forced = np.zeros(B, dtype=bool)
        tokens = np.full(B, -1, dtype=np.int64)
        self.last_logits, self.last_hidden = {}, {}
        pos = plan.start.astype(np.int64)
        blocks = [seq.blocks for seq in seqs]
        slots = np.array([blocks[b][pos[b] // bs] * bs + pos[b] % bs for b in range(B)], dtype=np.int64)
        ids = np.array([self.token_at(seq, int(p)) for seq, p in zip(seqs, pos)], dtype=np.int64)
        checks = self.rule.checks_confidence and bool(plan.can_exit.any())
        confident_all = self._replay_confident(plan) if (self.mode == "replay" and checks) else None
        graphs = self._segment_graphs

        active = np.arange(B)
        meta = self._stager.stage(ids, pos, slots, blocks)
        fill_h: list[Tensor] = []
        fill_rows: list[np.ndarray] = []  # rows that left, per exit
        fill_layer: list[int] = []
        pending: list[tuple[np.ndarray, Tensor]] = []  # (rows, argmax on device)
        lo = 0
        for s in range(S):
            hi = bounds[s + 1]
            if s < S - 1 and not checks:
                continue  # no check here: the next stretch runs on through these layers
            out = graphs.run(lo, hi, meta, "final" if s == S - 1 else ("check", s))
            lo = hi
            if s == S - 1:
                emit = plan.emits[active]
                pending.append((active[emit], out.token[torch.as_tensor(np.flatnonzero(emit), device=dev)]
                                if not emit.all() else out.token))
                break
            values = self._to_host(out.conf)  # the exit decision's host sync (a few bytes)
            conf = np.zeros(B, dtype=bool)
            if confident_all is not None:
                conf[:] = confident_all[:, s]
            else:
                conf[active] = self.measure.confident(values, self.threshold.at(plan.token_index[active],
                                                                               self.measure))
            act_mask = np.zeros(B, dtype=bool)
            act_mask[active] = True
            leaving = np.asarray(self.rule.decide(conf, act_mask, s), dtype=bool) & act_mask
            if not leaving.any():
                continue
            leave_local = np.flatnonzero(leaving[active])
            leave_rows = active[leave_local]
            exit_index[leave_rows] = s
            forced[leave_rows] = ~conf[leave_rows]
            leave_t = torch.as_tensor(leave_local, device=dev)
            h_exit = out.x[leave_t]
            tok = out.token[leave_t] if out.token is not None else \
                self._exit_logits(self._model_exit[s], h_exit).argmax(-1)
            pending.append((leave_rows, tok))
            fill_h.append(h_exit)
            fill_rows.append(leave_rows)
            fill_layer.append(hi)
            keep = np.flatnonzero(~leaving[active])
            if not len(keep):
                break
            x_keep = out.x[torch.as_tensor(keep, device=dev)]
            active = active[keep]
            meta = self._stager.stage(ids[active], pos[active], slots[active], [blocks[b] for b in active])
            graphs.set_x(x_keep)

        if fill_h:  # owed K/V of the rows that left, every layer they skipped: one launch
            rows = np.concatenate(fill_rows)
            layer = np.concatenate([np.full(len(r), e) for r, e in zip(fill_rows, fill_layer)])
            ints = torch.as_tensor(np.stack([layer, pos[rows], slots[rows]]), device=dev)  # one copy
            w = self.weights
            fused_fill(torch.cat(fill_h), ints[0].to(torch.int32), ints[1], ints[2], w.ln1, w.wk, w.wv, self.eps,
                       self.cos, self.sin, self.k_cache, self.v_cache, backend=self.backend)
        if pending:
            rows = np.concatenate([r for r, _ in pending])
            tokens[rows] = torch.cat([t for _, t in pending]).cpu().numpy()
        return exit_index, forced, tokens

    def _to_host(self, t: Tensor) -> np.ndarray:
        """``t.cpu().numpy()`` through a pinned buffer (a non-blocking copy, then a stream sync)."""
        if t.device.type != "cuda":
            return t.cpu().numpy()
        buf = self._host_bufs.get((t.shape, t.dtype)) if hasattr(self, "_host_bufs") else None
        if buf is None:
            if not hasattr(self, "_host_bufs"):
                self._host_bufs = {}
            buf = self._host_bufs[(t.shape, t.dtype)] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return buf.numpy().copy()

    # ---- the general path -------------------------------------------------------------------------
    def _run(self, plan: IterationPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        spec, model, dev = self.spec, self.model, self.device
        seqs = plan.seqs
        B = len(seqs)
        S = spec.num_segments
        bounds = spec.segment_bounds
        L = spec.num_layers
        policy = self.policy
        exit_index = np.full(B, S - 1, dtype=np.int64)
        forced = np.zeros(B, dtype=bool)
        tokens = np.full(B, -1, dtype=np.int64)
        self.last_logits, self.last_hidden = {}, {}
        num_new, start = plan.num_new.astype(np.int64), plan.start.astype(np.int64)

        # ---- the flat token batch: one-token rows first, then prefill chunks ----
        paged = np.flatnonzero(num_new == 1)
        generic = np.flatnonzero(num_new > 1)
        positions, ids, slots = [], [], []
        row_slots: dict[int, np.ndarray] = {}
        for b in [*paged.tolist(), *generic.tolist()]:
            seq = seqs[b]
            pos = np.arange(start[b], start[b] + num_new[b], dtype=np.int64)
            positions.append(pos)
            ids.extend(self.token_at(seq, int(p)) for p in pos)
            row_slots[b] = self.slots_of(seq, pos)
            slots.append(row_slots[b])
        positions = np.concatenate(positions)
        slots = np.concatenate(slots)
        num_generic_tokens = int(num_new[generic].sum())
        # generic rows' token ranges within the generic part of the batch
        g_off = np.concatenate([[0], np.cumsum(num_new[generic])]).astype(np.int64)
        x = model.embed_tokens.weight[torch.as_tensor(np.asarray(ids, dtype=np.int64), device=dev)]

        # ---- owed positions (entries) ----
        entries = _Entries()
        if policy.settle != "iteration_end":
            owed_slots, owed_rows = [], []
            for b, owed in enumerate(plan.owed):
                for p, d in owed:
                    slot = int(self.slots_of(seqs[b], np.array([p]))[0])
                    owed_slots.append(slot)
                    owed_rows.append((b, p, slot, d))
            if owed_rows:
                pending = self.hidden_pool[torch.as_tensor(owed_slots, device=dev)]
                for i, (b, p, slot, d) in enumerate(owed_rows):
                    entries.add(b, p, slot, d, pending[i])
        fill_rows: list[tuple[Tensor, int, int, int]] = []  # (hidden, exit layer, position, slot)

        active = paged.copy()  # rows still running among the one-token rows, in batch order
        row_active = np.ones(B, dtype=bool)
        can_exit = plan.can_exit.astype(bool)
        checks = self.rule.checks_confidence and can_exit.any()
        confident_all = self._replay_confident(plan) if (self.mode == "replay" and checks) else None
        prev = x[: len(paged)] if checks and self.measure.column == "cosine" else None  # cosine's previous exit
        pending_tokens: list[tuple[np.ndarray, Tensor]] = []  # (rows, argmax on device)
        full_ids: list[int] = []  # entries currently carried as extra rows at the end of x
        pos_active = positions[: len(paged)]
        slot_active = slots[: len(paged)]

        for s in range(S):
            lo, hi = bounds[s], bounds[s + 1]
            any_rows = len(active) + num_generic_tokens > 0
            riding = []
            for e in range(len(entries)):
                d = entries.depth[e]
                if d > lo or d >= L:
                    continue
                b = entries.row[e]
                if policy.settle == "batch_pass":
                    rides = any_rows
                elif policy.settle == "own_pass":
                    rides = bool(row_active[b])
                else:  # iteration_end: only full_layers entries exist here; they go to the last layer
                    rides = True
                if rides:
                    assert d == lo, f"owed entry at depth {d} missed layers before {lo}"
                    riding.append(e)
            full = policy.work == "full_layers"
            new_full = riding if full else []
            proj = [] if full else riding
            if not any_rows and not new_full:
                break
            # rebuild the carried extra rows
            base = len(active) + num_generic_tokens
            x = x[:base]
            if new_full:
                x = torch.cat([x, torch.stack([entries.hidden[e] for e in new_full])])
            full_ids = new_full
            meta = self._segment_meta(plan, seqs, active, pos_active, slot_active, generic, g_off,
                                      positions[len(paged):], slots[len(paged):], entries, full_ids, proj)
            if (self.cuda_graphs and self.device.type == "cuda") and not meta.groups and meta.proj_hidden is None and meta.num_paged == len(x):
                x = self._graphed_segment(lo, hi, x, meta)
            else:
                for layer in range(lo, hi):
                    x = self._layer(layer, x, meta)
            for j, e in enumerate(full_ids):
                entries.hidden[e] = x[base + j]
                entries.depth[e] = hi
            for e in proj:
                entries.depth[e] = hi
            if s == S - 1 or not checks:
                continue
            # ---- exit check at exit s ----
            cand = [i for i, b in enumerate(active.tolist()) if can_exit[b]]
            if not cand:
                continue
            cand_t = torch.as_tensor(cand, device=dev)
            h = x[cand_t]
            values, logits = self._confidence(s, h, prev[cand_t] if prev is not None else None)
            values = values.float().cpu().numpy()  # the exit decision's host sync
            cand_rows = active[cand]
            conf = np.zeros(B, dtype=bool)
            if confident_all is not None:
                conf[:] = confident_all[:, s]
            else:
                thr = self.threshold.at(plan.token_index[cand_rows], self.measure)
                conf[cand_rows] = self.measure.confident(values, thr)
            act_mask = np.zeros(B, dtype=bool)
            act_mask[cand_rows] = True
            leaving = np.asarray(self.rule.decide(conf, act_mask, s), dtype=bool) & act_mask
            if prev is not None:
                prev = x[: len(active)]
            if not leaving.any():
                continue
            leave_local = np.flatnonzero(leaving[active])  # indices into the active rows
            leave_rows = active[leave_local]
            exit_index[leave_rows] = s
            forced[leave_rows] = ~conf[leave_rows]
            row_active[leave_rows] = False
            leave_t = torch.as_tensor(leave_local, device=dev)
            h_exit = x[leave_t]
            if logits is not None:
                pick = torch.as_tensor(np.searchsorted(np.asarray(cand), leave_local), device=dev)
                lg = logits[pick]
            else:
                lg = self._exit_logits(self._model_exit[s], h_exit)
            pending_tokens.append((leave_rows, lg.argmax(-1)))
            if self.keep_logits:
                for j, b in enumerate(leave_rows.tolist()):
                    self.last_logits[b] = lg[j].float()
                    self.last_hidden[b] = h_exit[j]
            e_layer = bounds[s + 1]
            for j, b in enumerate(leave_rows.tolist()):
                p, slot = int(pos_active[leave_local[j]]), int(slot_active[leave_local[j]])
                if policy.settle == "iteration_end" and policy.work == "kv_projection":
                    fill_rows.append((h_exit[j], e_layer, p, slot))
                else:
                    entries.add(b, p, slot, e_layer, h_exit[j])
            keep = np.flatnonzero(~leaving[active])
            keep_t = torch.as_tensor(np.concatenate([keep, len(active) + np.arange(num_generic_tokens)]),
                                     device=dev, dtype=torch.long)
            x = torch.cat([x[:base][keep_t], x[base:]])
            if prev is not None:
                prev = prev[torch.as_tensor(keep, device=dev, dtype=torch.long)]
            active, pos_active, slot_active = active[keep], pos_active[keep], slot_active[keep]

        # ---- rows that ran to the last layer: final head for those that emit ----
        final_rows, final_idx = [], []
        for i, b in enumerate(active.tolist()):
            if plan.emits[b]:
                final_rows.append(b)
                final_idx.append(i)
        for j, b in enumerate(generic.tolist()):
            if plan.emits[b]:
                final_rows.append(b)
                final_idx.append(len(active) + int(g_off[j + 1]) - 1)
        if final_rows and exit_index[final_rows].max() == S - 1:
            h = x[torch.as_tensor(final_idx, device=dev)]
            lg = self._exit_logits(self._model_exit[S - 1], h)
            pending_tokens.append((np.asarray(final_rows), lg.argmax(-1)))
            if self.keep_logits:
                for j, b in enumerate(final_rows):
                    self.last_logits[b] = lg[j].float()

        # ---- owed K/V settled at the end of the iteration, or kept for later passes ----
        if fill_rows:
            w = self.weights
            fused_fill(torch.stack([r[0] for r in fill_rows]),
                       torch.tensor([r[1] for r in fill_rows], dtype=torch.int32, device=dev),
                       torch.tensor([r[2] for r in fill_rows], dtype=torch.int64, device=dev),
                       torch.tensor([r[3] for r in fill_rows], dtype=torch.int64, device=dev),
                       w.ln1, w.wk, w.wv, self.eps, self.cos, self.sin, self.k_cache, self.v_cache,
                       backend=self.backend)
        if len(entries) and self.hidden_pool is not None:
            keep_state = [e for e in range(len(entries)) if entries.depth[e] < L]
            if keep_state:
                self.hidden_pool[torch.as_tensor([entries.slot[e] for e in keep_state], device=dev)] = \
                    torch.stack([entries.hidden[e] for e in keep_state])

        if pending_tokens:
            rows = np.concatenate([r for r, _ in pending_tokens])
            vals = torch.cat([t for _, t in pending_tokens]).cpu().numpy()
            tokens[rows] = vals
        return exit_index, forced, tokens

    # ---- pieces --------------------------------------------------------------------------------------
    def _segment_meta(self, plan, seqs, active, pos_active, slot_active, generic, g_off, g_positions, g_slots,
                      entries: _Entries, full_ids: list[int], proj: list[int]) -> _SegmentMeta:
        dev, bs = self.device, self.block_size
        P = len(active)
        pos_parts = [pos_active, g_positions]
        slot_parts = [slot_active, g_slots]
        if full_ids:
            pos_parts.append(np.asarray([entries.position[e] for e in full_ids], dtype=np.int64))
            slot_parts.append(np.asarray([entries.slot[e] for e in full_ids], dtype=np.int64))
        if proj:
            slot_parts.append(np.asarray([entries.slot[e] for e in proj], dtype=np.int64))
        positions = np.concatenate(pos_parts)
        slots_all = np.concatenate(slot_parts)
        bt = ctx = None
        if P:
            ctx_np = (pos_active + 1).astype(np.int32)
            maxb = int(-(-ctx_np.max() // bs))
            bt_np = np.zeros((P, maxb), dtype=np.int32)
            for i, b in enumerate(active.tolist()):
                blocks = seqs[b].blocks[:maxb]
                bt_np[i, : len(blocks)] = blocks
            bt = torch.as_tensor(bt_np, device=dev)
            ctx = torch.as_tensor(ctx_np, device=dev)
        groups = []
        base = P
        for j, b in enumerate(generic.tolist()):
            lo, hi = int(g_off[j]), int(g_off[j + 1])
            groups.append(self._group(seqs[b], np.arange(base + lo, base + hi), g_positions[lo:hi]))
        if full_ids:
            extra0 = P + len(g_positions)
            by_row: dict[int, list[int]] = {}
            for j, e in enumerate(full_ids):
                by_row.setdefault(entries.row[e], []).append(j)
            for b, js in by_row.items():
                qpos = np.asarray([entries.position[full_ids[j]] for j in js], dtype=np.int64)
                groups.append(self._group(seqs[b], extra0 + np.asarray(js), qpos))
        proj_hidden = proj_positions = None
        if proj:
            proj_hidden = torch.stack([entries.hidden[e] for e in proj])
            proj_positions = torch.as_tensor([entries.position[e] for e in proj], dtype=torch.long, device=dev)
        return _SegmentMeta(torch.as_tensor(positions, device=dev), torch.as_tensor(slots_all, device=dev), P,
                            bt, ctx, groups, proj_hidden, proj_positions)

    def _group(self, seq: Sequence, q_idx: np.ndarray, qpos: np.ndarray) -> _Group:
        dev = self.device
        keys = np.arange(int(qpos.max()) + 1, dtype=np.int64)
        mask = keys[None, :] <= qpos[:, None]
        return _Group(torch.as_tensor(q_idx, dtype=torch.long, device=dev),
                      torch.as_tensor(self.slots_of(seq, keys), device=dev), torch.as_tensor(mask, device=dev))

    def _graphed_segment(self, lo: int, hi: int, x: Tensor, m: _SegmentMeta) -> Tensor:
        """Layers lo..hi-1 of a batch of one-token rows, as a CUDA graph captured per (segment, rows,
        block-table width rounded up to 32 blocks). Inputs are copied into the graph's static buffers;
        the returned tensor is the graph's output buffer (valid until the same graph runs again)."""
        n, maxb = x.shape[0], m.block_tables.shape[1]
        width = -(-maxb // 32) * 32
        key = (lo, hi, n, width)
        entry = self._graphs.get(key)
        if entry is None:
            bt = torch.zeros(n, width, dtype=torch.int32, device=self.device)
            bt[:, :maxb] = m.block_tables
            static = _SegmentMeta(m.positions.clone(), m.slots.clone(), n, bt, m.context_lens.clone(), [], None, None)
            x_in = x.clone()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the kernels; writes the same K/V the replay writes
                y = x_in
                for layer in range(lo, hi):
                    y = self._layer(layer, y, static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                y = x_in
                for layer in range(lo, hi):
                    y = self._layer(layer, y, static)
            entry = self._graphs[key] = (graph, x_in, static, y)
        else:
            graph, x_in, static, y = entry
            x_in.copy_(x)
            static.positions.copy_(m.positions)
            static.slots.copy_(m.slots)
            static.context_lens.copy_(m.context_lens)
            static.block_tables[:, :maxb].copy_(m.block_tables)
            if maxb < width:
                static.block_tables[:, maxb:].zero_()
        graph.replay()
        return y

    def _layer(self, layer: int, x: Tensor, m: _SegmentMeta) -> Tensor:
        spec, w, be = self.spec, self.weights, self.backend
        H, Hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        n = x.shape[0]
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        h = rmsnorm(x, w.ln1[layer], self.eps, backend=be)
        if m.proj_hidden is None:  # one GEMM for Q, K and V (weights.py says why)
            qkv = self._linear(h, w.wqkv[layer])
            qd, kvd = H * hd, Hkv * hd
            q = qkv[:, :qd].view(n, H, hd)
            k = qkv[:, qd:qd + kvd].view(n, Hkv, hd)
            v = qkv[:, qd + kvd:].view(n, Hkv, hd)
        else:  # owed rows add K/V projections only
            q = F.linear(h, w.wq[layer]).view(n, H, hd)
            hk = torch.cat([h, rmsnorm(m.proj_hidden, w.ln1[layer], self.eps, backend=be)])
            k = F.linear(hk, w.wk[layer]).view(-1, Hkv, hd)
            v = F.linear(hk, w.wv[layer]).view(-1, Hkv, hd)
        q, k_rows = apply_rotary(q, k[:n], m.positions, self.cos, self.sin, backend=be)
        if m.proj_hidden is not None:
            kp = k[n:].contiguous()
            _, kp = apply_rotary(kp, kp, m.proj_positions, self.cos, self.sin, backend=be)
            k = torch.cat([k_rows, kp])
        else:
            k = k_rows
        store_kv(k, v, kc, vc, m.slots, backend=be)
        P = m.num_paged
        if P == n and not m.groups:  # decode rows only: the kernel's output is the attention (no copy)
            attn = paged_decode_attention(q, kc, vc, m.block_tables, m.context_lens, backend=be)
        else:
            attn = torch.empty_like(q)
            if P:
                attn[:P] = paged_decode_attention(q[:P], kc, vc, m.block_tables, m.context_lens, backend=be)
            for g in m.groups:
                attn[g.q_idx] = self._dense_attention(q[g.q_idx], kc, vc, g)
        # residual adds (and the MLP's silu * up) ride in the skinny GEMM at small batches
        x = self._linear(attn.reshape(n, H * hd), w.wo[layer], residual=x)
        h2 = rmsnorm(x, w.ln2[layer], self.eps, backend=be)
        gu = self._linear(h2, w.w_gate_up[layer])
        return self._linear(gu, w.w_down[layer], residual=x, act="silu_mul")

    def _linear(self, x: Tensor, w: Tensor, residual: Tensor | None = None, act: str | None = None) -> Tensor:
        """``act(x) @ w.T (+ residual)``: the skinny-GEMM kernel up to ``skinny_rows`` rows, else torch."""
        be = self.backend if x.shape[0] <= self.skinny_rows else "torch"
        return skinny_linear(x, w, residual, act, backend=be)

    def _exit_logits(self, k: int, h: Tensor) -> Tensor:
        """Logits of the model's exit ``k`` (``EarlyExitLlama.exit_logits``, the head through ``_linear``)."""
        model = self.model
        norm = model.norm if k == model.num_exits - 1 else model.exit_norms[k]
        normed = rmsnorm(h, norm.weight, norm.eps, backend=self.backend)  # one kernel (the module: ~6)
        head = model.exit_heads[k] if (k < model.num_exits - 1 and model.head_kind == "per_exit") else model.lm_head
        return self._linear(normed, head.weight)


    def _dense_attention(self, q: Tensor, kc: Tensor, vc: Tensor, g: _Group) -> Tensor:
        spec = self.spec
        Hkv, hd = spec.num_kv_heads, spec.head_dim
        k = kc.view(-1, Hkv, hd)[g.key_slots]
        v = vc.view(-1, Hkv, hd)[g.key_slots]
        rep = spec.num_heads // Hkv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=g.mask)
        return out[0].transpose(0, 1)

    def _confidence(self, k: int, h: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The measure at exit ``k`` over rows ``h``; also the exit's logits when they were computed."""
        model, col = self.model, self.measure.column
        mk = self._model_exit[k]
        logits = self._exit_logits(mk, h) if (col in LOGIT_COLUMNS or self.measure.needs_logits) else None
        if col == "max_prob":
            return max_prob_argmax(logits, backend=self.backend)[0], logits
        if col == "margin":
            return C.margin(logits), logits
        if col == "entropy":
            return C.entropy(logits), logits
        if col == "cosine":
            return C.cosine(h, prev), logits
        if col == "classifier":
            return torch.sigmoid(model.classifier_logit(mk, h, logits).float()), logits
        if col == "agrees":  # the oracle (replay only): the exit's argmax stands in for its cost
            return logits.argmax(-1), logits
        raise EesimError(f"GPU executor: no computation for measure column {col!r}")


def run_plans(scheduler, executor, max_iterations: int = 100_000, on_iteration=None) -> float:
    """Drive ``scheduler`` with ``executor`` until no work is left; returns the summed measured seconds.
    ``on_iteration(plan, outcome)`` is called after each update."""
    now = 0.0
    for _ in range(max_iterations):
        if not scheduler.has_work:
            break
        plan = scheduler.schedule(now)
        outcome = executor.execute(plan)
        now += float(outcome.elapsed[0])
        scheduler.update(plan, outcome, [now])
        if on_iteration is not None:
            on_iteration(plan, outcome)
    else:
        raise RuntimeError("run_plans: iteration limit reached with work pending")
    return now
