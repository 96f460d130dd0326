"""The working format: a converted expression matrix as a chunked Zarr store.

Every reader writes the same :class:`ExpressionStore`, a Zarr group laid out
cells × genes:

``X``
    float32 array, cells × genes, chunked ``(cell_chunk, gene_chunk)``
    (:func:`scimpute_dask.plan.store_chunks`); or, for a sparse input, a group
    holding the matrix as CSR by blocks of cells and genes (:mod:`.blocked`),
    read back by every stage in the same blocks as a dense one.
``obs_names`` / ``var_names``
    cell and gene names.
``column_max``
    the largest magnitude of every gene (float64), recorded as the conversion
    writes its blocks (``column_max_blocks`` until it is complete), so that
    nothing reads the whole matrix again to learn it. Absent from stores not
    written by :func:`write_store`.
attrs
    ``format``, ``fingerprint`` (what was converted), ``progress`` (how far),
    ``complete``.

A reader writes whole chunks per block and then records its progress, so a
conversion that dies half-way resumes at the last recorded block
(:func:`resumable`); a store converted from the same, unchanged input is
reused as it is. This module is the one place that knows the layout; every
reader depends on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import zarr
from scipy import sparse as sp

from scimpute_dask.errors import InputError
from scimpute_dask.io import blocked
from scimpute_dask.io.registry import Reader, ReadOptions
from scimpute_dask.io.storage import (
    Location,
    is_location,
    is_remote,
    location,
    remove_tree,
    zarr_store,
)
from scimpute_dask.kernels.imputation import column_max

#: Bumped when a reader changes what it writes: older stores are then converted again.
FORMAT_VERSION = 1
FORMAT = "scimpute-dask-expression"


@dataclass(frozen=True)
class ExpressionStore:
    """A converted, complete cells × genes expression matrix in Zarr.

    Parameters
    ----------
    path
        Directory of the Zarr group: a local path or an fsspec URL path.
    """

    path: Location

    @classmethod
    def open(cls, path: str | os.PathLike) -> ExpressionStore:
        """Open a complete store, refusing one whose conversion did not finish."""
        path = location(path)
        try:
            group = zarr.open_group(zarr_store(path, read_only=True), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise InputError(f"{path}: not a scimpute-dask Zarr store") from err
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise InputError(f"{path}: not a scimpute-dask Zarr store")
        if not attrs.get("complete", False):
            raise InputError(
                f"{path}: conversion did not finish; rerun the conversion to resume it"
            )
        return cls(path)

    @property
    def group(self) -> zarr.Group:
        return zarr.open_group(zarr_store(self.path, read_only=True), mode="r")

    @property
    def cell_names(self) -> np.ndarray:
        return np.asarray(self.group["obs_names"][:], dtype=object)

    @property
    def gene_names(self) -> np.ndarray:
        return np.asarray(self.group["var_names"][:], dtype=object)

    @property
    def sparse(self) -> bool:
        """Is ``X`` stored sparse (blocked CSR)?"""
        return blocked.is_blocked(self.group)

    def _blocked(self) -> blocked.BlockedCSR:
        return blocked.BlockedCSR(self.group["X"])

    @property
    def shape(self) -> tuple[int, int]:
        return self._blocked().shape if self.sparse else tuple(self.group["X"].shape)

    @property
    def chunks(self) -> tuple[int, int]:
        return self._blocked().chunks if self.sparse else tuple(self.group["X"].chunks)

    @property
    def density(self) -> float:
        """The fraction of values stored (1 for a dense store)."""
        if not self.sparse:
            return 1.0
        n, g = self.shape
        return self._blocked().nnz / max(1, n * g)

    @property
    def fingerprint(self) -> dict:
        return dict(self.group.attrs["fingerprint"])

    def column_max(self) -> np.ndarray | None:
        """The largest magnitude of every gene as the conversion recorded it (float64),
        or None for a store written without it."""
        group = self.group
        return group[COLUMN_MAX][:] if COLUMN_MAX in group else None

    def to_dask(self, chunks: tuple[int, int] | None = None):
        """The matrix as a lazy, dense Dask array read straight from Zarr."""
        import dask.array as da

        if self.sparse:
            return self.columns(np.arange(self.shape[1]), chunks or self.chunks)
        X = self.group["X"]
        return da.from_zarr(X, chunks=chunks or X.chunks)

    def columns(self, cols: np.ndarray, chunks: tuple[int, int]):
        """Genes ``cols`` (positions) of every cell, dense, chunked ``chunks`` (-1 = all)."""
        if not self.sparse:
            return self.to_dask()[:, cols].rechunk(chunks)
        return self._view(cols, chunks, as_sparse=False)

    def gene_blocks(self, gene_chunk: int, genes: np.ndarray | None = None):
        """Genes ``genes`` (default all) of every cell in blocks of ``gene_chunk`` genes
        (one chunk of cells): CSR blocks from a sparse store, NumPy ones from a dense one."""
        n, g = self.shape
        if not self.sparse and (genes is None or len(genes) == g):
            return self.to_dask((n, gene_chunk))
        return self.blocks(np.arange(g) if genes is None else genes, (n, gene_chunk))

    def blocks(self, genes: np.ndarray, chunks: tuple[int, int]):
        """Genes ``genes`` (positions) of every cell in blocks of ``chunks`` (cells, genes;
        -1 = all): CSR blocks from a sparse store (its entries only), NumPy ones from a
        dense one. For a reduction over cells that must not densify a sparse store."""
        if not self.sparse:
            return self.to_dask(chunks)[:, genes].rechunk(chunks)
        return self._view(np.asarray(genes), chunks, as_sparse=True)

    def in_chunks(self):
        """The whole matrix in the store's own chunks, each read once: dense blocks of a
        dense store, CSR gene blocks (all cells) of a sparse one."""
        return self.gene_blocks(self.chunks[1]) if self.sparse else self.to_dask()

    def _view(self, cols: np.ndarray, chunks: tuple[int, int], as_sparse: bool):
        import dask.array as da

        view = _SparseView(self.path, np.asarray(cols, dtype=np.int64), self.shape[0],
                           as_sparse)
        meta = (sp.csr_matrix((0, 0), dtype=np.float32) if as_sparse
                else np.empty((0, 0), dtype=np.float32))
        return da.from_array(view, chunks=chunks, asarray=False, fancy=False, meta=meta,
                             name=f"sparse-{'csr' if as_sparse else 'dense'}-"
                                  f"{_tokenize(view)}")

    def select(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Rows ``rows`` × genes ``cols`` (positions), dense float32, read at once."""
        if self.sparse:
            return self._blocked().select(rows, cols)
        return self.group["X"].get_orthogonal_selection((rows, cols))

    def read(self) -> np.ndarray:
        """The whole matrix, dense (small stores only)."""
        n, g = self.shape
        return self.select(np.arange(n), np.arange(g)) if self.sparse \
            else self.group["X"][:]


