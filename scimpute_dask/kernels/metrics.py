"""Accuracy metrics of imputed against measured expression, on NumPy blocks.

The held-out benchmarks of spatial imputation (Li et al. 2022, Tangram,
SpaGE, stImpute) score each gene across cells and each cell across genes with
the cosine similarity (CSS), the Pearson and Spearman correlations and the
(root) mean squared error. Undefined values are NaN, not 0: the cosine of an
all-zero vector and the correlations of a constant vector have no value, and
a score of 0 there would pass for a genuinely poor prediction.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

#: Column names of :func:`paired_scores`, in order.
METRICS = ("css", "pearson", "spearman", "mse", "rmse", "log_pearson")


def _cosine(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    num = (a * b).sum(axis=axis)
    den = np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _pearson(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    return _cosine(a - a.mean(axis=axis, keepdims=True), b - b.mean(axis=axis, keepdims=True),
                   axis)


def paired_scores(measured: np.ndarray, imputed: np.ndarray, axis: int) -> np.ndarray:
    """CSS, Pearson, Spearman, MSE, RMSE and log1p Pearson of matching vectors along ``axis``.

    Parameters
    ----------
    measured, imputed
        Arrays of the same 2-D shape.
    axis
        ``0`` scores each column (a gene across cells), ``1`` each row (a cell
        across genes).

    Returns
    -------
    numpy.ndarray
        ``(n_vectors, 6)`` float64, columns :data:`METRICS`. CSS is NaN when
        either vector is all zero; Pearson and Spearman are NaN when either is
        constant (Spearman ranks ties by their average rank, as SciPy).
    """
    a = np.asarray(measured, dtype=np.float64)
    b = np.asarray(imputed, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"measured and imputed must be 2-D of one shape, got {a.shape}, {b.shape}")
    mse = ((a - b) ** 2).mean(axis=axis)
    return np.column_stack([
        _cosine(a, b, axis),
        _pearson(a, b, axis),
        _pearson(rankdata(a, axis=axis), rankdata(b, axis=axis), axis),
        mse,
        np.sqrt(mse),
        # the same correlation on log1p values: how well the pattern across cells is
        # caught where most values are small, which a few large values dominate otherwise
        _pearson(np.log1p(np.maximum(a, 0)), np.log1p(np.maximum(b, 0)), axis),
    ])


def gene_correlations(measured: np.ndarray, imputed: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene (column) CSS, Pearson and log1p Pearson: the metrics tuning maximises,
    without :func:`paired_scores`' ranks and errors."""
    a = np.asarray(measured, dtype=np.float64)
    b = np.asarray(imputed, dtype=np.float64)
    return {"css": _cosine(a, b, 0), "pearson": _pearson(a, b, 0),
            "log_pearson": _pearson(np.log1p(np.maximum(a, 0)), np.log1p(np.maximum(b, 0)), 0)}


def summarize(scores: np.ndarray, names: tuple[str, ...] = METRICS) -> dict[str, dict[str, float]]:
    """Mean, median and quartiles of each metric over its defined (finite) values.

    Parameters
    ----------
    scores
        ``(n, len(names))`` as :func:`paired_scores` returns.
    names
        The metric of each column.

    Returns
    -------
    dict
        ``metric -> {"n", "mean", "median", "q25", "q75"}``; ``n`` counts the
        defined values the statistics are over.
    """
    out = {}
    for j, name in enumerate(names):
        v = np.asarray(scores, dtype=np.float64)[:, j]
        v = v[np.isfinite(v)]
        if v.size == 0:
            out[name] = {"n": 0, **dict.fromkeys(("mean", "median", "q25", "q75"), np.nan)}
            continue
        q25, median, q75 = np.percentile(v, [25, 50, 75])
        out[name] = {"n": int(v.size), "mean": float(v.mean()), "median": float(median),
                     "q25": float(q25), "q75": float(q75)}
    return out
