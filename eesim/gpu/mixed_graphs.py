"""Iterations with prefill chunks (beside decode rows or alone) as CUDA graphs over padded shapes.

Why: run eagerly, a 7B iteration with a prompt chunk launches ~12 kernels per layer from Python, and
the host, not the GPU, set its pace (a 128-token chunk took 26 ms on the H100 against ~5 ms of weight
reads; iterations of one size spread over 25-50 ms). A graph replays the whole stretch in one launch.

Graphs need fixed shapes and fixed addresses, so the rows are padded to buckets, as serving engines do:
decode rows to a power of two, chunk tokens to a power of two from 16 to 256 and to a multiple of 128
above (``token_bucket``), the number of chunks to a power of two (at least 8), block tables to the
longest context, copy_hidden's projected entries to a power of two (at least 16). Padding rows write no K/V (slot -1, which ``store_kv`` skips), decode padding attends
one key of block 0, chunk padding belongs to no chunk (the prefill kernel leaves it alone); every layer
treats rows independently, so padding never reaches a real row. One static metadata buffer and one
input buffer per padded shape; a graph per (stretch, shape).

Off CUDA the padded batch runs eagerly through the same layers, so the CPU tests check the padding.

Layout of a padded batch: decode rows ``0 .. P-1``, padding to ``P_pad``, then the chunks' tokens
``P_pad .. P_pad+T-1``, padding to ``P_pad + T_pad``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from eesim.gpu.batch import LayerMeta
from eesim.profile_tokens import bucket

MIN_CHUNKS = 8  # prompt chunks per padded shape, at least (empty chunks cost nothing)


def pow2(n: int, least: int = 1) -> int:
    return 0 if n <= 0 else max(least, 1 << (int(n) - 1).bit_length())


# Chunk tokens: powers of two from 16 to 256, then multiples of 128 (prefill is compute bound, so padding
# 590 tokens to 1024 would cost ~40% more time; multiples of 128 keep the waste under 22%). The profiler
# records this rule, and the profile-backed cost model prices chunks at their padded size.
TOKEN_PADDING = {"min": 16, "pow2_until": 256, "step": 128}


def token_bucket(n: int) -> int:
    return bucket(n, TOKEN_PADDING)


class _Shape:
    """Static buffers of one padded shape: pinned host metadata, its device copy, the input rows."""

    def __init__(self, ex, P: int, T: int, C: int, wd: int, wc: int, M: int) -> None:
        self.P, self.T, self.C, self.wd, self.wc, self.M = P, T, C, wd, wc, M
        n = P + T
        # positions, slots (rows, then projected entries), tables, context, cu rows, chunk tables, entries' positions
        self.sizes = [n, n + M, P * wd, P, C + 1, C * wc, M]
        total = sum(self.sizes)
        self.cuda = ex.device.type == "cuda"
        self.host = torch.empty(total, dtype=torch.int32, pin_memory=self.cuda)
        self.dev = torch.empty(total, dtype=torch.int32, device=ex.device)
        self.event = torch.cuda.Event() if self.cuda else None  # recorded after each copy out of ``host``
        parts, off = [], 0
        for size in self.sizes:
            parts.append(self.dev[off:off + size])
            off += size
        pos, slots, bt, ctx, cu, ct, proj_pos = parts
        # copy_hidden's projected entries: their exit hidden states, K/V only (padding: slot -1)
        self.proj = torch.zeros(M, ex.spec.hidden_size, dtype=ex.dtype, device=ex.device) if M else None
        self.meta = LayerMeta(pos, slots, P, bt.view(P, wd) if P else None, ctx if P else None, cu, ct.view(C, wc), T,
                              self.proj, proj_pos if M else None)
        self.x = torch.zeros(n, ex.spec.hidden_size, dtype=ex.dtype, device=ex.device)

    def stage(self, a: dict) -> None:
        """Write this iteration's metadata (real rows from ``a``, padding as the module says) and ship it."""
        if self.event is not None:
            self.event.synchronize()  # the previous copy out of the host buffer has finished (at once before any)
        P, T, C, wd, wc, M = self.P, self.T, self.C, self.wd, self.wc, self.M
        p, t, c, m = a["num_paged"], a["num_chunk_rows"], len(a["cu"]) - 1, len(a["proj"])
        pos = np.zeros(P + T, dtype=np.int32)
        slots = np.full(P + T + M, -1, dtype=np.int32)
        pos[:p], pos[P:P + t] = a["positions"][:p], a["positions"][p:]
        slots[:p], slots[P:P + t] = a["slots"][:p], a["slots"][p:p + t]
        slots[P + T:P + T + m] = a["slots"][p + t:]
        proj_pos = np.zeros(M, dtype=np.int32)
        proj_pos[:m] = a["proj_positions"]
        bt = np.zeros((P, wd), dtype=np.int32)
        bt[:p, :a["tables"].shape[1]] = a["tables"]
        ctx = np.ones(P, dtype=np.int32)
        ctx[:p] = a["context"]
        cu = np.full(C + 1, t, dtype=np.int32)
        cu[:c + 1] = a["cu"]
        ct = np.zeros((C, wc), dtype=np.int32)
        ct[:c, :a["chunk_tables"].shape[1]] = a["chunk_tables"]
        h = self.host.numpy()
        off = 0
        for arr, size in zip((pos, slots, bt, ctx, cu, ct, proj_pos), self.sizes):
            h[off:off + size] = arr.reshape(-1)
            off += size
        self.dev.copy_(self.host, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()


class MixedGraphs:
    def __init__(self, executor) -> None:
        self.ex = executor
        self._shapes: dict[tuple, _Shape] = {}
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None
        self.captures = 0  # graphs captured so far (a capture stalls the iteration that needs it)
        # Block tables as wide as the longest context: one width, so fewer shapes to capture (the
        # attention kernels size their work by the rows' own contexts).
        self.width = -(-executor.spec.max_context // executor.block_size)

    def prepare(self, a: dict) -> _Shape:
        """The padded shape for metadata arrays ``a`` (from general_path), with the metadata staged."""
        shape = self._shape(pow2(a["num_paged"]), token_bucket(a["num_chunk_rows"]),
                            max(MIN_CHUNKS, pow2(len(a["cu"]) - 1)), pow2(len(a["proj"]), 16))
        shape.stage(a)
        return shape

    def _shape(self, P: int, T: int, C: int, M: int) -> _Shape:
        """The padded shape of ``P`` decode rows, ``T`` chunk tokens, ``C`` chunks, ``M`` projected entries."""
        key = (P, T, C, self.width if P else 0, self.width, M)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape(self.ex, *key)
        return shape

    def capture(self, P: int, T: int, stretches: list[tuple[int, int]], M: int = 0) -> int:
        """Capture the graphs of the padded shape with ``P`` decode rows, ``T`` chunk tokens, ``M`` projected
        entries and ``MIN_CHUNKS`` chunks for each ``(lo, hi)`` stretch, from metadata of padding only
        (nothing written to the cache), so that no iteration of that shape stalls on a capture. Returns the
        captures."""
        shape = self._shape(P, T, MIN_CHUNKS, M)
        none = np.zeros(0, dtype=np.int64)
        shape.stage({"num_paged": 0, "num_chunk_rows": 0, "cu": np.zeros(1, np.int64), "proj": none,
                     "positions": none, "slots": none, "proj_positions": none, "context": none,
                     "tables": np.zeros((0, 0), np.int64), "chunk_tables": np.zeros((0, 0), np.int64)})
        before = self.captures
        x = shape.x[:0]
        for lo, hi in stretches:
            self.run(lo, hi, x, shape, 0)
        return self.captures - before

    def run(self, lo: int, hi: int, x: Tensor, shape: _Shape, p: int, proj: Tensor | None = None) -> Tensor:
        """Layers lo..hi-1 of the real rows ``x`` (``p`` decode rows, then the chunks' tokens and recompute's
        rows), with ``proj`` (copy_hidden's entries) projected beside them; returns the real rows after them
        (a new tensor)."""
        P = shape.P
        t = x.shape[0] - p
        shape.x[:p] = x[:p]
        shape.x[P:P + t] = x[p:]
        if proj is not None:
            shape.proj[:proj.shape[0]] = proj
        if not shape.cuda:  # off CUDA the same padded body runs eagerly (the CPU tests check the padding)
            y = self._body(lo, hi, shape)
            return torch.cat([y[:p], y[P:P + t]])
        key = (lo, hi, shape.P, shape.T, shape.C, shape.wd, shape.wc, shape.M)
        entry = self._graphs.get(key)
        if entry is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            saved = shape.x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the kernels; writes the same K/V the replay writes
                self._body(lo, hi, shape)
            torch.cuda.current_stream().wait_stream(side)
            shape.x.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            self.captures += 1
            with torch.cuda.graph(graph, pool=self._pool):
                y = self._body(lo, hi, shape)
            entry = self._graphs[key] = (graph, y)
        graph, y = entry
        graph.replay()
        return torch.cat([y[:p], y[P:P + t]])

    def _body(self, lo: int, hi: int, shape: _Shape) -> Tensor:
        y = shape.x
        for layer in range(lo, hi):
            y = self.ex._layer(layer, y, shape.meta)
        return y
