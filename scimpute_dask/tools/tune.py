"""Self-tuning: the search and averaging settings chosen by held-out validation on the
shared genes.

Two sections of one assay and two technologies (an in-situ panel against a
SMART-seq or 10x reference) want different neighbour spaces and different
amounts of smoothing; no fixed setting wins both. The shared genes are the
held-out data needed to choose honestly: they are split into folds, and for
each fold the neighbours are found on the other genes and the fold's genes
imputed and scored against their measured values. Each candidate setting's
score is the mean per-gene score over all shared genes, each scored while it
was held out; the best candidate wins.

The search is cheap: one kNN per (fold × search transform) at the largest k;
every smaller k, every weighting and temperature and both averaging spaces
come from the same sorted neighbour lists
(:func:`scimpute_dask.kernels.tuning.prefix_scores`). A large query is tuned
on a seeded subsample of its cells. The tuner is given only the genes it may
use: inside ``validate --tune`` those are each outer fold's training genes,
so the outer scores are honest estimates of the tuned mode.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
import pandas as pd

from scimpute_dask.config import (
    AVERAGES,
    DEFAULT_RIDGE_ALPHA,
    DEFAULT_TEMPERATURE,
    OPTIONS,
    TUNE_METRICS,
    TUNE_OPTIONS,
    RunConfig,
)
from scimpute_dask.engine import cluster, graph, search
from scimpute_dask.engine.inputs import RunInputs, check_study, study_stores
from scimpute_dask.errors import InputError
from scimpute_dask.export.outdir import atomic_file
from scimpute_dask.export.tables import write_manifest
from scimpute_dask.io.storage import Location, location
from scimpute_dask.io.store import ExpressionStore
from scimpute_dask.kernels import ridge
from scimpute_dask.kernels.imputation import neighbour_weights, weighted_mean
from scimpute_dask.kernels.metrics import gene_correlations
from scimpute_dask.kernels.tuning import gene_folds, prefix_scores
from scimpute_dask.plotting.figures import TUNING_PNG, tuning_heatmap

log = logging.getLogger("scimpute_dask")

#: Columns of the tuning table that name a setting.
SETTING = ("normalize", "k", "weighting", "temperature", "average", "blend", "ridge_alpha")


@dataclass(frozen=True)
class Grid:
    """The candidate settings: every combination, in both averaging spaces, is scored.

    Weightings must be positive (``cosine`` is not offered: with centred genes
    a cell's weights can sum to zero). The blends are scored in a second stage,
    at the best neighbour setting of the first, each ``(blend, ridge_alpha)``
    pair on the same inner folds.
    """

    normalizations: tuple[str, ...] = ("none", "scale", "zscore", "log1p")
    ks: tuple[int, ...] = (10, 25, 50, 100, 200, 500)
    weightings: tuple[tuple[str, float], ...] = (
        ("cosine+1", DEFAULT_TEMPERATURE), ("uniform", DEFAULT_TEMPERATURE),
        *(("softmax", t) for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)))
    #: The neighbours' shares of a blend with the linear model, tried at the best
    #: neighbour setting (the neighbours alone, 1, always competes).
    blends: tuple[float, ...] = (0.85, 0.7, 0.5, 0.3)
    ridge_alphas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)


GRID = Grid()


@dataclass
class TuneResult:
    """Every candidate's inner-validation score, and the winner."""

    table: pd.DataFrame  # one row per candidate: SETTING columns, then each metric
    metric: str
    best: dict  # the winning setting (SETTING keys)
    score: float  # its inner-validation score: the expected held-out score
    n_cells: int  # query cells the tuning used
    n_genes: int  # shared genes it scored
    folds: int
    seed: int
    timings: dict[str, float] = field(default_factory=dict)

    def neighbours_only(self) -> TuneResult:
        """The same tuning restricted to the neighbours alone (no blend): its best
        candidate without the linear model, by the same inner folds."""
        table = self.table[~(self.table["blend"] < 1)]
        row = table[self.metric].idxmax() if table[self.metric].notna().any() else table.index[0]
        timings = {**self.timings, "total": round(self.timings.get("total", 0.0)
                                                  - self.timings.get("blend", 0.0), 3)}
        timings.pop("blend", None)
        return dataclasses.replace(self, table=table, best=_setting(table, row),
                                   score=float(table.at[row, self.metric]), timings=timings)

    def record(self) -> dict:
        """What ``run.json`` keeps of a tuning."""
        return {"metric": self.metric, "best": self.best, "expected_score": self.score,
                "cells": self.n_cells, "genes": self.n_genes, "folds": self.folds,
                "seed": self.seed, "timings_s": self.timings}

    def __str__(self) -> str:
        return (f"Tuned on {self.n_genes} shared genes × {self.n_cells} query cells "
                f"({self.folds} gene folds): {describe(self.best)}; expected held-out "
                f"{self.metric} {self.score:.3f} ({len(self.table)} candidates)")


def describe(setting: dict) -> str:
    """``normalize zscore, k 50, softmax T=0.1, average mean``."""
    weight = setting["weighting"] + (f" T={setting['temperature']:g}"
                                     if setting["weighting"] == "softmax" else "")
    text = (f"normalize {setting['normalize']}, k {setting['k']}, {weight}, "
            f"average {setting['average']}")
    if setting.get("blend", 1.0) < 1:
        text += f", blend {setting['blend']:g} (ridge alpha {setting['ridge_alpha']:g})"
    return text


def subsample(n: int, max_cells: int, seed: int) -> np.ndarray:
    """The query cells tuning uses: all of them, or a seeded sorted sample of ``max_cells``."""
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))


