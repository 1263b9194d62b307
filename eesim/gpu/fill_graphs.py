"""The graphed decode path's K/V projection for rows that left (fill, copy_hidden) as one CUDA graph.

After an exit decision the GPU waits for the host: whatever the host does before the projection is
launched is idle device time in the step. Launched eagerly, ``fused_fill`` costs the host ~150 us at the
7B shape (the Triton launcher's argument handling, the index copies); replayed from a graph it is the
staging copy and a launch. One graph per (padded rows, first layer, end layer); its inputs are static
buffers: the exit states in the segment graphs' residual buffer of that row count (dead once the pass is
over), the indices in a small int32 buffer. Padding rows carry layer ``L`` (nothing to project, no K/V
written). Off CUDA, with graphs off, or where ``fused_fill`` falls back to its torch reference, the projection
is launched as it is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from eesim.gpu.batch import row_bucket


class FillGraphs:
    def __init__(self, executor) -> None:
        self.ex = executor
        self._graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self._ints: dict[int, Tensor] = {}  # padded rows -> (3, rows) int32 (layer, position, slot)
        self._kernel: bool | None = None  # whether fused_fill runs its Triton kernel here (asked once)
        self.captures = 0

    def graphable(self) -> bool:
        """CUDA graphs on, and the projection is the Triton kernel (the torch reference reads indices on the host)."""
        ex = self.ex
        if self._kernel is None:
            from eesim.kernels import fused_fill_uses_kernel

            self._kernel = ex.device.type == "cuda" and fused_fill_uses_kernel(ex.k_cache, ex.k_cache, ex.backend)
        return self._kernel and ex.cuda_graphs

    def _static(self, rows: int) -> Tensor:
        static = self._ints.get(rows)
        if static is None:
            static = self._ints[rows] = torch.zeros(3, rows, dtype=torch.int32, device=self.ex.device)
        return static

    def run(self, h: Tensor, layer: np.ndarray, positions: np.ndarray, slots: np.ndarray, end: int) -> None:
        """Project the K/V of rows with exit states ``h`` that left at ``layer``, for layers up to ``end``."""
        ex = self.ex
        if not self.graphable():
            ex.project_kv(h, layer, positions, slots, end)
            return
        n = len(layer)
        rows = row_bucket(n)
        ints = np.zeros((3, rows), np.int32)
        ints[0] = ex.spec.num_layers
        ints[:, :n] = layer, positions, slots
        (staged,) = ex._pinned.stage(ints)
        static = self._static(rows)
        static.copy_(staged)
        hbuf = ex._segment_graphs._buf(rows)
        if h.data_ptr() != hbuf.data_ptr():
            hbuf[:n].copy_(h)
        key = (rows, int(layer.min()), int(end))
        graph = self._graphs.get(key) or self._capture(key, hbuf, static)
        graph.replay()

    def _capture(self, key: tuple[int, int, int], hbuf: Tensor, static: Tensor) -> torch.cuda.CUDAGraph:
        _, first, end = key
        ex = self.ex
        w = ex.weights

        def launch():
            from eesim.kernels import fused_fill

            fused_fill(hbuf, static[0], static[1], static[2], w.ln1, w.wk, w.wv, ex.eps, ex.cos, ex.sin,
                       ex.k_cache, ex.v_cache, end_layer=end, first_layer=first, backend=ex.backend)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles the kernel; writes the K/V the replay writes
            launch()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch()
        self.captures += 1
        self._graphs[key] = graph
        return graph

    def capture(self, rows: int, first: int, end: int) -> int:
        """Capture the graph of ``rows`` padded rows leaving at ``first`` (up front); returns 1 if new."""
        n = row_bucket(rows)
        if (n, first, end) in self._graphs or not self.graphable():
            return 0
        static = self._static(n)
        static[0].fill_(self.ex.spec.num_layers)  # padding only: nothing is written
        self._capture((n, first, end), self.ex._segment_graphs._buf(n), static)
        return 1
