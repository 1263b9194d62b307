"""The executor's general path: any plan (prefill chunks, decode rows, owed K/V of every KV policy).

One flat token batch: one-token decode rows first, then the tokens of prefill chunks, sequence by
sequence; recompute's owed positions join as extra rows after them while they run the layers they
skipped. The batch runs stretch by stretch (the layers between two exits checked) and layer by layer
(``GPUExecutor._layer``): decode rows attend with the paged decode kernel, every other row with the
paged prefill kernel, all of a layer's chunks in one launch. What the layers read about the rows
(positions, KV slots, block tables, row ranges) is built with numpy and reaches the device in one
pinned copy per change of the rows (``batch.PinnedStager``), so the host never waits on the GPU
except at an exit decision.

Owed K/V is produced as the KV policy declares (kv_policy.py):
- ``kv_projection`` + ``iteration_end`` (fill): one ``fused_fill`` launch after the last layer, over every
  token that exited and every layer it skipped;
- ``batch_pass`` (copy_hidden): the kept exit hidden states of the batch's sequences (``plan.owed`` and
  this pass's own exits) ride along in the K/V projection of every layer the batch runs;
- ``own_pass`` with ``full_layers`` (recompute): owed positions run as extra rows through the layers
  they skipped, beside their sequence's row, up to the depth that row reaches, written before that
  row's attention.
The combinations the built-ins do not use work the same way. Exit hidden states (and, for
``full_layers``, the residual carried so far) are kept in ``GPUExecutor.hidden_pool``, indexed by KV
slot, so a sequence's blocks own its pending states too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from eesim.gpu.batch import LayerMeta
from eesim.plan import IterationPlan


def block_tables(blocks: list[list[int]], need: np.ndarray) -> np.ndarray:
    """(n, width) int32: the first ``need[i]`` blocks of each row's sequence, zero-padded."""
    width = max(int(need.max()) if len(need) else 1, 1)
    out = np.zeros((len(blocks), width), dtype=np.int32)
    for i, row in enumerate(blocks):
        k = int(need[i])
        out[i, :k] = row[:k]
    return out


@dataclass
class Owed:
    """Positions whose K/V is owed, handled in this pass (from ``plan.owed`` and this pass's exits).

    ``depth``: how far each position's K/V reaches so far (it rises as the entry rides along);
    ``hidden``: the state the policy works from, the exit hidden state (kv_projection) or the residual
    after ``depth`` layers (full_layers)."""

    row: np.ndarray
    position: np.ndarray
    slot: np.ndarray
    depth: np.ndarray
    hidden: Tensor | None

    @classmethod
    def empty(cls) -> Owed:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z, None)

    def __len__(self) -> int:
        return len(self.row)

    def add(self, row: np.ndarray, position: np.ndarray, slot: np.ndarray, depth: int | np.ndarray,
            hidden: Tensor) -> None:
        self.row = np.concatenate([self.row, row])
        self.position = np.concatenate([self.position, position])
        self.slot = np.concatenate([self.slot, slot])
        self.depth = np.concatenate([self.depth, np.broadcast_to(depth, row.shape)]).astype(np.int64)
        self.hidden = hidden if self.hidden is None else torch.cat([self.hidden, hidden])


@dataclass
class Resume:
    """A pure-decode pass the graphed path (decode_path.py) ran up to stretch ``stretch``, handed over because
    owed entries ride from there: the residual ``x`` of the rows still running (``active``) at that stretch's
    first layer, the exits and tokens so far, and the rows that left (exit states, exit layers), their K/V
    settled up to that layer."""

    stretch: int
    x: Tensor
    active: np.ndarray
    exit_index: np.ndarray
    forced: np.ndarray
    pending_tokens: list
    left_rows: np.ndarray
    left_hidden: Tensor | None
    left_depth: np.ndarray


def rides(policy, depth: np.ndarray, row_running: np.ndarray, lo: int, num_layers: int,
          any_rows: bool = True) -> np.ndarray:
    """Which owed entries (K/V reaching ``depth`` so far; their row still running or not) ride along in a
    stretch that starts at layer ``lo``: as the KV policy settles them."""
    cand = (depth <= lo) & (depth < num_layers)
    if policy.settle == "batch_pass":
        return cand & any_rows
    if policy.settle == "own_pass":
        return cand & row_running
    return cand  # iteration_end: only full_layers entries exist here; they go to the last layer


