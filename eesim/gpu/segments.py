"""The graphed decode path: a pure-decode batch run as one CUDA graph per stretch of layers.

A stretch runs layers ``lo .. hi-1`` and then its tail, all inside the graph:
- ``("check", s)``: the measure at intermediate exit ``s`` (exit head + confidence, or cosine against
  the stretch's input) and, when the measure computed logits, their argmax (the token of rows that
  leave there);
- ``"final"``: the last exit's head and argmax (the emitted tokens of rows that ran to the end);
- ``None``: nothing (the general path's stretches of decode rows, which check exits eagerly).
So a step pays one graph launch per exit checked and one small host read per check (the confidence
values), instead of an eager head, eager measure and host-built metadata per segment. With no checks
the whole depth, the embedding lookup and the final head are one graph.

The residual stream between stretches lives in one device buffer per padded batch size (the graphs read
and write it in place); the metadata comes from ``batch.MetaStager`` (one copy per batch shape, rows
padded to ``batch.row_bucket``). Graphs are captured per (lo, hi, padded rows, block-table width, tail):
lazily, or up front by ``capture``. Off CUDA the same function runs eagerly,
so the CPU tests exercise this path's logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from eesim.gpu.batch import DecodeMeta, LayerMeta
from eesim.kernels import max_prob_argmax


@dataclass
class StretchOut:
    x: Tensor  # (n, d) residual after layer hi-1 (the batch-size's shared buffer)
    conf: Tensor | None  # (n,) float32 confidence at the exit ("check" tails)
    token: Tensor | None  # (n,) int64 argmax of the exit's logits, when computed


class SegmentGraphs:
    def __init__(self, executor) -> None:
        self.ex = executor
        self._graphs: dict = {}
        self._xbuf: dict[int, Tensor] = {}  # rows -> (rows, d) residual stream
        self._pool = None
        self.captures = 0  # graphs captured so far (a capture stalls the iteration that needs it)

    def reset(self) -> None:
        """Forget captured graphs (their tails depend on the exits and the measure)."""
        self._graphs.clear()
        self._pool = None  # the old pool is released with its graphs; capturing into it again fails

    def set_x(self, x: Tensor, meta: DecodeMeta) -> None:
        """Start the next stretch (lo > 0) from ``x``: the rows still running after an exit, the first
        ``meta.rows`` of its padded batch (the padding rows keep whatever finite values they hold)."""
        self._buf(meta.ids.shape[0])[:x.shape[0]].copy_(x)

    def _buf(self, n: int) -> Tensor:
        if n not in self._xbuf:
            ex = self.ex
            self._xbuf[n] = torch.zeros(n, ex.spec.hidden_size, dtype=ex.dtype, device=ex.device)
        return self._xbuf[n]

    def _body(self, lo: int, hi: int, meta: DecodeMeta, tail) -> StretchOut:
        ex = self.ex
        n = meta.ids.shape[0]
        xbuf = self._buf(n)
        x = torch.index_select(ex.model.embed_tokens.weight, 0, meta.ids) if lo == 0 else xbuf
        m = LayerMeta(meta.positions, meta.slots, n, meta.block_tables, meta.context_lens)
        y = x
        for layer in range(lo, hi):
            y = ex._layer(layer, y, m)
        conf = token = None
        if tail is None:
            pass
        elif tail == "final":
            token = ex._exit_logits(ex._model_exit[-1], y).argmax(-1)
        elif ex.measure.column == "max_prob":  # confidence and argmax in one kernel
            logits = ex._exit_logits(ex._model_exit[tail[1]], y)
            conf, token = max_prob_argmax(logits, backend=ex.backend)
        else:
            values, logits = ex._confidence(tail[1], y, x)  # cosine: against the stretch's input
            conf = values.float()
            token = logits.argmax(-1) if logits is not None else None
        xbuf.copy_(y)
        return StretchOut(xbuf, conf, token)

    def run_layers(self, lo: int, hi: int, x: Tensor, meta: DecodeMeta) -> Tensor:
        """Layers lo..hi-1 from ``x`` with no head after them (the general path's decode-only stretches);
        returns the real rows of the batch size's residual buffer."""
        if lo > 0:
            self.set_x(x, meta)
        return self.run(lo, hi, meta, None).x

    def run(self, lo: int, hi: int, meta: DecodeMeta, tail) -> StretchOut:
        """The stretch over the padded batch; returns its real rows (views of the static outputs)."""
        out = self._run_padded(lo, hi, meta, tail)
        r = meta.rows
        return StretchOut(out.x[:r], None if out.conf is None else out.conf[:r],
                          None if out.token is None else out.token[:r])

    def _run_padded(self, lo: int, hi: int, meta: DecodeMeta, tail) -> StretchOut:
        if self.ex.device.type != "cuda":
            return self._body(lo, hi, meta, tail)
        graph, out = self.ensure(lo, hi, meta, tail)
        graph.replay()
        return out

    def ensure(self, lo: int, hi: int, meta: DecodeMeta, tail) -> tuple:
        """The graph of this stretch and shape (CUDA), captured now if it is new; (graph, its outputs)."""
        key = (lo, hi, meta.key, tail)
        entry = self._graphs.get(key)
        if entry is None:
            xbuf = self._buf(meta.ids.shape[0])
            saved = xbuf.clone()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the kernels; writes the same K/V the replay writes
                self._body(lo, hi, meta, tail)
                xbuf.copy_(saved)  # the warm-up advanced the residual: put the input back
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.captures += 1
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._body(lo, hi, meta, tail)
            entry = self._graphs[key] = (graph, out)
        return entry
