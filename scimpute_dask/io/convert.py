"""Conversion: any input the engine reads, into a chunked cells × genes Zarr store.

Every input goes through the reader registry (:mod:`scimpute_dask.io.registry`):
the readers below are asked in order and the first that claims the input
reads its names, fingerprints it and converts it. The store they all write is
:class:`~scimpute_dask.io.store.ExpressionStore`.
"""

from __future__ import annotations

import os

import numpy as np

from scimpute_dask import plan
from scimpute_dask.config import OPTIONS, parse_memory
from scimpute_dask.errors import InputError
from scimpute_dask.io import anndata_io, frame, spatialdata_io, tenx, tenx_h5, text, xenium
from scimpute_dask.io import store as stores
from scimpute_dask.io.registry import Layout, Reader, ReadOptions, as_source, reader_for
from scimpute_dask.io.storage import is_location, location, remove_tree
from scimpute_dask.io.store import ExpressionStore

#: Asked in this order; delimited text, which claims any file, comes last.
READERS: tuple[Reader, ...] = (
    frame.READER,
    anndata_io.READER,
    spatialdata_io.READER,
    tenx.READER,
    tenx_h5.READER,
    xenium.READER,
    stores.READER,
    text.READER,
)

__all__ = ["ExpressionStore", "Layout", "convert", "label_of", "read_names",
           "source_fingerprint"]


def label_of(source: object, role: str | None = None) -> str:
    """What messages call an input: its path, or ``"<role> DataFrame"`` for objects."""
    if isinstance(source, str | os.PathLike) or is_location(source):
        return str(source)
    kind = "AnnData" if anndata_io.is_anndata(source) else type(source).__name__
    return f"{role} {kind}" if role else kind


def _options(source, layout, sep, layer, name, **kwargs) -> ReadOptions:
    OPTIONS["query_layout"].constraint.check(layout, "layout")
    return ReadOptions(label=name or label_of(source), layout=layout, sep=sep, layer=layer,
                       **kwargs)


def read_names(
    source,
    layout: Layout = "genes_x_cells",
    sep: str | None = None,
    name: str | None = None,
    layer: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cell and gene names of an input, checked, without parsing a single value.

    Lets every name-level check (shared genes, identity table, k) fail in
    seconds, before a long conversion starts.
    """
    options = _options(source, layout, sep, layer, name)
    source = as_source(source)
    return reader_for(source, READERS, options.label).names(source, options)


def source_fingerprint(source, layout: Layout = "genes_x_cells", sep: str | None = None,
                       layer: str | None = None) -> dict | None:
    """The fingerprint a conversion of ``source`` with these options records.

    ``None`` for inputs that are never reused (in-memory objects) or not converted
    (stores).
    """
    options = _options(source, layout, sep, layer, None)
    source = as_source(source)
    reader = reader_for(source, READERS, options.label)
    return None if reader.fingerprint is None else reader.fingerprint(source, options)


def convert(
    source,
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
        A delimited text file (``.tsv``/``.txt``/``.csv``, plain or gzip, bzip2,
        xz or zstd compressed), an AnnData (``.h5ad`` file, AnnData-Zarr store
        or in-memory object), a 10x ``matrix.mtx`` directory, an existing
        scimpute-dask ``.zarr`` store (returned as is), or a
        :class:`pandas.DataFrame` with cells as rows and genes as columns.
    store
        Directory of the Zarr group to write: a local path or an fsspec URL
        (``s3://bucket/query.zarr``).
    layout
        Orientation of a text file: ``"genes_x_cells"`` is scimpute's layout
        (first row = cell names, first column = gene names);
        ``"cells_x_genes"`` is the transpose. Ignored for other sources.
    sep
        Field separator of a text file; by default ``","`` for ``.csv`` (and
        ``.csv.gz`` …) and a tab otherwise.
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
    options = _options(source, layout, sep, layer, name, restart=restart, progress=progress,
                       memory_limit=parse_memory(memory_limit))
    plan.check_conversion_budget(options.memory_limit)
    target = location(store)
    source = as_source(source)
    reader = reader_for(source, READERS, options.label)
    try:
        return reader.convert(source, target, options)
    except InputError:
        # The input is bad: the blocks converted so far cannot be resumed from once
        # it is fixed (it will have changed), so leave no unfinished store behind.
        group = stores.unfinished(target)
        if group is not None and reader.fingerprint is not None and \
                group.attrs.get("fingerprint") == reader.fingerprint(source, options):
            remove_tree(target)
        raise

