"""Xenium output bundles (Xenium Onboard Analysis): the directory itself as the query.

A bundle holds the cell × gene counts as ``cell_feature_matrix.h5`` (read by
:mod:`.tenx_h5`) or the ``cell_feature_matrix/`` MatrixMarket folder (read by
:mod:`.tenx`), and the cells' centroids in ``cells.parquet`` (or
``cells.csv.gz``: ``cell_id``, ``x_centroid``, ``y_centroid``, in µm), which
become ``obsm["spatial"]`` and the spatial maps. Only the ``Gene Expression``
features are kept (not the negative-control probes and codewords). A bundle
without centroids is imputed all the same, without maps; the log says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from scimpute_dask.errors import InputError
from scimpute_dask.io import store as stores
from scimpute_dask.io import tenx, tenx_h5
from scimpute_dask.io.registry import Reader, ReadOptions
from scimpute_dask.io.storage import is_location, is_remote

log = logging.getLogger("scimpute_dask")

MATRIX_H5 = "cell_feature_matrix.h5"
MATRIX_MTX = "cell_feature_matrix"
CELLS = ("cells.parquet", "cells.csv.gz", "cells.csv")
#: What marks a directory as a Xenium bundle when its count matrix is missing.
MARKERS = ("experiment.xenium", "cells.parquet", "transcripts.parquet", "morphology.ome.tif")


def is_xenium(path: object) -> bool:
    """Is ``path`` a local directory that looks like a Xenium output bundle?"""
    return (is_location(path) and not is_remote(path) and path.is_dir()
            and any((path / name).exists() for name in (MATRIX_H5, MATRIX_MTX, *MARKERS)))


def _matrix(bundle: Path, label: str) -> tuple[Path, str]:
    """The bundle's count matrix and its kind (``"h5"`` or ``"mtx"``)."""
    if (bundle / MATRIX_H5).is_file():
        return bundle / MATRIX_H5, "h5"
    if tenx.is_10x(bundle / MATRIX_MTX):
        return bundle / MATRIX_MTX, "mtx"
    raise InputError(f"{label}: a Xenium bundle without a count matrix (expected "
                     f"{MATRIX_H5} or {MATRIX_MTX}/ with matrix.mtx.gz)")


def read_names(bundle: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Cell ids and genes of a bundle's count matrix."""
    path, kind = _matrix(bundle, label)
    if kind == "h5":
        matrix = tenx_h5.read_matrix(path, f"{label}/{path.name}")
        return matrix.cells, matrix.genes
    return tenx.read_names(path, f"{label}/{path.name}")


def fingerprint(bundle: Path, label: str) -> dict:
    """The fingerprint of the bundle's count matrix (what its conversion records)."""
    path, kind = _matrix(bundle, label)
    return tenx_h5.fingerprint(path) if kind == "h5" else tenx.fingerprint(path)


def read_coordinates(bundle: Path, cells: np.ndarray, label: str) -> np.ndarray | None:
    """The centroids (``x_centroid``, ``y_centroid``) of ``cells``, in their order; None
    (said once in the log) where the bundle has no cells table."""
    table = next((bundle / name for name in CELLS if (bundle / name).is_file()), None)
    if table is None:
        log.warning("%s: no %s; imputing without spatial coordinates (no spatial maps)",
                    label, " or ".join(CELLS))
        return None
    where = f"{label}/{table.name}"
    columns = ["cell_id", "x_centroid", "y_centroid"]
    try:
        if table.suffix == ".parquet":
            frame = pd.read_parquet(table, columns=columns)
        else:
            frame = pd.read_csv(table, usecols=columns, dtype={"cell_id": str},
                                float_precision="round_trip")  # each number as written
    except ImportError:
        raise InputError(f"{where}: reading Parquet needs pyarrow: "
                         f"pip install 'scimpute-dask[xenium]'") from None
    except (ValueError, KeyError, OSError) as err:
        raise InputError(f"{where}: not a Xenium cells table with columns "
                         f"{', '.join(columns)} ({err})") from None
    ids = frame["cell_id"]
    if len(ids) and isinstance(ids.iloc[0], bytes):  # older bundles' byte-string ids
        ids = ids.str.decode("utf-8")
    index = pd.Index(ids.astype(str))
    if index.has_duplicates:
        raise InputError(f"{where}: cell_id {index[index.duplicated()][0]!r} listed twice")
    pos = index.get_indexer(pd.Index(np.asarray(cells, dtype=str)))
    if (pos < 0).any():
        missing = ", ".join(repr(c) for c in np.asarray(cells)[pos < 0][:5])
        raise InputError(f"{where}: {(pos < 0).sum()} cells of the count matrix have no "
                         f"centroid: {missing}")
    xy = frame[["x_centroid", "y_centroid"]].to_numpy(np.float64)[pos]
    if not np.isfinite(xy).all():
        raise InputError(f"{where}: centroids must be finite numbers")
    return xy


def _claims(source: object) -> bool:
    return is_xenium(source)


def _names(source: Path, options: ReadOptions) -> tuple[np.ndarray, np.ndarray]:
    return read_names(source, options.label)


def _fingerprint(source: Path, options: ReadOptions) -> dict:
    return fingerprint(source, options.label)


def _convert(source: Path, store, options: ReadOptions) -> stores.ExpressionStore:
    path, kind = _matrix(source, options.label)
    convert = tenx_h5.convert_10x_h5 if kind == "h5" else tenx.convert_10x
    return convert(path, store, restart=options.restart, progress=options.progress,
                   memory_limit=options.memory_limit, name=f"{options.label}/{path.name}")


READER = Reader("a Xenium output bundle (cell_feature_matrix.h5, cells.parquet)", _claims,
                _names, _fingerprint, _convert)
