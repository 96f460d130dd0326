"""Checks of names, values and parameters, run before any output is written.

Errors are :class:`~scimpute_dask.errors.InputError` and name the file and the
row, cell, gene or cluster at fault, in the manner of scikit-learn's parameter
validation.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
import pandas as pd
from scipy import sparse

from scimpute_dask.errors import InputError, some


# --------------------------------------------------------------------------- #
# Matrices
# --------------------------------------------------------------------------- #
def check_unique_names(names: np.ndarray, label: str, kind: str) -> None:
    """Raise if a cell or gene name is empty or occurs twice."""
    names = pd.Index(names)
    if (names == "").any():
        pos = int(np.flatnonzero(names == "")[0])
        raise InputError(f"{label}: {kind} number {pos + 1} has an empty name")
    dup = names[names.duplicated()].unique()
    if len(dup):
        raise InputError(f"{label}: duplicated {kind} names: {some(dup)}")


def check_values(
    values: np.ndarray,
    row_names: np.ndarray,
    col_names: np.ndarray,
    label: str,
    row_kind: str,
    col_kind: str,
) -> None:
    """Raise on the first NaN, infinite, negative or float32-overflowing value of a block.

    Stores hold float32: a finite value beyond its range would become infinite.
    """
    if sparse.issparse(values):
        values = sparse.csr_matrix(values)
        _check_entries(values.data, values.indptr, values.indices, row_names, col_names,
                       label, row_kind, col_kind)
        return
    too_large = np.finfo(np.float32).max
    for bad, what in ((~np.isfinite(values), "is NaN or infinite"), (values < 0, "is negative"),
                      (values > too_large, f"is larger than float32 can hold (at most "
                                           f"{too_large:.4g})")):
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise InputError(
                f"{label}: {row_kind} '{row_names[r]}', {col_kind} '{col_names[c]}': "
                f"value {float(values[r, c])!r} {what}; expression must be finite and "
                f"non-negative"
            )


def _check_entries(data: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
                   row_names: np.ndarray, col_names: np.ndarray, label: str, row_kind: str,
                   col_kind: str) -> None:
    """:func:`check_values` on the stored entries of a CSR block (the others are zeros)."""
    bad = ~np.isfinite(data) | (data < 0) | (np.abs(data) > np.finfo(np.float32).max)
    if bad.any():
        at = int(np.argmax(bad))
        r = int(np.searchsorted(indptr, at, side="right")) - 1
        check_values(np.array([[data[at]]]), row_names[r : r + 1],
                     col_names[indices[at] : indices[at] + 1], label, row_kind, col_kind)


def shared_genes(query_genes: np.ndarray, reference_genes: np.ndarray, query_label: str,
                 reference_label: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the shared genes in the query and the reference, in reference order."""
    ref_pos = pd.Index(reference_genes)
    q_pos = pd.Index(query_genes)
    common = ref_pos.intersection(q_pos, sort=False)
    if len(common) == 0:
        raise InputError(
            f"no genes are shared between the query ({query_label}, e.g. "
            f"{some(query_genes, 3)}) and the reference ({reference_label}, e.g. "
            f"{some(reference_genes, 3)}); check that both use the same gene identifiers"
        )
    return q_pos.get_indexer(common), ref_pos.get_indexer(common)


# --------------------------------------------------------------------------- #
# Parameters
# --------------------------------------------------------------------------- #
def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int, or an error naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_k(
    k: int,
    query_clusters: np.ndarray | None,
    reference_clusters: np.ndarray | None,
    n_reference: int,
) -> None:
    """Raise if a query cell has fewer than ``k`` candidate reference cells.

    Without clusters every reference cell is a candidate; with clusters only
    those of the query cell's own cluster are, and the message names the cluster.
    """
    check_positive_int(k, "k_neighbors")
    if query_clusters is None:
        if k > n_reference:
            raise InputError(
                f"k_neighbors={k} is larger than the number of reference cells ({n_reference})"
            )
        return
    ref_counts = pd.Series(reference_clusters).value_counts()
    q_counts = pd.Series(query_clusters).value_counts()
    short = [
        (c, int(ref_counts.get(c, 0)), int(n)) for c, n in q_counts.items()
        if ref_counts.get(c, 0) < k
    ]
    if short:
        detail = "; ".join(
            f"cluster '{c}' has {nr} reference cells for {nq} query cells" for c, nr, nq in short
        )
        raise InputError(
            f"k_neighbors={k} is larger than the candidate reference cells of "
            f"{len(short)} cluster(s): {detail}. Lower k, merge these clusters, or run "
            f"without clusters (consider_clusters=False / --no-clusters)"
        )
