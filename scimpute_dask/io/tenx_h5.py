"""10x Genomics HDF5 feature-barcode matrices: Cell Ranger's ``filtered_feature_bc_matrix.h5``
(v3 and later) and Xenium's ``cell_feature_matrix.h5``.

The schema (`Cell Ranger's HDF5 feature-barcode matrix format`_)::

    matrix/data, matrix/indices, matrix/indptr, matrix/shape, matrix/barcodes
    matrix/features/{id, name, feature_type[, genome]}

holds a features × barcodes matrix in CSC form: a barcode's column
(``indptr[c]:indptr[c + 1]``) is its row of the cells × genes CSR matrix, so
a block of cells is one contiguous slice of ``data`` and ``indices``. Blocks
are read through h5py one at a time and kept sparse in the store; memory is
one block of entries, whatever the file size.

Only ``Gene Expression`` features are kept, as ``scanpy.read_10x_h5`` does by
default: antibody capture, CRISPR guides and Xenium's control probes and
codewords are left out and counted in the log. Gene names are the feature
names made unique as ``var_names_make_unique`` does (:func:`tenx.make_unique`).

.. _Cell Ranger's HDF5 feature-barcode matrix format:
   https://www.10xgenomics.com/support/software/cell-ranger/latest/analysis/outputs/cr-outputs-h5-matrices
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from scimpute_dask import plan
from scimpute_dask.checks import check_unique_names, check_values
from scimpute_dask.errors import InputError
from scimpute_dask.io import store as stores
from scimpute_dask.io.registry import Reader, ReadOptions
from scimpute_dask.io.storage import is_location, is_remote
from scimpute_dask.io.tenx import GENE_EXPRESSION, kept_features, make_unique

log = logging.getLogger("scimpute_dask")

_DATASETS = ("data", "indices", "indptr", "shape", "barcodes", "features/name")


def _h5py(label: str):
    try:
        import h5py
    except ImportError:
        raise InputError(f"{label}: reading 10x HDF5 needs h5py: "
                         f"pip install 'scimpute-dask[h5ad]'") from None
    return h5py


def _decoded(values: np.ndarray) -> np.ndarray:
    """Strings of an HDF5 string dataset (fixed-length bytes as Cell Ranger writes them,
    or variable-length), decoded at once."""
    values = np.asarray(values)
    if values.dtype.kind == "O" and len(values) and isinstance(values[0], bytes):
        values = values.astype("S")  # variable-length: h5py's bytes objects
    if values.dtype.kind == "S":
        values = np.char.decode(values, "utf-8")
    return values.astype(str).astype(object)


@dataclass(frozen=True)
class Matrix:
    """What a 10x HDF5 file holds, read without its entries."""

    cells: np.ndarray  # barcodes
    genes: np.ndarray  # names of the Gene Expression features, made unique
    keep: np.ndarray  # feature positions of those genes
    n_features: int
    left_out: dict[str, int]  # feature type -> features left out


def read_matrix(path: Path, label: str | None = None) -> Matrix:
    """Barcodes and genes of a 10x HDF5 matrix, the schema checked; the entries unread."""
    label = label or str(path)
    h5py = _h5py(label)
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"{label}: not a readable HDF5 file ({err})") from None
    with fh:
        group = fh.get("matrix")
        missing = [name for name in _DATASETS
                   if not isinstance(group, h5py.Group) or name not in group]
        if missing:
            found = ", ".join(sorted(fh.keys())) or "nothing"
            raise InputError(
                f"{label}: not a 10x HDF5 feature-barcode matrix (Cell Ranger v3+ schema): "
                f"no matrix/{', matrix/'.join(missing)}; found {found} at the top level")
        try:
            n_features, n_cells = (int(x) for x in group["shape"][:2])
            cells = _decoded(group["barcodes"][:])
            names = _decoded(group["features/name"][:])
            types = (_decoded(group["features/feature_type"][:])
                     if "features/feature_type" in group
                     else np.full(len(names), GENE_EXPRESSION, dtype=object))
            n_indptr = group["indptr"].shape[0]
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise InputError(f"{label}: damaged 10x HDF5 matrix ({err})") from None
    if (n_features, n_cells) != (len(names), len(cells)) or n_indptr != n_cells + 1:
        raise InputError(f"{label}: matrix/shape is {n_features} features × {n_cells} "
                         f"barcodes, but there are {len(names)} features, {len(cells)} "
                         f"barcodes and {n_indptr} entries in matrix/indptr")
    keep = kept_features(types, label)
    kinds, counts = np.unique(types[types != GENE_EXPRESSION].astype(str), return_counts=True)
    genes = make_unique(names[keep])
    check_unique_names(cells, f"{label}: matrix/barcodes", "cell")
    check_unique_names(genes, f"{label}: matrix/features/name", "gene")
    return Matrix(cells, genes, keep, n_features,
                  dict(zip(kinds.tolist(), counts.tolist(), strict=True)))


def fingerprint(path: Path) -> dict:
    """What identifies a conversion of a 10x HDF5 file."""
    return {**stores.file_fingerprint(path), "layout": "10x-h5"}


def _blocks(path: Path, matrix: Matrix, start: int, step: int, label: str
            ) -> Iterator[stores.Block]:
    """Blocks of ``step`` cells from ``start`` on, as canonical float32 CSR of the kept genes."""
    h5py = _h5py(label)
    column = np.full(matrix.n_features, -1, dtype=np.int64)
    column[matrix.keep] = np.arange(len(matrix.keep))
    n_cells, n_genes = len(matrix.cells), len(matrix.genes)
    with h5py.File(path, "r") as fh:
        group = fh["matrix"]
        indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        n_entries = group["data"].shape[0]
        if indptr[0] != 0 or (np.diff(indptr) < 0).any() or indptr[-1] != n_entries or \
                group["indices"].shape[0] != n_entries:
            raise InputError(f"{label}: matrix/indptr does not index the "
                             f"{n_entries} entries of matrix/data and matrix/indices")
        for lo in range(start, n_cells, step):
            hi = min(lo + step, n_cells)
            a, b = indptr[lo], indptr[hi]
            try:
                data = np.asarray(group["data"][a:b], dtype=np.float64)
                features = np.asarray(group["indices"][a:b], dtype=np.int64)
            except OSError as err:
                raise InputError(f"{label}: damaged 10x HDF5 matrix: cells {lo + 1}–{hi} "
                                 f"unreadable ({err})") from None
            rows = np.repeat(np.arange(hi - lo), np.diff(indptr[lo : hi + 1]))
            outside = (features < 0) | (features >= matrix.n_features)
            if outside.any():
                at = int(np.argmax(outside))
                raise InputError(f"{label}: cell {matrix.cells[lo + rows[at]]!r} has an entry "
                                 f"for feature {features[at]}, outside the "
                                 f"{matrix.n_features} features")
            genes = column[features]
            kept = genes >= 0
            # duplicated coordinates are summed, as scipy's CSC → CSR does
            block = sparse.csr_matrix((data[kept], (rows[kept], genes[kept])),
                                      shape=(hi - lo, n_genes))
            block.sum_duplicates()
            check_values(block, matrix.cells[lo:hi], matrix.genes, label, "cell", "gene")
            yield stores.Block(lo, hi, block.astype(np.float32))


def convert_10x_h5(path: Path, store, *, restart: bool, progress: bool, memory_limit: int,
                   name: str | None = None) -> stores.ExpressionStore:
    """Stream a 10x HDF5 matrix into a sparse cells × genes store, resumably (an
    interrupted conversion continues at its next block of cells)."""
    label = name or str(path)
    matrix = read_matrix(path, label)

    def shape() -> stores.Shape:
        if matrix.left_out:
            log.info("%s: left out %s (only '%s' features are imputed from or into)", label,
                     ", ".join(f"{n} {kind}" for kind, n in matrix.left_out.items()),
                     GENE_EXPRESSION)
        return matrix.cells, matrix.genes, plan.store_chunks(
            len(matrix.cells), len(matrix.genes), False, 0, memory_limit)

    def blocks(done: int, offset: int, chunks: tuple[int, int]) -> Iterator[stores.Block]:
        return _blocks(path, matrix, done, chunks[0], label)

    return stores.write_store(store, fingerprint(path), label, shape=shape, blocks=blocks,
                              sparse=True, restart=restart, progress=progress,
                              desc=f"convert {path.name}")


def _claims(source: object) -> bool:
    return (is_location(source) and source.suffix.lower() in (".h5", ".hdf5")
            and (is_remote(source) or source.is_file()))


def _names(source: Path, options: ReadOptions) -> tuple[np.ndarray, np.ndarray]:
    matrix = read_matrix(source, options.label)
    return matrix.cells, matrix.genes


def _fingerprint(source: Path, options: ReadOptions) -> dict:
    return fingerprint(source)


def _convert(source: Path, store, options: ReadOptions) -> stores.ExpressionStore:
    return convert_10x_h5(source, store, restart=options.restart, progress=options.progress,
                          memory_limit=options.memory_limit, name=options.label)


READER = Reader("a 10x HDF5 matrix (.h5: Cell Ranger v3+, Xenium)", _claims, _names,
                _fingerprint, _convert)