def _tokenize(view: _SparseView) -> str:
    from dask.base import tokenize

    return tokenize(str(view.path), view.cols, view.as_sparse)


class _SparseView:
    """Rows × chosen genes of a blocked-CSR store, sliced as Dask asks: a Dask array's
    chunks are CSR or dense blocks assembled by the worker that reads them."""

    def __init__(self, path: Location, cols: np.ndarray, n_cells: int, as_sparse: bool):
        self.path, self.cols, self.as_sparse = path, cols, as_sparse
        self.shape = (n_cells, len(cols))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2
        self._reader: blocked.BlockedCSR | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}  # the open arrays stay with their process

    def __getitem__(self, key: tuple[slice, slice]):
        rows, cols = key
        if self._reader is None:
            group = zarr.open_group(zarr_store(self.path, read_only=True), mode="r")
            self._reader = blocked.BlockedCSR(group["X"])
        lo, hi, _ = rows.indices(self.shape[0])
        block = self._reader.rows(lo, hi, self.cols[cols])
        return block if self.as_sparse else block.toarray()


def is_store(path: Location) -> bool:
    """Is ``path`` a scimpute-dask store (to be used as it is) rather than a file to convert?"""
    meta = path / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and attrs.get("format") == FORMAT


def file_fingerprint(path: Location, **options: object) -> dict:
    """What identifies a conversion of a file: its identity and the reading options."""
    if is_remote(path):
        # the backend's unique key of the object's version (S3: its ETag)
        return {"source": str(path), "size": path.fs.size(path.path),
                "key": path.fs.ukey(path.path), "format_version": FORMAT_VERSION, **options}
    st = path.stat()
    # ctime cannot be set back by cp -p, rsync -a or tar, unlike mtime
    return {
        "source": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "format_version": FORMAT_VERSION,
        **options,
    }


