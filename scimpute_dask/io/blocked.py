"""Sparse expression in the working format: CSR stored by blocks of cells and of genes.

A sparse input (CSR ``.h5ad`` or AnnData-Zarr, a 10x matrix) is stored as it
came, without densifying: an atlas of 1M cells × 20,000 genes at 5 % non-zero
is 8 GB of CSR, and would be 80 GB dense. The store's ``X`` is a group
(attribute ``encoding`` = :data:`ENCODING`, ``shape``, ``chunks`` =
``(cells per block, genes per block)``) holding, for every block of cells
``a`` (the conversion writes one at a time, whole, so a resumed conversion
never appends to a half-written array):

``X/data/<a>`` float32, ``X/indices/<a>`` int32 (the gene)
    the block's non-zero entries, ordered by gene block, then cell, then
    gene: the entries of one gene block are contiguous.
``X/ptr/<a>`` int64, ``(gene blocks, cells + 1)``, one chunk per gene block
    where each cell's entries of each gene block start in ``data`` (the last
    column: where the gene block ends).

So the two ways the engine reads a reference are both a few contiguous
slices: rows of the shared genes (the search: whole cell blocks) and one
gene block across all cells (the imputation: one slice per cell block,
read once per gene block). Everything is assembled by the compiled
:func:`_gather`, into CSR blocks or, for dense consumers, dense ones with
the values a dense store would hold.
"""

from __future__ import annotations

import numba
import numpy as np
import zarr
from scipy import sparse

#: The ``encoding`` attribute of a blocked-CSR ``X``.
ENCODING = "blocked-csr"
#: Entries per chunk of ``data`` and ``indices``: a gene block's slice of one cell
#: block (~50,000 entries in an atlas) is read in a chunk or two.
ENTRY_CHUNK = 1 << 17
#: Genes per stored gene block: the imputation reads (at least) one such block of
#: all reference cells at a time.
GENE_BLOCK = 1024


def is_blocked(group: zarr.Group) -> bool:
    """Does the store ``group`` hold its ``X`` as blocked CSR?"""
    node = group["X"]
    return isinstance(node, zarr.Group) and node.attrs.get("encoding") == ENCODING


def create(group: zarr.Group, shape: tuple[int, int], chunks: tuple[int, int]
           ) -> zarr.Group:
    """An empty blocked-CSR ``X`` of ``shape`` in ``group``."""
    X = group.create_group("X")
    for name in ("data", "indices", "ptr"):
        X.create_group(name)
    X.attrs.update({"encoding": ENCODING, "shape": list(shape), "chunks": list(chunks)})
    return X


