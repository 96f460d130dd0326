"""10x Genomics ``matrix.mtx`` directories (Cell Ranger's filtered/raw feature-barcode matrix).

A directory holds ``matrix.mtx``, ``barcodes.tsv`` and ``features.tsv`` (or
the older ``genes.tsv``), each optionally gzipped. The MatrixMarket file is
genes × cells in coordinate format, in no guaranteed order, so it is streamed
in two passes that never hold it whole: the entries are read in fixed-size
batches and appended to one bucket file per block of cells on disk, then each
bucket becomes one block of rows of the cells × genes store, kept sparse. Memory is
bounded by a batch plus one block, whatever the file size.

Only ``Gene Expression`` features are kept (not antibody capture, CRISPR
guides or Xenium's control probes), as ``scanpy.read_10x_mtx`` does by
default. Gene names are the feature symbols (the second column), made unique as
anndata's ``var_names_make_unique`` does (``Gene``, ``Gene-1``, ...), as
``scanpy.read_10x_mtx`` returns them by default.
"""

from __future__ import annotations

import gzip
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from scimpute_dask import plan
from scimpute_dask.checks import check_unique_names, check_values
from scimpute_dask.errors import InputError
from scimpute_dask.io import store as stores
from scimpute_dask.io.registry import Reader, ReadOptions
from scimpute_dask.io.storage import Location, is_location, is_remote

#: The feature type kept (the third column of ``features.tsv``).
GENE_EXPRESSION = "Gene Expression"
_MATRIX = ("matrix.mtx", "matrix.mtx.gz")
_BARCODES = ("barcodes.tsv", "barcodes.tsv.gz")
_FEATURES = ("features.tsv", "features.tsv.gz", "genes.tsv", "genes.tsv.gz")
#: MatrixMarket entries parsed per batch (24 bytes each in the buckets: see ``_ENTRY``).
BATCH = 2_000_000
_ENTRY = np.dtype([("cell", "<i8"), ("gene", "<i8"), ("value", "<f8")])


def _find(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def is_10x(path: Path) -> bool:
    """Is ``path`` a directory holding a 10x ``matrix.mtx``?"""
    return path.is_dir() and _find(path, _MATRIX) is not None


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _files(directory: Path, label: str) -> tuple[Path, Path, Path]:
    found = [_find(directory, n) for n in (_MATRIX, _BARCODES, _FEATURES)]
    for path, names in zip(found, (_MATRIX, _BARCODES, _FEATURES), strict=True):
        if path is None:
            raise InputError(f"{label}: a 10x directory needs one of {', '.join(names)}")
    return found[0], found[1], found[2]


def make_unique(names: np.ndarray) -> np.ndarray:
    """Suffix repeated names ``-1``, ``-2``, ... (anndata's ``var_names_make_unique``).

    The algorithm of ``anndata.utils.make_index_unique``: every repeat after
    the first takes the next suffix that collides with no name, original or
    already given, so ``A, A, A-1`` becomes ``A, A-2, A-1``.

    Parameters
    ----------
    names : numpy.ndarray
        Names, possibly repeated.

    Returns
    -------
    numpy.ndarray
        Unique names (object dtype), in the same order.
    """
    names = np.asarray(names, dtype=object).copy()
    repeats = np.flatnonzero(pd.Index(names).duplicated(keep="first"))
    taken = set(names)
    counter: Counter[str] = Counter()
    for i in repeats:
        name = names[i]
        while True:
            counter[name] += 1
            candidate = f"{name}-{counter[name]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        names[i] = candidate
    return names


def _table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)


def kept_features(types: np.ndarray, label: str) -> np.ndarray:
    """Positions of the ``Gene Expression`` features among ``types`` (each feature's
    type), as scanpy's 10x readers keep them by default; an error if there are none."""
    types = np.asarray(types, dtype=str)
    keep = np.flatnonzero(types == GENE_EXPRESSION)
    if not len(keep):
        raise InputError(f"{label}: no '{GENE_EXPRESSION}' features among the {len(types)} "
                         f"(feature types: {', '.join(sorted(set(types)))})")
    return keep


