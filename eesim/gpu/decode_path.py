"""The graphed decode path: a plan of one-token decode rows, stretch by stretch through CUDA graphs.

Covers the plans ``GPUExecutor._graphed_decode_ok`` admits (every row a decode step; nothing owed
when the iteration starts, but fill's): ``batch.MetaStager`` ships the rows' metadata in one copy and
``segments.SegmentGraphs`` runs each stretch between exits checked (the whole depth when none is) as
one CUDA graph with the exit's head and confidence, or the final head, inside. After each check the
host reads the confidences (a few bytes), the rule decides, and the batch shrinks by the rows that
left; ``_settle_exits`` then does what the KV policy asks of them in one ``fused_fill`` launch, replayed
from a CUDA graph (``fill_graphs``; fill: every layer skipped; copy_hidden: the layers the rest of the batch ran) and keeps the exit states of what is
still owed in the hidden pool (copy_hidden past the pass's reach, recompute).

With ``graphed_owing`` it also takes plans that start owing K/V (copy_hidden, recompute): they run here up to
the first stretch in which an owed entry would ride along (often none: the rows leave first), and there
``_hand_over`` passes the rest of the pass to the general path (``general_path.Resume``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from eesim.gpu.general_path import Resume, rides, run_general
from eesim.plan import IterationPlan
from eesim.work import settle_target


def run_decode(ex, plan: IterationPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One decode step of every row through ``SegmentGraphs``: one stretch per exit checked (one
    with no checks), a host read of the confidences after each, the batch shrinking as rows leave."""
    spec, dev, bs = ex.spec, ex.device, ex.block_size
    seqs = plan.seqs
    B, S, bounds = len(seqs), spec.num_segments, spec.segment_bounds
    exit_index = np.full(B, S - 1, dtype=np.int64)
    forced = np.zeros(B, dtype=bool)
    tokens = np.full(B, -1, dtype=np.int64)
    ex.last_logits, ex.last_hidden = {}, {}
    pos = plan.start.astype(np.int64)
    blocks = [seq.blocks for seq in seqs]
    slots = np.array([blocks[b][pos[b] // bs] * bs + pos[b] % bs for b in range(B)], dtype=np.int64)
    ids = np.array([ex.token_at(seq, int(p)) for seq, p in zip(seqs, pos)], dtype=np.int64)
    checks = ex.rule.checks_confidence and bool(plan.can_exit.any())
    confident_all = ex._replay_confident(plan) if (ex.mode == "replay" and checks) else None
    graphs = ex._segment_graphs

    active = np.arange(B)
    reach = spec.num_layers  # deepest layer any row of this pass runs
    meta = ex._stager.stage(ids, pos, slots, blocks)
    fill_h: list[Tensor] = []
    fill_rows: list[np.ndarray] = []  # rows that left, per exit
    fill_layer: list[int] = []
    pending: list[tuple[np.ndarray, Tensor]] = []  # (rows, argmax on device)
    # K/V owed from earlier steps (copy_hidden, recompute): none of it rides before its exit layer, and a step
    # whose rows all leave before then never runs it; the first stretch it would ride in, the general path
    # takes the pass over (general_path.Resume)
    owed_row = owed_depth = None  # (only with graphed_owing: the executor admits no other owing plan here)
    if any(plan.owed):
        owed_row = np.asarray([b for b, o in enumerate(plan.owed) for _ in o], dtype=np.int64)
        owed_depth = np.asarray([d for o in plan.owed for _, d in o], dtype=np.int64)
    x_now = None  # the running rows' residual after the last stretch
    lo = 0
    for s in range(S):
        hi = bounds[s + 1]
        if s < S - 1 and not checks:
            continue  # no check here: the next stretch runs on through these layers
        if owed_row is not None and s:
            running = np.zeros(B, dtype=bool)
            running[active] = True
            if rides(ex.policy, owed_depth, running[owed_row], lo, spec.num_layers).any():
                return _hand_over(ex, plan, s, x_now, active, exit_index, forced, pending, fill_h, fill_rows,
                                  fill_layer, pos, slots)
        out = graphs.run(lo, hi, meta, "final" if s == S - 1 else ("check", s))
        x_now = out.x
        lo = hi
        if s == S - 1:
            emit = plan.emits[active]
            pending.append((active[emit], out.token[torch.as_tensor(np.flatnonzero(emit), device=dev)]
                            if not emit.all() else out.token))
            break
        values = ex._to_host(out.conf)  # the exit decision's host sync (a few bytes)
        conf = np.zeros(B, dtype=bool)
        if confident_all is not None:
            conf[:] = confident_all[:, s]
        else:
            conf[active] = ex.measure.confident(values, ex.threshold.at(plan.token_index[active],
                                                                           ex.measure))
        act_mask = np.zeros(B, dtype=bool)
        act_mask[active] = True
        leaving = np.asarray(ex.rule.decide(conf, act_mask, s), dtype=bool) & act_mask
        if not leaving.any():
            continue
        leave_local = np.flatnonzero(leaving[active])
        leave_rows = active[leave_local]
        exit_index[leave_rows] = s
        forced[leave_rows] = ~conf[leave_rows]
        if len(leave_local) == len(active):  # the whole batch leaves: no gathers
            h_exit, tok = out.x, out.token
        else:
            leave_t = torch.as_tensor(leave_local, device=dev)
            h_exit, tok = out.x[leave_t], (out.token[leave_t] if out.token is not None else None)
        if tok is None:
            tok = ex._exit_logits(ex._model_exit[s], h_exit).argmax(-1)
        pending.append((leave_rows, tok))
        fill_h.append(h_exit)
        fill_rows.append(leave_rows)
        fill_layer.append(hi)
        keep = np.flatnonzero(~leaving[active])
        if not len(keep):
            reach = hi  # the pass ends here: no row runs deeper
            break
        x_keep = x_now = out.x[torch.as_tensor(keep, device=dev)]
        active = active[keep]
        meta = ex._stager.stage(ids[active], pos[active], slots[active], [blocks[b] for b in active])
        graphs.set_x(x_keep, meta)

    if fill_h:
        _settle_exits(ex, fill_h[0] if len(fill_h) == 1 else torch.cat(fill_h), np.concatenate(fill_rows),
                      np.concatenate([np.full(len(r), e) for r, e in zip(fill_rows, fill_layer)]), pos, slots, reach)
    if pending:
        rows = np.concatenate([r for r, _ in pending])
        tokens[rows] = (pending[0][1] if len(pending) == 1 else torch.cat([t for _, t in pending])).cpu().numpy()
    return exit_index, forced, tokens


def _hand_over(ex, plan: IterationPlan, s: int, x: Tensor, active: np.ndarray, exit_index: np.ndarray,
               forced: np.ndarray, pending: list, fill_h: list, fill_rows: list, fill_layer: list, pos: np.ndarray,
               slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rest of the pass, from stretch ``s``, on the general path: the rows that left so far settled up to
    that stretch's first layer, as ``_settle_exits`` would for a pass reaching it, and owed from there."""
    ex.handovers += 1
    lo = ex.spec.segment_bounds[s]
    x = x.clone()  # before a projection below reuses the segment graphs' residual buffers
    rows = np.concatenate(fill_rows) if fill_rows else np.zeros(0, dtype=np.int64)
    depth, h = np.zeros(0, dtype=np.int64), None
    if len(rows):
        h = fill_h[0] if len(fill_h) == 1 else torch.cat(fill_h)
        layer = np.concatenate([np.full(len(r), e) for r, e in zip(fill_rows, fill_layer)])
        end = settle_target(ex.policy, 0, lo, ex.spec.num_layers)
        if end > int(layer.min()):
            ex._fill_graphs.run(h, layer, pos[rows], slots[rows], end)
        depth = np.maximum(layer, end)
    return run_general(ex, plan, Resume(s, x, active, exit_index, forced, pending, rows, h, depth))


def _settle_exits(ex, h: Tensor, rows: np.ndarray, layer: np.ndarray, pos: np.ndarray, slots: np.ndarray,
                  reach: int) -> None:
    """What the KV policy does with the rows that left (exit hidden states ``h``, exit layers ``layer``),
    as the general path's owed entries would: fill projects their K/V for every layer they skipped;
    copy_hidden (batch_pass) for the layers the rest of the batch ran in this pass (up to ``reach``), as
    its entries ride along there; recompute (own_pass) runs nothing now. Whatever is still owed keeps its
    exit state in the hidden pool, by KV slot, for a later pass."""
    L = ex.spec.num_layers
    # the policy's settle target (own_pass: each row's own exit layer, where it already is: 0 stands for it)
    end = settle_target(ex.policy, 0, reach, L)
    if end > int(layer.min()):  # one fused launch for every layer to project
        ex._fill_graphs.run(h, layer, pos[rows], slots[rows], end)  # one graph replay on CUDA
    owed = np.maximum(layer, end) < L
    if owed.any():
        (slot_t,) = ex._pinned.stage(slots[rows[owed]].astype(np.int32))
        ex.hidden_pool[slot_t.long()] = h[torch.as_tensor(np.flatnonzero(owed), device=h.device)] \
            if not owed.all() else h