def n_gene_blocks(shape: tuple[int, int], chunks: tuple[int, int]) -> int:
    return max(1, -(-shape[1] // chunks[1]))


@numba.njit(nogil=True, cache=True)
def _split(indptr, indices, data, width, nb):  # pragma: no cover - compiled
    """A CSR block's entries reordered by gene block, then row; and each row's start per
    gene block (``(nb, rows + 1)``; the last column ends the gene block)."""
    n = indptr.shape[0] - 1
    counts = np.zeros((nb, n), np.int64)
    for r in range(n):
        for p in range(indptr[r], indptr[r + 1]):
            counts[indices[p] // width, r] += 1
    ptr = np.empty((nb, n + 1), np.int64)
    q = 0
    for b in range(nb):
        for r in range(n):
            ptr[b, r] = q
            q += counts[b, r]
        ptr[b, n] = q
    cursor = ptr[:, :n].copy()
    out_d = np.empty(q, np.float32)
    out_i = np.empty(q, np.int32)
    for r in range(n):
        for p in range(indptr[r], indptr[r + 1]):
            b = indices[p] // width
            at = cursor[b, r]
            out_d[at] = data[p]
            out_i[at] = indices[p]
            cursor[b, r] = at + 1
    return ptr, out_i, out_d


def write_block(X: zarr.Group, lo: int, values: sparse.csr_matrix, compressors) -> int:
    """Store the rows from ``lo`` on (one whole block of cells, canonical CSR); returns
    its number of entries. Rewriting a block replaces it whole."""
    shape, chunks = tuple(X.attrs["shape"]), tuple(X.attrs["chunks"])
    a = lo // chunks[0]
    ptr, idx, dat = _split(values.indptr.astype(np.int64), values.indices.astype(np.int32),
                           values.data.astype(np.float32), chunks[1],
                           n_gene_blocks(shape, chunks))
    for name, arr, chunk in (("data", dat, (max(1, min(len(dat), ENTRY_CHUNK)),)),
                             ("indices", idx, (max(1, min(len(idx), ENTRY_CHUNK)),)),
                             ("ptr", ptr, (1, ptr.shape[1]))):
        stored = X[name].create_array(str(a), shape=arr.shape, dtype=arr.dtype, chunks=chunk,
                                      compressors=compressors, overwrite=True)
        stored.with_config({"write_empty_chunks": True})[...] = arr
    return len(dat)


def _col_map(n_genes: int, cols: np.ndarray) -> np.ndarray:
    out = np.full(n_genes, -1, dtype=np.int32)
    out[cols] = np.arange(len(cols), dtype=np.int32)
    return out


@numba.njit(nogil=True, cache=True)
def _gather(ptr, indices, data, start, lo, hi, col_map):  # pragma: no cover - compiled
    """CSR of rows ``lo:hi`` of a cell block over the gene blocks of ``ptr`` (positions
    into the block's arrays; ``indices``/``data`` hold them from ``start`` on), keeping
    the genes ``col_map`` gives an output column (≥ 0)."""
    nb = ptr.shape[0]
    n = hi - lo
    out_ptr = np.zeros(n + 1, np.int64)
    for r in range(lo, hi):
        count = 0
        for b in range(nb):
            for p in range(ptr[b, r] - start, ptr[b, r + 1] - start):
                if col_map[indices[p]] >= 0:
                    count += 1
        out_ptr[r - lo + 1] = out_ptr[r - lo] + count
    out_i = np.empty(out_ptr[n], np.int32)
    out_d = np.empty(out_ptr[n], np.float32)
    q = 0
    for r in range(lo, hi):
        for b in range(nb):
            for p in range(ptr[b, r] - start, ptr[b, r + 1] - start):
                c = col_map[indices[p]]
                if c >= 0:
                    out_i[q] = c
                    out_d[q] = data[p]
                    q += 1
    return out_ptr, out_i, out_d


class BlockedCSR:
    """Reads of a blocked-CSR ``X``: rows × chosen genes, as CSR or dense."""

    def __init__(self, X: zarr.Group) -> None:
        self.X = X
        self.shape = tuple(X.attrs["shape"])
        self.chunks = tuple(X.attrs["chunks"])

    @property
    def nnz(self) -> int:
        return int(self.X.attrs.get("nnz", 0))

    def _piece(self, a: int, lo: int, hi: int, blocks: range, col_map: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``lo:hi`` (local) of cell block ``a``, gene blocks ``blocks``."""
        ptr = self.X["ptr"][str(a)][blocks.start : blocks.stop]
        # entries run by gene block, then row: these rows' span of the first block to
        # that of the last
        start, stop = int(ptr[0, lo]), int(ptr[-1, hi])
        indices = self.X["indices"][str(a)][start:stop]
        data = self.X["data"][str(a)][start:stop]
        return _gather(ptr, indices, data, start, lo, hi, col_map)

    def rows(self, lo: int, hi: int, cols: np.ndarray) -> sparse.csr_matrix:
        """Rows ``lo:hi`` × genes ``cols`` (positions; unique) as float32 CSR."""
        cols = np.asarray(cols, dtype=np.int64)
        col_map = _col_map(self.shape[1], cols)
        bc, bg = self.chunks
        if len(cols):
            blocks = range(int(cols.min()) // bg, int(cols.max()) // bg + 1)
        else:
            blocks = range(0, 1)
        ptrs, idxs, dats, offset = [np.zeros(1, np.int64)], [], [], 0
        for a in range(lo // bc, -(-hi // bc) if hi > lo else lo // bc):
            r0, r1 = max(lo, a * bc) - a * bc, min(hi, (a + 1) * bc) - a * bc
            p, i, d = self._piece(a, r0, r1, blocks, col_map)
            ptrs.append(p[1:] + offset)
            idxs.append(i)
            dats.append(d)
            offset += len(d)
        return sparse.csr_matrix(
            (np.concatenate(dats or [np.zeros(0, np.float32)]),
             np.concatenate(idxs or [np.zeros(0, np.int32)]), np.concatenate(ptrs)),
            shape=(hi - lo, len(cols)))

    def dense(self, lo: int, hi: int, cols: np.ndarray) -> np.ndarray:
        """Rows ``lo:hi`` × genes ``cols`` as dense float32: a dense store's values."""
        return self.rows(lo, hi, cols).toarray()

    def select(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Any rows (positions) × genes ``cols``, dense: read by cell block."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), len(cols)), dtype=np.float32)
        if not len(rows):
            return out
        bc = self.chunks[0]
        blocks = rows // bc
        for a in np.unique(blocks):
            at = np.flatnonzero(blocks == a)
            lo, hi = int(rows[at].min()), int(rows[at].max()) + 1
            out[at] = self.rows(lo, hi, cols)[rows[at] - lo].toarray()
        return out