def _names_and_kept(directory: Path, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Barcodes, kept gene names and the kept features' positions, checked."""
    mtx, barcodes, features = _files(directory, label)
    cells = np.asarray(_table(barcodes).iloc[:, 0], dtype=object)
    table = _table(features)
    # a v3 table's third column is the feature type; an older genes.tsv has none
    keep = (kept_features(table.iloc[:, 2].to_numpy(str), f"{label}/{features.name}")
            if table.shape[1] >= 3 else np.arange(len(table)))
    genes = make_unique(np.asarray(table.iloc[keep, min(1, table.shape[1] - 1)], dtype=object))
    check_unique_names(cells, f"{label}/{barcodes.name}", "cell")
    check_unique_names(genes, f"{label}/{features.name}", "gene")
    n_genes, n_cells, _, _ = _header(mtx, label)
    if (n_genes, n_cells) != (len(table), len(cells)):
        raise InputError(f"{label}: {mtx.name} is {n_genes} genes × {n_cells} cells, but there "
                         f"are {len(table)} features and {len(cells)} barcodes")
    return cells, genes, keep


def read_names(directory: Path, label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cell barcodes and gene names (``Gene Expression`` features) of a 10x directory,
    checked against the matrix header."""
    cells, genes, _ = _names_and_kept(directory, label or str(directory))
    return cells, genes


def _header(mtx: Path, label: str) -> tuple[int, int, int, int]:
    """Rows, columns, entries and the number of header lines of a coordinate MatrixMarket."""
    with _open(mtx) as fh:
        banner = fh.readline().decode(errors="replace").lower().split()
        if banner[:3] != ["%%matrixmarket", "matrix", "coordinate"] or \
                (len(banner) > 4 and banner[4] != "general") or \
                (len(banner) > 3 and banner[3] not in ("real", "integer")):
            raise InputError(f"{label}/{mtx.name}: not a general real/integer coordinate "
                             f"MatrixMarket file")
        lines = 1
        for raw in fh:
            lines += 1
            line = raw.strip()
            if line and not line.startswith(b"%"):
                try:
                    rows, cols, nnz = map(int, line.split())
                except ValueError:
                    raise InputError(f"{label}/{mtx.name}: bad size line {line!r}") from None
                return rows, cols, nnz, lines
    raise InputError(f"{label}/{mtx.name}: no size line")


def fingerprint(directory: Path) -> dict:
    """What identifies a conversion of a 10x directory: its three files."""
    parts = {}
    for path in _files(directory, str(directory)):
        st = path.stat()
        parts[path.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return {"source": str(directory.resolve()), "files": parts,
            "format_version": stores.FORMAT_VERSION, "layout": "10x"}


def _bucket(mtx: Path, n_genes: int, n_cells: int, nnz: int, skip: int, step: int,
            buckets: Path, label: str, bar) -> None:
    """Pass 1: append every entry to the bucket file of its block of ``step`` cells."""
    n_blocks = -(-n_cells // step)
    seen = 0
    with pd.read_csv(mtx, sep=r"\s+", header=None, skiprows=skip, comment="%",
                     names=["gene", "cell", "value"], chunksize=BATCH,
                     dtype={"gene": np.int64, "cell": np.int64, "value": np.float64}) as reader:
        try:
            for batch in reader:
                entries = np.empty(len(batch), dtype=_ENTRY)
                entries["gene"] = batch["gene"].to_numpy() - 1
                entries["cell"] = batch["cell"].to_numpy() - 1
                entries["value"] = batch["value"].to_numpy()
                bad = ((entries["gene"] < 0) | (entries["gene"] >= n_genes)
                       | (entries["cell"] < 0) | (entries["cell"] >= n_cells))
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise InputError(f"{label}/{mtx.name}: entry {seen + i + 1} refers to "
                                     f"gene {entries['gene'][i] + 1}, cell "
                                     f"{entries['cell'][i] + 1}, outside {n_genes} × {n_cells}")
                seen += len(entries)
                bar.update(len(entries))
                block = entries["cell"] // step
                order = np.argsort(block, kind="stable")
                entries, block = entries[order], block[order]
                bounds = np.searchsorted(block, np.arange(n_blocks + 1))
                for b in np.flatnonzero(np.diff(bounds)):
                    with open(buckets / f"{b}.bin", "ab") as out:
                        entries[bounds[b] : bounds[b + 1]].tofile(out)
        except ValueError as err:  # pandas' parse errors; anything else is a bug
            if isinstance(err, InputError):
                raise
            raise InputError(f"{label}/{mtx.name}: unreadable entry ({err})") from None
    if seen != nnz:
        raise InputError(f"{label}/{mtx.name}: the header announces {nnz} entries, the file "
                         f"holds {seen}")


def convert_10x(directory: Path, store: Location, *, restart: bool, progress: bool,
                memory_limit: int, name: str | None = None):
    """Stream a 10x directory into a cells × genes ExpressionStore (two passes, on disk).

    An interrupted conversion starts again from the beginning.
    """
    label = name or str(directory)
    cells, genes, keep = _names_and_kept(directory, label)
    mtx = _files(directory, label)[0]
    n_genes, n_cells, nnz, skip = _header(mtx, label)

    def shape() -> stores.Shape:
        return cells, genes, plan.store_chunks(len(cells), len(genes), False, 0, memory_limit)

    def blocks(done: int, offset: int, chunks: tuple[int, int]) -> Iterator[stores.Block]:
        step = chunks[0]
        # The buckets are local files (appended to, read back with numpy): beside a
        # local store, on the disk chosen for the data; for a store on an object
        # store, in the local temporary directory.
        with tempfile.TemporaryDirectory(prefix=f".{store.name}.buckets-",
                                         dir=None if is_remote(store) else store.parent) as tmp:
            buckets = Path(tmp)
            bar = stores.progress_bar(progress, total=nnz, desc=f"read {mtx.name}")
            bar.unit = "entry"
            _bucket(mtx, n_genes, n_cells, nnz, skip, step, buckets, label, bar)
            bar.close()
            for lo in range(0, len(cells), step):
                hi = min(lo + step, len(cells))
                part = buckets / f"{lo // step}.bin"
                entries = np.fromfile(part, dtype=_ENTRY) if part.exists() else \
                    np.empty(0, dtype=_ENTRY)
                # duplicated coordinates are summed, as scipy.io.mmread + tocsr does
                block = sparse.coo_matrix(
                    (entries["value"], (entries["cell"] - lo, entries["gene"])),
                    shape=(hi - lo, n_genes)).tocsr()
                if len(keep) < n_genes:
                    block = block[:, keep]
                block.sum_duplicates()
                check_values(block, cells[lo:hi], genes, label, "cell", "gene")
                yield stores.Block(lo, hi, block.astype(np.float32))

    # the buckets do not outlive a process: an interrupted conversion starts over
    return stores.write_store(store, fingerprint(directory), label, shape=shape, blocks=blocks,
                              sparse=True, restart=restart, resume=False, progress=progress,
                              desc=f"convert {directory.name}")


def _claims(source: object) -> bool:
    return is_location(source) and is_10x(source)


def _names(source: Path, options: ReadOptions) -> tuple[np.ndarray, np.ndarray]:
    return read_names(source, options.label)


def _fingerprint(source: Path, options: ReadOptions) -> dict:
    return fingerprint(source)


def _convert(source: Path, store: Location, options: ReadOptions) -> stores.ExpressionStore:
    return convert_10x(source, store, restart=options.restart, progress=options.progress,
                       memory_limit=options.memory_limit, name=options.label)


READER = Reader("a 10x directory (matrix.mtx, barcodes, features)", _claims, _names,
                _fingerprint, _convert)
