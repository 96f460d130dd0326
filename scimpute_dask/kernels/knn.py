"""Exact cosine k-nearest-neighbour kernels on NumPy blocks.

The search has three steps, each on one block at a time (the Dask graph in
:mod:`scimpute_dask.engine.graph` tiles them):

1. :func:`screen`: each (query block × reference block) tile is screened with
   float32 products of the L2-normalised rows, a cache-sized sub-tile at a
   time, keeping the best ``k + RERANK_MARGIN`` candidates per query cell;
2. :func:`merge_topk`: the tiles' candidate lists are merged into one per cell;
3. :func:`exact_topk`: the merged candidates' cosines are computed again in
   float64 from the raw values, in the reference block that holds each, and
   the best k kept (merged again over the blocks). A cell whose candidates
   the float32 screen cannot vouch for (:func:`incomplete`: a group of equal
   cosines wider than the margin at its k-th place) is searched exhaustively
   in float64 instead.

A top-k list is packed as a float64 array of shape ``(n, k, 2)``: ``[..., 0]``
the similarity, ``[..., 1]`` the global reference row (exact in float64),
``-1`` marking an empty slot. Ties in similarity go to the lower reference row,
and the final ranking uses values that depend only on the two rows compared,
so the result does not depend on how the data were tiled.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numba
import numpy as np

from scimpute_dask.plan import SEARCH_MARGIN

EMPTY = -1


#: Rows converted to float64 at once by :func:`row_norms` and :func:`normalize_rows`:
#: whole-block float64 copies would take six times a float32 block's memory.
ROW_BLOCK = 1024


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of every row, in float64 (each row's value does not depend on the others)."""
    x = np.asarray(x)
    out = np.empty(x.shape[0], dtype=np.float64)
    for lo in range(0, x.shape[0], ROW_BLOCK):
        part = np.asarray(x[lo : lo + ROW_BLOCK], dtype=np.float64)
        out[lo : lo + ROW_BLOCK] = np.sqrt(np.einsum("ij,ij->i", part, part))
    return out


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows as float32; all-zero rows stay zero (as scikit-learn's)."""
    x = np.asarray(x)
    out = np.empty(x.shape, dtype=np.float32)
    for lo in range(0, x.shape[0], ROW_BLOCK):
        part = np.asarray(x[lo : lo + ROW_BLOCK], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", part, part))
        norms[norms == 0] = 1.0
        out[lo : lo + ROW_BLOCK] = part / norms[:, None]
    return out


def zero_rows(x: np.ndarray) -> np.ndarray:
    """True for rows without any non-zero value: their cosine is undefined."""
    return ~np.any(np.asarray(x) != 0, axis=1)


@numba.njit(nogil=True, cache=True)
def _topk_into(sim, idx, out_sim, out_idx):  # pragma: no cover - compiled
    """Keep, per row, the k best (similarity desc, index asc) of ``sim``/``idx``.

    ``out_sim``/``out_idx`` hold the running top-k (sorted, ``EMPTY`` padded) and
    are updated in place. A sorted insertion buffer beats a heap for k ~ 25, and
    after the first few columns almost every candidate fails the threshold test;
    its ``O(width·k)`` worst case makes :func:`_collect_into` better for large k.
    """
    n, m = sim.shape
    k = out_sim.shape[1]
    for i in range(n):
        cnt = 0
        while cnt < k and out_idx[i, cnt] != EMPTY:
            cnt += 1
        # the k-th value, kept in a register: almost every candidate fails this one test
        th = out_sim[i, k - 1] if cnt == k else -np.inf
        for j in range(m):
            s = sim[i, j]
            if s < th:
                continue
            t = idx[i, j]
            if t == EMPTY:
                continue
            if cnt == k:
                if s == th and t > out_idx[i, k - 1]:
                    continue
                pos = k - 1
            else:
                pos = cnt
                cnt += 1
            while pos > 0 and (
                out_sim[i, pos - 1] < s or (out_sim[i, pos - 1] == s and out_idx[i, pos - 1] > t)
            ):
                out_sim[i, pos] = out_sim[i, pos - 1]
                out_idx[i, pos] = out_idx[i, pos - 1]
                pos -= 1
            out_sim[i, pos] = s
            out_idx[i, pos] = t
            if cnt == k:
                th = out_sim[i, k - 1]


@numba.njit(nogil=True, cache=True, inline="always")
def _before(va, da, vb, db):  # pragma: no cover - compiled
    return va > vb or (va == vb and da < db)


@numba.njit(nogil=True, cache=True)
def _select(v, d, n, m):  # pragma: no cover - compiled
    """Reorder ``v[:n]``/``d[:n]`` in place so that the first ``m`` are the best ``m``.

    Quickselect (median-of-three Hoare partitions) on the total order
    (similarity desc, index asc): linear time, no allocation, and the set kept
    is unique, so the result does not depend on the input order.
    """
    lo, hi = 0, n - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        if _before(v[mid], d[mid], v[lo], d[lo]):
            v[mid], v[lo] = v[lo], v[mid]
            d[mid], d[lo] = d[lo], d[mid]
        if _before(v[hi], d[hi], v[lo], d[lo]):
            v[hi], v[lo] = v[lo], v[hi]
            d[hi], d[lo] = d[lo], d[hi]
        if _before(v[hi], d[hi], v[mid], d[mid]):
            v[hi], v[mid] = v[mid], v[hi]
            d[hi], d[mid] = d[mid], d[hi]
        pv, pd = v[mid], d[mid]
        i, j = lo, hi
        while i <= j:
            while _before(v[i], d[i], pv, pd):
                i += 1
            while _before(pv, pd, v[j], d[j]):
                j -= 1
            if i <= j:
                v[i], v[j] = v[j], v[i]
                d[i], d[j] = d[j], d[i]
                i += 1
                j -= 1
        if m - 1 <= j:
            hi = j
        elif m - 1 >= i:
            lo = i
        else:
            break


@numba.njit(nogil=True, cache=True)
def _collect_into(sim, idx, buf_v, buf_d, counts, floor, m):  # pragma: no cover - compiled
    """The top-k of :func:`_topk_into` by buffered selection, for large k.

    Per row, candidates at or above the running floor (the m-th best value so
    far) are appended unsorted to a buffer of ``2·m``; a full buffer is cut
    back to its best ``m`` by :func:`_select`, which raises the floor, and
    :func:`_finish_into` sorts the survivors once: ``O(width)`` per row plus
    ``O(m)`` per cut.
    """
    n, w = sim.shape
    cap = buf_v.shape[1]
    for i in range(n):
        cnt = counts[i]
        th = floor[i]
        for j in range(w):
            s = sim[i, j]
            if s >= th:
                t = idx[i, j]
                if t == EMPTY:
                    continue
                buf_v[i, cnt] = s
                buf_d[i, cnt] = t
                cnt += 1
                if cnt == cap:
                    _select(buf_v[i], buf_d[i], cnt, m)
                    cnt = m
                    th = buf_v[i, 0]
                    for t in range(1, m):
                        th = min(th, buf_v[i, t])
        counts[i] = cnt
        floor[i] = th


@numba.njit(nogil=True, cache=True)
def _finish_into(buf_v, buf_d, counts, out_sim, out_idx):  # pragma: no cover - compiled
    """The best ``m`` of each :func:`_collect_into` buffer, sorted (similarity desc, index asc)."""
    m = out_sim.shape[1]
    for i in range(buf_v.shape[0]):
        cnt = counts[i]
        if cnt == 0:
            continue
        if cnt > m:
            _select(buf_v[i], buf_d[i], cnt, m)
            cnt = m
        v, d = buf_v[i, :cnt], buf_d[i, :cnt]
        # index ascending first, then a stable sort by similarity descending
        order = np.argsort(d, kind="mergesort")
        v, d = v[order], d[order]
        order = np.argsort(-v, kind="mergesort")
        for j in range(cnt):
            out_sim[i, j] = v[order[j]]
            out_idx[i, j] = d[order[j]]


#: From this k on, :class:`TopK` selects instead of inserting (measured on a
#: 1,024 × 11,913 screen: equal at k + 16 = 41, selection 1.3× faster at 116
#: and 1.6× at 516).
SELECT_FROM_K = 200


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, dtype=np.float64), np.full((n, k), EMPTY, dtype=np.int64)


def _pack(sim: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.stack([sim.astype(np.float64), idx.astype(np.float64)], axis=-1)


class TopK:
    """Running top-k lists of ``n`` rows, fed candidate blocks one after another.

    Any split of the candidates into blocks gives the same lists (similarity
    descending, then reference row ascending). Values keep the dtype given
    (a float32 screen is compared in float32, without a float64 copy).
    """

    def __init__(self, n: int, k: int, dtype: type = np.float64) -> None:
        self.k = k
        self.select = k >= SELECT_FROM_K
        width = 2 * k if self.select else k
        self.values = np.full((n, width), -np.inf, dtype=dtype)
        self.rows = np.full((n, width), EMPTY, dtype=np.int64)
        if self.select:  # buffer fill and running floor of each row
            self.counts = np.zeros(n, dtype=np.int64)
            self.floor = np.full(n, -np.inf, dtype=dtype)

    def add(self, sim: np.ndarray, idx: np.ndarray, lo: int = 0) -> None:
        """Offer candidates ``sim``/``idx`` (``-1`` = none) to rows ``lo:lo + len(sim)``."""
        hi = lo + sim.shape[0]
        sim = np.asarray(sim, dtype=self.values.dtype)
        idx = np.asarray(idx, dtype=np.int64)
        if self.select:
            _collect_into(sim, idx, self.values[lo:hi], self.rows[lo:hi], self.counts[lo:hi],
                          self.floor[lo:hi], self.k)
        else:
            _topk_into(sim, idx, self.values[lo:hi], self.rows[lo:hi])

    def result(self) -> np.ndarray:
        """The packed ``(n, k, 2)`` lists, best first."""
        if not self.select:
            return _pack(self.values, self.rows)
        out_sim, out_idx = _empty(self.values.shape[0], self.k)
        _finish_into(self.values, self.rows, self.counts, out_sim, out_idx)
        return _pack(out_sim, out_idx)


def topk(sim: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """Top-k per row of a similarity block with explicit candidate indices.

    Parameters
    ----------
    sim
        ``(n, m)`` similarities.
    idx
        ``(n, m)`` global reference rows (may be a broadcast view), ``-1`` = none.
    k
        Neighbours to keep.

    Returns
    -------
    numpy.ndarray
        Packed ``(n, k, 2)`` top-k list, best first.
    """
    sim = np.asarray(sim)
    best = TopK(sim.shape[0], k, np.float32 if sim.dtype == np.float32 else np.float64)
    best.add(sim, idx)
    return best.result()


def merge_topk(packed: np.ndarray, k: int) -> np.ndarray:
    """Merge concatenated top-k lists ``(n, m, 2)`` into one ``(n, k, 2)`` list."""
    return topk(packed[..., 0], packed[..., 1].astype(np.int64), k)


#: Extra candidates kept through the screen and the merge, so that float32
#: rounding rarely leaves a cell's exact k-th neighbour outside its list; when
#: it might (:func:`incomplete`), the cell is searched exhaustively instead.
#: (Declared in the plan, which sizes the lists.)
RERANK_MARGIN = SEARCH_MARGIN

#: Sub-tile of the float32 screen: a (rows × columns) product that stays in
#: cache while its candidates are collected, and a buffer reused for the whole
#: tile (writing a whole tile's products to fresh memory costs as much as
#: computing them).
SCREEN_ROWS = 1024
SCREEN_COLUMNS = 512


def _screen_tile(q: np.ndarray, r: np.ndarray, rows: np.ndarray, m: int) -> np.ndarray:
    best = TopK(q.shape[0], m, np.float32)
    buf = np.empty((min(SCREEN_ROWS, q.shape[0]), min(SCREEN_COLUMNS, r.shape[0])),
                   dtype=np.float32)
    for lo in range(0, q.shape[0], SCREEN_ROWS):
        qs = q[lo : lo + SCREEN_ROWS]
        for c in range(0, r.shape[0], SCREEN_COLUMNS):
            rs = r[c : c + SCREEN_COLUMNS]
            sim = np.matmul(qs, rs.T, out=buf[: qs.shape[0], : rs.shape[0]])
            best.add(sim, np.broadcast_to(rows[c : c + rs.shape[0]], sim.shape), lo)
    return best.result()


def screen(
    query: np.ndarray,
    reference: np.ndarray,
    reference_rows: np.ndarray,
    k: int,
    query_clusters: np.ndarray | None = None,
    reference_clusters: np.ndarray | None = None,
) -> np.ndarray:
    """Candidate neighbours of one query block in one reference block, by float32 cosine.

    Parameters
    ----------
    query, reference
        ``(bq, g)`` and ``(br, g)`` L2-normalised float32 rows
        (:func:`normalize_rows`) on the shared genes.
    reference_rows
        ``(br,)`` global row numbers of the reference block.
    k
        Neighbours wanted; ``k + RERANK_MARGIN`` candidates are kept.
    query_clusters, reference_clusters
        Integer cluster codes; when given, only same-cluster pairs are compared,
        and only their similarities are computed (one product per cluster), so a
        clustered search costs less than an unrestricted one.

    Returns
    -------
    numpy.ndarray
        Packed ``(bq, k + RERANK_MARGIN, 2)`` list of float32 similarities, best
        first; slots stay empty when the block has fewer candidates for a cell.
    """
    m = k + RERANK_MARGIN
    query = np.ascontiguousarray(query, dtype=np.float32)
    reference = np.ascontiguousarray(reference, dtype=np.float32)
    reference_rows = np.asarray(reference_rows, dtype=np.int64)
    if query_clusters is None:
        return _screen_tile(query, reference, reference_rows, m)
    out = _pack(*_empty(query.shape[0], m))
    for code in np.intersect1d(query_clusters, reference_clusters):
        qi = np.flatnonzero(query_clusters == code)
        ri = np.flatnonzero(reference_clusters == code)
        out[qi] = _screen_tile(query[qi], reference[ri], reference_rows[ri], m)
    return out


@numba.njit(nogil=True, cache=True)
def _cosine64_into(query, query_norms, reference, reference_norms, first, candidates, out
                   ):  # pragma: no cover - compiled
    """float64 cosine of each query row with its candidates in ``reference``.

    ``reference`` holds global rows ``first .. first + len(reference)``; other
    candidates are left as they are. The sum over genes runs in eight
    interleaved partial sums in a fixed order (gene ``t`` goes to sum
    ``t % 8``): the value depends only on the two rows, never on how the
    matrix was tiled (BLAS sums do), and the eight independent chains keep
    the FPU busy where one sequential sum waits on each addition.
    """
    n, m = candidates.shape
    nr = reference.shape[0]
    g = query.shape[1]
    g8 = g - g % 8
    acc = np.empty(8, dtype=np.float64)
    for i in range(n):
        for j in range(m):
            c = candidates[i, j] - first
            if candidates[i, j] < 0 or c < 0 or c >= nr:
                continue
            denom = query_norms[i] * reference_norms[c]
            if denom == 0.0:
                out[i, j] = 0.0  # zero rows: cosine 0, as in scikit-learn
                continue
            acc[:] = 0.0
            for t in range(0, g8, 8):
                for u in range(8):
                    # np.float64, not float(): numba keeps float32 through float()
                    acc[u] += np.float64(query[i, t + u]) * np.float64(reference[c, t + u])
            for t in range(g8, g):
                acc[t - g8] += np.float64(query[i, t]) * np.float64(reference[c, t])
            total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5])
                                                              + (acc[6] + acc[7]))
            out[i, j] = total / denom