def run_general(ex, plan: IterationPlan, resume: Resume | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs ``plan`` on executor ``ex``; returns (exit index, forced, token) per row. With ``resume``, the
    rest of a pure-decode pass the graphed path began."""
    spec, model, stager = ex.spec, ex.model, ex._pinned
    seqs = plan.seqs
    B, S, bounds, L = len(seqs), spec.num_segments, spec.segment_bounds, spec.num_layers
    policy = ex.policy
    exit_index = np.full(B, S - 1, dtype=np.int64) if resume is None else resume.exit_index
    forced = np.zeros(B, dtype=bool) if resume is None else resume.forced
    tokens = np.full(B, -1, dtype=np.int64)
    if resume is None:
        ex.last_logits, ex.last_hidden = {}, {}
    num_new, start = plan.num_new.astype(np.int64), plan.start.astype(np.int64)

    # ---- the flat token batch: one-token rows first, then prefill chunks ----
    paged = np.flatnonzero(num_new == 1)
    chunked = np.flatnonzero(num_new > 1)
    order = np.concatenate([paged, chunked])
    pos_parts = [np.arange(start[b], start[b] + num_new[b], dtype=np.int64) for b in order]
    positions = np.concatenate(pos_parts) if pos_parts else np.zeros(0, dtype=np.int64)
    ids = np.concatenate([ex.tokens_at(seqs[b], p) for b, p in zip(order, pos_parts)]) if B else positions
    slots = np.concatenate([ex.slots_of(seqs[b], p) for b, p in zip(order, pos_parts)]) if B else positions
    P0 = len(paged)
    chunk_pos, chunk_slots = positions[P0:], slots[P0:]
    chunk_counts = num_new[chunked]
    T = int(chunk_counts.sum())
    chunk_last = P0 + np.cumsum(chunk_counts) - 1  # the row of each chunk's last token
    blocks = [seqs[b].blocks for b in range(B)]
    if resume is None:
        (ids_dev,) = stager.stage(ids.astype(np.int32))
        x = torch.index_select(model.embed_tokens.weight, 0, ids_dev)
    else:
        x = resume.x

    # ---- owed positions carried into this pass ----
    owed = Owed.empty()
    if policy.settle != "iteration_end":
        o_row = np.asarray([b for b, o in enumerate(plan.owed) for _ in o], dtype=np.int64)
        if len(o_row):
            o_pos = np.asarray([p for o in plan.owed for p, _ in o], dtype=np.int64)
            o_depth = np.asarray([d for o in plan.owed for _, d in o], dtype=np.int64)
            o_slot = np.concatenate([ex.slots_of(seqs[b], np.asarray([p for p, _ in o], dtype=np.int64))
                                     for b, o in enumerate(plan.owed) if o])
            (slot_dev,) = stager.stage(o_slot.astype(np.int32))
            owed.add(o_row, o_pos, o_slot, o_depth, ex.hidden_pool[slot_dev])
    fills: list[tuple[Tensor, int, np.ndarray, np.ndarray]] = []  # (exit hidden, exit layer, positions, slots)

    active = paged.copy()  # decode rows still running, in batch order
    ids_active, pos_active, slot_active = ids[:P0], positions[:P0], slots[:P0]
    row_active = np.ones(B, dtype=bool)
    can_exit = plan.can_exit.astype(bool)
    checks = ex.rule.checks_confidence and bool(can_exit.any())
    confident_all = ex._replay_confident(plan) if (ex.mode == "replay" and checks) else None
    prev = x[:P0] if checks and ex.measure.column == "cosine" else None  # cosine's previous exit
    pending_tokens: list[tuple[np.ndarray, Tensor]] = []  # (rows, argmax on device)
    first = 0  # first stretch to run
    if resume is not None:  # (a pure-decode pass: every row is a decode row, in batch order)
        first, active = resume.stretch, resume.active
        ids_active, pos_active, slot_active = ids[active], positions[active], slots[active]
        row_active[:] = False
        row_active[active] = True
        pending_tokens = resume.pending_tokens
        if len(resume.left_rows):  # the rows that left owe what the policy asks from where they are settled
            owed.add(resume.left_rows, positions[resume.left_rows], slots[resume.left_rows], resume.left_depth,
                     resume.left_hidden)
    full_layers = policy.work == "full_layers"
    staged_rows = -1  # decode rows the metadata below was staged for
    meta: LayerMeta | None = None  # exact metadata (eager layers), or
    mixed = None  # a padded shape (mixed_graphs.py), or
    decode_meta = None  # the decode stretch graphs' metadata (segments.py)
    carried = np.zeros(0, dtype=np.int64)

    lo = bounds[first]  # first layer of the stretch to run
    for s in range(first, S):
        hi = bounds[s + 1]
        if s < S - 1 and not checks and not len(owed):
            continue  # nothing happens at this exit: the stretch runs on through it
        any_rows = len(active) + T > 0
        riding = np.zeros(0, dtype=np.int64)
        if len(owed):
            ride = rides(policy, owed.depth, row_active[owed.row], lo, L, any_rows)
            assert (owed.depth[ride] == lo).all(), "an owed entry missed layers it should have run"
            riding = np.flatnonzero(ride)
        new_full = riding[np.lexsort((owed.position[riding], owed.row[riding]))] if full_layers else riding[:0]
        proj = riding[:0] if full_layers else riding
        if not any_rows and not len(new_full):
            break
        base = len(active) + T
        if staged_rows != len(active) or len(new_full) or len(carried) or len(proj):
            staged_rows = len(active)
            arrays = _meta_arrays(ex, blocks, active, pos_active, slot_active, chunked, chunk_counts, chunk_pos,
                                  chunk_slots, owed, new_full, proj)
            meta = mixed = decode_meta = None
            if not ex.cuda_graphs:
                meta, full_t, proj_t = _stage(ex, arrays)
            elif arrays["num_chunk_rows"] or len(proj):
                # rows beside the decode rows (prompt chunks, recompute's owed rows) or projected entries:
                # a padded graph (eager off CUDA)
                mixed = ex._mixed_graphs.prepare(arrays)
                full_t, proj_t = (t.long() for t in stager.stage(new_full.astype(np.int32), proj.astype(np.int32)))
            else:  # decode rows alone
                decode_meta = ex._stager.stage(ids_active, pos_active, slot_active, [blocks[b] for b in active])
                full_t = proj_t = None
            x = x[:base]
            if len(new_full):
                x = torch.cat([x, owed.hidden[full_t]])
            proj_hidden = owed.hidden[proj_t] if len(proj) else None
            if meta is not None:
                meta.proj_hidden = proj_hidden
        carried = new_full
        if mixed is not None:
            x = ex._mixed_graphs.run(lo, hi, x, mixed, len(active), proj_hidden)
        elif decode_meta is not None:
            x = ex._segment_graphs.run_layers(lo, hi, x, decode_meta)
        else:
            for layer in range(lo, hi):
                x = ex._layer(layer, x, meta)
        if len(new_full):
            owed.hidden[full_t] = x[base:]
            owed.depth[new_full] = hi
        owed.depth[proj] = hi
        lo = hi
        if s == S - 1 or not checks:
            continue

        # ---- exit check at exit s ----
        cand_local = np.flatnonzero(can_exit[active])
        if not len(cand_local):
            continue
        all_cand = len(cand_local) == len(active)
        (cand_t,) = (None,) if all_cand else stager.stage(cand_local.astype(np.int32))
        h = x[: len(active)] if all_cand else x[cand_t.long()]
        p = None if prev is None else (prev if all_cand else prev[cand_t.long()])
        values, logits = ex._confidence(s, h, p)
        values = ex._to_host(values.float())  # the exit decision's host sync
        cand_rows = active[cand_local]
        conf = np.zeros(B, dtype=bool)
        if confident_all is not None:
            conf[:] = confident_all[:, s]
        else:
            conf[cand_rows] = ex.measure.confident(values, ex.threshold.at(plan.token_index[cand_rows], ex.measure))
        act_mask = np.zeros(B, dtype=bool)
        act_mask[cand_rows] = True
        leaving = np.asarray(ex.rule.decide(conf, act_mask, s), dtype=bool) & act_mask
        if prev is not None:
            prev = x[: len(active)].clone()  # x may be a graph's buffer, rewritten by the next stretch
        if not leaving.any():
            continue
        leave_local = np.flatnonzero(leaving[active])  # indices into the active rows
        keep = np.flatnonzero(~leaving[active])
        pick = np.searchsorted(cand_local, leave_local)  # their rows among the candidates
        leave_t, keep_t, pick_t = (t.long() for t in stager.stage(
            leave_local.astype(np.int32), np.concatenate([keep, len(active) + np.arange(T)]).astype(np.int32),
            pick.astype(np.int32)))
        leave_rows = active[leave_local]
        exit_index[leave_rows] = s
        forced[leave_rows] = ~conf[leave_rows]
        row_active[leave_rows] = False
        h_exit = x[leave_t]
        lg = logits[pick_t] if logits is not None else ex._exit_logits(ex._model_exit[s], h_exit)
        pending_tokens.append((leave_rows, lg.argmax(-1)))
        if ex.keep_logits:
            for j, b in enumerate(leave_rows.tolist()):
                ex.last_logits[b] = lg[j].float()
                ex.last_hidden[b] = h_exit[j]
        e_pos, e_slot = pos_active[leave_local], slot_active[leave_local]
        if policy.settle == "iteration_end" and policy.work == "kv_projection":
            fills.append((h_exit, hi, e_pos, e_slot))
        else:
            owed.add(leave_rows, e_pos, e_slot, hi, h_exit)
        x = x[:base][keep_t]
        if prev is not None:
            prev = prev[keep_t[: len(keep)]]
        active, ids_active, pos_active, slot_active = active[keep], ids_active[keep], pos_active[keep], slot_active[keep]

    # ---- rows that ran to the last layer: final head for those that emit ----
    emit_local = np.flatnonzero(plan.emits[active])
    emit_chunk = np.flatnonzero(plan.emits[chunked])
    final_rows = np.concatenate([active[emit_local], chunked[emit_chunk]])
    if len(final_rows):
        final_idx = np.concatenate([emit_local, len(active) + chunk_last[emit_chunk] - P0])
        (idx_t,) = stager.stage(final_idx.astype(np.int32))
        lg = ex._exit_logits(ex._model_exit[S - 1], x[idx_t.long()])
        pending_tokens.append((final_rows, lg.argmax(-1)))
        if ex.keep_logits:
            for j, b in enumerate(final_rows.tolist()):
                ex.last_logits[b] = lg[j].float()

    # ---- owed K/V settled at the end of the iteration, or kept for later passes ----
    if fills:
        ex._fill_graphs.run(torch.cat([h for h, _, _, _ in fills]), np.concatenate([np.full(len(p), e) for _, e, p, _ in fills]),
                            np.concatenate([p for _, _, p, _ in fills]), np.concatenate([s for _, _, _, s in fills]), L)
    if len(owed) and ex.hidden_pool is not None:
        keep_state = np.flatnonzero(owed.depth < L)
        if len(keep_state):
            ks_t, slot_t = (t.long() for t in stager.stage(keep_state.astype(np.int32),
                                                             owed.slot[keep_state].astype(np.int32)))
            ex.hidden_pool[slot_t] = owed.hidden[ks_t]

    if pending_tokens:
        rows = np.concatenate([r for r, _ in pending_tokens])
        tokens[rows] = torch.cat([t for _, t in pending_tokens]).cpu().numpy()
    return exit_index, forced, tokens


def _meta_arrays(ex, blocks, active, pos_active, slot_active, chunked, chunk_counts, chunk_pos, chunk_slots,
                 owed: Owed, new_full: np.ndarray, proj: np.ndarray) -> dict:
    """What the layers read about the current rows, as numpy arrays (see ``LayerMeta``)."""
    bs = ex.block_size
    f_pos = owed.position[new_full]
    ctx = (pos_active + 1).astype(np.int32)
    # chunk groups: each prefill chunk, then each sequence's recomputed positions
    f_rows, f_counts = np.unique(owed.row[new_full], return_counts=True)
    group_seq = np.concatenate([chunked, f_rows]).astype(np.int64)
    counts = np.concatenate([chunk_counts, f_counts]).astype(np.int64)
    cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last_pos = np.concatenate([chunk_pos, f_pos])[cu[1:] - 1] if len(counts) else np.zeros(0, np.int64)
    return {"num_paged": len(active), "num_chunk_rows": int(cu[-1]), "max_rows": int(counts.max()) if len(counts) else 0,
            "positions": np.concatenate([pos_active, chunk_pos, f_pos]),
            "slots": np.concatenate([slot_active, chunk_slots, owed.slot[new_full], owed.slot[proj]]),
            "tables": block_tables([blocks[b] for b in active], -(-ctx // bs)), "context": ctx, "cu": cu,
            "chunk_tables": block_tables([blocks[b] for b in group_seq], last_pos // bs + 1),
            "proj_positions": owed.position[proj], "new_full": new_full, "proj": proj}


def _stage(ex, a: dict) -> tuple[LayerMeta, Tensor, Tensor]:
    """The exact (unpadded) metadata on the device, and the index tensors of the carried and the projected
    entries into ``Owed``, in one copy."""
    names = ("positions", "slots", "tables", "context", "cu", "chunk_tables", "proj_positions", "new_full", "proj")
    (pos_t, slot_t, bt_t, ctx_t, cu_t, ct_t, proj_pos_t, full_t, proj_t) = ex._pinned.stage(
        *(a[k].astype(np.int32) for k in names))
    P, chunks = a["num_paged"], len(a["cu"]) > 1
    meta = LayerMeta(pos_t, slot_t, P, bt_t if P else None, ctx_t if P else None, cu_t if chunks else None,
                     ct_t if chunks else None, a["max_rows"], None, proj_pos_t if len(a["proj"]) else None)
    return meta, full_t.long(), proj_t.long()
