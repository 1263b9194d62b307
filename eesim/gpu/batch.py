"""A pure-decode batch's per-row metadata, gathered into device tensors with one host-to-device copy.

Why: ``torch.as_tensor(numpy_array, device="cuda")`` copies from pageable memory and waits for the
stream, so every small tensor built on the host between kernels stalls the GPU until the host catches
up (at batch 1 the old per-segment set-up left the GPU idle for ~3 ms of a ~10 ms step). Here the
token ids, positions, KV slots, context lengths and block tables of all rows go into one pinned int32
buffer and reach the device in one ``non_blocking`` copy; the views below are what the layers (and the
CUDA graphs captured over them) read.

The buffers are kept per (padded rows, block-table width): CUDA graphs capture device addresses, so the
same shape must always land in the same device buffer. A pinned host buffer is only rewritten once the
copy out of it has finished (an event per buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from eesim.profile_tokens import bucket

# Block tables are padded to a multiple of this many blocks, so that graphs are reused as contexts grow.
WIDTH_QUANTUM = 32
# Decode rows are padded, as serving engines pad to their captured batch sizes: powers of two up to
# ``pow2_until``, then multiples of ``step``. Decode reads the weights once for all rows, so a padded row
# costs little (its attention reads one key and it writes no K/V), while each distinct row count would
# otherwise be one more graph to capture under load. The profiler records this rule (``decode_padding``)
# and the profile-backed cost model prices a batch at its padded size.
DECODE_PADDING = {"pow2_until": 8, "step": 8}


def row_bucket(n: int) -> int:
    """Rows a decode batch of ``n`` rows runs as."""
    return bucket(n, DECODE_PADDING)


@dataclass
class DecodeMeta:
    """``n`` padded rows, the first ``rows`` real; a padding row has token 0 at position 0, slot -1 (no K/V
    written) and attends one key of block 0."""

    ids: Tensor  # (n,) int32 input token ids
    positions: Tensor  # (n,) int32 position of each row's new token
    slots: Tensor  # (n,) int32 flat KV slot of that position
    context_lens: Tensor  # (n,) int32 positions attended (position + 1)
    block_tables: Tensor  # (n, width) int32, zero-padded
    rows: int = 0  # real rows (the first ones)

    @property
    def key(self) -> tuple[int, int]:
        return tuple(self.block_tables.shape)


class MetaStager:
    def __init__(self, device: torch.device, block_size: int) -> None:
        self.device, self.block_size = device, block_size
        self._bufs: dict[tuple[int, int], tuple] = {}  # (rows, width) -> (pinned host, device, copy's event)

    def stage(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, blocks: list,
              width: int | None = None) -> DecodeMeta:
        """``blocks[i]``: the block ids of row i's sequence (at least up to its position). Rows are padded to
        ``row_bucket``; ``width`` (blocks) overrides the block-table width the positions need."""
        rows = len(ids)
        n = row_bucket(rows)
        need = -(-(positions.astype(np.int64) + 1) // self.block_size)
        if width is None:
            width = int(-(-int(need.max()) // WIDTH_QUANTUM) * WIDTH_QUANTUM)
        key = (n, width)
        if key not in self._bufs:
            cuda = self.device.type == "cuda"
            host = torch.empty(n * (4 + width), dtype=torch.int32, pin_memory=cuda)
            dev = torch.empty_like(host, device=self.device) if cuda else host
            self._bufs[key] = (host, dev, torch.cuda.Event() if cuda else None)
        host, dev, copied = self._bufs[key]
        if copied is not None:  # padded rows: a shrinking batch can come back to a shape staged this iteration
            copied.synchronize()  # (returns at once before the first record)
        h = host.numpy()
        h[:4 * n] = 0
        h[:rows], h[n:n + rows], h[2 * n:2 * n + rows], h[3 * n:3 * n + rows] = ids, positions, slots, positions + 1
        h[2 * n + rows:3 * n], h[3 * n + rows:4 * n] = -1, 1  # padding: no K/V written, one key attended
        bt = h[4 * n:].reshape(n, width)
        bt[:] = 0
        for i, row_blocks in enumerate(blocks):
            k = int(need[i])
            bt[i, :k] = row_blocks[:k]
        if dev is not host:
            dev.copy_(host, non_blocking=True)
            copied.record()
        return DecodeMeta(dev[:n], dev[n:2 * n], dev[2 * n:3 * n], dev[3 * n:4 * n], dev[4 * n:].view(n, width), rows)


@dataclass
class LayerMeta:
    """What every layer of one stretch reads about its rows (device tensors).

    Rows ``0 .. num_paged-1`` are one-token decode rows (paged decode attention over ``block_tables``
    and ``context_lens``); the rows after them, up to ``positions``' length, belong to ``chunk_rows``'s
    sequences, contiguously (prefill chunks, then recompute's extra rows), and attend causally through
    ``paged_prefill_attention`` over ``chunk_tables``. ``slots`` also holds, after the rows, the slots
    of the ``proj_hidden`` entries whose K/V only is projected (copy_hidden)."""

    positions: Tensor  # (n,) int32
    slots: Tensor  # (n + M,) int32
    num_paged: int
    block_tables: Tensor | None = None  # (num_paged, width) int32
    context_lens: Tensor | None = None  # (num_paged,) int32
    chunk_rows: Tensor | None = None  # (C + 1,) int32 cumulative row counts, relative to num_paged
    chunk_tables: Tensor | None = None  # (C, width) int32
    max_chunk_rows: int = 0
    proj_hidden: Tensor | None = None  # (M, d)
    proj_positions: Tensor | None = None  # (M,) int32


class PinnedStager:
    """Ships several small int arrays to the device in one non-blocking copy from pinned memory.

    A ring of pinned buffers, each guarded by an event recorded after its copy, so that a buffer is
    rewritten only once the GPU has read it (the general path stages once per change of its rows,
    several times in one iteration)."""

    def __init__(self, device: torch.device, ring: int = 4) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._ring: list[list] = [[None, None, None] for _ in range(ring)]  # host, device, event
        self._next = 0

    def stage(self, *arrays: np.ndarray) -> list[Tensor]:
        sizes = [int(a.size) for a in arrays]
        total = max(sum(sizes), 1)
        slot = self._ring[self._next]
        self._next = (self._next + 1) % len(self._ring)
        host, dev, event = slot
        if event is not None:
            event.synchronize()
        if host is None or host.numel() < total:
            cap = 1 << (total - 1).bit_length()
            host = torch.empty(cap, dtype=torch.int32, pin_memory=self.cuda)
            dev = torch.empty_like(host, device=self.device) if self.cuda else None
            slot[0], slot[1] = host, dev
            if self.cuda and event is None:
                event = slot[2] = torch.cuda.Event()
        h = host.numpy()
        off = 0
        for a, n in zip(arrays, sizes):
            h[off:off + n] = a.reshape(-1)
            off += n
        if self.cuda:
            dev[:total].copy_(host[:total], non_blocking=True)
            event.record()
            src = dev
        else:
            src = host[:total].clone()  # the CPU path reads its own copy: the ring buffer is reused
        out, off = [], 0
        for a, n in zip(arrays, sizes):
            out.append(src[off:off + n].view(a.shape))
            off += n
        return out