# --------------------------------------------------------------------------- #
# Life cycle: create, resume, finish
# --------------------------------------------------------------------------- #
def resumable(store: Location, fingerprint: dict, restart: bool, label: str
              ) -> zarr.Group | None:
    """The group to resume or reuse at ``store``, or ``None`` to start afresh.

    Refuses a store holding a conversion of another input (or of this one
    before it changed) rather than mixing the two.
    """
    if restart and store.exists():
        remove_tree(store)
    if not (store / "zarr.json").exists():
        return None
    group = zarr.open_group(zarr_store(store), mode="r+")
    old = dict(group.attrs).get("fingerprint")
    if old is None:
        # killed before its first record: nothing to resume
        remove_tree(store)
        return None
    if old != fingerprint:
        raise InputError(
            f"{store} holds a conversion of a different input than {label} "
            f"(the file changed or other options were given); refusing to mix them. "
            f"Use restart (--restart) to convert from scratch."
        )
    return group


def is_complete_conversion(store: Location, fingerprint: dict) -> bool:
    """Does ``store`` hold a complete conversion of the input ``fingerprint`` identifies?"""
    if not (store / "zarr.json").exists():
        return False
    attrs = dict(zarr.open_group(zarr_store(store, read_only=True), mode="r").attrs)
    return bool(attrs.get("complete")) and attrs.get("fingerprint") == fingerprint


def unfinished(store: Location) -> zarr.Group | None:
    """The group at ``store`` if it holds a conversion that did not finish."""
    if not (store / "zarr.json").exists():
        return None
    group = zarr.open_group(zarr_store(store, read_only=True), mode="r")
    return None if group.attrs.get("complete") else group


#: The compressor of every array the engine writes (converted inputs, stage results):
#: Blosc's LZ4 over shuffled bytes. Measured on 4,096-row chunks of a 100k run
#: (write / read MB/s, stored fraction): imputed float32 values 1,450 / 4,000,
#: 0.88 (LZ4-HC level 1: 565 / 1,600, 0.86; Zarr's default zstd: 680 / 820,
#: 0.92); synthetic reference counts 890 / 2,400, 0.87, where zstd stores 0.36 but
#: writes at 200 and reads at 620 MB/s. The inputs are read three or four times
#: (screen, exact pass, scores), so zstd's compactness cost more time than the
#: conversion's parsing at 100k cells; on the real Molecular Cartography counts
#: LZ4 stores 0.26 and zstd 0.16.
COMPRESSORS = (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)


def for_writing(array: zarr.Array) -> zarr.Array:
    """``array`` to write dense blocks to: every chunk is written as given.

    Otherwise Zarr compares each chunk with the fill value first, to skip empty
    ones: a pass over every value that finds nothing to skip in expression
    data. (A runtime setting of the handle, not stored with the array.)
    """
    return array.with_config({"write_empty_chunks": True})


