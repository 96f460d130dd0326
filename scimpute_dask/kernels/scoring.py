"""scimpute's internal validation: per-cell cosine of imputed vs measured shared genes.

Note that these genes also chose the neighbours, so the score is optimistic;
it is kept because scimpute reports it.
"""

from __future__ import annotations

import numba
import numpy as np

from scimpute_dask.kernels.imputation import round_2


def round_like_scimpute(values: np.ndarray) -> np.ndarray:
    """Imputed values are rounded to 2 decimals (NumPy's half-to-even, as pandas)."""
    return np.round(np.asarray(values, dtype=np.float64), 2)


def cosine_from_sums(dot: np.ndarray, aa: np.ndarray, bb: np.ndarray) -> np.ndarray:
    """Cosine from ``Σab``, ``Σa²``, ``Σb²``; 0 when a row is all zero (as scikit-learn)."""
    na, nb = np.sqrt(aa), np.sqrt(bb)
    return dot / (np.where(na == 0, 1.0, na) * np.where(nb == 0, 1.0, nb))


@numba.njit(nogil=True, cache=True)
def _rounded_cosine_into(imputed, measured, out):  # pragma: no cover - compiled
    n, g = measured.shape
    for i in range(n):
        dot = aa = bb = 0.0
        for c in range(g):
            v = round_2(np.float64(imputed[i, c]))
            m = np.float64(measured[i, c])
            dot += v * m
            aa += v * v
            bb += m * m
        if np.isnan(aa):  # a cell without neighbours: its imputed row is NaN
            out[i] = np.nan
            continue
        na, nb = np.sqrt(aa), np.sqrt(bb)
        out[i] = dot / ((na if na != 0.0 else 1.0) * (nb if nb != 0.0 else 1.0))


def rounded_cosine(imputed: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """scimpute's score of each cell: the cosine of its measured shared genes with their
    imputation rounded to 2 decimals, as scimpute's table is.

    One compiled pass: :func:`round_like_scimpute` (operation for operation)
    and :func:`cosine_from_sums`, without temporaries. ``imputed`` may be the
    float32 store's values: each rounds as its float64 mean does
    (:func:`scimpute_dask.kernels.imputation.float32_keeping_text`). NaN for
    cells without neighbours (NaN rows).
    """
    out = np.empty(measured.shape[0], dtype=np.float64)
    _rounded_cosine_into(np.ascontiguousarray(imputed), np.ascontiguousarray(measured), out)
    return out


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows; 0 when a row is all zero (as scikit-learn).

    Rows of ``a`` that are NaN (cells without neighbours) give NaN.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return cosine_from_sums(np.einsum("ij,ij->i", a, b), np.einsum("ij,ij->i", a, a),
                            np.einsum("ij,ij->i", b, b))


def summary_stats(scores: np.ndarray) -> dict[str, float]:
    """The five statistics of ``stats.txt``, over the cells that have a score."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return dict.fromkeys(STAT_NAMES, float("nan"))
    return {
        "Mean": float(np.mean(s)),
        "Median": float(np.median(s)),
        "Lower quantile": float(np.percentile(s, 25)),
        "Upper quantile": float(np.percentile(s, 75)),
        "Standard deviation": float(np.std(s)),
    }


STAT_NAMES = ("Mean", "Median", "Lower quantile", "Upper quantile", "Standard deviation")