def feasible_ks(ks: tuple[int, ...], limit: int) -> np.ndarray:
    """The grid's k values a search can honour (``≤ limit``), and ``limit`` if it cuts any."""
    kept = sorted({k for k in ks if k <= limit} | ({limit} if max(ks) > limit else set()))
    return np.asarray(kept, dtype=np.int64)


def candidate_limit(n_reference: int, query_clusters: np.ndarray | None,
                    reference_clusters: np.ndarray | None) -> int:
    """The largest k every query cell has candidates for (its cluster's reference cells)."""
    if query_clusters is None:
        return n_reference
    counts = pd.Series(reference_clusters).value_counts()
    present = pd.unique(np.asarray(query_clusters))
    return int(min(counts.get(c, 0) for c in present))


def tune(
    query: np.ndarray,
    reference: np.ndarray,
    *,
    query_clusters: np.ndarray | None = None,
    reference_clusters: np.ndarray | None = None,
    metric: str = "pearson",
    folds: int = 5,
    seed: int = 0,
    max_cells: int = 10_000,
    grid: Grid = GRID,
) -> TuneResult:
    """Score every candidate setting by held-out validation on these genes; pick the best.

    Parameters
    ----------
    query, reference
        ``(n_query, g)`` and ``(n_reference, g)``: the values of the genes the
        tuning may use — the shared genes of a run, or a validation fold's
        training genes — in the same column order. Nothing else is seen.
    query_clusters, reference_clusters
        Cluster codes restricting each query cell's neighbours, as in the run.
    metric
        What to maximise: ``"pearson"`` (per-gene Pearson of imputed and measured
        values as given), ``"log_pearson"`` (of their log1p) or ``"css"``.
    folds
        Gene folds of the inner validation.
    seed
        Seed of the gene folds and of the cell subsample.
    max_cells
        Query cells used at most (a seeded subsample beyond).
    grid
        The candidates.
    """
    OPTIONS["tune_metric"].constraint.check(metric, "tune_metric")
    query, reference = np.asarray(query, np.float32), np.asarray(reference, np.float32)
    n_genes = query.shape[1]
    if n_genes < max(2, folds):
        raise InputError(f"tuning needs at least {max(2, folds)} shared genes to hold out in "
                         f"{folds} folds; there are {n_genes}")
    clock = time.perf_counter()
    cells = subsample(len(query), max_cells, seed)
    q = query[cells]
    qc = None if query_clusters is None else np.asarray(query_clusters)[cells]
    limit = candidate_limit(len(reference), qc, reference_clusters)
    ks = feasible_ks(grid.ks, limit)
    fold = gene_folds(n_genes, folds, seed)
    n_w, n_k, n_t = len(grid.weightings), len(ks), len(grid.normalizations)
    scores = {m: np.full((n_t, 2, n_w, n_k, n_genes), np.nan) for m in TUNE_METRICS}
    timings = {"knn": 0.0, "scores": 0.0}
    codes = _codes(qc, reference_clusters)
    for f in range(folds):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        for t, normalize in enumerate(grid.normalizations):
            lap = time.perf_counter()
            indices, similarity = _neighbours(q[:, train], reference[:, train], normalize,
                                              int(ks[-1]), codes)
            timings["knn"] += time.perf_counter() - lap
            lap = time.perf_counter()
            weights = np.stack([neighbour_weights(similarity, w, temp)
                                for w, temp in grid.weightings])
            got = prefix_scores(indices, np.nan_to_num(weights, nan=0.0),
                                reference[:, test], q[:, test], ks)
            for m in TUNE_METRICS:
                scores[m][t][..., test] = got[m]
            timings["scores"] += time.perf_counter() - lap
    table = _table(scores, grid, ks)
    if grid.blends and grid.ridge_alphas and table[metric].notna().any():
        lap = time.perf_counter()
        table = pd.concat([table, _blend_table(
            q, reference, fold, _setting(table, table[metric].idxmax()), codes, grid)],
            ignore_index=True)
        timings["blend"] = time.perf_counter() - lap
    best_row = table[metric].idxmax() if table[metric].notna().any() else 0
    best = _setting(table, best_row)
    timings = {k: round(v, 3) for k, v in timings.items()}
    timings["total"] = round(time.perf_counter() - clock, 3)
    result = TuneResult(table, metric, best, float(table.at[best_row, metric]), len(cells),
                        n_genes, folds, seed, timings)
    log.info("%s", result)
    return result