def create(
    store: Location,
    fingerprint: dict,
    cell_names: np.ndarray,
    gene_names: np.ndarray,
    chunks: tuple[int, int],
    sparse: bool = False,
) -> zarr.Group:
    """A new, empty store for ``cell_names`` × ``gene_names``, progress at zero; ``X``
    blocked CSR when ``sparse``."""
    if not is_remote(store):  # object stores have no directories to make
        store.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(zarr_store(store), mode="w")
    for key, names in (("obs_names", cell_names), ("var_names", gene_names)):
        arr = group.create_array(key, shape=(len(names),), dtype=str, chunks=(max(len(names), 1),))
        arr[:] = np.asarray(names, dtype=str)
    shape = (len(cell_names), len(gene_names))
    if sparse:
        blocked.create(group, shape, chunks)
    else:
        group.create_array("X", shape=shape, dtype="float32", chunks=chunks, fill_value=0.0,
                           compressors=COMPRESSORS)
    group.attrs.update(
        {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "progress": {"rows_done": 0, "offset": 0, "nnz": 0},
            "complete": False,
        }
    )
    return group


def record_progress(group: zarr.Group, rows_done: int, offset: int = 0, nnz: int = 0
                    ) -> None:
    """After a block's chunks are written: how far the conversion got (never before), and
    a sparse store's entries so far."""
    group.attrs["progress"] = {"rows_done": rows_done, "offset": offset, "nnz": nnz}


def finish(group: zarr.Group, store: Location) -> ExpressionStore:
    """Mark a store complete: from now on it is reused, never rewritten."""
    if blocked.is_blocked(group):
        group["X"].attrs["nnz"] = int(group.attrs["progress"].get("nnz", 0))
    group.attrs["complete"] = True
    return ExpressionStore(store)


@dataclass(frozen=True)
class Block:
    """Rows ``lo:hi`` of the streamed axis (cells, or genes with ``by_columns``), as the
    store holds them (cells × genes; dense, or canonical scipy CSR for cells), and how
    far into the input they end (a text reader's byte offset, recorded for resuming)."""

    lo: int
    hi: int
    values: np.ndarray | sp.csr_matrix
    offset: int = 0


#: What a new store is created with: cell names, gene names, chunks.
Shape = tuple[np.ndarray, np.ndarray, tuple[int, int]]

#: The genes' largest magnitudes, and each written block's until the store is complete.
COLUMN_MAX, BLOCK_MAXIMA = "column_max", "column_max_blocks"


def _record_block_max(group: zarr.Group, block: Block) -> None:
    """Before a block's progress is recorded: the largest magnitude of each of its genes
    as stored (float32), named by its first row (or gene, for a block of genes).
    Rewritten whole if the block is written again after a kill."""
    # rounding to float32 is monotone: the float32 of the largest is the largest float32
    found = column_max(block.values)[0].astype(np.float32).astype(np.float64)
    group.require_group(BLOCK_MAXIMA).create_array(
        str(block.lo), shape=found.shape, dtype=found.dtype, chunks=found.shape,
        overwrite=True)[...] = found


def _gather_column_max(group: zarr.Group, n_genes: int, by_columns: bool) -> None:
    """The blocks' maxima into one ``column_max`` (a kill here: done again on resuming):
    blocks of cells each hold every gene, blocks of genes their own."""
    largest = np.zeros(n_genes)
    for name, part in group[BLOCK_MAXIMA].arrays():
        if by_columns:
            lo = int(name)
            largest[lo : lo + part.shape[0]] = part[...]
        else:
            np.maximum(largest, part[...], out=largest)
    group.create_array(COLUMN_MAX, shape=largest.shape, dtype=largest.dtype,
                       chunks=largest.shape, overwrite=True)[...] = largest
    del group[BLOCK_MAXIMA]


