"""Resumable stages: a stage's Dask arrays stored to Zarr block by block.

Each task writes one block of every array of a stage and then marks the
block done; a rerun with the same key computes only the blocks not marked, a
different key starts the stage over. Workers write the Zarr chunks
themselves, so only the task results the caller computes travel back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import pandas as pd
import zarr

from scimpute_dask.config import RunConfig
from scimpute_dask.engine import cluster, graph
from scimpute_dask.engine.inputs import RunInputs
from scimpute_dask.io.storage import Location, remove_tree, zarr_store
from scimpute_dask.io.store import COMPRESSORS, ExpressionStore, for_writing
from scimpute_dask.kernels import imputation
from scimpute_dask.kernels.imputation import neighbour_weights
from scimpute_dask.plan import Plan


def digest(values: np.ndarray) -> str:
    """A short content hash, for the keys that decide whether a stage can be resumed."""
    return hashlib.sha1(np.ascontiguousarray(values).tobytes()).hexdigest()


def names_array(group: zarr.Group, name: str, names: np.ndarray) -> None:
    """Cell or gene names beside a stage's arrays, as the expression stores keep them."""
    arr = group.create_array(name, shape=(len(names),), dtype=str,
                             chunks=(max(1, len(names)),), overwrite=True)
    arr[:] = np.asarray(names, dtype=str)


def _write_blocks(targets: list[zarr.Array], done: zarr.Array, index: tuple[int, ...],
                  region: tuple[slice, ...], *blocks: np.ndarray) -> None:
    """Write one block of every stage array, then mark it done (after, never before)."""
    for target, block in zip(targets, blocks, strict=True):
        target[region] = block
    done[index] = True


def store_stage(
    path: Location,
    arrays: dict[str, tuple[da.Array, object]],
    key: dict,
    attrs: dict,
) -> zarr.Group:
    """Store a stage's Dask arrays to a Zarr group, block by block, resumably.

    Each task writes one block of every array (Zarr chunks equal the Dask
    chunks, so no two tasks touch the same chunk) and then marks that block in
    a ``done`` array. A rerun with the same ``key`` (inputs and parameters)
    computes only the blocks not marked; a different key starts the stage over.

    Parameters
    ----------
    path
        The stage's Zarr group.
    arrays
        ``name -> (array, fill value)``: 2-D, all with the same row and column blocks.
    key
        What the stage's result depends on.
    attrs
        Extra attributes for the group.
    """
    first = next(iter(arrays.values()))[0]
    group = zarr.open_group(zarr_store(path), mode="a") if (path / "zarr.json").exists() \
        else None
    if group is None or dict(group.attrs).get("key") != key:
        # metadata first: a removal cut short must not leave the old key marked complete
        remove_tree(path)
        group = zarr.open_group(zarr_store(path), mode="w")
        for name, (arr, fill) in arrays.items():
            group.create_array(name, shape=arr.shape, dtype=arr.dtype,
                               chunks=tuple(c[0] for c in arr.chunks), fill_value=fill,
                               compressors=COMPRESSORS)
        group.create_array("done", shape=first.numblocks, dtype=bool, chunks=(1, 1),
                           fill_value=False)
        group.attrs.update({**attrs, "key": key, "complete": False})
    if group.attrs.get("complete"):
        return group
    done = group["done"]
    marked = done[:]
    targets = [for_writing(group[name]) for name in arrays]
    # unoptimised, so that arrays computed from a shared graph share its keys
    delayed = [arr.to_delayed(optimize_graph=False) for arr, _ in arrays.values()]
    offsets = [np.cumsum((0, *c)) for c in first.chunks]
    # One column of blocks at a time: an input shared along the column (the
    # imputation's reference gene block) is read once and released before the
    # next, instead of every column being held at once.
    for column in range(marked.shape[1]):
        tasks = []
        for row in np.flatnonzero(~marked[:, column]):
            index = (int(row), column)
            region = tuple(slice(offsets[d][i], offsets[d][i + 1]) for d, i in enumerate(index))
            blocks = [d[index] for d in delayed]
            tasks.append(dask.delayed(_write_blocks)(targets, done, index, region, *blocks))
        cluster.compute(*tasks)
    group.attrs["complete"] = True
    return group


# --------------------------------------------------------------------------- #
# The run's stages
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SearchData:
    """The shared genes of both inputs, blocked for the kNN, and the cluster codes."""

    query: da.Array  # query cells × shared genes, (query block, all)
    reference: da.Array  # reference cells × shared genes, (reference block, all)
    query_codes: da.Array | None
    reference_codes: da.Array | None
    codes_digest: str | None


def search_data(zarr_dir: Location, q_store: ExpressionStore, r_store: ExpressionStore,
                inputs: RunInputs, blocks: Plan, clusters: bool) -> SearchData:
    """The kNN's inputs; the cluster codes go through Zarr, not embedded in the graph, so that
    nothing large travels via the scheduler."""
    bq, br = blocks.query_chunk, blocks.reference_chunk
    q = q_store.to_dask()[:, inputs.q_cols].rechunk((bq, -1))
    r = r_store.to_dask()[:, inputs.r_cols].rechunk((br, -1))
    if not clusters:
        return SearchData(q, r, None, None, None)
    n_q = len(inputs.q_cells)
    codes, _ = pd.factorize(np.concatenate([inputs.q_ids, inputs.r_ids]))
    stored = zarr.create_array(zarr_store(zarr_dir / "clusters.zarr"), shape=codes.shape,
                               dtype="int32", chunks=(max(1, len(codes)),), overwrite=True)
    stored[:] = codes
    return SearchData(q, r, da.from_zarr(stored)[:n_q].rechunk(bq),
                      da.from_zarr(stored)[n_q:].rechunk(br), digest(codes))


