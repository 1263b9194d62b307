"""Sums of Python floats in numpy's pairwise order (``_psum``), so that a step priced on floats equals the
same step priced in an array, bit for bit (profile_cost.py's one-step path)."""

from __future__ import annotations

import numpy as np


def _psum_pairwise(values: list[float]) -> float:
    """The sum numpy's ``add.reduce`` computes over a contiguous row (its pairwise summation: eight running sums
    for up to 128 values, halves above), so that a step priced on Python floats equals the same step priced
    in an array, bit for bit."""
    n = len(values)
    if n < 8:
        total = 0.0
        for v in values:
            total += v
        return total
    if n > 128:
        half = n // 2
        half -= half % 8
        return _psum_pairwise(values[:half]) + _psum_pairwise(values[half:])
    r = values[:8]
    i, stop = 8, n - n % 8
    while i < stop:
        for j in range(8):
            r[j] += values[i + j]
        i += 8
    total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        total += values[i]
        i += 1
    return total


def _psum_numpy(values: list[float]) -> float:
    return float(np.add.reduce(np.array(values, dtype=np.float64)))


def _pick_psum():
    """_psum_pairwise where it reproduces this numpy's row sums on values that tell summation orders apart,
    else numpy itself (slower, as exact)."""
    rng = np.random.default_rng(0)
    for n in (*range(1, 20), 31, 64, 127, 128, 129, 200, 300):
        rows = rng.choice([1e16, -1e16, 1.0, 3.3, 1e-3, 7e15], size=(4, n)) * rng.random((4, n))
        want = np.add.reduce(rows, axis=1)
        if any(_psum_pairwise(row) != w for row, w in zip(rows.tolist(), want.tolist())):
            return _psum_numpy
    return _psum_pairwise


_psum = _pick_psum()