def write_store(store: Location, fingerprint: dict, label: str, *,
                shape: Callable[[], Shape], blocks: Callable[..., Iterable[Block]],
                by_columns: bool = False, sparse: bool = False, restart: bool = False,
                resume: bool = True, progress: bool = False, desc: str = "convert"
                ) -> ExpressionStore:
    """The one conversion loop every reader drives: resumable, block by block.

    A complete conversion of the same input (same ``fingerprint``) is reused as
    it is, an interrupted one resumes (or, with ``resume=False``, starts over),
    another input's is refused (:func:`resumable`). Otherwise a store is created
    (``shape()``, asked only then). ``blocks(done, offset, chunks)`` yields the
    :class:`Block` s from row ``done`` on (``offset`` as the last block recorded
    it; ``chunks`` the store's); each is written, then recorded
    (:func:`record_progress`), so a kill at any point loses at most the block
    in flight. Readers yield whole chunks along the streamed axis, so that a
    resumed write never mixes two.

    A reader of sparse input (rows of cells) says ``sparse`` and yields CSR
    blocks, stored sparse (:mod:`.blocked`); a store begun dense by an earlier
    version is resumed dense.
    """
    group = resumable(store, fingerprint, restart, label)
    if group is not None and group.attrs.get("complete"):
        return ExpressionStore(store)
    if group is not None and not resume:
        remove_tree(store)
        group = None
    if group is None:
        cells, genes, chunks = shape()
        if sparse:
            chunks = (chunks[0], min(len(genes), blocked.GENE_BLOCK) or 1)
        group = create(store, fingerprint, cells, genes, chunks, sparse and not by_columns)
        # only a store begun here has every block's maxima (one begun by an older
        # version is resumed without them)
        group.require_group(BLOCK_MAXIMA)
    state = dict(group.attrs["progress"])
    done, nnz = int(state["rows_done"]), int(state.get("nnz", 0))
    as_csr = blocked.is_blocked(group)
    X = group["X"] if as_csr else for_writing(group["X"])
    chunks = tuple(X.attrs["chunks"]) if as_csr else X.chunks
    n = group["var_names" if by_columns else "obs_names"].shape[0]
    maxima = BLOCK_MAXIMA in group
    bar = progress_bar(progress, total=n, initial=done, desc=desc)
    for block in blocks(done, int(state["offset"]), chunks):
        if maxima:
            _record_block_max(group, block)
        values = block.values
        if as_csr:
            nnz += blocked.write_block(X, block.lo, sp.csr_matrix(values), COMPRESSORS)
        else:
            values = values.toarray() if sp.issparse(values) else values
            if by_columns:
                X[:, block.lo : block.hi] = values
            else:
                X[block.lo : block.hi, :] = values
        record_progress(group, block.hi, block.offset, nnz)
        bar.update(block.hi - block.lo)
    bar.close()
    if maxima:
        _gather_column_max(group, group["var_names"].shape[0], by_columns)
    return finish(group, store)


def progress_bar(enabled: bool, **kwargs):
    """A conversion's progress bar (tqdm), or a silent one."""
    if enabled:
        from tqdm.auto import tqdm
    else:  # tqdm.auto warns in a notebook without ipywidgets even for a hidden bar
        from tqdm import tqdm
    return tqdm(disable=not enabled, unit="row", leave=False, **kwargs)


# --------------------------------------------------------------------------- #
# An existing store as an input
# --------------------------------------------------------------------------- #
def _claims(source: object) -> bool:
    return is_location(source) and source.is_dir() \
        and (source / "zarr.json").exists()


def _names(source: Location, options: ReadOptions) -> tuple[np.ndarray, np.ndarray]:
    store = ExpressionStore.open(source)
    return store.cell_names, store.gene_names


def _convert(source: Location, store: Location, options: ReadOptions) -> ExpressionStore:
    return ExpressionStore.open(source)


READER = Reader("a scimpute-dask store (.zarr)", _claims, _names, None, _convert, remote=True)