def neighbours_stage(zarr_dir: Location, data: SearchData, key: dict, inputs: RunInputs,
                     config: RunConfig) -> zarr.Group:
    """kNN of every query cell on the shared genes, with its weights, stored resumably."""
    indices, similarity = graph.knn_graph(
        *graph.search_space(data.query, data.reference, config.normalize), config.k,
        data.query_codes, data.reference_codes)
    weights = neighbour_weights(similarity, config.weighting, config.temperature)
    nbrs = store_stage(
        zarr_dir / "neighbors.zarr", {"indices": (indices, -1), "weights": (weights, np.nan)},
        key, {"k": config.k, "consider_clusters": config.consider_clusters,
              "weight": config.weighting})
    names_array(nbrs, "obs_names", inputs.q_cells)
    names_array(nbrs, "reference_names", inputs.r_cells)  # what the indices point at
    return nbrs


#: The imputed values of the genes too large for float32's 2-decimal text, in float64.
WIDE_STORE = "imputed_wide.zarr"


def imputation_stage(zarr_dir: Location, nbrs: zarr.Group, r_store: ExpressionStore,
                     key: dict, inputs: RunInputs, gene_chunk: int, average: str = "mean"
                     ) -> zarr.Group:
    """The weighted mean of the neighbours' profiles, every reference gene, stored resumably.

    The store ``X`` is float32 — half the disk of float64 — with each value
    chosen to round to 2 decimals as the float64 mean does
    (:func:`~scimpute_dask.kernels.imputation.float32_keeping_text`). A gene
    whose reference values reach ``FLOAT32_TEXT_LIMIT`` (CPM of the most
    expressed genes) cannot be carried so: its nearest float32 stays in ``X``
    and its float64 values go to :data:`WIDE_STORE` as well (attribute
    ``wide_genes``), from which ``imputation.tsv`` takes them; a weighted mean,
    arithmetic or geometric, never exceeds its largest term, so the reference
    decides. If more than a quarter of the genes are wide, ``X`` is float64.
    """
    reference = r_store.to_dask((len(inputs.r_cells), gene_chunk))
    wide = wide_genes(reference)
    dtype = np.float32 if 4 * len(wide) <= reference.shape[1] else np.float64
    if dtype == np.float64:
        wide = np.array([], dtype=np.int64)
    indices, weights = da.from_zarr(nbrs["indices"]), da.from_zarr(nbrs["weights"])
    imputed = graph.impute_graph(indices, weights, reference, dtype=dtype, average=average,
                                 wide=wide)
    # scimpute's average and the float64 store keep the key they always had,
    # so older runs still resume
    extra = {} if average == "mean" else {"average": average}
    if dtype == np.float32:
        extra["store"] = "float32"
    attrs = {"format": "scimpute-dask-expression", "fingerprint": {"source": "imputation"},
             "wide_genes": wide.tolist()}
    if len(wide):
        store_stage(zarr_dir / WIDE_STORE, {"X": (graph.impute_graph(
            indices, weights, reference[:, wide].rechunk({1: -1}), average=average), np.nan)},
            {**key, **extra}, {"genes": wide.tolist()})
    out = store_stage(zarr_dir / "imputed.zarr", {"X": (imputed, np.nan)},
                      {**key, "genes": gene_chunk, **extra}, attrs)
    names_array(out, "obs_names", inputs.q_cells)
    names_array(out, "var_names", inputs.r_genes)
    return out


def wide_genes(reference: da.Array) -> np.ndarray:
    """Genes with a reference value of magnitude ``FLOAT32_TEXT_LIMIT`` or more."""
    largest = da.nanmax(abs(reference), axis=0).compute() if reference.size else np.zeros(0)
    return np.flatnonzero(largest >= imputation.FLOAT32_TEXT_LIMIT)


#: Columns and their float64 values, written in place of those columns' stored values.
Patch = tuple[np.ndarray, np.ndarray]


def imputed_reader(zarr_dir: Location
                   ) -> Callable[[int, int], tuple[np.ndarray, Patch | None]]:
    """A reader of rows ``lo:hi`` of the imputation; the stores are opened once.

    It returns the values as stored (float32 or float64) and the patch
    ``(columns, float64 values)`` of the wide genes from :data:`WIDE_STORE`
    (None without wide genes), whose stored float32 values are only the
    nearest float32. Widening and patching are left to the consumer, which can
    do both in one pass over the block.
    """
    group = zarr.open_group(zarr_store(zarr_dir / "imputed.zarr", True), mode="r")
    imputed = group["X"]
    wide = np.asarray(group.attrs.get("wide_genes") or [], dtype=np.int64)
    exact = (zarr.open_group(zarr_store(zarr_dir / WIDE_STORE, True), mode="r")["X"]
             if len(wide) else None)

    def rows(lo: int, hi: int) -> tuple[np.ndarray, Patch | None]:
        return imputed[lo:hi], None if exact is None else (wide, exact[lo:hi])

    return rows


def score_stage(nbrs: zarr.Group, data: SearchData, average: str = "mean") -> np.ndarray:
    """scimpute's validation score of every query cell (computed, not stored)."""
    return graph.scores_graph(da.from_zarr(nbrs["indices"]), da.from_zarr(nbrs["weights"]),
                              data.reference, data.query, average=average).compute()
