"""The run's stages: kNN, imputation and score, each stored resumably or computed blockwise.

Each stage builds its graph (:mod:`.graph`, through the one searcher of
:mod:`.search` for the kNN) and stores it with :func:`.resumable.store_stage`.
No stage holds the reference whole: the kNN reads its prepared tiles one at a
time, the imputation one gene block at a time, and the score reads the
imputation itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from scimpute_dask import plan
from scimpute_dask.config import RunConfig
from scimpute_dask.engine import cluster, graph, search
from scimpute_dask.engine.inputs import RunInputs
from scimpute_dask.engine.resumable import digest, is_complete, names_array, store_stage
from scimpute_dask.io.layout import RunLayout
from scimpute_dask.io.storage import Location, is_remote, remove_tree, zarr_store
from scimpute_dask.io.store import ExpressionStore
from scimpute_dask.kernels import imputation, ridge
from scimpute_dask.kernels.imputation import neighbour_weights
from scimpute_dask.plan import Plan

log = logging.getLogger("scimpute_dask")


# --------------------------------------------------------------------------- #
# The run's stages
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SearchData:
    """The shared genes of both inputs, blocked for the kNN, and the cluster codes."""

    query: da.Array  # query cells × shared genes, (search block, all)
    reference: da.Array  # reference cells × shared genes, (reference tile, all)
    query_codes: da.Array | None
    reference_codes: da.Array | None
    codes_digest: str | None


def search_data(layout: RunLayout, q_store: ExpressionStore, r_store: ExpressionStore,
                inputs: RunInputs, blocks: Plan, clusters: bool) -> SearchData:
    """The kNN's inputs (the reference is prepared in tiles, not searched in these
    blocks); the cluster codes go through Zarr, not embedded in the graph, so that
    nothing large travels via the scheduler."""
    bs, br = blocks.search_chunk, blocks.reference_chunk
    q = q_store.columns(inputs.q_cols, (bs, -1))
    # the reference in whole chunks of its store where they fit: a smaller block decodes
    # its whole store chunk for a part of it
    rows = plan.preparation_rows(blocks, r_store.chunks[0], len(inputs.r_cols))
    r = r_store.columns(inputs.r_cols, (rows, -1))
    if not clusters:
        return SearchData(q, r, None, None, None)
    n_q = len(inputs.q_cells)
    codes, _ = pd.factorize(np.concatenate([inputs.q_ids, inputs.r_ids]))
    stored = zarr.create_array(zarr_store(layout.clusters), shape=codes.shape,
                               dtype="int32", chunks=(max(1, len(codes)),), overwrite=True)
    stored[:] = codes
    return SearchData(q, r, da.from_zarr(stored)[:n_q].rechunk(bs),
                      da.from_zarr(stored)[n_q:].rechunk(br), digest(codes))


#: Query cells on which an approximate search measures its recall.
RECALL_SAMPLE = 1000


def neighbours_stage(layout: RunLayout, data: SearchData, key: dict, inputs: RunInputs,
                     config: RunConfig, blocks: Plan) -> zarr.Group:
    """kNN of every query cell on the shared genes, with its weights, stored resumably.

    The reference is prepared for the search in ``layout.search`` (resumable
    too; keyed by the reference, its genes, the search transform and the
    clusters) and removed once the neighbours are stored. With ``search
    approx`` it is prepared in the order of coarse lists (k-means of its rows),
    and the lists each cell probes are the fewest that reach ``config.recall``
    on a seeded sample of query cells (:meth:`search.Searcher.choose_probes`);
    what was chosen and measured goes to the group's ``search`` attribute.
    """
    path = layout.neighbours
    # an approximate search's stored key adds the lists and probes it chose
    if not is_complete(path, key):
        q, r = graph.search_space(data.query, data.reference, config.normalize)
        prepared_key = {"reference": key["reference"], "genes": digest(inputs.r_cols),
                        "normalize": config.normalize, "clusters": data.codes_digest}
        probes, chosen, stored_key = None, None, key
        if config.search == "approx":
            clock = time.perf_counter()
            coarse = search.fit_coarse(r, search.n_lists_for(r.shape[0]), config.seed)
            log.debug("%d coarse lists fitted in %.1f s", len(coarse),
                      time.perf_counter() - clock)
            clock = time.perf_counter()
            searcher = search.prepare(r, blocks.reference_chunk, data.reference_codes,
                                      layout.search, prepared_key, coarse)
            log.debug("reference prepared in list order in %.1f s", time.perf_counter() - clock)
            cells = np.sort(np.random.default_rng(config.seed).choice(
                q.shape[0], min(q.shape[0], RECALL_SAMPLE), replace=False))
            chosen = searcher.choose_probes(
                np.asarray(q[cells].compute(), dtype=np.float32), config.k, config.recall,
                None if data.query_codes is None else np.asarray(data.query_codes[cells]))
            probes = chosen.probes
            # blocks searched with other lists or probes are never resumed into these
            stored_key = {**key, "lists": digest(coarse), "probes": probes}
            log.info("approximate search: %d of %d coarse lists per cell, recall@%d %.3f "
                     "expected on %d sampled cells (chosen in %.1f s)", chosen.probes,
                     chosen.lists, config.k, chosen.recall, chosen.cells, chosen.seconds)
        else:
            searcher = search.prepare(r, blocks.reference_chunk, data.reference_codes,
                                      layout.search, prepared_key)
        log.debug("reference prepared for the search in %d-cell tiles", blocks.reference_chunk)
        indices, similarity = searcher.neighbours(q, config.k, data.query_codes, probes)
        # stored in the query blocks the imputation and the export read
        bq = blocks.query_chunk
        indices, similarity = indices.rechunk((bq, -1)), similarity.rechunk((bq, -1))
        weights = neighbour_weights(similarity, config.weighting, config.temperature)
        record = {"mode": "exact"} if chosen is None else chosen.record()
        group = store_stage(path, {"indices": (indices, -1), "weights": (weights, np.nan)},
                            stored_key, {"k": config.k, "request": key,
                                         # expected; then what the search measured
                                         "search": record,
                                         "consider_clusters": config.consider_clusters,
                                         "weight": config.weighting})
        if chosen is not None:
            chosen = chosen.measured(group["indices"].get_orthogonal_selection((cells,
                                                                                slice(None))))
            record = chosen.record()
            log.info("approximate search: recall@%d %.3f (95%% CI %.3f–%.3f) on the %d "
                     "sampled cells", config.k, chosen.recall, *chosen.interval, chosen.cells)
            if chosen.recall < config.recall:
                log.warning("approximate search: recall@%d %.3f on the sampled cells is "
                            "below the %.3f asked for", config.k, chosen.recall,
                            config.recall)
        group.attrs["search"] = record
        clock = time.perf_counter()
        searcher.remove()
        log.debug("search preparation removed in %.1f s", time.perf_counter() - clock)
    nbrs = zarr.open_group(zarr_store(path), mode="r+")
    names_array(nbrs, "obs_names", inputs.q_cells)
    names_array(nbrs, "reference_names", inputs.r_cells)  # what the indices point at
    return nbrs


def search_record(layout: RunLayout) -> dict:
    """How the run's neighbours were searched (``run.json``'s ``search``)."""
    nbrs = zarr.open_group(zarr_store(layout.neighbours, True), mode="r")
    return dict(nbrs.attrs.get("search") or {"mode": "exact"})


def imputation_stage(layout: RunLayout, nbrs: zarr.Group, r_store: ExpressionStore,
                     key: dict, inputs: RunInputs, gene_chunk: int, average: str = "mean",
                     genes: np.ndarray | None = None,
                     stores: tuple[Location, Location] | None = None,
                     blend: graph.Blend | None = None) -> zarr.Group:
    """The weighted mean of the neighbours' profiles, stored resumably.

    With ``blend`` (the linear model of every reference gene,
    :func:`linear_model`), each block is blended with the model's prediction
    where its mean is formed (:func:`~scimpute_dask.kernels.ridge.blend`).

    ``genes`` (reference positions, ascending; default: the run's imputed
    genes, :attr:`RunInputs.imputed`) are stored in ``imputed.zarr`` and
    ``imputed_wide.zarr``, or in ``stores``.

    The store ``X`` is float32 — half the disk of float64 — with each value
    chosen to round to 2 decimals as the float64 mean does
    (:func:`~scimpute_dask.kernels.imputation.float32_keeping_text`). A gene
    whose reference values reach ``FLOAT32_TEXT_LIMIT`` (CPM of the most
    expressed genes) cannot be carried so: its nearest float32 stays in ``X``
    and its float64 values go to ``imputed_wide.zarr`` as well (attribute
    ``wide_genes``), from which ``imputation.tsv`` takes them; a weighted mean,
    arithmetic or geometric, never exceeds its largest term, so the reference
    decides. If more than a quarter of the genes are wide, ``X`` is float64.
    """
    n_genes = len(inputs.r_genes)
    genes = inputs.imputed if genes is None else np.asarray(genes, dtype=np.int64)
    imputed_path, wide_path = stores or (layout.imputed, layout.wide)
    subset = {"imputed": digest(genes)} if len(genes) < n_genes else {}
    reference = r_store.gene_blocks(gene_chunk, genes if subset else None)
    wide_all, dtype = imputed_format(nbrs)
    wide = np.flatnonzero(np.isin(genes, wide_all))  # positions among the stored genes
    indices, weights = da.from_zarr(nbrs["indices"]), da.from_zarr(nbrs["weights"])
    imputed = graph.impute_graph(indices, weights, reference, dtype=dtype, average=average,
                                 wide=wide, blend=None if blend is None else blend.genes(genes))
    # scimpute's average and the float64 store keep the key they always had,
    # so older runs still resume
    extra = {} if average == "mean" else {"average": average}
    if blend is not None:
        extra["blend"] = blend.weight
        extra["ridge"] = blend.key
    if dtype == np.float32:
        extra["store"] = "float32"
    attrs = {"format": "scimpute-dask-expression", "fingerprint": {"source": "imputation"},
             "wide_genes": wide.tolist()}
    if len(wide):
        store_stage(wide_path, {"X": (graph.impute_graph(
            indices, weights, r_store.gene_blocks(len(wide), genes[wide]), average=average,
            blend=None if blend is None else blend.genes(genes[wide])),
            np.nan)},
            {**key, **extra, **subset}, {"genes": wide.tolist()})
    out = store_stage(imputed_path, {"X": (imputed, np.nan)},
                      {**key, "genes": gene_chunk, **extra, **subset}, attrs)
    names_array(out, "obs_names", inputs.q_cells)
    names_array(out, "var_names", inputs.r_genes[genes])
    return out


def describe_run(layout: RunLayout, nbrs: zarr.Group, r_store: ExpressionStore,
                 inputs: RunInputs, average: str, q_store: ExpressionStore | None = None,
                 blend: float = 1.0) -> None:
    """Record beside the neighbours what imputing any gene from them takes.

    The reference store (relative to the run's directory when it lies inside,
    so that the output can be moved), the averaging space, the shared genes,
    and the imputed values' format: the wide genes (a reference value of
    ``FLOAT32_TEXT_LIMIT`` or more, stored as their nearest float32 beside
    float64 values) and the dtype (float64 when over a quarter of the genes
    are wide). The imputation stage and :func:`scimpute_dask.read_run` both
    read it. With a ``blend`` below 1, also what its linear model needs: the
    query store and its shared genes, and the model's store.
    """
    if "wide_genes" not in nbrs.attrs:
        # in the store's own chunks: each read once, none held for another task
        wide = wide_genes(r_store)
        dtype = "float32" if 4 * len(wide) <= len(inputs.r_genes) else "float64"
        nbrs.attrs.update({"wide_genes": wide.tolist() if dtype == "float32" else [],
                           "imputed_dtype": dtype})
    model = None
    if blend < 1:
        model = {"weight": blend, "store": _relative(layout, layout.ridge),
                 "query_store": _relative(layout, q_store.path),
                 "query_genes": np.asarray(inputs.q_cols).tolist()}
    nbrs.attrs.update({"reference_store": _relative(layout, r_store.path), "average": average,
                       "shared_genes": np.asarray(inputs.r_cols).tolist(), "blend": model})


def _relative(layout: RunLayout, path: Location) -> str:
    """``path`` relative to the run's directory when it lies inside (the output can then
    be moved), else as it is."""
    if not is_remote(path) and path.is_relative_to(layout.root):
        return path.relative_to(layout.root).as_posix()
    return str(path)


def imputed_format(nbrs: zarr.Group) -> tuple[np.ndarray, type]:
    """The wide genes and the dtype recorded by :func:`describe_run`."""
    return (np.asarray(nbrs.attrs["wide_genes"], dtype=np.int64),
            np.dtype(nbrs.attrs["imputed_dtype"]).type)


def wide_genes(r_store: ExpressionStore) -> np.ndarray:
    """Genes with a reference value of magnitude ``FLOAT32_TEXT_LIMIT`` or more.

    As the conversion recorded them; for a store written without them, read in
    the store's own chunks (each once, none held for another task; a sparse
    store's entries only).
    """
    n, g = r_store.shape
    if not n * g:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(column_max(r_store) >= imputation.FLOAT32_TEXT_LIMIT)


def column_max(r_store: ExpressionStore) -> np.ndarray:
    """Every gene's largest magnitude: as the conversion recorded it, or read for a store
    written without it."""
    largest = r_store.column_max()
    if largest is None:
        (largest,) = cluster.compute(graph.column_max(r_store.in_chunks()))
    return np.asarray(largest, dtype=np.float64)


def ridge_stage(layout: RunLayout, q_store: ExpressionStore, r_store: ExpressionStore,
                inputs: RunInputs, alpha: float, blocks: Plan) -> zarr.Group:
    """A blend's linear model of every reference gene, fitted out of core, stored resumably.

    The ridge regression of :mod:`~scimpute_dask.kernels.ridge`: one pass over
    the reference's shared genes for their Gram matrix, and one reduction over
    the reference's row blocks per block of target genes (a sparse store's
    entries only), each solved with the one factorisation. ``ridge.zarr``
    holds the coefficients (shared genes × reference genes, float64), each
    gene's intercept and largest log1p value, and in its attributes the
    query's per-gene log1p mean and sd (its features are z-scored over its own
    cells).
    """
    path = layout.ridge
    n_ref, n_genes = r_store.shape
    key = {"query": q_store.fingerprint, "reference": r_store.fingerprint,
           "query_genes": digest(inputs.q_cols), "genes": digest(inputs.r_cols),
           "ridge_alpha": alpha}
    if is_complete(path, key):
        return zarr.open_group(zarr_store(path), mode="r")
    clock = time.perf_counter()
    rows = r_store.chunks[0]
    gb = plan.ridge_gene_chunk(blocks, len(inputs.r_cols), rows, n_genes)
    # a sparse reference stays sparse: its entries only, in every sum
    fit = fit_linear_model(r_store.blocks(inputs.r_cols, (rows, -1)),
                           r_store.blocks(np.arange(n_genes), (rows, gb)),
                           q_store.columns(inputs.q_cols, (blocks.query_chunk, -1)),
                           column_max(r_store), alpha)
    group = store_stage(path, {"coef": (fit.coef, np.nan),
                               "intercept": (fit.intercept[None], np.nan),
                               "upper": (fit.upper[None], np.nan)},
                        key, {"ridge_alpha": alpha, "reference_cells": n_ref,
                              "query_mean": fit.query_mean.tolist(),
                              "query_sd": fit.query_sd.tolist()})
    log.debug("linear model fitted in %.1f s", time.perf_counter() - clock)
    return group


@dataclass(frozen=True)
class LinearFit:
    """A linear model's lazy coefficients and the query statistics of its features."""

    coef: da.Array  # (s, n_genes)
    intercept: da.Array  # (n_genes,)
    upper: da.Array  # (n_genes,)
    query_mean: np.ndarray  # (s,)
    query_sd: np.ndarray  # (s,)

    def blend(self, query: da.Array, weight: float, key: dict | None = None) -> graph.Blend:
        """The blend with ``weight`` of the neighbours, for ``query`` (its shared genes)."""
        return graph.Blend(weight, graph.ridge_features(query, self.query_mean, self.query_sd),
                           self.coef, self.intercept, self.upper, key)


