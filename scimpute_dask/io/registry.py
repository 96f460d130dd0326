"""The reader registry: one :class:`Reader` per input format, one dispatcher.

Modelled on anndata's I/O registry: each format lives in a module of its own
that defines its ``READER``; :mod:`scimpute_dask.io.convert` lists them in the
order they are asked, and everything that reads an input (names, fingerprint,
conversion) goes through :func:`reader_for`. Adding a format is one module and
one line in that list.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from scimpute_dask.errors import InputError
from scimpute_dask.io.storage import Location, is_location, is_remote, location

if TYPE_CHECKING:
    import numpy as np

    from scimpute_dask.io.store import ExpressionStore

#: A text input's orientation: one of :data:`~scimpute_dask.config.LAYOUTS`.
Layout = Literal["genes_x_cells", "cells_x_genes"]


@dataclass(frozen=True)
class ReadOptions:
    """How to read one input: the options every reader receives (each uses its own)."""

    label: str  # what error messages call the input
    layout: Layout = "genes_x_cells"  # delimited text: orientation
    sep: str | None = None  # delimited text: field separator (None: by suffix)
    layer: str | None = None  # AnnData: the layer (None: X)
    restart: bool = False  # discard an unfinished conversion
    progress: bool = False
    memory_limit: int = 0  # bytes; sets the store's chunks and the text block


@dataclass(frozen=True)
class Reader:
    """One input format.

    Attributes
    ----------
    name
        What the format is called in messages.
    claims
        Does this reader read ``source`` (a local path, a URL path, or an
        in-memory object)? Asked in registry order; the first that claims it reads it.
    names
        ``(source, options) -> (cell names, gene names)``, checked, without
        reading the values, so that every name-level check fails in seconds.
    fingerprint
        ``(source, options) -> dict``: what a conversion of the source records,
        to reuse or resume it; ``None`` for sources that are never reused.
    convert
        ``(source, store, options) -> ExpressionStore``: stream the source into
        a new store at ``store`` (or resume/reuse the one there).
    remote
        Whether the format can be read from an fsspec URL.
    """

    name: str
    claims: Callable[[Any], bool]
    names: Callable[[Any, ReadOptions], tuple[np.ndarray, np.ndarray]]
    fingerprint: Callable[[Any, ReadOptions], dict] | None
    convert: Callable[[Any, Location, ReadOptions], ExpressionStore]
    remote: bool = False


def as_source(source: object) -> object:
    """Paths and URLs as :data:`Location`; in-memory objects as they are."""
    if isinstance(source, str | os.PathLike):
        return location(source)
    return source


def reader_for(source: object, readers: Sequence[Reader], label: str) -> Reader:
    """The first reader of ``readers`` that claims ``source``; a clear error if none does."""
    if is_location(source) and not source.exists():
        raise InputError(f"{label}: file not found")
    for reader in readers:
        if reader.claims(source):
            if is_location(source) and is_remote(source) and not reader.remote:
                raise InputError(
                    f"{label}: only delimited text and scimpute-dask stores are read from URLs "
                    f"({reader.name} must be local); convert it first: "
                    f"scimpute-dask convert LOCAL_INPUT {source.parent}/NAME.zarr")
            return reader
    kinds = ", ".join(r.name for r in readers)
    what = "a directory" if is_location(source) and source.is_dir() else \
        f"an object of type {type(source).__name__}"
    raise InputError(f"{label}: {what} of no known input kind (readable: {kinds})")