def screen_error(n_genes: int) -> float:
    """Bound on ``|float32 screen value − true cosine|`` for unit rows of ``n_genes``.

    Rounding the normalised rows to float32 moves a dot product of unit
    vectors by at most ``2u`` and any summation order of ``g`` products by at
    most ``γ_g ≈ g·u`` (``u = 2**-24``; Cauchy-Schwarz bounds the sums of
    magnitudes by 1), whatever BLAS kernel computed it; 1 % is added for the
    higher-order terms.
    """
    return 1.01 * (n_genes + 2) * 2.0**-24


def incomplete(screened: np.ndarray, k: int, n_genes: int) -> np.ndarray:
    """Cells whose screened candidates may miss one of their exact k nearest.

    A candidate the screen dropped scored at most the last kept value; if
    that is below the k-th kept value by more than twice :func:`screen_error`
    (plus the 1e-12 grid of the exact ranking), k kept candidates are truly
    more similar, so the dropped one cannot be among the k nearest. Otherwise
    (big groups of equal cosines, e.g. integer counts on few genes) the cell is
    searched again exactly.
    """
    full = screened[:, -1, 1] != EMPTY
    return full & (screened[:, -1, 0] >= band_floor(screened, k, n_genes))


def band_floor(screened: np.ndarray, k: int, n_genes: int) -> np.ndarray:
    """Per cell, the lowest float32 screen value a row of its exact k nearest can have.

    k rows screen at or above the k-th kept value, so the true k-th cosine is at
    least that minus :func:`screen_error`; a row screened (by any float32
    product) below this floor is truly below the k-th by more than the exact
    ranking's 1e-12 grid, and cannot be among the k nearest. An exhaustive
    search computes float64 cosines only for the rows above it.
    """
    kth = screened[:, min(k, screened.shape[1]) - 1, 0]
    return kth - 2 * screen_error(n_genes) - 1e-11