def fit_linear_model(features: da.Array, targets: da.Array, query: da.Array,
                     largest: np.ndarray, alpha: float) -> LinearFit:
    """The ridge model of ``targets`` on ``features`` (:mod:`~scimpute_dask.kernels.ridge`).

    The Gram matrix of the reference's features and the query's per-gene
    statistics are computed now (one pass over each); the coefficients stay
    lazy, one reduction over the reference's row blocks per gene block of
    ``targets``.

    Parameters
    ----------
    features
        ``(n_reference, s)`` the reference's shared genes, in row blocks.
    targets
        ``(n_reference, n_genes)`` the genes to model, in the same row blocks
        (dense or CSR).
    query
        ``(n_query, s)`` the query's values of the same shared genes.
    largest
        ``(n_genes,)`` each target gene's largest reference value.
    alpha
        The ridge penalty.
    """
    packed, q_sum, q_squares = cluster.compute(graph.ridge_gram(features),
                                               *graph.log1p_sums(query))
    n_ref, n_q = features.shape[0], query.shape[0]
    factor = ridge.factor(ridge.Gram.from_packed(n_ref, packed), alpha)
    cross = graph.ridge_cross(features, targets)
    upper = da.from_array(np.log1p(np.maximum(np.asarray(largest, np.float64), 0)),
                          chunks=(targets.chunks[1],))
    return LinearFit(graph.ridge_coefficients(cross, factor), cross[0] / max(1, n_ref), upper,
                     q_sum / max(1, n_q), ridge.standard_deviation(n_q, q_sum, q_squares))


