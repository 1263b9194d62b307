"""Paged KV blocks: a fixed pool of equal blocks, each holding ``block_size`` positions of every layer."""

from __future__ import annotations

import numpy as np

from eesim.errors import require

FREE = -1


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        require(num_blocks > 0, f"num_blocks must be positive, got {num_blocks}")
        require(block_size > 0, f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # LIFO free list: a freed block is reused first, which keeps the GPU cache's working set warm.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owner = np.full(num_blocks, FREE, dtype=np.int64)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def scatter(self, share: float, seed: int = 0) -> None:
        """Hand out the free blocks among the pool's leading ``share`` first, in a random order (``seed``): the
        blocks of a pool that has served for a while, where sequences came and went, instead of consecutive
        ones. (The profiler's states use it: on the H100 a batch-1 decode step over scattered blocks ran 1-2.5%
        slower, larger batches 0-1.7%, docs/benchmarks.md.)"""
        require(0.0 < share <= 1.0, f"allocator: scatter share must be in (0, 1], got {share}")
        cut = max(1, int(round(share * self.num_blocks)))
        free = np.asarray(self._free, dtype=np.int64)
        lead = free[free < cut]
        rest = free[free >= cut]  # kept in their order, below the scattered ones (the list pops from its end)
        self._free = rest.tolist() + np.random.default_rng(seed).permutation(lead).tolist()

    def allocate(self, owner: int, count: int) -> list[int]:
        free = self._free
        if count > len(free):
            raise RuntimeError(f"allocator: {count} blocks asked for, {len(free)} free")
        if count == 1:  # a decode step's new block (most calls): no list-to-array conversion
            block = free.pop()
            self._owner[block] = owner
            return [block]
        taken = free[len(free) - count:][::-1]
        del free[len(free) - count:]
        self._owner[np.fromiter(taken, dtype=np.intp, count=count)] = owner  # (faster than indexing by the list)
        return taken

    def free(self, owner: int, blocks: list[int]) -> None:
        index = np.fromiter(blocks, dtype=np.intp, count=len(blocks))  # converted once, for the check and the release
        mismatched = self._owner[index] != owner
        if np.count_nonzero(mismatched):
            block = blocks[int(np.argmax(mismatched))]
            raise RuntimeError(f"allocator: block {block} freed by {owner}, which does not own it")
        self._owner[index] = FREE
        self._free.extend(blocks)

    def owners(self) -> dict[int, int]:
        """Block -> owning sequence id, for invariant checks."""
        used = np.flatnonzero(self._owner != FREE)
        return dict(zip(used.tolist(), self._owner[used].tolist()))
