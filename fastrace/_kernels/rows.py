"""Rows of a matrix copied or added by index, without the GIL (private).

numpy's ``take`` and fancy-index ``+=`` hold the GIL: the samples engine's threads, which gather
and scatter the samples an edge's gates open, waited on each other there. Compiled on first use
(``cache=True``); the numbers are numpy's (one copy, or one addition, per element).
"""

from __future__ import annotations

import numba


@numba.njit(cache=True, nogil=True)
def take_rows(src, rows, out):  # pragma: no cover - compiled
    """``out[i] = src[rows[i]]`` for every i."""
    for i in range(rows.size):
        r = rows[i]
        for j in range(src.shape[1]):
            out[i, j] = src[r, j]


@numba.njit(cache=True, nogil=True)
def add_rows(dst, rows, part):  # pragma: no cover - compiled
    """``dst[rows[i]] += part[i]`` for every i (``rows`` distinct)."""
    for i in range(rows.size):
        r = rows[i]
        for j in range(dst.shape[1]):
            dst[r, j] += part[i, j]