def linear_model(path: Location, q_store: ExpressionStore, q_cols: np.ndarray,
                 query_chunk: int, weight: float) -> graph.Blend:
    """The stored linear model (:func:`ridge_stage`) and the query's features, lazily."""
    group = zarr.open_group(zarr_store(path, True), mode="r")
    fit = LinearFit(da.from_zarr(group["coef"]), da.from_zarr(group["intercept"])[0],
                    da.from_zarr(group["upper"])[0],
                    np.asarray(group.attrs["query_mean"], dtype=np.float64),
                    np.asarray(group.attrs["query_sd"], dtype=np.float64))
    return fit.blend(q_store.columns(np.asarray(q_cols), (query_chunk, -1)), weight,
                     dict(group.attrs["key"]))


#: Columns and their float64 values, written in place of those columns' stored values.
Patch = tuple[np.ndarray, np.ndarray]


def imputed_reader(layout: RunLayout
                   ) -> Callable[[int, int], tuple[np.ndarray, Patch | None]]:
    """A reader of rows ``lo:hi`` of the imputation; the stores are opened once.

    It returns the values as stored (float32 or float64) and the patch
    ``(columns, float64 values)`` of the wide genes from ``imputed_wide.zarr``
    (None without wide genes), whose stored float32 values are only the
    nearest float32. Widening and patching are left to the consumer, which can
    do both in one pass over the block.
    """
    group = zarr.open_group(zarr_store(layout.imputed, True), mode="r")
    imputed = group["X"]
    wide = np.asarray(group.attrs.get("wide_genes") or [], dtype=np.int64)
    exact = (zarr.open_group(zarr_store(layout.wide, True), mode="r")["X"]
             if len(wide) else None)

    def rows(lo: int, hi: int) -> tuple[np.ndarray, Patch | None]:
        return imputed[lo:hi], None if exact is None else (wide, exact[lo:hi])

    return rows


