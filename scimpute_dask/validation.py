"""Input validation: every check that can fail is run before any output is written.

Errors are :class:`InputError` (a :class:`ValueError`) and name the file and the
row, cell, gene or cluster at fault, in the manner of scikit-learn's parameter
validation.
"""

from __future__ import annotations

import os
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd

#: How many offending names an error message lists before it abbreviates.
_SHOW = 5


class InputError(ValueError):
    """An input file, table or parameter is unusable; the message says where."""


def _some(names, n: int = _SHOW) -> str:
    names = [str(x) for x in names]
    shown = ", ".join(f"'{x}'" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


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
        raise InputError(f"{label}: duplicated {kind} names: {_some(dup)}")


def check_values(
    values: np.ndarray,
    row_names: np.ndarray,
    col_names: np.ndarray,
    label: str,
    row_kind: str,
    col_kind: str,
) -> None:
    """Raise on the first NaN, infinite or negative expression value of a block."""
    for bad, what in ((~np.isfinite(values), "is NaN or infinite"), (values < 0, "is negative")):
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise InputError(
                f"{label}: {row_kind} '{row_names[r]}', {col_kind} '{col_names[c]}': "
                f"value {float(values[r, c])!r} {what}; expression must be finite and non-negative"
            )


def shared_genes(query_genes: np.ndarray, reference_genes: np.ndarray, query_label: str,
                 reference_label: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the shared genes in the query and the reference, in reference order."""
    ref_pos = pd.Index(reference_genes)
    q_pos = pd.Index(query_genes)
    common = ref_pos.intersection(q_pos, sort=False)
    if len(common) == 0:
        raise InputError(
            f"no genes are shared between the query ({query_label}, e.g. "
            f"{_some(query_genes, 3)}) and the reference ({reference_label}, e.g. "
            f"{_some(reference_genes, 3)}); check that both use the same gene identifiers"
        )
    return q_pos.get_indexer(common), ref_pos.get_indexer(common)


# --------------------------------------------------------------------------- #
# Identity table
# --------------------------------------------------------------------------- #
def read_identities(
    source: str | os.PathLike | pd.DataFrame, cell_name_column_idx: int
) -> pd.Series:
    """Read scimpute's cell identity table into a Series ``cell name -> cluster id``.

    Parameters
    ----------
    source
        Tab-separated file or DataFrame with a column named exactly ``id`` and a
        column of cell names.
    cell_name_column_idx
        0-based position of the cell-name column. Leading ``_`` characters of the
        names are stripped, as scimpute does.
    """
    if isinstance(source, pd.DataFrame):
        label = "identity table (DataFrame)"
        if "id" in source.columns and source.index.name is not None:
            # As scimpute's read_inputs returns it: a named index of cell names.
            table = source.reset_index()
            cell_name_column_idx = 0
        else:
            table = source
        table = table.astype(str)
    else:
        label = str(source)
        path = Path(source)
        if not path.exists():
            raise InputError(f"{label}: file not found")
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if isinstance(cell_name_column_idx, bool) or not isinstance(cell_name_column_idx, Integral):
        raise InputError(
            f"{label}: cell_name_column_idx must be an integer column position, got "
            f"{cell_name_column_idx!r}"
        )
    ncol = table.shape[1]
    if not 0 <= cell_name_column_idx < ncol:
        raise InputError(
            f"{label}: cell_name_column_idx={cell_name_column_idx} is out of range; the "
            f"table has {ncol} columns {list(map(str, table.columns))} (positions 0..{ncol - 1})"
        )
    if "id" not in table.columns:
        raise InputError(
            f"{label}: no column named 'id' (the cluster of each cell); columns are "
            f"{list(map(str, table.columns))}"
        )
    name_col = table.columns[cell_name_column_idx]
    if name_col == "id":
        raise InputError(
            f"{label}: cell_name_column_idx={cell_name_column_idx} points at the 'id' column; "
            f"it must point at the column of cell names"
        )
    names = table[name_col].astype(str).str.lstrip("_")
    ids = table["id"].astype(str).str.strip()
    missing = names[ids.isin(["", "nan", "NaN", "NA"])]
    if len(missing):
        raise InputError(f"{label}: cells without a cluster id: {_some(missing)}")
    check_unique_names(names.to_numpy(), label, "cell")
    return pd.Series(ids.to_numpy(), index=pd.Index(names.to_numpy(), name="cell"), name="id")


def clusters_of(cells: np.ndarray, identities: pd.Series, matrix_label: str,
                table_label: str) -> np.ndarray:
    """The cluster id of every cell of a matrix; raises if any cell is not in the table."""
    keys = pd.Index(cells).astype(str).str.lstrip("_")
    pos = identities.index.get_indexer(keys)
    if (pos < 0).any():
        missing = np.asarray(cells)[pos < 0]
        raise InputError(
            f"{table_label}: {len(missing)} cells of {matrix_label} are missing from the "
            f"identity table: {_some(missing)}"
        )
    return identities.to_numpy()[pos]


# --------------------------------------------------------------------------- #
# Parameters
# --------------------------------------------------------------------------- #
def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int, or an error naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_choice(value: object, allowed: tuple[str, ...], name: str) -> str:
    """``value`` if it is one of ``allowed``, or an error listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_positive_float(value: object, name: str) -> float:
    """``value`` as a finite float > 0, or an error naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < np.inf:
        raise InputError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


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
