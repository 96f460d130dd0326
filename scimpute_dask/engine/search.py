"""The engine's one neighbour search: a reference prepared once, every query block searched
against it one tile at a time.

A run, the held-out validation, the tuner, the compat API and
self-imputation all search through :func:`prepare` and
:meth:`Searcher.neighbours`. Preparing casts the reference's search-space
rows to float32 and stores them (LZ4-compressed: an atlas's rows are mostly
zeros), their float64 norms and their cluster codes in row tiles (each tile
normalised as it is read) — in a Zarr group of the work
directory when a path is given (resumable; read by the workers themselves on
a cluster), in memory otherwise. Each search task then reads the tiles it
needs, one at a time, instead of receiving the reference from Dask: Dask
keeps a block that many tasks share in memory until the last of them has
run, so a reference handed around as a Dask array was resident whole however
small the tiles were planned.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr
from scipy import sparse

from scimpute_dask.engine import cluster, graph
from scimpute_dask.engine.resumable import digest, store_stage
from scimpute_dask.io.storage import Location, is_remote, remove_tree, zarr_store
from scimpute_dask.io.store import COMPRESSORS
from scimpute_dask.kernels import knn as kernel

log = logging.getLogger("scimpute_dask")

#: Arrays of a prepared reference, as :func:`graph.prepared_reference` names them, and
#: those it has with clusters or coarse lists. A stored preparation has no ``unit``.
PREPARED = ("values", "unit", "norms")
#: What a stored preparation holds, in its key: one stored by an older version (with
#: raw ``unit`` rows) is prepared again.
STORED = "values+norms, lz4"
OPTIONAL = ("codes", "lists", "rows")


def _bounds(n: int, tile: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, tile):
        yield lo, min(n, lo + tile)


@dataclass(frozen=True)
class PreparedTiles:
    """A prepared reference (:class:`scimpute_dask.kernels.knn.Tiles`): its arrays, Zarr
    arrays of a stored preparation (each read decodes the chunks of one tile) or NumPy
    arrays held in memory (small data: the tuner, the compat API)."""

    arrays: dict
    tile: int
    #: The tiles searched: ``(first, last + 1)`` tile numbers; None: all.
    span: tuple[int, int] | None = None
    #: The per-row columns (norms, codes, lists, rows) read whole at their first use: a
    #: few bytes a row, read otherwise once per tile and task, each read a request of its
    #: own. Not pickled: each process reads its own.
    columns: dict = field(default_factory=dict, compare=False, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "columns": {}}

    @classmethod
    def stored(cls, group: zarr.Group, tile: int) -> PreparedTiles:
        """The arrays of a stored preparation, opened once (on an object store every
        opening is a request)."""
        return cls({name: group[name] for name in (*PREPARED, *OPTIONAL) if name in group},
                   tile)

    def bounds(self) -> Iterator[tuple[int, int]]:
        tiles = _bounds(self.arrays["values"].shape[0], self.tile)
        if self.span is None:
            return tiles
        first, last = self.span
        return (b for i, b in enumerate(tiles) if first <= i < last)

    def parts(self, n: int) -> list[PreparedTiles]:
        """The reference in ``n`` parts of whole tiles (fewer if it has fewer tiles): a
        search of each is the exact search within its rows, and their lists merged
        (:func:`scimpute_dask.kernels.knn.merge_topk`) the search of the whole."""
        n_tiles = -(-self.arrays["values"].shape[0] // self.tile)
        edges = np.unique(np.linspace(0, n_tiles, max(1, min(n, n_tiles)) + 1).astype(int))
        return [replace(self, span=(int(a), int(b))) for a, b in pairwise(edges)]

    def unit(self, lo: int, hi: int) -> np.ndarray:
        # a stored preparation keeps only the values: normalising a tile costs 1/bq of
        # screening it, and halves what is written and read
        unit = self.arrays.get("unit")
        return kernel.normalize_rows(self.values(lo, hi)) if unit is None else unit[lo:hi]

    def values(self, lo: int, hi: int) -> np.ndarray:
        return self.arrays["values"][lo:hi]

    def norms(self, lo: int, hi: int) -> np.ndarray:
        return self._column("norms", lo, hi)

    def clusters(self, lo: int, hi: int) -> np.ndarray | None:
        return self._column("codes", lo, hi)

    def lists(self, lo: int, hi: int) -> np.ndarray | None:
        return self._column("lists", lo, hi)

    def rows(self, lo: int, hi: int) -> np.ndarray | None:
        return self._column("rows", lo, hi)

    def positions(self, rows: np.ndarray) -> np.ndarray:
        order = self._column("rows", 0, None)
        if order is None:
            return np.asarray(rows, dtype=np.int64)
        inverse = self.columns.get("positions")
        if inverse is None:
            inverse = np.empty(len(order), dtype=np.int64)
            inverse[order] = np.arange(len(order))
            self.columns["positions"] = inverse
        rows = np.asarray(rows, dtype=np.int64)
        return np.where(rows >= 0, inverse[np.maximum(rows, 0)], kernel.EMPTY)

    def _column(self, name: str, lo: int, hi: int | None) -> np.ndarray | None:
        column = self.columns.get(name)
        if column is None:
            array = self.arrays.get(name)
            if array is None:
                return None
            # two threads may both read it: the same values, the last one kept
            column = self.columns[name] = np.asarray(array[:, 0])
        return column[lo:hi]


#: Coarse lists of an approximate search: k-means centroids of the reference's unit rows
#: (``(lists, genes)`` float32).
Coarse = np.ndarray


@dataclass(frozen=True)
class Recall:
    """How an approximate search's probes were chosen: recall@k against the exact
    search on a seeded sample of query cells."""

    lists: int  # coarse lists of the reference
    probes: int  # lists each query cell screens
    recall: float  # mean recall@k on the sample
    interval: tuple[float, float]  # its 95 % confidence interval (normal, over cells)
    cells: int  # sampled query cells with neighbours
    target: float
    seconds: float
    #: The sample's exact neighbours (``(cells, k)`` reference rows), the measure of
    #: :meth:`measured`.
    exact: np.ndarray | None = field(default=None, compare=False, repr=False)

    def measured(self, found: np.ndarray) -> Recall:
        """This choice with the recall of ``found``, the search's own neighbours of the
        sample (what the run returned, not what the choice predicted)."""
        defined = (self.exact >= 0).any(axis=1)
        mean, interval = _mean_interval(recall_at_k(found[defined], self.exact[defined]))
        return replace(self, recall=mean, interval=interval)

    def record(self) -> dict:
        """What ``run.json`` keeps of it."""
        return {"mode": "approx", "lists": self.lists, "probes": self.probes,
                "recall_at_k": round(self.recall, 4),
                "recall_ci95": [round(x, 4) for x in self.interval],
                "sample_cells": self.cells, "target": self.target,
                "seconds": round(self.seconds, 3)}


def _mean_interval(per_cell: np.ndarray) -> tuple[float, tuple[float, float]]:
    """The mean and its normal 95 % confidence interval, within [0, 1]."""
    if not len(per_cell):
        return 1.0, (1.0, 1.0)
    mean = float(per_cell.mean())
    half = 1.96 * float(per_cell.std(ddof=1)) / np.sqrt(len(per_cell)) \
        if len(per_cell) > 1 else 0.0
    return mean, (max(0.0, mean - half), min(1.0, mean + half))


@dataclass(frozen=True)
class Searcher:
    """A prepared reference (:func:`prepare`) that query blocks are searched against."""

    tiles: PreparedTiles
    token: str
    path: Location | None = None
    coarse: Coarse | None = None

    def neighbours(self, query: da.Array, k: int, query_codes: da.Array | None = None,
                   probes: int | None = None) -> tuple[da.Array, da.Array]:
        """Cosine kNN of every query row (lazy); see :func:`graph.search_graph`.

        ``query`` is in the same search space and gene order as the prepared
        reference; its row chunks are the search tasks, each holding its block
        and one reference tile at a time. Exact, or with ``probes`` (a
        reference prepared with coarse lists) each cell screens only the rows
        of its ``probes`` nearest lists, every candidate then ranked exactly.
        """
        if probes is None or self.path is None:
            probing = None if probes is None else (self.coarse, probes)
            return graph.search_graph(query, self.tiles, self.token, k, query_codes, probing)
        return self._neighbours_in_lists(query, k, query_codes, probes)

    def _neighbours_in_lists(self, query: da.Array, k: int, query_codes: da.Array | None,
                             probes: int) -> tuple[da.Array, da.Array]:
        """An approximate search of a stored preparation, its query cells searched in the
        order of their nearest list.

        In the query's own order every block of cells probes nearly every list,
        so every task reads the whole reference. Sorted by nearest list (and the
        lists ordered so that similar ones are neighbours, :func:`fit_coarse`), a
        block's cells probe a few neighbouring lists, and its task reads only
        the tiles holding them. The query is sorted as the reference is
        (:func:`_prepare_in_lists`, in ``query`` beside the preparation), its
        neighbours stored in that order (``found``; both resumable) and returned
        lazily in the query's own order, read from there. The same neighbours,
        each cell's search being its own.
        """
        block = query.chunks[0][0]
        key = {"query": query.name, "codes": None if query_codes is None else query_codes.name,
               "lists": digest(self.coarse)}
        clock = time.perf_counter()
        in_lists = _prepare_in_lists(query, block, query_codes, self.path / "query", key,
                                     self.coarse).tiles.arrays
        log.debug("query cells sorted by nearest list in %.1f s", time.perf_counter() - clock)
        clock = time.perf_counter()
        codes = None if query_codes is None else da.from_zarr(in_lists["codes"])[:, 0]
        indices, similarity = graph.search_graph(
            da.from_zarr(in_lists["values"]), self.tiles, self.token, k, codes,
            (self.coarse, probes))
        found = store_stage(self.path / "found", {"indices": (indices, -1),
                                                  "similarity": (similarity, np.nan)},
                            {**key, "probes": probes, "k": k, "reference": self.token}, {})
        log.debug("searched in %.1f s", time.perf_counter() - clock)
        where = np.empty(query.shape[0], dtype=np.int64)  # each query cell's sorted place
        where[np.asarray(in_lists["rows"][:, 0])] = np.arange(query.shape[0])
        where = da.from_array(where, chunks=(query.chunks[0],))
        return tuple(where.map_blocks(_rows_of, found[name], new_axis=1, dtype=found[name].dtype,
                                      chunks=(query.chunks[0], (k,)))
                     for name in ("indices", "similarity"))

    def choose_probes(self, sample: np.ndarray, k: int, target: float,
                      sample_codes: np.ndarray | None = None) -> Recall:
        """The fewest probes (lists each cell screens) whose recall@k on ``sample``
        reaches ``target``, measured against the exact search of the same cells.

        One exact search of the sample decides it, whatever the probes: an
        approximate search returns the exact top k among the rows of the lists
        it probes (every candidate is ranked by the exact cosine, and a cell the
        screen cannot vouch for is searched exhaustively within those lists), so
        its recall at ``p`` probes is the share of each cell's exact neighbours
        lying in the cell's ``p`` nearest lists — known for every ``p`` at once.
        A cell whose probed lists hold fewer than ``k`` + margin rows is searched
        in every list (recall 1). With cluster codes more cells are (fewer rows
        of the cell's cluster), so the estimate can only be low. All lists
        probed is the exact search: the target is always reached in the end.
        The run then records the recall its own neighbours have
        (:meth:`Recall.measured`).
        """
        clock = time.perf_counter()
        n_lists = len(self.coarse)
        # the sample whole against each part of the reference, one task per core: split
        # by cells, every task would read the whole reference
        (packed,) = cluster.compute(graph.search_in_parts(
            sample, self.tiles.parts(cluster.threads()), k, sample_codes))
        exact = packed[..., 1].astype(np.int64)
        defined = (exact >= 0).any(axis=1)
        # each exact neighbour's list, and that list's place among the cell's nearest
        lists = self.tiles.lists(0, None)
        where = self.tiles.positions(exact[defined])
        neighbour_lists = np.where(where >= 0, lists[np.maximum(where, 0)], -1)
        ranking = kernel.nearest_lists(kernel.normalize_rows(sample[defined]), self.coarse,
                                       n_lists)
        place = np.empty_like(ranking)
        np.put_along_axis(place, ranking, np.arange(n_lists, dtype=ranking.dtype)[None, :],
                          axis=1)
        needed = np.where(neighbour_lists >= 0,
                          np.take_along_axis(place, np.maximum(neighbour_lists, 0), axis=1),
                          n_lists)
        held = np.cumsum(np.bincount(lists, minlength=n_lists)[ranking], axis=1)
        valid = np.maximum((exact[defined] >= 0).sum(axis=1), 1)
        for probes in range(1, n_lists + 1):  # all lists probed: recall 1
            short = held[:, probes - 1] < k + kernel.RERANK_MARGIN
            per_cell = np.where(short, 1.0, (needed < probes).sum(axis=1) / valid)
            mean, interval = _mean_interval(per_cell)
            # the interval's lower end: the target reached on the query, not just on
            # the sample (a mean just over it is under it on other cells half the time)
            if interval[0] >= target:
                break
        return Recall(n_lists, probes, mean, interval, int(defined.sum()), target,
                      time.perf_counter() - clock, exact)

    def remove(self) -> None:
        """Delete a stored preparation (its work is done)."""
        if self.path is not None:
            remove_tree(self.path)


def _rows_of(rows: np.ndarray, array: zarr.Array) -> np.ndarray:
    return array.get_orthogonal_selection((rows, slice(None)))


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per cell, the share of its exact neighbours (``-1`` = none) that ``found`` holds."""
    hits = (exact[:, :, None] == found[:, None, :]).any(axis=2) & (exact >= 0)
    return hits.sum(axis=1) / np.maximum((exact >= 0).sum(axis=1), 1)


#: An exact search projected to take longer than this (seconds) is told about ``approx``.
SLOW_EXACT_S = 1800.0
#: The exact search's time over its products' time at the sgemm rate: the screen's
#: merges, the float64 re-ranking and the reads (10,000 × 200,000 cells, 2,000 genes:
#: 80 s for 8·10¹² flops at 156 GFLOPS).
EXACT_OVERHEAD = 1.5
#: Faster than any CPU this runs on (flops per second): a search projected under
#: SLOW_EXACT_S at this rate is not measured.
FASTEST = 2e12


def exact_seconds(n_query: int, n_reference: int, n_shared: int) -> float:
    """The exact search's projected time on this machine, in seconds.

    Its cost is the products of every query cell with every reference cell on
    the shared genes (2·q·r·g flops), at the float32 matrix-product rate
    measured now on blocks of that width, times :data:`EXACT_OVERHEAD`.
    """
    width = int(min(max(1, n_shared), 2048))
    rng = np.random.default_rng(0)
    a = rng.random((1024, width), dtype=np.float32)
    b = rng.random((width, 2048), dtype=np.float32)
    a @ b  # warm: threads started, pages touched
    start = time.perf_counter()
    a @ b
    rate = 2 * a.shape[0] * b.shape[1] * width / max(time.perf_counter() - start, 1e-9)
    return EXACT_OVERHEAD * 2.0 * n_query * n_reference * max(1, n_shared) / rate


def exact_too_slow(n_query: int, n_reference: int, n_shared: int) -> float | None:
    """:func:`exact_seconds` when over :data:`SLOW_EXACT_S` (measured only when it could
    be), else None."""
    flops = 2.0 * n_query * n_reference * max(1, n_shared)
    if EXACT_OVERHEAD * flops / FASTEST < SLOW_EXACT_S:
        return None
    seconds = exact_seconds(n_query, n_reference, n_shared)
    return seconds if seconds > SLOW_EXACT_S else None


#: The most coarse lists: at a million reference cells, lists of ~2,000 cells.
MAX_LISTS = 512


def n_lists_for(n_reference: int) -> int:
    """Coarse lists for a reference: about √n / 2, at most :data:`MAX_LISTS` (each search
    task loops over the lists of every tile, so they must not get too small)."""
    return int(min(MAX_LISTS, max(1, round(np.sqrt(n_reference) / 2))))


def fit_coarse(reference: da.Array, n_lists: int, seed: int = 0, sample: int | None = None
               ) -> Coarse:
    """Coarse lists of a reference's rows: the centroids, in the full space of the unit
    rows, of a mini-batch k-means (scikit-learn) of a seeded sample's 64 principal
    components (the sample's rows from at least 32 whole blocks drawn at random).

    Cells are assigned and probe in the full space: on clustered counts (300 genes,
    50,000 cells, 112 lists) the lists holding a cell's 25 true neighbours were among
    its 16 nearest for 97 % of them, against 96 % with 64 components and 66 % with 32;
    fitting in 64 components keeps the fit a few seconds. The lists are numbered in
    the order of the leaves of their centroids' average-linkage tree, so that similar
    lists are numbered (and stored) side by side.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA

    g = reference.shape[1]
    sample = sample or max(20_000, 64 * n_lists)  # rows enough for every list's centroid
    rng = np.random.default_rng(seed)
    # whole blocks drawn at random (scattered rows would read every block of the store),
    # at least 32 of them (a reference ordered by cell type is still covered), then rows
    sizes = np.asarray(reference.chunks[0])
    picked = rng.permutation(len(sizes))
    enough = int(np.searchsorted(np.cumsum(sizes[picked]), 2 * sample)) + 1
    picked = np.sort(picked[: min(len(sizes), max(32, enough))])
    rows = np.concatenate([np.arange(sizes[:b].sum(), sizes[: b + 1].sum()) for b in picked])
    rows = np.sort(rng.choice(rows, min(len(rows), sample), replace=False))
    unit = kernel.normalize_rows(np.asarray(reference[rows].compute(), dtype=np.float32))
    n_lists = max(1, min(n_lists, len(np.unique(unit, axis=0))))
    # k-means in 64 principal components (fast), centroids then in the full space
    x = unit if g <= 64 else PCA(n_components=64, svd_solver="randomized",
                                 random_state=seed).fit_transform(unit)
    labels = MiniBatchKMeans(n_clusters=n_lists, random_state=seed, n_init=1,
                             batch_size=4096).fit_predict(x)
    sums = np.zeros((n_lists, g))
    np.add.at(sums, labels, unit)
    counts = np.bincount(labels, minlength=n_lists)
    centroids = (sums[counts > 0] / counts[counts > 0, None]).astype(np.float32)
    if len(centroids) < 3:
        return centroids
    # similar lists numbered side by side (the leaves of their average-linkage tree): the
    # lists a query block probes are then a few runs of tiles (Searcher.neighbours)
    return centroids[leaves_list(linkage(centroids, "average"))]


def prepare(reference: da.Array, tile: int, codes: da.Array | None = None,
            path: Location | None = None, key: dict | None = None,
            coarse: Coarse | None = None) -> Searcher:
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
    coarse
        Coarse lists (:func:`fit_coarse`), for an approximate search: the rows
        are then stored in the order of their nearest list.
    """
    tile = max(1, min(int(tile), reference.shape[0]))
    if coarse is not None:
        return _prepare_in_lists(reference, tile, codes, path, key, coarse)
    arrays = graph.prepared_reference(reference, tile, codes)
    if path is None:
        computed = dask.compute(*arrays.values())
        return Searcher(PreparedTiles(dict(zip(arrays, computed, strict=True)), tile),
                        uuid.uuid4().hex)
    fills = {"values": np.nan, "norms": np.nan, "codes": -1}
    del arrays["unit"]  # normalised as read (PreparedTiles.unit)
    group = store_stage(path, {name: (arr, fills[name]) for name, arr in arrays.items()},
                        {**(key or {}), "tile": tile, "stored": STORED}, {"tile": tile},
                        compressors=COMPRESSORS)
    return Searcher(PreparedTiles.stored(group, tile), dask.base.tokenize(str(path), key, tile),
                    path)


def _prepare_in_lists(reference: da.Array, tile: int, codes: da.Array | None,
                      path: Location | None, key: dict | None, centroids: Coarse) -> Searcher:
    """:func:`prepare` for an approximate search: the rows in the order of their coarse
    list (the original order within a list), so that a list is a contiguous run of rows
    and a tile holds a few whole lists.

    Stored, the reordering is an external bucket sort in one pass over the reference:
    each block is read once, its rows assigned to their nearest list and appended to
    a local file per list (as CSR where that is smaller); the tiles are then filled
    from the lists in order and written. Memory stays two blocks, the rows waiting to
    be written (:data:`_PENDING_BYTES`) and a tile. (On a cluster the blocks are
    computed by the workers and sorted here.)
    """
    reference = reference.rechunk({1: -1})
    n, g = reference.shape
    if path is None:
        values = np.asarray(reference.compute(), dtype=np.float32)
        lists = kernel.nearest_lists(kernel.normalize_rows(values), centroids)[:, 0]
        order = np.argsort(lists, kind="stable")
        arrays = {"values": values[order], "lists": lists[order][:, None],
                  "rows": order[:, None].astype(np.int64)}
        arrays["unit"] = kernel.normalize_rows(arrays["values"])
        arrays["norms"] = kernel.row_norms(arrays["values"])[:, None]
        if codes is not None:
            arrays["codes"] = np.asarray(codes.compute(), dtype=np.int32)[order][:, None]
        return Searcher(PreparedTiles(arrays, tile), uuid.uuid4().hex, coarse=centroids)
    key = {**(key or {}), "tile": tile, "lists": digest(centroids), "stored": STORED}
    token = dask.base.tokenize(str(path), key)
    if (path / "zarr.json").exists():
        group = zarr.open_group(zarr_store(path), mode="r")
        if dict(group.attrs).get("key") == key and group.attrs.get("complete"):
            return Searcher(PreparedTiles.stored(group, tile), token, path, centroids)
    remove_tree(path)
    group = zarr.open_group(zarr_store(path), mode="w")

    def array(name: str, columns: int, dtype: str) -> zarr.Array:
        return group.create_array(name, shape=(n, columns), dtype=dtype,
                                  chunks=(tile, columns), compressors=COMPRESSORS)

    out = {"values": array("values", g, "float32"), "norms": array("norms", 1, "float64")}
    lists = np.empty(n, dtype=np.int32)
    local = None if is_remote(path) else path.parent
    with tempfile.TemporaryDirectory(prefix=".search-buckets-", dir=local) as tmp:
        buckets = Path(tmp)
        starts = np.cumsum((0, *reference.chunks[0]))
        pending: dict[int, list[np.ndarray]] = {}
        held = 0
        for first in range(0, reference.numblocks[0], 2):  # two blocks at a time: two cores
            blocks = dask.compute(*[reference.blocks[j, 0] for j in
                                    range(first, min(first + 2, reference.numblocks[0]))])
            for j, block in enumerate(blocks, start=first):
                block = np.asarray(block, dtype=np.float32)
                lo = starts[j]
                assigned = kernel.nearest_lists(kernel.normalize_rows(block), centroids)[:, 0]
                lists[lo : lo + len(block)] = assigned
                order = np.argsort(assigned, kind="stable")
                bounds = np.searchsorted(assigned[order], np.arange(len(centroids) + 1))
                for c in np.flatnonzero(np.diff(bounds)):
                    pending.setdefault(int(c), []).append(block[order[bounds[c]:bounds[c + 1]]])
                held += block.nbytes
            # a list's rows gathered over blocks, written as one record: a block's
            # rows of one list are a few, and each record costs an opening and a header
            if held >= _PENDING_BYTES or first + 2 >= reference.numblocks[0]:
                for c, parts in pending.items():
                    with open(buckets / f"{c}.rows", "ab") as fh:
                        _write_rows(fh, np.concatenate(parts))
                pending, held = {}, 0
        order = np.argsort(lists, kind="stable")  # each list's rows in original order
        array("lists", 1, "int32")[:] = lists[order][:, None]
        array("rows", 1, "int64")[:] = order[:, None]
        if codes is not None:
            array("codes", 1, "int32")[:] = np.asarray(codes.compute(),
                                                       dtype=np.int32)[order][:, None]
        buffer, filled, lo = np.empty((min(tile, n), g), dtype=np.float32), 0, 0
        in_order = (rows for c in range(len(centroids))
                    for rows in _read_rows(buckets / f"{c}.rows", g))
        for rows in in_order:
            read = 0
            while read < len(rows):
                take = min(len(rows) - read, len(buffer) - filled)
                buffer[filled : filled + take] = rows[read : read + take]
                filled, read = filled + take, read + take
                if filled == len(buffer) or lo + filled == n:
                    values = buffer[:filled]
                    out["values"][lo : lo + filled] = values
                    out["norms"][lo : lo + filled] = kernel.row_norms(values)[:, None]
                    lo, filled = lo + filled, 0
    group.attrs.update({"key": key, "tile": tile, "complete": True})
    return Searcher(PreparedTiles.stored(group, tile), token, path, centroids)


#: Rows of the reference gathered by list before they are written to the list's bucket.
_PENDING_BYTES = 128 * 2**20
#: A bucket record's header: rows, stored entries (-1: dense rows follow).
_RECORD = np.dtype([("rows", "<i8"), ("entries", "<i8")])


def _write_rows(fh, rows: np.ndarray) -> None:
    """Append rows to a bucket file: as CSR when that is smaller (an atlas's rows are
    mostly zeros: a million rows of 5,000 genes are 20 GB dense, ~2 GB as CSR), else
    dense."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nnz = int(np.count_nonzero(rows))
    if 8 * nnz + 8 * len(rows) < rows.nbytes:
        csr = sparse.csr_matrix(rows)
        fh.write(np.array([(len(rows), csr.nnz)], dtype=_RECORD).tobytes())
        for part in (csr.indptr.astype(np.int64), csr.indices.astype(np.int32), csr.data):
            fh.write(part.tobytes())
    else:
        fh.write(np.array([(len(rows), -1)], dtype=_RECORD).tobytes())
        fh.write(rows.tobytes())


def _read_rows(path: Path, g: int) -> Iterator[np.ndarray]:
    """The records of a bucket file (:func:`_write_rows`) in order, as dense rows."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        while header := fh.read(_RECORD.itemsize):
            (n, nnz), = np.frombuffer(header, dtype=_RECORD).tolist()
            if nnz < 0:
                yield np.frombuffer(fh.read(4 * n * g), dtype=np.float32).reshape(n, g)
                continue
            indptr = np.frombuffer(fh.read(8 * (n + 1)), dtype=np.int64)
            indices = np.frombuffer(fh.read(4 * nnz), dtype=np.int32)
            data = np.frombuffer(fh.read(4 * nnz), dtype=np.float32)
            yield sparse.csr_matrix((data, indices, indptr), shape=(n, g)).toarray()


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
