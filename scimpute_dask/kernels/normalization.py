"""Transforms of the shared genes before the neighbour search, on NumPy blocks.

They change which reference cells are found, never what is averaged: the
imputed values stay weighted means of the raw reference profiles, as in
scimpute. Per-cell transforms are row-local; per-gene scaling divides each
gene by a per-gene statistic of its own dataset, computed by one Dask
reduction (:func:`scimpute_dask.engine.graph.search_space`), so that a few
high-expression genes do not dominate the cosine and each platform's
gene-specific capture efficiency cancels out; ``"zscore"`` also centres
each gene, so that the cosine becomes a correlation of the standardised
profiles.
"""

from __future__ import annotations

import numpy as np


def cpm(x: np.ndarray) -> np.ndarray:
    """Counts per million of each row's total; all-zero rows stay zero.

    The cosine does not change when a row is scaled, so on its own this finds
    the same neighbours as ``"none"``; it matters under ``log1p``.
    """
    x = np.asarray(x, dtype=np.float64)
    totals = x.sum(axis=1, keepdims=True)
    return x / np.where(totals > 0, totals, 1.0) * 1e6


def log1p(x: np.ndarray) -> np.ndarray:
    """``log(1 + x)`` of the values as given (already normalised data, e.g. CPM)."""
    return np.log1p(np.asarray(x, dtype=np.float64))


def log1p_cpm(x: np.ndarray) -> np.ndarray:
    """``log(1 + CPM)`` of each row: compresses the range of high-expression genes."""
    return np.log1p(cpm(x))


def scale_genes(x: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Each gene divided by its standard deviation ``sd``; constant genes are left as they are."""
    sd = np.asarray(sd, dtype=np.float64)
    return np.asarray(x, dtype=np.float64) / np.where(sd > 0, sd, 1.0)


def zscore_genes(x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Each gene centred on its mean and divided by its standard deviation.

    The cosine of centred profiles is their correlation over genes, each gene
    weighing the same. Cells without any expression stay all-zero rows: they
    have no profile to compare, and stay unimputable as with the other options.
    """
    x = np.asarray(x, dtype=np.float64)
    out = (x - np.asarray(mean, dtype=np.float64)) / np.where(sd > 0, sd, 1.0)
    out[~np.any(x != 0, axis=1)] = 0.0
    return out


ROW_TRANSFORMS = {"cpm": cpm, "log1p": log1p, "log1p_cpm": log1p_cpm}
