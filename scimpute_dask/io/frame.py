"""pandas DataFrames (cells × genes, scimpute's in-memory orientation) into a store."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from scimpute_dask import plan
from scimpute_dask.checks import check_unique_names, check_values
from scimpute_dask.errors import InputError
from scimpute_dask.io import store as stores
from scimpute_dask.io.registry import Reader, ReadOptions
from scimpute_dask.io.storage import Location, remove_tree


def check_frame(frame: pd.DataFrame, name: str) -> np.ndarray:
    """Validate a cells × genes DataFrame; return its values as float64."""
    check_unique_names(np.asarray(frame.index.astype(str)), name, "cell")
    check_unique_names(np.asarray(frame.columns.astype(str)), name, "gene")
    bad = [c for c, t in frame.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if bad:
        col = frame[bad[0]]
        rows = col.index[pd.to_numeric(col, errors="coerce").isna()]
        where = f", cell '{rows[0]}'" if len(rows) else ""
        raise InputError(f"{name}: gene '{bad[0]}'{where}: value is not a number")
    values = frame.to_numpy(dtype=np.float64)
    check_values(values, frame.index, frame.columns, name, "cell", "gene")
    return values


def _claims(source: object) -> bool:
    return isinstance(source, pd.DataFrame)


def _names(frame: pd.DataFrame, options: ReadOptions) -> tuple[np.ndarray, np.ndarray]:
    cells = np.asarray(frame.index.astype(str))
    genes = np.asarray(frame.columns.astype(str))
    check_unique_names(cells, options.label, "cell")
    check_unique_names(genes, options.label, "gene")
    return cells.astype(object), genes.astype(object)


def _convert(frame: pd.DataFrame, store: Location, options: ReadOptions
             ) -> stores.ExpressionStore:
    values = check_frame(frame, options.label)
    cells, genes = _names(frame, options)
    if store.exists():
        remove_tree(store)
    digest = hashlib.sha1(values.tobytes())
    for names in (cells, genes):
        digest.update("\t".join(names).encode())
    fingerprint = {"source": options.label, "sha1": digest.hexdigest(),
                   "format_version": stores.FORMAT_VERSION}
    chunks = plan.store_chunks(len(cells), len(genes), False, 0, options.memory_limit)
    return stores.write_store(
        store, fingerprint, options.label, shape=lambda: (cells, genes, chunks),
        blocks=lambda done, offset, chunks: [stores.Block(0, len(cells),
                                                          values.astype(np.float32))])


READER = Reader("a pandas DataFrame (cells × genes)", _claims, _names, None, _convert)
