"""Every (k, weighting, averaging space) at once, from one sorted neighbour list.

A neighbour list found at the largest k holds the lists of every smaller k as
its prefixes (the order is the similarity's, whatever k), and the weights of
every weighting are functions of the same similarities. So one pass over a
cell's ``k_max`` neighbours, keeping running weighted sums, yields the
imputation of every candidate setting: :func:`prefix_scores` reads each
neighbour's values once and, at each k of the grid, adds the imputed value's
contribution to per-gene sums from which the held-out metrics follow
(:func:`gene_metrics`) — no imputed matrix is ever stored.
"""

from __future__ import annotations

import numba
import numpy as np

#: Sums kept per (average, weighting, k, gene), in this order: of the centred
#: imputed value p, p², p·m (m the centred measured value), and the same three
#: in log1p space.
SUMS = ("p", "pp", "pm", "q", "qq", "qm")


@numba.njit(nogil=True, cache=True, parallel=True)
def _prefix_sums(indices, weights, raw, logs, measured, log_measured, centre, log_centre,
                 ks, out, counts):  # pragma: no cover - compiled
    n, kmax = indices.shape
    n_w = weights.shape[0]
    g = raw.shape[1]
    n_k = ks.shape[0]
    # one weighting per thread: each writes only its own out[:, w] (and w = 0 the counts)
    for w in numba.prange(n_w):
        acc = np.empty(g, dtype=np.float64)
        accl = np.empty(g, dtype=np.float64)
        for i in range(n):
            if indices[i, 0] < 0:
                continue  # no neighbours: left out of every score
            acc[:] = 0.0
            accl[:] = 0.0
            total = 0.0
            kk = 0
            for j in range(kmax):
                r = indices[i, j]
                if r >= 0:
                    wt = weights[w, i, j]
                    total += wt
                    for c in range(g):
                        acc[c] += wt * raw[r, c]
                        accl[c] += wt * logs[r, c]
                if j + 1 == ks[kk]:
                    if total > 0.0:
                        if w == 0:
                            counts[kk] += 1
                        for a in range(2):
                            for c in range(g):
                                if a == 0:
                                    value = acc[c] / total
                                else:
                                    value = np.expm1(accl[c] / total)
                                p = value - centre[c]
                                q = np.log1p(value) - log_centre[c]
                                m = measured[i, c]
                                lm = log_measured[i, c]
                                out[a, w, kk, c, 0] += p
                                out[a, w, kk, c, 1] += p * p
                                out[a, w, kk, c, 2] += p * m
                                out[a, w, kk, c, 3] += q
                                out[a, w, kk, c, 4] += q * q
                                out[a, w, kk, c, 5] += q * lm
                    kk += 1
                    if kk == n_k:
                        break


def gene_folds(n_genes: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each of ``n_genes`` genes: a seeded permutation dealt into ``folds`` folds.

    Fold sizes differ by at most one gene.
    """
    fold = np.empty(n_genes, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n_genes)] = np.arange(n_genes) % folds
    return fold


def prefix_scores(indices: np.ndarray, weights: np.ndarray, reference: np.ndarray,
                  measured: np.ndarray, ks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene held-out metrics of every (average, weighting, k) from one neighbour list.

    Parameters
    ----------
    indices
        ``(n, k_max)`` reference rows of each query cell's neighbours, best
        first (``-1`` = none).
    weights
        ``(n_weightings, n, k_max)`` the neighbours' weight under each weighting.
    reference
        ``(n_reference, g)`` the reference's values of the genes to impute.
    measured
        ``(n, g)`` the query's measured values of those genes.
    ks
        Increasing neighbour counts, each ``≤ k_max``.

    Returns
    -------
    dict
        ``"pearson"``, ``"log_pearson"`` (Pearson of log1p values) and ``"css"``
        (cosine), each ``(2, n_weightings, len(ks), g)``: axis 0 the average
        (``mean``, ``log1p``). Cells without neighbours are left out; a gene
        constant in either vector scores NaN.
    """
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    ks = np.asarray(ks, dtype=np.int64)
    if ks.size == 0 or np.any(np.diff(ks) <= 0) or ks[-1] > indices.shape[1] or ks[0] < 1:
        raise ValueError(f"ks must increase within 1..{indices.shape[1]}, got {ks}")
    raw = np.ascontiguousarray(reference, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    defined = indices[:, 0] >= 0
    lm = np.log1p(m)
    zeros = np.zeros(m.shape[1])
    m_centre = m[defined].mean(axis=0) if defined.any() else zeros
    lm_centre = lm[defined].mean(axis=0) if defined.any() else zeros
    mc, lmc = m - m_centre, lm - lm_centre
    # Imputed values are weighted means of reference values: centred on the reference's
    # mean, their sums of squares keep their digits (no cancellation against a large mean).
    logs = np.log1p(raw)
    centre, log_centre = raw.mean(axis=0), logs.mean(axis=0)
    out = np.zeros((2, weights.shape[0], len(ks), raw.shape[1], len(SUMS)))
    counts = np.zeros(len(ks), dtype=np.int64)
    _prefix_sums(indices, np.ascontiguousarray(weights, dtype=np.float64), raw, logs,
                 np.ascontiguousarray(mc), np.ascontiguousarray(lmc), centre, log_centre,
                 ks, out, counts)
    n = counts[None, None, :, None].astype(np.float64)
    mm = (mc[defined] ** 2).sum(axis=0)
    ll = (lmc[defined] ** 2).sum(axis=0)
    p, pp, pm, q, qq, qm = (out[..., j] for j in range(len(SUMS)))
    with np.errstate(invalid="ignore", divide="ignore"):
        # m is centred (Σm = 0 over the cells scored), so Σ(p - p̄)(m) = Σp·m
        var_p = pp - p * p / n
        pearson = pm / np.sqrt(var_p * mm)
        var_q = qq - q * q / n
        log_pearson = qm / np.sqrt(var_q * ll)
        # uncentred: Σ(p+c)(m+d) = Σpm + dΣp + cΣm(=0) + n·c·d
        c, d = centre[None, None, None, :], m_centre[None, None, None, :]
        num = pm + d * p + n * c * d
        den = np.sqrt((pp + 2 * c * p + n * c * c) * (mm + n * d * d))
        css = num / den
    bad_p = ~(var_p > 1e-12 * np.maximum(pp, 1e-300)) | ~(mm > 0)
    bad_q = ~(var_q > 1e-12 * np.maximum(qq, 1e-300)) | ~(ll > 0)
    return {"pearson": np.where(bad_p, np.nan, pearson),
            "log_pearson": np.where(bad_q, np.nan, log_pearson),
            "css": np.where(den > 0, css, np.nan)}
