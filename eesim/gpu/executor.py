"""The GPU executor: runs an early-exit Llama over a paged KV cache, one scheduler plan per call.

It implements ``eesim.executor.Executor`` and is driven by the same ``Scheduler`` as the simulator:

    plan = scheduler.schedule(now)
    outcome = executor.execute(plan)          # runs the model; measured seconds in outcome.elapsed
    scheduler.update(plan, outcome, [now + float(outcome.elapsed[0])])

One iteration (``plan.steps`` is always 1 here) takes one of two paths:

- decode_path.py (``cuda_graphs=True`` and a plan of one-token decode rows; see ``_graphed_decode_ok``): each
  stretch between exits checked runs as one CUDA graph with the exit's head and confidence inside
  (segments.py), and the exits are settled after the last one; with ``graphed_owing``, a plan owing K/V
  from earlier steps runs so up to the first stretch that K/V would ride along in, and the general path
  takes the rest over;
- general_path.py (anything else: prefill chunks beside decode rows, copy_hidden's projections and
  recompute's extra rows of K/V owed from earlier steps, kept logits): a layer loop over one flat token batch, decode rows through the
  paged decode kernel and every prefill chunk (and recompute's rows) of a layer through one paged
  prefill launch. With ``cuda_graphs`` each stretch runs as a CUDA graph: over a padded batch
  (mixed_graphs.py) when rows beside the decode rows or projected entries are present, else as a decode
  stretch (segments.py).

Both check an exit where decode rows that may exit are still running: the exit head (per-exit norm +
shared head, or the classifier / cosine) and the confidence measure over those rows, one host sync,
then ``rule.decide(confident, active, k)``; leaving rows emit that exit's argmax and the rest continue
(the batch shrinks by an index-select). Owed K/V is produced as the KV policy declares: see
general_path.py.

Matrix products go through ``_linear``: up to ``skinny_rows`` (64) rows the skinny-GEMM kernel
(kernels/gemv.py; residual adds and the MLP's silu(gate) * up fused in: at one row into the down
GEMV's prologue, above into the gate+up GEMM's epilogue), cuBLAS above. The exit
heads use it too (``_exit_logits``); the graphed max_prob check computes confidence and argmax in one
kernel (kernels/confidence.py). Rotary and the K/V store are one kernel after the QKV projection
(kernels/rope_store.py).

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

import numpy as np
import torch
from torch import Tensor

from eesim.kernels import (
    SKINNY_MAX_ROWS,
    apply_rotary,
    fused_fill,
    max_prob_argmax,
    paged_decode_attention,
    paged_prefill_attention,
    rmsnorm,
    rotary_store_kv,
    rotary_tables,
    skinny_linear,
    store_kv,
)
from eesim.policies import exit_rule as _exit_rule
from eesim.policies import kv_policy as _kv_policy
from eesim.policies import measure as _measure
from eesim.policies.base import ExitRule, Measure
from eesim.policies.thresholds import Threshold, parse_threshold
from eesim.errors import EesimError, require
from eesim.exit_trace import ExitTrace
from eesim.gpu.batch import LayerMeta, MetaStager, PinnedStager
from eesim.gpu.decode_path import run_decode
from eesim.gpu.fill_graphs import FillGraphs
from eesim.gpu.general_path import run_general
from eesim.gpu.mixed_graphs import MixedGraphs
from eesim.gpu.segments import SegmentGraphs
from eesim.gpu.weights import FusedWeights, build_random_model
from eesim.kv_policy import KVPolicy
from eesim.model import confidence as C
from eesim.model.transformer import EarlyExitLlama
from eesim.model_spec import ModelSpec
from eesim.plan import IterationOutcome, IterationPlan
from eesim.request import Sequence
from eesim.sim_executor import SimExecutor
from eesim.work import WorkCounter, settle_target

MODES = ("model", "replay")
LOGIT_COLUMNS = ("max_prob", "margin", "entropy", "classifier", "agrees")


def synthetic_token(seq_id: int, position, vocab_size: int):
    """Prompt token of a request without real token ids (deterministic, spread over the vocabulary); ``position``
    an int or an array of them."""
    return (seq_id * 1_000_003 + position * 7_919 + 12_345) % vocab_size


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
        self._tails = None  # what the decode graphs' tails were captured for (see configure)
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
        # cuda_graphs: pure-decode plans take the graphed path (decode_path.py; on CPU the same code runs
        # eagerly); other plans take the general path, its stretches as padded graphs on CUDA.
        self.cuda_graphs = cuda_graphs
        # False: every plan takes the general path (the profiler times eager exit checks this way)
        self.graphed_decode = True
        # True: decode steps that start owing K/V (copy_hidden, recompute) run graphed up to the first stretch
        # where it would ride along, then on the general path (decode_path._hand_over). On by default since
        # measured on the H100 (2026-11-23: such steps 0.8-2 ms faster, docs/benchmarks.md); the profiler records
        # it (ProfileGrid.graphed_owing)
        self.graphed_owing = True
        self.handovers = 0  # graphed passes the general path took over where owed K/V rides (decode_path.py)
        self._stager = MetaStager(self.device, block_size)
        self._pinned = PinnedStager(self.device)
        self._host_bufs: dict = {}  # pinned landing buffers of _to_host, per shape
        self._segment_graphs = SegmentGraphs(self)
        self._mixed_graphs = MixedGraphs(self)
        self._fill_graphs = FillGraphs(self)
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

        tails = (tuple(spec.exit_layers), self.measure.column, self.measure.name)
        if hasattr(self, "k_cache"):  # (a reconfiguration)
            self._ensure_hidden_pool()
            if tails != self._tails:  # decode graphs' tails hold the exit heads and the measure; mixed graphs
                self._segment_graphs.reset()  # hold layers only
        self._tails = tails

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

    def tokens_at(self, seq: Sequence, positions: np.ndarray) -> np.ndarray:
        """``token_at`` for many positions of one sequence at once."""
        req, vocab = seq.request, self.spec.vocab_size
        out = np.empty(len(positions), dtype=np.int64)
        in_prompt = positions < req.prompt_len
        p = positions[in_prompt]
        if len(p):
            out[in_prompt] = np.asarray(req.prompt_tokens, dtype=np.int64)[p] if req.prompt_tokens is not None \
                else synthetic_token(req.request_id, p, vocab)
        generated = positions[~in_prompt] - req.prompt_len
        if len(generated):  # (a decode row: one token, read from the list without converting it)
            out[~in_prompt] = [seq.output_tokens[g] % vocab for g in generated.tolist()]
        return out

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
            exit_index, forced, tokens = run_decode(self, plan)
        else:
            exit_index, forced, tokens = run_general(self, plan)
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
        """Plans the graphed path covers: every row a one-token decode step; exits settled at its end (fill,
        copy_hidden) or kept (recompute); nothing owed from earlier steps, or, with ``graphed_owing``, K/V owed
        (copy_hidden, recompute) up to where it would ride along (then the general path takes over); no kept
        logits."""
        if not self.cuda_graphs or not self.graphed_decode or self.keep_logits or not len(plan.seqs) \
                or (plan.num_new != 1).any():
            return False
        policy = self.policy
        checks = self.rule.checks_confidence and plan.can_exit.any()
        if checks and not plan.can_exit.all():
            return False
        if policy.settle == "iteration_end" and policy.work == "kv_projection":
            return True
        if any(len(o) for o in plan.owed):
            if not self.graphed_owing:
                return False
            # owed K/V rides from its exit layer on: the graphed path runs the pass up to the first stretch where
            # some of it would ride, then hands the rest to the general path (decode_path._hand_over), for the
            # policies whose rows that left by then can be settled up to there (projected, or left to their own
            # pass)
            return bool(checks) and (policy.settle == "own_pass"
                                     or (policy.settle == "batch_pass" and policy.work == "kv_projection"))
        # nothing owed yet: rows that leave are settled at the end (decode_path._settle_exits)
        return not checks or policy.settles_exits_after_the_pass

    def project_kv(self, h: Tensor, layer: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                   end_layer: int | None = None) -> None:
        """K/V of rows that left at ``layer`` (exit hidden states ``h``), projected into the cache for layers
        ``layer .. end_layer - 1`` (default: every skipped layer): one ``fused_fill`` launch, its indices in one
        pinned copy. Fill's settlement, and copy_hidden's on the graphed decode path."""
        layer_t, pos_t, slot_t = self._pinned.stage(layer.astype(np.int32), positions.astype(np.int32),
                                                    slots.astype(np.int32))
        w = self.weights
        fused_fill(h, layer_t, pos_t, slot_t, w.ln1, w.wk, w.wv, self.eps, self.cos, self.sin,
                   self.k_cache, self.v_cache, end_layer=end_layer, first_layer=int(layer.min()),
                   backend=self.backend)

    @property
    def graph_captures(self) -> int:
        """CUDA graphs captured so far: each one stalled the iteration that first needed its shape."""
        return self._segment_graphs.captures + self._mixed_graphs.captures + self._fill_graphs.captures

    @torch.no_grad()
    def capture_graphs(self, max_rows: int, max_context: int, max_chunk_tokens: int = 0) -> int:
        """Capture up front every decode graph a run of at most ``max_rows`` decode rows and ``max_context``
        positions can need (each padded row count x block-table width x stretch of the current exits),
        as serving engines capture their batch sizes at start-up; otherwise a shape first met under load
        stalls that iteration for a model pass and a capture. With ``max_chunk_tokens``, also the prompt-chunk
        graphs (``mixed_graphs``) of ``mixed_graph_plan``: chunks up to that many tokens beside each padded count
        of decode rows, recompute's owed rows beside them, copy_hidden's projected entries beside decode rows
        or a chunk. Returns the graphs captured (0 off CUDA)."""
        if self.device.type != "cuda" or not self.cuda_graphs:
            return 0
        from eesim.gpu.batch import WIDTH_QUANTUM, row_bucket

        spec, graphs = self.spec, self._segment_graphs
        bounds, S = spec.segment_bounds, spec.num_segments
        stretches = [(0, spec.num_layers, "final")]
        if self.rule.checks_confidence and S > 1:
            stretches += [(bounds[s], bounds[s + 1], ("check", s) if s < S - 1 else "final") for s in range(S)]
        buckets = sorted({row_bucket(n) for n in range(1, max(1, max_rows) + 1)})
        blocks = -(-max(1, max_context) // self.block_size)
        widths = range(WIDTH_QUANTUM, -(-blocks // WIDTH_QUANTUM) * WIDTH_QUANTUM + 1, WIDTH_QUANTUM)
        before = graphs.captures
        for n in buckets:
            for width in widths:
                # rows of padding only (slot -1: nothing written), in the buffers real batches of the shape use
                meta = self._stager.stage(np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, -1, np.int64),
                                          [[0]] * n, width=width)
                for lo, hi, tail in stretches:
                    graphs.ensure(lo, hi, meta, tail)
        captured = graphs.captures - before
        if len(stretches) > 1:  # the projection of rows that leave at each exit, to each depth it can go to
            L = spec.num_layers
            ends = {settle_target(self.policy, 0, reach, L) for reach in bounds[1:]}
            for n in buckets:
                for first in bounds[1:-1]:
                    for end in sorted(e for e in ends if e > first):
                        captured += self._fill_graphs.capture(n, first, end)
        for P, T, stretches_of_shape, M in self.mixed_graph_plan(max_rows, max_chunk_tokens):
            captured += self._mixed_graphs.capture(P, T, stretches_of_shape, M)
        torch.cuda.synchronize()
        return captured

    def mixed_graph_plan(self, max_rows: int, max_chunk_tokens: int) -> list[tuple[int, int, list, int]]:
        """The padded shapes ``capture_graphs`` captures on the general path (``mixed_graphs``), as
        ``(decode rows P, chunk tokens T, stretches, projected entries M)``, each with ``MIN_CHUNKS`` chunks:
        every shape a run of at most ``max_rows`` rows and chunks of at most ``max_chunk_tokens`` tokens can
        meet, but those of more than ``MIN_CHUNKS`` prompt chunks and owing sequences in one step, and
        copy_hidden's entries beside a chunk beyond one padded count (16) of them. Nothing runs here."""
        if max_chunk_tokens <= 0:
            return []
        from eesim.gpu.mixed_graphs import pow2, token_bucket

        spec, policy = self.spec, self.policy
        bounds, S = spec.segment_bounds, spec.num_segments
        checked = self.rule.checks_confidence and S > 1
        whole = [(0, spec.num_layers)]
        segments = whole + [(bounds[s], bounds[s + 1]) for s in range(S)] if checked else whole
        after_exit = segments[2:]  # the stretches after the first exit: where owed entries join
        top = token_bucket(max_chunk_tokens)
        tokens = sorted({token_bucket(n) for n in range(1, top + 1)})
        row_buckets = sorted({pow2(n) for n in range(1, max(1, max_rows) + 1)})
        # a chunk alone is never checked (one stretch), but it runs on alone, stretch by stretch, once every
        # decode row beside it has left at an exit
        plan = [(rows, t, segments if rows else whole + after_exit, 0) for rows in [0] + row_buckets for t in tokens]
        if not checked:
            return plan
        if policy.work == "full_layers":
            # recompute's owed rows join a prompt chunk's tokens after the first exit: more tokens than the
            # largest chunk (up to four owed positions per row, as many as the scheduler lets accumulate)
            extra = sorted({token_bucket(n) for n in range(top + 1, top + 4 * max(1, max_rows) + 1)} - set(tokens))
            plan += [(rows, t, after_exit, 0) for rows in row_buckets for t in extra]
        if policy.work == "kv_projection" and policy.settle != "iteration_end":
            # copy_hidden's steps that start owing: entries ride along from their exit on, stretch by
            # stretch, beside the decode rows alone (up to one per row) and beside a prompt chunk (16 padded)
            plan += [(rows, 0, after_exit, m) for rows in row_buckets
                     for m in sorted({pow2(n, 16) for n in range(1, rows + 1)})]
            plan += [(rows, t, after_exit, 16) for rows in [0] + row_buckets for t in tokens]
        return plan

    def _to_host(self, t: Tensor) -> np.ndarray:
        """``t.cpu().numpy()`` through a pinned buffer (a non-blocking copy, then a stream sync)."""
        if t.device.type != "cuda":
            return t.cpu().numpy()
        buf = self._host_bufs.get((t.shape, t.dtype))
        if buf is None:
            buf = self._host_bufs[(t.shape, t.dtype)] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return buf.numpy().copy()

    def _layer(self, layer: int, x: Tensor, m: LayerMeta) -> Tensor:
        spec, w, be = self.spec, self.weights, self.backend
        H, Hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        n = x.shape[0]
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        h = rmsnorm(x, w.ln1[layer], self.eps, backend=be)
        qd, kvd = H * hd, Hkv * hd
        qkv = self._linear(h, w.wqkv[layer])  # one GEMM for Q, K and V (weights.py says why)
        if m.proj_hidden is None:  # rotary and the K/V store in one kernel
            q = rotary_store_kv(qkv, H, Hkv, m.positions, self.cos, self.sin, kc, vc, m.slots, backend=be)
        else:  # owed positions add K/V projections only: the K;V rows of wqkv
            q = qkv[:, :qd].view(n, H, hd)
            k = qkv[:, qd:qd + kvd].view(n, Hkv, hd)
            v = qkv[:, qd + kvd:].view(n, Hkv, hd)
            q, k = apply_rotary(q, k, m.positions, self.cos, self.sin, backend=be)
            kv = self._linear(rmsnorm(m.proj_hidden, w.ln1[layer], self.eps, backend=be), w.wqkv[layer][qd:])
            kp = kv[:, :kvd].reshape(-1, Hkv, hd)
            _, kp = apply_rotary(kp, kp, m.proj_positions, self.cos, self.sin, backend=be)
            k = torch.cat([k, kp])
            v = torch.cat([v, kv[:, kvd:].view(-1, Hkv, hd)])
            store_kv(k, v, kc, vc, m.slots, backend=be)
        P = m.num_paged
        if P == n:  # decode rows only: the kernel's output is the attention (no copy)
            attn = paged_decode_attention(q, kc, vc, m.block_tables, m.context_lens, backend=be)
        elif P == 0:
            attn = paged_prefill_attention(q, kc, vc, m.chunk_tables, m.chunk_rows, m.positions,
                                           m.max_chunk_rows, backend=be)
        else:
            attn = torch.empty_like(q)
            paged_decode_attention(q[:P], kc, vc, m.block_tables, m.context_lens, out=attn[:P], backend=be)
            attn[P:] = paged_prefill_attention(q[P:], kc, vc, m.chunk_tables, m.chunk_rows, m.positions[P:],
                                               m.max_chunk_rows, backend=be)
        # residual adds (and the MLP's silu * up) ride in the skinny GEMM at small batches
        x = self._linear(attn.reshape(n, H * hd), w.wo[layer], residual=x)
        h2 = rmsnorm(x, w.ln2[layer], self.eps, backend=be)
        if n == 1:  # one row: silu(gate) * up in the down GEMV's prologue (benchmarks/mlp_bench.py: 3% faster)
            gu = self._linear(h2, w.w_gate_up[layer])
            return self._linear(gu, w.w_down[layer], residual=x, act="silu_mul")
        act = self._linear(h2, w.w_gate_up[layer], act="glu")  # in the gate+up GEMM's epilogue (no torch ops)
        return self._linear(act, w.w_down[layer], residual=x)

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