def tune_stores(q_store: ExpressionStore, r_store: ExpressionStore, inputs: RunInputs,
                config: RunConfig, genes: np.ndarray | None = None, folds: int = 5
                ) -> TuneResult:
    """:func:`tune` on a run's converted inputs: the shared genes (or ``genes``, positions
    among them) of a seeded subsample of query cells, and of every reference cell."""
    genes = np.arange(len(inputs.q_cols)) if genes is None else np.asarray(genes)
    # drawn as tune() draws it, so that tune() keeps every cell read here
    cells = subsample(len(inputs.q_cells), config.tune_cells, config.seed)
    query = q_store.select(cells, inputs.q_cols[genes])
    reference = r_store.select(np.arange(r_store.shape[0]), inputs.r_cols[genes])
    clusters = config.consider_clusters and inputs.q_ids is not None
    return tune(query, reference,
                query_clusters=inputs.q_ids[cells] if clusters else None,
                reference_clusters=inputs.r_ids if clusters else None,
                metric=config.tune_metric, folds=folds, seed=config.seed,
                max_cells=config.tune_cells)


def tune_inputs(query, reference, outdir, identities=None, *, client=None, **options
                ) -> TuneResult:
    """``scimpute-dask tune``: the search alone, on a query and a reference as a run takes them.

    The inputs are converted into ``outdir/zarr`` (reused by a rerun); the
    table of every candidate (``tuning.tsv``), the winner and its expected
    held-out score (``tuning.json``) and the heat map (``tuning.png``) are
    written to ``outdir``. ``options`` are those of
    :data:`~scimpute_dask.config.TUNE_OPTIONS`.
    """
    config = RunConfig.create(TUNE_OPTIONS, **options)
    inputs = check_study(query, reference, identities, config)
    outdir = location(outdir)
    q_store, r_store = study_stores(query, reference, outdir, config)
    with cluster.compute_on(client, config.scheduler, os.cpu_count() or 1, config.progress):
        result = tune_stores(q_store, r_store, inputs, config, folds=config.folds)
    write_table(outdir / "tuning.tsv", result)
    write_manifest(outdir / "tuning.json", {"query": inputs.q_label,
                                            "reference": inputs.r_label, **result.record()})
    tuning_heatmap(outdir / TUNING_PNG, result.table, result.metric, result.best)
    return result


def write_table(path: Location, result: TuneResult) -> None:
    """The tuning table as TSV: one row per candidate, its inner-validation scores."""
    with atomic_file(path) as fh:
        result.table.to_csv(fh, sep="\t", index=False, float_format="%.6g", na_rep="nan")


def _codes(query_clusters, reference_clusters):
    if query_clusters is None:
        return None
    codes, _ = pd.factorize(np.concatenate([query_clusters, reference_clusters]))
    return codes[: len(query_clusters)], codes[len(query_clusters):]


def _neighbours(query: np.ndarray, reference: np.ndarray, normalize: str, k: int, codes
                ) -> tuple[np.ndarray, np.ndarray]:
    """The engine's own exact kNN (the same graph as a run), on arrays in memory.

    The whole reference (up to 65,536 cells) is one tile: the screen streams
    it through a cache-sized sub-tile, so a large tile costs no memory, and
    one tile per query block means no candidate lists to merge at k = 500.
    The result does not depend on tiling.
    """
    bq, br = 1024, 65_536
    q, r = graph.search_space(da.from_array(query, chunks=(bq, -1)),
                              da.from_array(reference, chunks=(br, -1)), normalize)
    qc = rc = None
    if codes is not None:
        qc, rc = da.from_array(codes[0], chunks=bq), da.from_array(codes[1], chunks=br)
    with cluster.local_threads(os.cpu_count() or 1):
        indices, similarity = dask.compute(*search.knn(q, r, k, qc, rc))
    return np.asarray(indices, np.int64), np.asarray(similarity, np.float64)