#: Query cells searched exhaustively at once, and the (cells × block) buffer's
#: elements at most: a tile of 200,000 reference cells would otherwise take
#: 256 × 200,000 float64 (and as many row numbers) outside the memory plan.
EXHAUSTIVE_ROWS = 256
EXHAUSTIVE_ELEMENTS = 1 << 21


def _rank(exact: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    # Mathematically equal cosines (e.g. cells expressing a single shared gene)
    # differ in their last bits; on a 1e-12 grid they tie, and ties go to the
    # lower reference row whatever the tiling.
    return topk(np.round(exact, 12), np.where(np.isfinite(exact), candidates, EMPTY), k)


def exact_topk(
    query: np.ndarray,
    query_norms: np.ndarray,
    reference: np.ndarray,
    reference_norms: np.ndarray,
    reference_rows: np.ndarray,
    screened: np.ndarray,
    k: int,
    query_clusters: np.ndarray | None = None,
    reference_clusters: np.ndarray | None = None,
) -> np.ndarray:
    """The k best of each query cell's screened candidates held by one reference block,
    ranked by float64 cosine; cells the screen cannot vouch for are searched exhaustively.

    Merged over all reference blocks (:func:`merge_topk`), the result is the exact
    float64 kNN.

    Parameters
    ----------
    query, reference
        ``(bq, g)`` and ``(br, g)`` raw expression on the shared genes.
    query_norms, reference_norms
        Their rows' float64 norms (:func:`row_norms`), computed once per block.
    reference_rows
        ``(br,)`` global rows of the reference block (consecutive, or in any order).
    screened
        ``(bq, m, 2)`` merged candidate lists of :func:`screen` (``m > k``).
    k
        Neighbours to keep.
    query_clusters, reference_clusters
        Cluster codes, as for :func:`screen`.

    Returns
    -------
    numpy.ndarray
        Packed ``(bq, k, 2)`` lists of float64 cosines (on a 1e-12 grid).
    """
    query = np.ascontiguousarray(query, dtype=np.float32)
    reference = np.ascontiguousarray(reference, dtype=np.float32)
    reference_rows = np.asarray(reference_rows, dtype=np.int64)
    qn = np.asarray(query_norms, dtype=np.float64)
    rn = np.asarray(reference_norms, dtype=np.float64)
    candidates = screened[..., 1].astype(np.int64)
    again = np.flatnonzero(incomplete(screened, k, query.shape[1]))
    candidates[again] = EMPTY  # found by the exhaustive search instead, never twice
    exact = np.full(candidates.shape, -np.inf)
    _cosine64_into(query, qn, reference, rn, 0, _positions(candidates, reference_rows), exact)
    out = _rank(exact, candidates, k)
    step = max(1, min(EXHAUSTIVE_ROWS, EXHAUSTIVE_ELEMENTS // max(1, len(reference_rows))))
    floor = band_floor(screened, k, query.shape[1])
    unit = normalize_rows(reference) if len(again) else None
    for lo in range(0, len(again), step):
        cells = again[lo : lo + step]
        every = np.repeat(reference_rows[None, :], len(cells), axis=0)
        if query_clusters is not None:
            every[np.asarray(query_clusters)[cells, None]
                  != np.asarray(reference_clusters)[None, :]] = EMPTY
        # float64 only where the float32 screen leaves a row within reach of the k-th
        every[normalize_rows(query[cells]) @ unit.T < floor[cells, None]] = EMPTY
        exact = np.full(every.shape, -np.inf)
        _cosine64_into(query[cells], qn[cells], reference, rn, 0,
                       _positions(every, reference_rows), exact)
        out[cells] = _rank(exact, every, k)
    return out


def _positions(ids: np.ndarray, reference_rows: np.ndarray) -> np.ndarray:
    """Where in a block whose rows are ``reference_rows`` (consecutive, or in any order for
    a reference prepared in list order) each id lies; ``EMPTY`` for ids it does not hold."""
    if len(reference_rows) == 0:
        return np.full(ids.shape, EMPTY, dtype=np.int64)
    first = int(reference_rows[0])
    if int(reference_rows[-1]) - first == len(reference_rows) - 1 and \
            (len(reference_rows) < 2 or (np.diff(reference_rows) == 1).all()):
        at = ids - first
        return np.where((ids >= 0) & (at >= 0) & (at < len(reference_rows)), at, EMPTY)
    order = np.argsort(reference_rows, kind="stable")
    ranked = reference_rows[order]
    at = np.clip(np.searchsorted(ranked, ids), 0, len(ranked) - 1)
    return np.where((ids >= 0) & (ranked[at] == ids), order[at], EMPTY)


def drop_self(indices: np.ndarray, similarity: np.ndarray, rows: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Remove each cell from its own neighbour list (self-imputation): ``k + 1`` → ``k``.

    The cell is removed where it appears; an exact duplicate of it with a lower
    row wins the tie and can push it out of the list, and then the last
    neighbour goes instead, so exactly ``k`` other cells always remain.

    Parameters
    ----------
    indices, similarity
        ``(n, k + 1)`` neighbours of cells that are themselves reference rows.
    rows
        ``(n,)`` or ``(n, 1)`` reference row of each cell.
    """
    indices, similarity = np.asarray(indices), np.asarray(similarity)
    own = indices == np.asarray(rows).reshape(-1, 1)
    drop = own & (np.cumsum(own, axis=1) == 1)
    drop[~own.any(axis=1), -1] = True
    keep = ~drop
    k = indices.shape[1] - 1
    return indices[keep].reshape(-1, k), similarity[keep].reshape(-1, k)


class Tiles(Protocol):
    """A reference prepared for :func:`search_block`, read one tile of rows at a time.

    A task holds one tile, never the whole reference: each method reads rows
    ``lo:hi`` of one prepared array (from a store, or from memory).
    """

    def bounds(self) -> Iterator[tuple[int, int]]:
        """``(lo, hi)`` of every tile, in row order."""

    def unit(self, lo: int, hi: int) -> np.ndarray:
        """float32 L2-normalised rows (:func:`normalize_rows`), for the screen."""

    def values(self, lo: int, hi: int) -> np.ndarray:
        """float32 rows as searched, for the exact ranking."""

    def norms(self, lo: int, hi: int) -> np.ndarray:
        """float64 norms of those rows (:func:`row_norms`)."""

    def clusters(self, lo: int, hi: int) -> np.ndarray | None:
        """Cluster codes of the rows, or None for an unrestricted search."""

    def lists(self, lo: int, hi: int) -> np.ndarray | None:
        """For an approximate search: the coarse list of each row, ascending within the
        tile (the rows of one list are contiguous); None for an exact-only reference."""

    def rows(self, lo: int, hi: int) -> np.ndarray | None:
        """The reference row each prepared row holds (a reference prepared in list order
        holds them out of order; candidates are named, and ties broken, by these rows);
        None when they are in order."""

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where each reference row (``EMPTY`` stays ``EMPTY``) lies among the prepared
        rows: the inverse of :meth:`rows`."""


def _merged(best: np.ndarray | None, part: np.ndarray, m: int) -> np.ndarray:
    return part if best is None else merge_topk(np.concatenate([best, part], axis=1), m)


def _rows(tiles: Tiles, lo: int, hi: int) -> np.ndarray:
    rows = tiles.rows(lo, hi)
    return np.arange(lo, hi, dtype=np.int64) if rows is None else rows


def _screen_all(unit: np.ndarray, tiles: Tiles, k: int, query_clusters) -> np.ndarray:
    screened = None
    for lo, hi in tiles.bounds():
        rows = _rows(tiles, lo, hi)
        part = screen(unit, tiles.unit(lo, hi), rows, k, query_clusters, tiles.clusters(lo, hi))
        screened = _merged(screened, part, k + RERANK_MARGIN)
    return screened


def _cells_probing(probes: np.ndarray) -> list[np.ndarray]:
    """The cells probing each list, ascending (a cell probes a list once)."""
    n_lists = int(probes.max(initial=-1)) + 1
    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    ends = np.searchsorted(flat[order], np.arange(n_lists + 1))
    return [order[ends[c] : ends[c + 1]] // probes.shape[1] for c in range(n_lists)]


def _lists_in_tile(tiles: Tiles, lo: int, hi: int, probing: list[np.ndarray]
                   ) -> tuple[np.ndarray, list[int]]:
    """Where each list starts in a tile (prepared in list order), and the lists there that
    some cell probes."""
    n_lists = len(probing)
    offsets = np.searchsorted(tiles.lists(lo, hi), np.arange(n_lists + 1))
    return offsets, [c for c in range(n_lists)
                     if offsets[c] < offsets[c + 1] and len(probing[c])]


def _search_probed(q: np.ndarray, q_norms: np.ndarray, tiles: Tiles, probes: np.ndarray,
                   k: int, query_clusters, floor: np.ndarray) -> np.ndarray:
    """Every row of each cell's probed lists ranked by float64 cosine: the exhaustive search
    of cells the float32 screen cannot vouch for, within the lists they probe (all lists
    probed: the exact search's), over the rows screened at or above ``floor``
    (:func:`band_floor`)."""
    best = _pack(*_empty(len(q), k))
    probing = _cells_probing(probes)
    unit = normalize_rows(q)
    for lo, hi in tiles.bounds():
        offsets, wanted = _lists_in_tile(tiles, lo, hi, probing)
        if not wanted:
            continue
        values, rows = tiles.values(lo, hi), _rows(tiles, lo, hi)
        norms = np.asarray(tiles.norms(lo, hi), dtype=np.float64)
        codes, tile = tiles.clusters(lo, hi), normalize_rows(values)  # one read of the tile
        for c in wanted:
            a, b = offsets[c], offsets[c + 1]
            step = max(1, min(EXHAUSTIVE_ROWS, EXHAUSTIVE_ELEMENTS // (b - a)))
            for at in range(0, len(probing[c]), step):
                cells = probing[c][at : at + step]
                every = np.repeat(rows[None, a:b], len(cells), axis=0)
                local = np.repeat(np.arange(b - a)[None, :], len(cells), axis=0)
                other = unit[cells] @ tile[a:b].T < floor[cells, None]
                if query_clusters is not None:
                    other |= np.asarray(query_clusters)[cells, None] != codes[None, a:b]
                every[other], local[other] = EMPTY, EMPTY
                exact = np.full(every.shape, -np.inf)
                _cosine64_into(q[cells], q_norms[cells], values[a:b], norms[a:b], 0, local,
                               exact)
                best[cells] = _merged(best[cells], _rank(exact, every, k), k)
    return best


def _screen_probed(unit: np.ndarray, tiles: Tiles, k: int, query_clusters, probes: np.ndarray
                   ) -> np.ndarray:
    """The screen of an approximate search: each cell meets only the rows of the coarse
    lists it probes, one product per list present in a tile (the reference is prepared in
    list order, so a tile holds a few whole lists)."""
    m = k + RERANK_MARGIN
    screened = _pack(*_empty(len(unit), m))
    probing = _cells_probing(probes)
    for lo, hi in tiles.bounds():
        offsets, wanted = _lists_in_tile(tiles, lo, hi, probing)
        if not wanted:
            continue
        rows, tile = _rows(tiles, lo, hi), tiles.unit(lo, hi)
        codes = tiles.clusters(lo, hi)
        for c in wanted:
            cells, a, b = probing[c], offsets[c], offsets[c + 1]
            part = screen(unit[cells], tile[a:b], rows[a:b], k,
                          None if query_clusters is None else query_clusters[cells],
                          None if codes is None else codes[a:b])
            screened[cells] = _merged(screened[cells], part, m)
    return screened


def search_block(query: np.ndarray, tiles: Tiles, k: int,
                 query_clusters: np.ndarray | None = None,
                 probes: np.ndarray | None = None) -> np.ndarray:
    """Cosine kNN of one query block in a tiled reference, one tile held at a time.

    The float32 :func:`screen` of every tile, its candidate lists merged as
    they come; then :func:`exact_topk` in every tile, merged again. Any tiling
    gives the same result (the lists' order is total, the final cosines
    depend only on the two rows).

    Parameters
    ----------
    query
        ``(bq, g)`` rows as searched (cast to float32, as the reference's values).
    tiles
        The prepared reference (:class:`Tiles`).
    k
        Neighbours per query cell.
    query_clusters
        ``(bq,)`` cluster codes; with them only same-cluster pairs are compared.
    probes
        ``(bq, p)`` coarse lists each cell probes (an approximate search over a
        reference prepared with lists, :meth:`Tiles.lists`): the screen meets
        only those lists' rows; the candidates are then ranked exactly as
        always, so the only error left is a true neighbour in a list not probed.

    Returns
    -------
    numpy.ndarray
        Packed ``(bq, k, 2)`` list: cosine (NaN) and reference row (``-1``) per
        slot, best first; rows without any non-zero value are all empty.
    """
    q = np.ascontiguousarray(query, dtype=np.float32)
    unit, q_norms = normalize_rows(q), row_norms(q)
    if probes is not None:
        screened = _screen_probed(unit, tiles, k, query_clusters, probes)
        # cells whose probed lists hold fewer than k + margin candidates: every list
        short = np.flatnonzero((screened[:, -1, 1] == EMPTY) & ~zero_rows(q))
        if len(short):
            screened[short] = _screen_all(unit[short], tiles, k,
                                          None if query_clusters is None
                                          else query_clusters[short])
    else:
        screened = _screen_all(unit, tiles, k, query_clusters)
    del unit
    if probes is not None:
        # an approximate search ranks its candidates where they lie, reading only the
        # tiles holding them; a cell the screen cannot vouch for is searched exhaustively
        # within its probed lists (all lists for one searched whole)
        best = _rank_candidates(q, q_norms, tiles, screened, k)
        again = incomplete(screened, k, q.shape[1])
        everywhere = np.zeros(len(q), dtype=bool)
        everywhere[short] = True
        for cells, lists in ((np.flatnonzero(again & ~everywhere), probes),
                             (np.flatnonzero(again & everywhere), None)):
            if len(cells):
                n_lists = int(tiles.lists(0, None).max(initial=-1)) + 1
                lists = np.tile(np.arange(n_lists), (len(cells), 1)) if lists is None \
                    else lists[cells]
                best[cells] = _search_probed(
                    q[cells], q_norms[cells], tiles, lists, k,
                    None if query_clusters is None else np.asarray(query_clusters)[cells],
                    band_floor(screened[cells], k, q.shape[1]))
    else:
        best = _pack(*_empty(len(q), k))
        for lo, hi in tiles.bounds():
            part = exact_topk(q, q_norms, tiles.values(lo, hi), tiles.norms(lo, hi),
                              _rows(tiles, lo, hi), screened, k, query_clusters,
                              tiles.clusters(lo, hi))
            best = _merged(best, part, k)
    undefined = zero_rows(q)
    best[undefined, :, 0] = np.nan
    best[undefined, :, 1] = EMPTY
    return best


def _rank_candidates(q: np.ndarray, q_norms: np.ndarray, tiles: Tiles, screened: np.ndarray,
                     k: int) -> np.ndarray:
    """:func:`exact_topk`'s ranking of every cell's screened candidates (none searched
    exhaustively), in one pass over the tiles that hold them: each tile's pairs computed
    at once, every cell ranked once. The same cosines and the same order as tile by tile
    with merges, at a cost that grows with the candidates, not with cells × tiles."""
    candidates = screened[..., 1].astype(np.int64)
    where = tiles.positions(candidates)
    exact = np.full(candidates.shape, -np.inf)
    flat = where.ravel()
    held = np.flatnonzero(flat >= 0)
    held = held[np.argsort(flat[held], kind="stable")]
    for lo, hi in tiles.bounds():
        a, b = np.searchsorted(flat[held], [lo, hi])
        if a == b:
            continue
        cells = np.unique(held[a:b] // candidates.shape[1])
        part = exact[cells]
        _cosine64_into(q[cells], q_norms[cells], tiles.values(lo, hi),
                       np.asarray(tiles.norms(lo, hi), dtype=np.float64), lo, where[cells], part)
        exact[cells] = part
    return _rank(exact, candidates, k)


def nearest_lists(unit: np.ndarray, centroids: np.ndarray, n: int = 1) -> np.ndarray:
    """The ``n`` coarse lists (k-means centroids of unit rows) nearest each unit row, nearest
    first: ``(rows, n)`` int32."""
    unit = np.asarray(unit, dtype=np.float32)
    # squared distance up to the row's own norm, which does not change the order
    d = (centroids * centroids).sum(axis=1)[None, :] - 2.0 * (unit @ centroids.T)
    n = min(n, centroids.shape[0])
    near = np.argpartition(d, n - 1, axis=1)[:, :n] if n < centroids.shape[0] else \
        np.tile(np.arange(centroids.shape[0]), (len(d), 1))
    order = np.argsort(np.take_along_axis(d, near, axis=1), axis=1, kind="stable")
    return np.take_along_axis(near, order, axis=1).astype(np.int32)
