"""Which positions of which sequence have their K/V at which layers, and which are owed.

K/V is always present for a prefix of the layers: a position whose token ran (or was settled up to)
``d`` layers has K/V at layers 1..d, so one number per position, its *depth*, says everything. A
position with depth below the model's last layer is *owed* the rest, and the KV policy says how it is
paid (see kv_policy.py). Depths only ever sit on exit boundaries, which is what lets the cost model
and the executors count owed work per segment between exits.
"""

from __future__ import annotations

import numpy as np

from eesim.kv_policy import KVPolicy


class KVLedger:
    """Depths are kept per position only once a sequence has had a position short of full depth: a
    sequence whose every position is complete is just its length (most sequences, under fill)."""

    def __init__(self, num_layers: int, policy: KVPolicy) -> None:
        self.num_layers = num_layers
        self.policy = policy
        self._depth: dict[int, np.ndarray | None] = {}
        self._capacity: dict[int, int] = {}
        self._length: dict[int, int] = {}
        self._owed: dict[int, list[int]] = {}  # positions with depth < num_layers, ascending

    # ---- lifecycle --------------------------------------------------------------------------------
    def add(self, seq_id: int, capacity: int = 64) -> None:
        self._depth[seq_id] = None
        self._capacity[seq_id] = max(capacity, 1)
        self._length[seq_id] = 0
        self._owed[seq_id] = []

    def drop(self, seq_id: int) -> None:
        """The sequence finished or was preempted: its cache (and any debt) is gone."""
        del self._depth[seq_id], self._capacity[seq_id], self._length[seq_id], self._owed[seq_id]

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._depth

    @property
    def seq_ids(self) -> list[int]:
        return list(self._depth)

    # ---- queries ----------------------------------------------------------------------------------
    def length(self, seq_id: int) -> int:
        return self._length[seq_id]

    def depths(self, seq_id: int) -> np.ndarray:
        """Depth of every computed position (a read-only view)."""
        arr = self._depth[seq_id]
        if arr is None:
            view = np.full(self._length[seq_id], self.num_layers, dtype=np.int16)
        else:
            view = arr[: self._length[seq_id]]
        view.flags.writeable = False
        return view

    def owed(self, seq_id: int) -> list[tuple[int, int]]:
        """(position, depth) of every position still owed layers, ascending by position."""
        depth = self._depth[seq_id]
        return [(p, int(depth[p])) for p in self._owed[seq_id]] if depth is not None else []

    def num_owed(self, seq_id: int) -> int:
        return len(self._owed[seq_id])

    def total_owed(self) -> int:
        return sum(len(v) for v in self._owed.values())

    def positions_with_kv(self, seq_id: int, layer: int) -> np.ndarray:
        """Positions whose K/V exists at ``layer`` (1-based)."""
        return np.flatnonzero(self.depths(seq_id) >= layer)

    # ---- updates ----------------------------------------------------------------------------------
    def record(self, seq_id: int, start: int, count: int, depth: int | np.ndarray) -> None:
        """A pass computed positions [start, start+count) through ``depth`` layers (one number, or one
        per position when a fast-forwarded run computed one position per step). Positions are
        computed in order: ``start`` is the sequence's current length."""
        end = start + count
        arr = self._depth[seq_id]
        if arr is None:
            # (a plain int in the common case: np.all on a scalar costs more than the rest of the call)
            shallowest = depth if isinstance(depth, int) else int(depth.min())
            if shallowest >= self.num_layers:
                self._length[seq_id] = end
                return
            # the first position short of full depth: from now on, depths are kept per position
            arr = np.full(max(self._capacity[seq_id], end), self.num_layers, dtype=np.int16)
            self._depth[seq_id] = arr
        if end > arr.shape[0]:
            grown = np.full(max(end, 2 * arr.shape[0]), self.num_layers, dtype=np.int16)
            grown[: arr.shape[0]] = arr
            self._depth[seq_id] = arr = grown
        arr[start:end] = depth
        self._length[seq_id] = end
        if isinstance(depth, np.ndarray):
            self._owed[seq_id].extend((start + np.flatnonzero(depth < self.num_layers)).tolist())
        elif depth < self.num_layers:
            self._owed[seq_id].extend(range(start, end))

    def record_full_depth(self, seq_ids: list[int], starts: list[int], counts: list[int]) -> None:
        """``record`` at full depth for every row of a pass: one call per iteration. In the common case, a
        sequence with every position at full depth, only its length moves."""
        per_position, length = self._depth, self._length
        for seq_id, start, count in zip(seq_ids, starts, counts):
            if per_position[seq_id] is None:
                length[seq_id] = start + count
            else:
                self.record(seq_id, start, count, self.num_layers)

    def settle(self, seq_id: int, target: int) -> list[tuple[int, int]]:
        """Owed positions below ``target`` now have K/V up to it. Returns (position, old depth) settled."""
        owed = self._owed[seq_id]
        if not owed:
            return []
        arr = self._depth[seq_id]
        settled = [(p, int(arr[p])) for p in owed if arr[p] < target]
        for p, _ in settled:
            arr[p] = target
        if target >= self.num_layers:
            self._owed[seq_id] = [p for p in owed if arr[p] < self.num_layers]
        return settled
