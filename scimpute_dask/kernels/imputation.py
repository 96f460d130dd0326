"""Similarity-weighted imputation kernels on NumPy blocks.

scimpute's weight of a neighbour is its "distance", cosine similarity + 1
(0..2), and the imputed value of a gene is the weighted mean of the
neighbours' values: ``Σ w_j · ref[j, gene] / Σ w_j``.
"""

from __future__ import annotations

import numba
import numpy as np

from scimpute_dask.config import DEFAULT_TEMPERATURE


def similarity_to_weight(similarity: np.ndarray) -> np.ndarray:
    """scimpute's neighbour weight (its stored "distance"): cosine similarity + 1."""
    return similarity + 1.0


def neighbour_weights(similarity, weighting: str = "cosine+1",
                      temperature: float = DEFAULT_TEMPERATURE):
    """Weights of a cell's neighbours from their cosine similarities.

    Works on NumPy and Dask arrays alike (``(n, k)``, the k neighbours in one chunk).

    Parameters
    ----------
    similarity
        ``(n, k)`` cosine similarities; NaN rows (cells without neighbours) stay NaN.
    weighting
        ``"cosine+1"`` (scimpute: ``s + 1``), ``"cosine"`` (``max(s, 0)``), ``"softmax"``
        (``exp((s - max s) / temperature)`` per cell; the row maximum cancels in
        the weighted mean and keeps ``exp`` finite) or ``"uniform"`` (1).
    temperature
        Softmax temperature; lower concentrates the weight on the closest neighbours.
    """
    if weighting == "cosine+1":
        return similarity_to_weight(similarity)
    if weighting == "cosine":
        # centred genes (zscore) give negative cosines: a negative weight would
        # extrapolate away from that neighbour, outside the reference's range
        return np.maximum(similarity, 0)
    if weighting == "uniform":
        return np.where(np.isnan(similarity), np.nan, 1.0).astype(similarity.dtype)
    if weighting == "softmax":
        top = similarity.max(axis=1, keepdims=True)
        return np.exp((similarity - top) / temperature).astype(similarity.dtype)
    raise ValueError(f"unknown weighting {weighting!r}")


@numba.njit(nogil=True, cache=True)
def _weighted_mean_into(indices, weights, reference, out, log_space):  # pragma: no cover
    n, k = indices.shape
    g = reference.shape[1]
    acc = np.empty(g, dtype=np.float64)
    for i in range(n):
        total = 0.0
        acc[:] = 0.0
        for j in range(k):
            r = indices[i, j]
            if r < 0:
                continue
            w = weights[i, j]
            total += w
            if log_space:
                for c in range(g):
                    acc[c] += w * np.log1p(np.float64(reference[r, c]))
            else:
                for c in range(g):
                    acc[c] += w * reference[r, c]
        if total > 0.0:
            if log_space:
                for c in range(g):
                    out[i, c] = np.expm1(acc[c] / total)
            else:
                for c in range(g):
                    out[i, c] = acc[c] / total
        else:
            for c in range(g):
                out[i, c] = np.nan


def weighted_mean(
    indices: np.ndarray,
    weights: np.ndarray,
    reference: np.ndarray,
    dtype: type = np.float64,
    average: str = "mean",
) -> np.ndarray:
    """Weighted mean of the neighbours' rows, accumulated in float64.

    Parameters
    ----------
    indices
        ``(n, k)`` rows of ``reference``; ``-1`` = no neighbour.
    weights
        ``(n, k)`` neighbour weights.
    reference
        ``(n_reference, g)`` expression of one gene block of the reference.
    dtype
        Output dtype.
    average
        ``"mean"`` (scimpute): ``Σ w·x / Σ w``. ``"log1p"``: the same mean of
        ``log1p(x)``, mapped back by ``expm1`` — a weighted geometric mean of
        ``1 + x``, which a few expressing neighbours do not pull as far from
        zero as the plain mean does.

    Returns
    -------
    numpy.ndarray
        ``(n, g)``; rows without neighbours are NaN.
    """
    if average not in ("mean", "log1p"):
        raise ValueError(f"unknown average {average!r}")
    out = np.empty((indices.shape[0], reference.shape[1]), dtype=dtype)
    _weighted_mean_into(
        np.ascontiguousarray(indices, dtype=np.int64),
        np.ascontiguousarray(weights, dtype=np.float64),
        np.ascontiguousarray(reference),
        out,
        average == "log1p",
    )
    return out