def _setting(table: pd.DataFrame, row) -> dict:
    """A row's setting as run options (the neighbours alone keep the default penalty)."""
    setting = {c: _plain(table.at[row, c]) for c in SETTING}
    if not setting["blend"] < 1:
        setting["ridge_alpha"] = DEFAULT_RIDGE_ALPHA
    return setting


def _blend_table(query: np.ndarray, reference: np.ndarray, fold: np.ndarray, best: dict,
                 codes, grid: Grid) -> pd.DataFrame:
    """Every (blend, ridge_alpha) at the neighbour setting ``best``, on the same inner folds.

    Each fold's genes are imputed from neighbours found on the others and from the
    ridge model of them on the others: one pass over the reference gives the log1p
    Gram matrix of all these genes, whose sub-blocks are every fold's model
    (:mod:`~scimpute_dask.kernels.ridge`). The query is z-scored over its own
    cells, as in a run.
    """
    gram = ridge.Gram.of(reference)
    upper = np.log1p(np.maximum(reference.max(axis=0), 0).astype(np.float64))
    n_q = len(query)
    lq = ridge.log1p_dense(query)
    q_mean = lq.sum(axis=0) / max(1, n_q)
    q_sd = ridge.standard_deviation(n_q, lq.sum(axis=0), (lq * lq).sum(axis=0))
    n_b, n_a, n_genes = len(grid.blends), len(grid.ridge_alphas), query.shape[1]
    scores = {m: np.full((n_b, n_a, n_genes), np.nan) for m in TUNE_METRICS}
    for f in range(int(fold.max()) + 1):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        indices, similarity = _neighbours(query[:, train], reference[:, train],
                                          best["normalize"], int(best["k"]), codes)
        weights = neighbour_weights(similarity, best["weighting"], best["temperature"])
        knn = weighted_mean(indices, np.nan_to_num(weights, nan=0.0), reference[:, test],
                            average=best["average"])
        defined = indices[:, 0] >= 0
        z = ridge.zscore_log1p(query[defined][:, train], q_mean[train], q_sd[train])
        measured = query[defined][:, test]
        sub = gram.subset(train)
        for j, alpha in enumerate(grid.ridge_alphas):
            coef = ridge.coefficients(ridge.factor(sub, alpha), gram.sum[test],
                                      gram.outer[np.ix_(train, test)])
            predicted = ridge.predict(z, coef, gram.mean[test], upper[test])
            for i, a in enumerate(grid.blends):
                got = gene_correlations(measured, ridge.blend(knn[defined], predicted, a))
                for m in TUNE_METRICS:
                    scores[m][i, j, test] = got[m]
    rows = []
    for i, a in enumerate(grid.blends):
        for j, alpha in enumerate(grid.ridge_alphas):
            row = {**best, "blend": float(a), "ridge_alpha": float(alpha)}
            for m in TUNE_METRICS:
                per_gene = scores[m][i, j]
                row[m] = float(np.nanmean(per_gene)) if np.isfinite(per_gene).any() else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _table(scores: dict[str, np.ndarray], grid: Grid, ks: np.ndarray) -> pd.DataFrame:
    rows = []
    for t, normalize in enumerate(grid.normalizations):
        for a, average in enumerate(AVERAGES):  # prefix_scores' axis 0
            for w, (weighting, temperature) in enumerate(grid.weightings):
                for j, k in enumerate(ks):
                    row = {"normalize": normalize, "k": int(k), "weighting": weighting,
                           "temperature": float(temperature), "average": average,
                           "blend": 1.0, "ridge_alpha": np.nan}
                    for m in TUNE_METRICS:
                        per_gene = scores[m][t, a, w, j]
                        row[m] = float(np.nanmean(per_gene)) if np.isfinite(per_gene).any() \
                            else np.nan
                    rows.append(row)
    return pd.DataFrame(rows)


def _plain(value):
    """NumPy scalars as Python ones, for JSON and RunConfig."""
    return value.item() if hasattr(value, "item") else value
