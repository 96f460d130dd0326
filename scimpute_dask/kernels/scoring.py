"""scimpute's internal validation: per-cell cosine of imputed vs measured shared genes.

Note that these genes also chose the neighbours, so the score is optimistic;
it is kept because scimpute reports it.
"""

from __future__ import annotations

import numpy as np


def round_like_scimpute(values: np.ndarray) -> np.ndarray:
    """Imputed values are rounded to 2 decimals (NumPy's half-to-even, as pandas)."""
    return np.round(np.asarray(values, dtype=np.float64), 2)


def cosine_from_sums(dot: np.ndarray, aa: np.ndarray, bb: np.ndarray) -> np.ndarray:
    """Cosine from ``Σab``, ``Σa²``, ``Σb²``; 0 when a row is all zero (as scikit-learn)."""
    na, nb = np.sqrt(aa), np.sqrt(bb)
    return dot / (np.where(na == 0, 1.0, na) * np.where(nb == 0, 1.0, nb))


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
