"""Reading and conversion: expression matrices in, chunked Zarr stores out.

Every input the engine accepts (scimpute's genes-as-rows TSV, a cells-as-rows
CSV/TSV, a pandas DataFrame, an AnnData — :mod:`.anndata_io` — or a 10x
``matrix.mtx`` directory — :mod:`.tenx`) is converted once into an
:class:`ExpressionStore`, a Zarr group laid out cells × genes:

``X``
    float32 array, cells × genes, chunked ``(cell_chunk, gene_chunk)``.
``obs_names`` / ``var_names``
    cell and gene names.
attrs
    ``fingerprint`` (what was converted), ``progress`` (how far), ``complete``.

Text is streamed block by block: memory is bounded by the block size, never by
the file size. Each block is written as whole Zarr chunks and then recorded in
``progress``, so a conversion that dies half-way resumes at the last recorded
block; a store converted from the same, unchanged file is reused as it is.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Literal

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from . import anndata_io, plan, tenx, textio
from .storage import Location, is_remote, location, remove_tree, zarr_store
from .validation import InputError, check_unique_names, check_values

Layout = Literal["genes_x_cells", "cells_x_genes"]
LAYOUTS: tuple[str, ...] = ("genes_x_cells", "cells_x_genes")

FORMAT_VERSION = 1


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
        if attrs.get("format") != "scimpute-dask-expression":
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
    def shape(self) -> tuple[int, int]:
        return tuple(self.group["X"].shape)

    @property
    def chunks(self) -> tuple[int, int]:
        return tuple(self.group["X"].chunks)

    @property
    def fingerprint(self) -> dict:
        return dict(self.group.attrs["fingerprint"])

    def to_dask(self, chunks: tuple[int, int] | None = None) -> da.Array:
        """The matrix as a lazy Dask array read straight from Zarr."""
        X = self.group["X"]
        return da.from_zarr(X, chunks=chunks or X.chunks)


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #
def convert(
    source: str | os.PathLike | pd.DataFrame,
    store: str | os.PathLike,
    *,
    layout: Layout = "genes_x_cells",
    sep: str | None = None,
    restart: bool = False,
    progress: bool = False,
    name: str | None = None,
    memory_limit: int | str | None = None,
    layer: str | None = None,
) -> ExpressionStore:
    """Convert an expression matrix to a chunked cells × genes Zarr store.

    Parameters
    ----------
    source
        A delimited text file (``.tsv``/``.txt``/``.csv``), an AnnData (``.h5ad``
        file, AnnData-Zarr store or in-memory object), a 10x ``matrix.mtx``
        directory, an existing scimpute-dask ``.zarr`` store (returned as is),
        or a :class:`pandas.DataFrame` with cells as rows and genes as columns.
    store
        Directory of the Zarr group to write: a local path or an fsspec URL
        (``s3://bucket/query.zarr``).
    layout
        Orientation of a text file: ``"genes_x_cells"`` is scimpute's layout
        (first row = cell names, first column = gene names);
        ``"cells_x_genes"`` is the transpose. Ignored for other sources.
    sep
        Field separator of a text file; by default ``","`` for ``.csv`` and a
        tab otherwise.
    restart
        Discard an existing store at ``store`` and convert from scratch.
    progress
        Show a progress bar.
    name
        How to call the input in error messages (default: its path).
    memory_limit
        Budget for the conversion (bytes or ``"2GB"``; default: half the
        available memory); sets the text block and the store's chunks.
    layer
        AnnData inputs: the layer to read (default ``X``).

    Returns
    -------
    ExpressionStore
        The complete store. If ``store`` already holds a complete conversion of
        the same unchanged input it is reused without reading the input again;
        if it holds an interrupted one, conversion resumes where it stopped.

    Raises
    ------
    InputError
        On a missing or malformed input, naming the file and the row, cell or
        gene at fault.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    store = location(store)
    limit = plan.parse_memory(memory_limit)
    if isinstance(source, pd.DataFrame):
        return _convert_dataframe(source, store, name=name or "DataFrame", memory_limit=limit)
    if anndata_io.is_anndata(source) and not isinstance(source, str | os.PathLike):
        return anndata_io.convert_anndata(source, store, layer=layer, restart=restart,
                                          progress=progress, memory_limit=limit, name=name)
    src = location(source)
    label = name or str(src)
    if not src.exists():
        raise InputError(f"{label}: file not found")
    _check_url_format(src, label)
    if is_store(src):
        return ExpressionStore.open(src)
    if src.suffix == ".gz":
        raise InputError(f"{label}: compressed text is not supported; decompress it first")
    try:
        if anndata_io.is_anndata(src):
            return anndata_io.convert_anndata(src, store, layer=layer, restart=restart,
                                              progress=progress, memory_limit=limit,
                                              name=label)
        if tenx.is_10x(src):
            return tenx.convert_10x(src, store, restart=restart, progress=progress,
                                    memory_limit=limit, name=label)
        return _convert_text(src, store, layout=layout, sep=_sep_for(src, sep),
                             restart=restart, progress=progress, memory_limit=limit)
    except InputError:
        # The input is bad: the blocks converted so far cannot be resumed from once
        # it is fixed (it will have changed), so leave no unfinished store behind.
        group = _open_unfinished(store)
        if group is not None and group.attrs.get("fingerprint") == source_fingerprint(
            src, layout, sep, layer
        ):
            remove_tree(store)
        raise


def _check_url_format(src: Location, label: str) -> None:
    """From a URL, read text and scimpute-dask stores; the rest needs local files."""
    if is_remote(src) and (src.suffix == ".h5ad" or (src.is_dir() and not is_store(src))):
        raise InputError(
            f"{label}: only delimited text and scimpute-dask stores are read from URLs "
            f"(HDF5, AnnData-Zarr and 10x inputs must be local); convert it first: "
            f"scimpute-dask convert LOCAL_INPUT {src.parent}/NAME.zarr"
        )


def is_store(path: Location) -> bool:
    """Is ``path`` a Zarr store (to be used as it is) rather than a file to convert?"""
    return (path.is_dir() and (path / "zarr.json").exists()
            and not anndata_io.is_anndata_zarr(path))


def read_names(
    source: str | os.PathLike | pd.DataFrame,
    layout: Layout = "genes_x_cells",
    sep: str | None = None,
    name: str | None = None,
    layer: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cell and gene names of an input, checked, without parsing a single value.

    Lets every name-level check (shared genes, identity table, k) fail in
    seconds, before a long conversion starts.
    """
    if isinstance(source, pd.DataFrame):
        label = name or "DataFrame"
        cells, genes = np.asarray(source.index.astype(str)), np.asarray(source.columns.astype(str))
        check_unique_names(cells, label, "cell")
        check_unique_names(genes, label, "gene")
        return cells.astype(object), genes.astype(object)
    if anndata_io.is_anndata(source) and not isinstance(source, str | os.PathLike):
        return anndata_io.read_names(source, layer, name or "AnnData")
    src = location(source)
    label = name or str(src)
    if not src.exists():
        raise InputError(f"{label}: file not found")
    _check_url_format(src, label)
    if anndata_io.is_anndata(src):
        return anndata_io.read_names(src, layer, label)
    if tenx.is_10x(src):
        return tenx.read_names(src, label)
    if src.is_dir():
        store = ExpressionStore.open(src)
        return store.cell_names, store.gene_names
    genes_rows = layout == "genes_x_cells"
    kinds = ("gene", "cell") if genes_rows else ("cell", "gene")
    scanned = scan_text(src, _sep_for(src, sep), label, *kinds)
    return (scanned.columns, scanned.rows) if genes_rows else (scanned.rows, scanned.columns)


def source_fingerprint(src: Location, layout: Layout = "genes_x_cells", sep: str | None = None,
                       layer: str | None = None) -> dict:
    """The fingerprint a conversion of ``src`` with these options records."""
    if anndata_io.is_anndata(src):
        return anndata_io.fingerprint(src, layer)
    if tenx.is_10x(src):
        return tenx.fingerprint(src)
    return file_fingerprint(src, layout=layout, sep=_sep_for(src, sep))


def _sep_for(src: Location, sep: str | None) -> str:
    return sep if sep is not None else ("," if src.suffix.lower() == ".csv" else "\t")


def file_fingerprint(path: Location, **options: object) -> dict:
    """What identifies a conversion: the file's identity and the reading options."""
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
# Store life cycle
# --------------------------------------------------------------------------- #
def _existing(store: Location, fingerprint: dict, restart: bool, label: str) -> zarr.Group | None:
    """Return the group to resume or reuse at ``store``, or ``None`` to start afresh."""
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


def _open_unfinished(store: Location) -> zarr.Group | None:
    if not (store / "zarr.json").exists():
        return None
    group = zarr.open_group(zarr_store(store, read_only=True), mode="r")
    return None if group.attrs.get("complete") else group


def _create(
    store: Location,
    fingerprint: dict,
    cell_names: np.ndarray,
    gene_names: np.ndarray,
    chunks: tuple[int, int],
) -> zarr.Group:
    if not is_remote(store):  # object stores have no directories to make
        store.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(zarr_store(store), mode="w")
    for key, names in (("obs_names", cell_names), ("var_names", gene_names)):
        arr = group.create_array(key, shape=(len(names),), dtype=str, chunks=(max(len(names), 1),))
        arr[:] = np.asarray(names, dtype=str)
    group.create_array(
        "X",
        shape=(len(cell_names), len(gene_names)),
        dtype="float32",
        chunks=chunks,
        fill_value=0.0,
    )
    group.attrs.update(
        {
            "format": "scimpute-dask-expression",
            "fingerprint": fingerprint,
            "progress": {"rows_done": 0, "offset": 0},
            "complete": False,
        }
    )
    return group


# --------------------------------------------------------------------------- #
# Delimited text
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class _TextLayout:
    """What one pass over a delimited text file tells before any value is parsed."""

    columns: np.ndarray  # names along the first row
    rows: np.ndarray  # names along the first column
    header_bytes: int  # offset of the first data line


def scan_text(path: Location, sep: str, label: str, row_kind: str, col_kind: str) -> _TextLayout:
    """Read the names of a delimited matrix and check its shape, in one streaming pass.

    Every data line must hold one name plus one field per column; the names
    along both axes must be unique. Values are not parsed here.
    """
    sep_b = sep.encode()
    rows: list[str] = []
    with path.open("rb") as fh:
        header = fh.readline()
        header_bytes = fh.tell()
        if not header.strip():
            raise InputError(f"{label}: file is empty")
        fields = header.rstrip(b"\r\n").split(sep_b)
        n_fields = len(fields)
        for lineno, line in enumerate(fh, start=2):
            if _blank(line):
                continue
            line = line.rstrip(b"\r\n")
            n = line.count(sep_b) + 1
            if not rows:
                # pandas convention: a header one field short has no corner label
                if n == n_fields + 1 and fields[0].strip(b'"'):
                    fields = [b"", *fields]
                    n_fields = n
            if n != n_fields:
                raise InputError(
                    f"{label}: line {lineno} ({row_kind} "
                    f"'{line.split(sep_b, 1)[0].decode(errors='replace')}') has {n} fields, "
                    f"the header has {n_fields}"
                )
            rows.append(line[: line.find(sep_b)].decode())
    if not rows:
        raise InputError(f"{label}: no data rows below the header")
    columns = np.array([f.decode().strip('"') for f in fields[1:]], dtype=object)
    row_names = np.array([r.strip('"') for r in rows], dtype=object)
    if len(columns) == 0:
        raise InputError(f"{label}: no {col_kind} columns")
    check_unique_names(columns, label, col_kind)
    check_unique_names(row_names, label, row_kind)
    return _TextLayout(columns=columns, rows=row_names, header_bytes=header_bytes)


def _blank(line: bytes) -> bool:
    """Blank lines are skipped; the scan and the conversion must agree on which."""
    return not line.strip()


def _read_lines(fh: io.BufferedReader, n: int) -> tuple[bytes, int]:
    """Read up to ``n`` non-blank lines; return them and how many were read."""
    out: list[bytes] = []
    while len(out) < n:
        line = fh.readline()
        if not line:
            break
        if not _blank(line):
            out.append(line)
    return b"".join(out), len(out)


def _parse_block(
    text: bytes,
    sep: str,
    row_names: np.ndarray,
    col_names: np.ndarray,
    label: str,
    row_kind: str,
    col_kind: str,
) -> np.ndarray:
    """Parse a block of data lines into a float32 matrix, naming any bad field."""
    values, (code, r, c) = textio.parse_rows(text, sep, len(row_names), len(col_names))
    if code == textio.BAD_FIELD:
        field = text.splitlines()[r].split(sep.encode())[c + 1].decode(errors="replace")
        raise InputError(
            f"{label}: {row_kind} '{row_names[r]}', {col_kind} '{col_names[c]}': "
            f"value {field!r} is not a number"
        )
    if code != textio.OK:
        raise InputError(f"{label}: {row_kind} '{row_names[r]}' has the wrong number of fields")
    check_values(values, row_names, col_names, label, row_kind, col_kind)
    return values


def _convert_text(
    src: Location, store: Location, *, layout: Layout, sep: str, restart: bool, progress: bool,
    memory_limit: int,
) -> ExpressionStore:
    label = str(src)
    genes_rows = layout == "genes_x_cells"
    row_kind, col_kind = ("gene", "cell") if genes_rows else ("cell", "gene")
    fingerprint = source_fingerprint(src, layout, sep)
    group = _existing(store, fingerprint, restart, label)
    if group is not None and group.attrs.get("complete"):
        return ExpressionStore(store)

    text_layout = scan_text(src, sep, label, row_kind, col_kind)
    cols, rows = text_layout.columns, text_layout.rows
    cells, genes = (cols, rows) if genes_rows else (rows, cols)
    line_bytes = max(1, src.stat().st_size // max(1, len(rows)))
    if group is None:
        chunks = plan.store_chunks(len(cells), len(genes), genes_rows, line_bytes, memory_limit)
        group = _create(store, fingerprint, cells, genes, chunks)
    state = dict(group.attrs["progress"])
    X = group["X"]

    # A block is a whole number of Zarr chunks along the streamed axis, so each
    # write replaces complete chunks and a resumed run never mixes two writes.
    row_chunk = X.chunks[1] if genes_rows else X.chunks[0]
    per_row = line_bytes + 12 * len(cols)
    block_rows = max(row_chunk,
                     plan.text_block_bytes(memory_limit) // per_row // row_chunk * row_chunk)

    done, offset = int(state["rows_done"]), int(state["offset"]) or text_layout.header_bytes
    bar = _progress_bar(progress, total=len(rows), initial=done, desc=f"convert {src.name}")
    with src.open("rb") as fh:
        fh.seek(offset)
        while done < len(rows):
            text, n = _read_lines(fh, block_rows)
            if n == 0:
                raise InputError(f"{label}: the file changed during conversion (it ended after "
                                 f"{done} of {len(rows)} rows); convert it again")
            block = _parse_block(
                text, sep, rows[done : done + n], cols, label, row_kind, col_kind
            )
            if genes_rows:
                X[:, done : done + n] = block.T
            else:
                X[done : done + n, :] = block
            done += n
            group.attrs["progress"] = {"rows_done": done, "offset": fh.tell()}
            bar.update(n)
    bar.close()
    group.attrs["complete"] = True
    return ExpressionStore(store)


# --------------------------------------------------------------------------- #
# In-memory sources
# --------------------------------------------------------------------------- #
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


def _convert_dataframe(frame: pd.DataFrame, store: Location, *, name: str, memory_limit: int
                       ) -> ExpressionStore:
    """Write a cells × genes DataFrame (scimpute's in-memory orientation)."""
    values = check_frame(frame, name)
    cells = np.asarray(frame.index.astype(str), dtype=object)
    genes = np.asarray(frame.columns.astype(str), dtype=object)
    if store.exists():
        remove_tree(store)
    digest = hashlib.sha1(values.tobytes())
    for names in (cells, genes):
        digest.update("\t".join(names).encode())
    fingerprint = {"source": name, "sha1": digest.hexdigest(), "format_version": FORMAT_VERSION}
    group = _create(
        store, fingerprint, cells, genes,
        plan.store_chunks(len(cells), len(genes), False, 0, memory_limit),
    )
    group["X"][:] = values.astype(np.float32)
    group.attrs["complete"] = True
    return ExpressionStore(store)


def _progress_bar(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, unit="row", leave=False, **kwargs)