def score_stage(layout: RunLayout, nbrs: zarr.Group, r_store: ExpressionStore, key: dict,
                inputs: RunInputs, data: SearchData, blocks: Plan, average: str = "mean",
                blend: graph.Blend | None = None) -> np.ndarray:
    """scimpute's validation score of every query cell (computed, not stored).

    From the stored imputation's shared genes, which round to 2 decimals as the
    float64 weighted means do (the wide genes' float64 values patched in), and
    the measured values: no reference row is read again. When ``--impute-genes``
    left shared genes out, those are imputed first into ``imputed_shared.zarr``,
    removed afterwards.
    """
    imputed_path, wide_path = layout.imputed, layout.wide
    columns = np.searchsorted(inputs.imputed, inputs.r_cols)
    scratch = not np.isin(inputs.r_cols, inputs.imputed).all()
    if scratch:
        imputed_path, wide_path = layout.shared
        imputation_stage(layout, nbrs, r_store, key, inputs, blocks.gene_chunk, average,
                         genes=inputs.r_cols, stores=layout.shared, blend=blend)
        columns = np.arange(len(inputs.r_cols))
    group = zarr.open_group(zarr_store(imputed_path, True), mode="r")
    bq = blocks.query_chunk
    imputed = da.from_zarr(group["X"])[:, columns].rechunk((bq, -1))
    wide = np.asarray(group.attrs.get("wide_genes") or [], dtype=np.int64)
    at = np.flatnonzero(np.isin(columns, wide))
    patch = None
    if len(at):
        exact = zarr.open_group(zarr_store(wide_path, True), mode="r")["X"]
        patch = (at, da.from_zarr(exact)[:, np.searchsorted(wide, columns[at])]
                 .rechunk((bq, -1)))
    (scores,) = cluster.compute(graph.scores_graph(imputed, data.query.rechunk((bq, -1)), patch))
    if scratch:
        for path in layout.shared:
            remove_tree(path)
    return scores
