"""The cell identity table: scimpute's joint clustering of both datasets' cells."""

from __future__ import annotations

import os
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd

from scimpute_dask.checks import check_unique_names
from scimpute_dask.errors import InputError, some


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
        raise InputError(f"{label}: cells without a cluster id: {some(missing)}")
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
            f"identity table: {some(missing)}"
        )
    return identities.to_numpy()[pos]


