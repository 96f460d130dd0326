"""Similarity-weighted imputation kernels on NumPy blocks.

scimpute's weight of a neighbour is its "distance", cosine similarity + 1
(0..2), and the imputed value of a gene is the weighted mean of the
neighbours' values: ``Σ w_j · ref[j, gene] / Σ w_j``.
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import sparse

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
def _column_max_into(indices, data, largest):  # pragma: no cover - compiled
    for i in range(len(data)):
        v = abs(data[i])
        if v > largest[indices[i]]:  # NaN never is
            largest[indices[i]] = v


def column_max(block) -> np.ndarray:
    """The largest magnitude in every column of a dense or CSR block (NaN skipped; 0 for
    an empty column), ``(1, columns)`` float64."""
    if sparse.issparse(block):
        block = sparse.csr_matrix(block)
        largest = np.zeros(block.shape[1])
        _column_max_into(block.indices, block.data, largest)
        return largest[None]
    return np.nanmax(np.abs(block), axis=0, initial=0)[None].astype(np.float64)


@numba.njit(nogil=True, cache=True, inline="always")
def weighted_sums_into(indices, weights, reference, acc, log_space):  # pragma: no cover
    """``acc = Σ w·x`` (or ``Σ w·log1p(x)``) over one cell's neighbours; returns ``Σ w``.

    ``indices``/``weights`` are the cell's ``(k,)`` row; ``-1`` = no neighbour.
    """
    g = reference.shape[1]
    total = 0.0
    acc[:] = 0.0
    for j in range(indices.shape[0]):
        r = indices[j]
        if r < 0:
            continue
        w = weights[j]
        total += w
        if log_space:
            for c in range(g):
                acc[c] += w * np.log1p(np.float64(reference[r, c]))
        else:
            for c in range(g):
                acc[c] += w * reference[r, c]
    return total


@numba.njit(nogil=True, cache=True)
def _weighted_mean_into(indices, weights, reference, out, log_space):  # pragma: no cover
    n = indices.shape[0]
    g = reference.shape[1]
    acc = np.empty(g, dtype=np.float64)
    for i in range(n):
        total = weighted_sums_into(indices[i], weights[i], reference, acc, log_space)
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


@numba.njit(nogil=True, cache=True)
def _weighted_mean_csr_into(indices, weights, indptr, columns, values, out,
                            log_space):  # pragma: no cover - compiled
    """:func:`_weighted_mean_into` over a CSR reference: each neighbour's stored entries
    only, in the same order, so every sum is the dense kernel's (its other terms are
    ``w · 0``, which leave a sum unchanged)."""
    n = indices.shape[0]
    g = out.shape[1]
    acc = np.empty(g, dtype=np.float64)
    for i in range(n):
        acc[:] = 0.0
        total = 0.0
        for j in range(indices.shape[1]):
            r = indices[i, j]
            if r < 0:
                continue
            w = weights[i, j]
            total += w
            for p in range(indptr[r], indptr[r + 1]):
                x = np.float64(values[p])
                acc[columns[p]] += w * (np.log1p(x) if log_space else x)
        if total > 0.0:
            for c in range(g):
                out[i, c] = np.expm1(acc[c] / total) if log_space else acc[c] / total
        else:
            for c in range(g):
                out[i, c] = np.nan


def weighted_mean(
    indices: np.ndarray,
    weights: np.ndarray,
    reference: np.ndarray | sparse.csr_matrix,
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
        ``(n_reference, g)`` expression of one gene block of the reference, dense or
        CSR (the same values give the same result, bit for bit).
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
    if sparse.issparse(reference):
        reference = sparse.csr_matrix(reference)
        _weighted_mean_csr_into(
            np.ascontiguousarray(indices, dtype=np.int64),
            np.ascontiguousarray(weights, dtype=np.float64),
            reference.indptr, reference.indices, reference.data, out, average == "log1p")
        return out
    _weighted_mean_into(
        np.ascontiguousarray(indices, dtype=np.int64),
        np.ascontiguousarray(weights, dtype=np.float64),
        np.ascontiguousarray(reference),
        out,
        average == "log1p",
    )
    return out


#: Below this magnitude a float32 can always carry scimpute's 2-decimal text:
#: float32's spacing there (at most 2**-9 ≈ 0.002) is under half of the 0.01
#: interval that rounds to one text, so one of the two float32 next to a value
#: rounds as the value does.
FLOAT32_TEXT_LIMIT = 2.0**15


@numba.njit(nogil=True, cache=True, inline="always")
def round_2(x):  # pragma: no cover - compiled
    """NumPy's ``round(x, 2)`` operation for operation (multiply, round half to even,
    divide): scimpute's rounding of imputed values, in compiled kernels."""
    return np.rint(x * 100.0) / 100.0


@numba.njit(nogil=True, cache=True)
def _float32_text_into(values, exempt, out):  # pragma: no cover - compiled
    """``out = float32(values)``, moved one step where that changes the 2-decimal text
    (:func:`round_2`). Columns flagged in ``exempt`` get the nearest float32.
    Returns the number of values no float32 can carry (left at the nearest).
    """
    bad = 0
    n, g = values.shape
    for i in range(n):
        for j in range(g):
            x = values[i, j]
            y = np.float32(x)
            out[i, j] = y
            if exempt[j]:
                continue
            want = round_2(x)
            if np.isnan(want) or round_2(np.float64(y)) == want:
                continue
            step = np.nextafter(y, np.float32(np.inf) if x > y else np.float32(-np.inf))
            if round_2(np.float64(step)) == want:
                out[i, j] = step
            else:
                bad += 1
    return bad


def float32_keeping_text(values: np.ndarray, exempt: np.ndarray | None = None) -> np.ndarray:
    """float32 values that round to 2 decimals exactly as the float64 ``values`` do.

    The nearest float32 is kept unless it lies across a rounding boundary from
    the float64 value; then it moves one float32 step back towards it (an
    error of one float32 unit instead of half). A table written from the
    float32 values is then byte-identical to one written from the float64s.
    One compiled pass, no temporaries: fresh arrays the size of the block
    cost more than the arithmetic.

    Parameters
    ----------
    values
        ``(n, g)`` float64 values, each NaN or of magnitude below
        :data:`FLOAT32_TEXT_LIMIT`.
    exempt
        ``(g,)`` booleans: columns that just get the nearest float32 (whose
        float64 values the caller keeps elsewhere).

    Raises
    ------
    ValueError
        If a value is too large for that (callers keep float64 then).
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    out = np.empty(values.shape, dtype=np.float32)
    flat = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
    exempt = (np.zeros(flat.shape[1], dtype=bool) if exempt is None
              else np.asarray(exempt, dtype=bool))
    if _float32_text_into(flat, exempt, out.reshape(flat.shape)):
        raise ValueError(f"values up to {np.nanmax(np.abs(values)):g} need float64 to keep "
                         "their 2-decimal text")
    return out
