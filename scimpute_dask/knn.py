"""Exact cosine k-nearest-neighbour kernels on NumPy blocks.

The Dask graph (:mod:`scimpute_dask.graph`) tiles the query × reference
similarity into blocks; these functions work on one block at a time and never
see more than one tile. A top-k list is packed as a float64 array of shape
``(n, k, 2)``: ``[..., 0]`` the cosine similarity, ``[..., 1]`` the global
reference row (exact in float64), ``-1`` marking an empty slot. Ties in
similarity go to the lower reference row, so the result does not depend on
how the reference is chunked.
"""

from __future__ import annotations

import numba
import numpy as np

EMPTY = -1


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows as float32; all-zero rows stay zero (as scikit-learn's)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0] = 1.0
    return (x / norms[:, None]).astype(np.float32)


def zero_rows(x: np.ndarray) -> np.ndarray:
    """True for rows without any non-zero value: their cosine is undefined."""
    return ~np.any(np.asarray(x) != 0, axis=1)


@numba.njit(nogil=True, cache=True)
def _topk_into(sim, idx, out_sim, out_idx):  # pragma: no cover - compiled
    """Keep, per row, the k best (similarity desc, index asc) of ``sim``/``idx``.

    ``out_sim``/``out_idx`` hold the running top-k (sorted, ``EMPTY`` padded) and
    are updated in place. A sorted insertion buffer beats a heap for k ~ 25, and
    after the first few columns almost every candidate fails the threshold test.
    """
    n, m = sim.shape
    k = out_sim.shape[1]
    for i in range(n):
        cnt = 0
        while cnt < k and out_idx[i, cnt] != EMPTY:
            cnt += 1
        for j in range(m):
            t = idx[i, j]
            if t == EMPTY:
                continue
            s = sim[i, j]
            if cnt == k:
                ls = out_sim[i, k - 1]
                if s < ls or (s == ls and t > out_idx[i, k - 1]):
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


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, dtype=np.float64), np.full((n, k), EMPTY, dtype=np.int64)


def _pack(sim: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.stack([sim, idx.astype(np.float64)], axis=-1)


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
    out_sim, out_idx = _empty(sim.shape[0], k)
    _topk_into(np.asarray(sim), np.asarray(idx, dtype=np.int64), out_sim, out_idx)
    return _pack(out_sim, out_idx)


@numba.njit(nogil=True, cache=True)
def _dot64(query, reference, candidates, out):  # pragma: no cover - compiled
    """float64 dot product of each query row with its candidate reference rows.

    A plain sequential sum over the genes: the value depends only on the two
    rows, never on how the matrix was tiled (BLAS results do).
    """
    n, m = candidates.shape
    g = query.shape[1]
    for i in range(n):
        for j in range(m):
            c = candidates[i, j]
            if c < 0:
                out[i, j] = -np.inf
                continue
            acc = 0.0
            for t in range(g):
                acc += float(query[i, t]) * float(reference[c, t])
            out[i, j] = acc


#: Extra candidates re-ranked per tile: float32 products can only misorder
#: values closer than ~1e-7, so a near-tie would need more than this many
#: rivals within 1e-7 of the k-th similarity to escape the re-ranking.
RERANK_MARGIN = 16


def _tile_topk(qn: np.ndarray, rn: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Screen a tile with a float32 product, then rank the best by a float64 dot."""
    sim = qn @ rn.T
    m = min(k + RERANK_MARGIN, sim.shape[1])
    pre = topk(sim, np.broadcast_to(np.arange(sim.shape[1]), sim.shape), m)
    local = pre[..., 1].astype(np.int64)
    exact = np.empty(local.shape, dtype=np.float64)
    _dot64(qn, rn, local, exact)
    return topk(exact, np.where(local >= 0, rows[np.maximum(local, 0)], EMPTY), k)


def block_topk(
    query: np.ndarray,
    reference: np.ndarray,
    reference_rows: np.ndarray,
    k: int,
    query_clusters: np.ndarray | None = None,
    reference_clusters: np.ndarray | None = None,
) -> np.ndarray:
    """Top-k reference cells of one reference block for each cell of one query block.

    The tile is screened with a float32 BLAS product; the best
    ``k + RERANK_MARGIN`` candidates are then ranked by a float64 dot product
    of the same rows, so the result does not depend on how the data were tiled.

    Parameters
    ----------
    query, reference
        Row-normalised (:func:`normalize_rows`) ``(bq, g)`` and ``(br, g)``
        float32 blocks on the shared genes.
    reference_rows
        ``(br,)`` global row numbers of the reference block.
    k
        Neighbours to keep.
    query_clusters, reference_clusters
        Integer cluster codes; when given, only same-cluster pairs are compared,
        and only their similarities are computed (one product per cluster), so a
        clustered search costs less than an unrestricted one.

    Returns
    -------
    numpy.ndarray
        Packed ``(bq, k, 2)`` top-k list; slots stay empty when the block has
        fewer than k candidates for a cell.
    """
    reference_rows = np.asarray(reference_rows, dtype=np.int64)
    if query_clusters is None:
        return _tile_topk(query, reference, reference_rows, k)
    out = _pack(*_empty(query.shape[0], k))
    for code in np.intersect1d(query_clusters, reference_clusters):
        qi = np.flatnonzero(query_clusters == code)
        ri = np.flatnonzero(reference_clusters == code)
        out[qi] = _tile_topk(query[qi], reference[ri], reference_rows[ri], k)
    return out


def merge_topk(packed: np.ndarray, k: int) -> np.ndarray:
    """Merge concatenated top-k lists ``(n, m, 2)`` into one ``(n, k, 2)`` list."""
    return topk(packed[..., 0], packed[..., 1].astype(np.int64), k)
