"""The engine's one neighbour search: a reference prepared once, every query block searched
against it one tile at a time.

A run, the held-out validation, the tuner, the compat API and
self-imputation all search through :func:`prepare` and
:meth:`Searcher.neighbours`. Preparing casts the reference's search-space
rows to float32 and stores them, their L2-normalised copy, their float64
norms and their cluster codes in row tiles — in a Zarr group of the work
directory when a path is given (resumable; read by the workers themselves on
a cluster), in memory otherwise. Each search task then reads the tiles it
needs, one at a time, instead of receiving the reference from Dask: Dask
keeps a block that many tasks share in memory until the last of them has
run, so a reference handed around as a Dask array was resident whole however
small the tiles were planned.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
import zarr

from scimpute_dask.engine import graph
from scimpute_dask.engine.resumable import store_stage
from scimpute_dask.io.storage import Location, remove_tree

#: Arrays of a prepared reference, as :func:`graph.prepared_reference` names them.
PREPARED = ("values", "unit", "norms")


def _bounds(n: int, tile: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, tile):
        yield lo, min(n, lo + tile)


@dataclass(frozen=True)
class StoredTiles:
    """A prepared reference in a Zarr group; each read decodes the chunks of one tile.

    The arrays are opened once, here: on an object store every opening is a request.
    """

    group: zarr.Group
    tile: int
    arrays: dict[str, zarr.Array] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arrays", {name: self.group[name] for name in
                                            (*PREPARED, "codes") if name in self.group})

    def bounds(self) -> Iterator[tuple[int, int]]:
        return _bounds(self.arrays["values"].shape[0], self.tile)

    def unit(self, lo: int, hi: int) -> np.ndarray:
        return self.arrays["unit"][lo:hi]

    def values(self, lo: int, hi: int) -> np.ndarray:
        return self.arrays["values"][lo:hi]

    def norms(self, lo: int, hi: int) -> np.ndarray:
        return self.arrays["norms"][lo:hi, 0]

    def clusters(self, lo: int, hi: int) -> np.ndarray | None:
        codes = self.arrays.get("codes")
        return None if codes is None else codes[lo:hi, 0]


@dataclass(frozen=True)
class ArrayTiles:
    """A prepared reference held in memory (small data: the tuner, the compat API)."""

    arrays: dict[str, np.ndarray]
    tile: int

    def bounds(self) -> Iterator[tuple[int, int]]:
        return _bounds(self.arrays["values"].shape[0], self.tile)

    def unit(self, lo: int, hi: int) -> np.ndarray:
        return self.arrays["unit"][lo:hi]

    def values(self, lo: int, hi: int) -> np.ndarray:
        return self.arrays["values"][lo:hi]

    def norms(self, lo: int, hi: int) -> np.ndarray:
        return self.arrays["norms"][lo:hi, 0]

    def clusters(self, lo: int, hi: int) -> np.ndarray | None:
        codes = self.arrays.get("codes")
        return None if codes is None else codes[lo:hi, 0]


@dataclass(frozen=True)
class Searcher:
    """A prepared reference (:func:`prepare`) that query blocks are searched against."""

    tiles: StoredTiles | ArrayTiles
    token: str
    path: Location | None = None

    def neighbours(self, query: da.Array, k: int, query_codes: da.Array | None = None
                   ) -> tuple[da.Array, da.Array]:
        """Exact cosine kNN of every query row (lazy); see :func:`graph.search_graph`.

        ``query`` is in the same search space and gene order as the prepared
        reference; its row chunks are the search tasks, each holding its block
        and one reference tile at a time.
        """
        return graph.search_graph(query, self.tiles, self.token, k, query_codes)

    def remove(self) -> None:
        """Delete a stored preparation (its work is done)."""
        if self.path is not None:
            remove_tree(self.path)


def prepare(reference: da.Array, tile: int, codes: da.Array | None = None,
            path: Location | None = None, key: dict | None = None) -> Searcher:
    """Prepare ``reference`` (rows as searched) for :meth:`Searcher.neighbours`.

    Parameters
    ----------
    reference
        ``(n_reference, g)`` search-space rows.
    tile
        Reference rows a search task holds at once (:func:`scimpute_dask.plan.plan_run`).
    codes
        ``(n_reference,)`` cluster codes, for a search restricted to each query
        cell's cluster.
    path
        Zarr group to store the preparation in, resumably (``key`` says what it
        depends on; another key rebuilds it). Without one it is computed into memory.
    key
        What the preparation depends on (inputs, genes, search transform, clusters).
    """
    tile = max(1, min(int(tile), reference.shape[0]))
    arrays = graph.prepared_reference(reference, tile, codes)
    if path is None:
        computed = dask.compute(*arrays.values())
        return Searcher(ArrayTiles(dict(zip(arrays, computed, strict=True)), tile),
                        uuid.uuid4().hex)
    fills = {"values": np.nan, "unit": np.nan, "norms": np.nan, "codes": -1}
    # raw: normalised rows do not compress, and every search task reads each tile once
    group = store_stage(path, {name: (arr, fills[name]) for name, arr in arrays.items()},
                        {**(key or {}), "tile": tile}, {"tile": tile}, compressors=None)
    return Searcher(StoredTiles(group, tile), dask.base.tokenize(str(path), key, tile), path)


def knn(query: da.Array, reference: da.Array, k: int, query_codes: da.Array | None = None,
        reference_codes: da.Array | None = None, *, tile: int | None = None,
        path: Location | None = None, key: dict | None = None) -> tuple[da.Array, da.Array]:
    """Exact cosine kNN of every query row among the reference rows, in one call.

    :func:`prepare` (tiles of ``tile`` rows, default: the reference's row
    chunks) followed by :meth:`Searcher.neighbours`; returns the lazy
    ``(indices, similarity)`` of :func:`graph.search_graph`.
    """
    searcher = prepare(reference, tile or reference.chunks[0][0], reference_codes, path, key)
    return searcher.neighbours(query, k, query_codes)
