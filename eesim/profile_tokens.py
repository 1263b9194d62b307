"""Prompt-chunk sizes for the profile-backed cost model (profile_cost.py): the padding rule the executor
and the cost model share (``bucket``), the tokens the executor ran for a chunk (``padded_tokens``), and the tokens of a chunk starting a prompt recovered from its attention beyond
its KV reads (``_chunk_table``, ``_chunks_from_excess``)."""

from __future__ import annotations

import numpy as np

from eesim.work import QUERY_TILE


def _chunk_table(rows: int) -> np.ndarray:
    """Running maximum over n = 0..rows of f(n) = n (n + 1) / 2 - n ceil(n / 128): the attention a chunk of n
    tokens starting a prompt does beyond its KV reads."""
    n = np.arange(rows + 1)
    return np.maximum.accumulate(n * (n + 1) / 2 - n * (-(-n // QUERY_TILE)))


def bucket(n: int, rule: dict) -> int:
    """``n`` (rows or tokens, > 0) padded by ``rule``: a power of two, at least ``min``, up to ``pow2_until``,
    then a multiple of ``step`` (no ``step``: powers of two throughout); 0 for ``n`` <= 0. The executor's
    decode batches (``gpu.batch.row_bucket``) and prompt chunks (``gpu.mixed_graphs.token_bucket``) pad so."""
    n = int(n)
    if n <= 0:
        return 0
    step, until = rule.get("step"), rule.get("pow2_until")
    if step and until is not None and n > until:
        return -(-n // step) * step
    return max(rule.get("min", 1), 1 << (n - 1).bit_length())


def padded_tokens(n, rule: dict | None):
    """Chunk tokens (or decode rows) as the executor ran them: padded by ``rule`` (profile metadata
    ``chunk_padding`` or ``decode_padding``: a power of two, at least ``min``, up to ``pow2_until``, then a
    multiple of ``step``; no ``step``: powers of two throughout), or ``n`` itself without a rule (profiles of
    an unpadded executor)."""
    if not rule:
        return n
    if not isinstance(n, np.ndarray):  # one chunk (the per-step path): integers, no numpy calls
        return float(bucket(max(int(n), 1), rule))
    least, step, until = rule.get("min", 1), rule.get("step"), rule.get("pow2_until", np.inf)
    p2 = np.maximum(float(least), np.exp2(np.ceil(np.log2(np.maximum(n, 1.0)))))
    return p2 if not step else np.where(n <= until, p2, np.ceil(n / step) * step)


def _chunks_from_excess(excess: np.ndarray, rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Tokens n of chunks starting a prompt whose attention exceeds their KV reads by ``excess`` (> 0.5), at
    most ``rows`` (at least 2): the least n with f(n) >= excess, searched upwards from
    max(floor(sqrt(2 excess)), 2) and stopped at ``rows``. (f is below excess everywhere before that start,
    so the least n of the running maximum is the one the upward search finds; ``table`` covers ``rows``.)"""
    start = np.maximum(np.sqrt(2.0 * excess).astype(np.int64), 2)
    first = np.searchsorted(table, excess, side="left")
    return np.minimum(np.maximum(start, np.minimum(first, rows)), np.maximum(rows, 2))
