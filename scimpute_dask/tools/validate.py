"""Held-out validation: k-fold cross-validation over the shared genes.

scimpute's own score compares imputed and measured values of the genes that
chose the neighbours, so it is optimistic. The published spatial-imputation
benchmarks (Li et al. 2022; Tangram; SpaGE; stImpute) hold genes out instead:
the shared genes are split into folds; for each fold the neighbours are found
on the other shared genes only, the fold's genes are imputed from the
reference, and the imputed values are scored against the measured ones.

Every fold is the engine's own run on a gene subset: the kNN and imputation
graphs of :mod:`scimpute_dask.engine.graph`, stored to Zarr block by block (resumable), so it
scales like a run. The same pass yields the per-gene *reliability*: the
neighbours' agreement on a gene (:func:`agreement`) is measured on the
held-out genes against their true accuracy, and that calibration turns the
agreement of the genes only the reference has into a predicted accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import zarr
from scipy.stats import spearmanr
from sklearn.isotonic import IsotonicRegression

from scimpute_dask import __version__, plan
from scimpute_dask.config import VALIDATE_OPTIONS, RunConfig, documented, parse_memory
from scimpute_dask.engine import cluster, graph, search, stages
from scimpute_dask.engine.inputs import check_study, study_stores
from scimpute_dask.engine.resumable import digest, is_complete, store_stage
from scimpute_dask.errors import InputError
from scimpute_dask.export.outdir import atomic_file
from scimpute_dask.export.tables import write_manifest
from scimpute_dask.io.layout import RunLayout
from scimpute_dask.io.storage import zarr_store
from scimpute_dask.kernels import ridge
from scimpute_dask.kernels.imputation import neighbour_weights
from scimpute_dask.kernels.metrics import METRICS, paired_scores, summarize
from scimpute_dask.kernels.tuning import gene_folds
from scimpute_dask.plotting.figures import SCORE_PNG, heldout_sparsity_plot
from scimpute_dask.tools import heldout
from scimpute_dask.tools import tune as tuning

log = logging.getLogger("scimpute_dask")

__all__ = ["ValidationResult", "cross_validate", "gene_folds"]


@dataclass
class ValidationResult:
    """Held-out scores and where they were written."""

    outdir: Path
    files: dict[str, Path]
    genes: pd.DataFrame  # per shared gene: fold, sparsity, metrics, agreement
    cells: pd.DataFrame  # per query cell: metrics over its held-out genes
    summary: pd.DataFrame  # level × metric: n, mean, median, q25, q75
    reliability: pd.DataFrame | None  # per reference gene
    timings: dict[str, float] = field(default_factory=dict)
    tuning: dict | None = None  # validate --tune: each fold's chosen setting

    @property
    def mean_gene_scores(self) -> dict[str, float]:
        """Mean over the shared genes of each held-out per-gene metric (Li et al.'s score)."""
        return {m: float(np.nanmean(self.genes[m])) for m in METRICS}

    def __str__(self) -> str:
        s = self.summary.set_index(["level", "metric"])
        lines = [f"Held-out scores of {len(self.genes)} shared genes over {len(self.cells)} "
                 f"query cells (median [quartiles]):"]
        for level in ("gene", "cell"):
            lines.append("  per " + level + ": " + ", ".join(
                f"{m} {s.loc[(level, m), 'median']:.3f} [{s.loc[(level, m), 'q25']:.3f}, "
                f"{s.loc[(level, m), 'q75']:.3f}]" for m in METRICS))
        lines.append("  mean per gene: " + ", ".join(
            f"{m} {v:.3f}" for m, v in self.mean_gene_scores.items()))
        if self.tuning:
            lines.append("  tuned per fold: " + "; ".join(
                f"{f}: {tuning.describe(b)}" for f, b in self.tuning.items()))
        lines += [f"  {name:<12} {path}" for name, path in self.files.items()]
        return "\n".join(lines)


def agreement(sum_m: np.ndarray, sum_m2: np.ndarray, sum_v: np.ndarray, n: np.ndarray
              ) -> np.ndarray:
    """Neighbours' agreement on each gene, from :func:`graph.neighbour_moments`.

    The neighbour values of a gene, pooled over all query cells, have a variance
    that splits into the variance of the cells' imputed means (signal: the
    neighbourhoods differ) and the mean within-neighbourhood variance (noise:
    a cell's neighbours disagree). Agreement is the signal's share, 0..1, an
    intra-class correlation; NaN for a gene the neighbours never express.
    """
    n = np.maximum(np.asarray(n, dtype=np.float64), 1)
    mean = sum_m / n
    signal = np.maximum(sum_m2 / n - mean * mean, 0.0)
    noise = sum_v / n
    total = signal + noise
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, signal / np.where(total > 0, total, 1.0), np.nan)


def calibrate(agree: np.ndarray, score: np.ndarray) -> IsotonicRegression | None:
    """Monotone map from agreement to held-out score, fitted on the shared genes.

    Returns None when fewer than 3 genes have both values.
    """
    ok = np.isfinite(agree) & np.isfinite(score)
    if ok.sum() < 3:
        return None
    return IsotonicRegression(increasing=True, out_of_bounds="clip").fit(agree[ok], score[ok])


@documented(*[o for o in VALIDATE_OPTIONS if o != "consider_clusters"])
def cross_validate(
    query,
    reference,
    outdir: str | os.PathLike = "validation_output",
    *,
    identities=None,
    cell_name_column_idx: int = 0,
    consider_clusters: bool = False,
    k: int = 25,
    folds: int = 5,
    seed: int = 0,
    normalize: str = "none",
    weighting: str = "cosine+1",
    temperature: float = 0.1,
    average: str = "mean",
    blend: float = 1.0,
    ridge_alpha: float = 100.0,
    tune: bool = False,
    tune_metric: str = "pearson",
    tune_cells: int = 10_000,
    reliability: bool = True,
    query_layout: str = "genes_x_cells",
    reference_layout: str = "genes_x_cells",
    memory_limit: int | str | None = None,
    chunk_size: int | None = None,
    plot: bool = True,
    progress: bool = False,
    scheduler: str | None = None,
    client=None,
) -> ValidationResult:
    """k-fold cross-validation of the imputation over the shared genes.

    Parameters
    ----------
    query, reference
        As for :func:`~scimpute_dask.run_imputation` (paths or DataFrames).
    outdir
        Directory for ``genes.tsv``, ``cells.tsv``, ``summary.tsv``,
        ``reliability.tsv``, the plot, ``validate.json`` and the Zarr stores
        (converted inputs and each fold's neighbours and imputation, resumable).
    identities, consider_clusters
        Restrict neighbours to the query cell's cluster, as a run does. The
        clustering must not have used the held-out genes, or it leaks them;
        hence off by default.
    client
        A ``distributed.Client`` to run on instead of ``scheduler``.
    {options}

    Returns
    -------
    ValidationResult
        Per-gene and per-cell scores on the held-out genes (cells without
        expression on some fold's search genes are NaN for that fold's genes
        and left out of the per-gene scores).
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    config = RunConfig.create(
        VALIDATE_OPTIONS, k=k, consider_clusters=consider_clusters,
        cell_name_column_idx=cell_name_column_idx, folds=folds, seed=seed,
        normalize=normalize, weighting=weighting, temperature=temperature, average=average,
        blend=blend, ridge_alpha=ridge_alpha, tune=tune, tune_metric=tune_metric,
        tune_cells=tune_cells, reliability=reliability,
        query_layout=query_layout, reference_layout=reference_layout,
        memory_limit=memory_limit, chunk_size=chunk_size, plot=plot, progress=progress,
        scheduler=scheduler)
    limit = parse_memory(config.memory_limit)
    inputs = check_study(query, reference, identities, config)
    k, folds, options = config.k, config.folds, config.search_settings()
    n_shared = len(inputs.q_cols)
    if not 2 <= folds <= n_shared:
        raise InputError(f"folds must be between 2 and the number of shared genes ({n_shared}), "
                         f"got {folds}")
    outdir = Path(outdir).absolute()
    zarr_dir = RunLayout(outdir).zarr
    q_store, r_store = study_stores(query, reference, outdir, config)
    timings["convert"] = round(time.perf_counter() - clock, 3)
    n_q, n_r = len(inputs.q_cells), len(inputs.r_cells)
    blocks = plan.align_to_store(plan.plan_run(limit, n_q, n_r, n_shared, len(inputs.r_genes),
                                               query_chunk=config.chunk_size, k=config.k),
                                 r_store.chunks)
    fold = gene_folds(n_shared, folds, config.seed)
    # shared genes in fold order: each fold's genes are one column range of the stores
    order = np.argsort(fold, kind="stable")
    bounds = np.searchsorted(fold[order], np.arange(folds + 1))

    with cluster.compute_on(client, config.scheduler, blocks.threads, config.progress):
        clock = time.perf_counter()
        sums = _ModelSums(q_store, r_store, inputs, blocks)

        def searcher(settings: RunConfig) -> _Search:
            return _Search(zarr_dir, q_store, r_store, inputs, blocks, settings.k,
                           settings.search_settings(), settings.consider_clusters, settings.average,
                           settings.model_settings(), sums)

        pair = searcher(config)
        imputed, moments, tuned = [], [], {}
        for f in range(folds):
            test = order[bounds[f]:bounds[f + 1]]
            train = np.sort(order[np.r_[0:bounds[f], bounds[f + 1]:n_shared]])
            log.info("fold %d/%d: %d genes held out", f + 1, folds, len(test))
            fold_search = pair
            if config.tune:
                # nested: the fold's settings are chosen on its training genes alone
                result = tuning.tune_stores(q_store, r_store, inputs, config, genes=train)
                tuned[str(f)] = {**result.best, "inner_score": result.score}
                fold_search = searcher(dataclasses.replace(config, **result.best))
            x, mom = fold_search.impute(f"fold{f}", train, inputs.r_cols[test])
            imputed.append(x)
            moments.append(mom)

        out_of_fold = da.concatenate(imputed, axis=1)
        measured = pair.q_shared[:, order].astype(np.float64)
        agree = agreement(*np.concatenate(dask.compute(*moments), axis=1))
        timings["folds"] = round(time.perf_counter() - clock, 3)

        clock = time.perf_counter()
        cells, genes, sparsity = _score(measured, out_of_fold, n_shared, limit, blocks.threads)
        timings["score"] = round(time.perf_counter() - clock, 3)

        rel = None
        gene_table = pd.DataFrame(genes, columns=METRICS)
        gene_table.insert(0, "gene", inputs.r_genes[inputs.r_cols[order]])
        gene_table.insert(1, "fold", fold[order])
        gene_table.insert(2, "sparsity", sparsity)
        gene_table["agreement"] = agree
        if config.reliability:
            clock = time.perf_counter()
            if config.tune:
                # the setting a run --tune of these inputs would use: tuned on every shared gene
                result = tuning.tune_stores(q_store, r_store, inputs, config)
                tuned["all"] = {**result.best, "inner_score": result.score}
                pair = searcher(dataclasses.replace(config, **result.best))
            rel = _reliability(pair, inputs, gene_table)
            timings["reliability"] = round(time.perf_counter() - clock, 3)

    cell_table = pd.DataFrame(cells, columns=METRICS, index=pd.Index(inputs.q_cells, name="cell"))
    summary = pd.DataFrame([
        {"level": level, "metric": m, **stats}
        for level, table in (("gene", gene_table), ("cell", cell_table))
        for m, stats in summarize(table[list(METRICS)].to_numpy()).items()
    ])
    files = {"genes": outdir / heldout.GENES, "cells": outdir / heldout.CELLS,
             "summary": outdir / heldout.SUMMARY}
    _write_tsv(files["genes"], gene_table, index=False)
    _write_tsv(files["cells"], cell_table, index=True)
    _write_tsv(files["summary"], summary, index=False)
    if rel is not None:
        files["reliability"] = outdir / heldout.RELIABILITY
        _write_tsv(files["reliability"], rel, index=False)
    if config.plot:
        files["plot"] = outdir / SCORE_PNG
        heldout_sparsity_plot(files["plot"], gene_table)
    for stale in {heldout.RELIABILITY, SCORE_PNG} - {p.name for p in files.values()}:
        (outdir / stale).unlink(missing_ok=True)  # from an earlier validation into outdir
    files["manifest"] = outdir / heldout.MANIFEST
    write_manifest(files["manifest"], {
        "scimpute_dask": __version__, "query": inputs.q_label, "reference": inputs.r_label,
        # what a run given this directory (run --validation) checks its inputs against
        "inputs": {"query": q_store.fingerprint, "reference": r_store.fingerprint},
        "parameters": {"k": k, "folds": folds, "seed": config.seed,
                       "consider_clusters": config.consider_clusters, **options,
                       "average": config.average, **config.model_settings(),
                       "tune": config.tune,
                       "chunk_size": blocks.query_chunk, "memory_limit": limit},
        "folds": {str(f): list(gene_table.loc[gene_table["fold"] == f, "gene"])
                  for f in range(folds)},
        **({"tuning": {"metric": config.tune_metric, "chosen": tuned}} if config.tune else {}),
        "timings_s": timings,
    })
    return ValidationResult(outdir, files, gene_table, cell_table, summary, rel, timings,
                            tuned or None)


class _ModelSums:
    """What every fold's linear model is solved from, each computed once, at first use:
    the reference's log1p Gram matrix of all shared genes (whose sub-blocks are every
    fold's normal equations and cross products: a fold's held-out genes are shared genes
    too), the query's per-gene log1p mean and sd, and each reference gene's largest log1p
    value."""

    def __init__(self, q_store, r_store, inputs, blocks) -> None:
        self.q_store, self.r_store, self.inputs, self.blocks = q_store, r_store, inputs, blocks

    @cached_property
    def gram(self) -> ridge.Gram:
        rows = self.r_store.chunks[0]
        (packed,) = cluster.compute(graph.ridge_gram(
            self.r_store.blocks(self.inputs.r_cols, (rows, -1))))
        return ridge.Gram.from_packed(self.r_store.shape[0], packed)

    @cached_property
    def query(self) -> tuple[np.ndarray, np.ndarray]:
        total, squares = cluster.compute(*graph.log1p_sums(
            self.q_store.columns(self.inputs.q_cols, (self.blocks.query_chunk, -1))))
        n = len(self.inputs.q_cells)
        return total / max(1, n), ridge.standard_deviation(n, total, squares)

    @cached_property
    def upper(self) -> np.ndarray:
        return np.log1p(stages.column_max(self.r_store))


class _Search:
    """One dataset pair's kNN-and-impute runs on gene subsets, each stored to Zarr."""

    def __init__(self, zarr_dir, q_store, r_store, inputs, blocks, k, options, clusters,
                 average="mean", model=None, sums: _ModelSums | None = None):
        self.zarr_dir, self.k, self.options, self.blocks = zarr_dir, k, options, blocks
        self.average, self.r_cols, self.sums = average, inputs.r_cols, sums
        self.model = model if model and model["blend"] < 1 else None
        bq, br = blocks.query_chunk, blocks.reference_chunk
        self.q_shared = q_store.columns(inputs.q_cols, (bq, -1))
        self.r_shared = r_store.columns(inputs.r_cols, (br, -1))
        self.reference = r_store.to_dask()
        self.codes = None
        if clusters:
            codes, _ = pd.factorize(np.concatenate([inputs.q_ids, inputs.r_ids]))
            self.codes = (da.from_array(codes[: len(inputs.q_cells)], chunks=bq),
                          da.from_array(codes[len(inputs.q_cells):], chunks=br))
            self.codes_digest = digest(codes)
        self.base_key = {"query": q_store.fingerprint, "reference": r_store.fingerprint, "k": k,
                         "clusters": self.codes_digest if clusters else None,
                         "chunks": [bq, br], **options}

    def neighbours(self, name: str, search_genes: np.ndarray) -> tuple[da.Array, da.Array]:
        """kNN of the query on the shared genes at ``search_genes`` only; stored, resumable.

        The reference is prepared for the search beside the stage (``NAME_search.zarr``)
        and removed once the neighbours are stored.
        """
        path = self.zarr_dir / f"{name}_neighbors.zarr"
        key = {**self.base_key, "search_genes": digest(search_genes)}
        if not is_complete(path, key):
            bs = self.blocks.search_chunk
            q, r = graph.search_space(self.q_shared[:, search_genes].rechunk((bs, -1)),
                                      self.r_shared[:, search_genes],
                                      self.options["normalize"])
            codes = self.codes or (None, None)
            searcher = search.prepare(
                r, self.blocks.reference_chunk, codes[1], self.zarr_dir / f"{name}_search.zarr",
                key)
            idx, sim = searcher.neighbours(q, self.k, codes[0])
            bq = self.blocks.query_chunk
            idx, sim = idx.rechunk((bq, -1)), sim.rechunk((bq, -1))
            w = neighbour_weights(sim, self.options["weighting"], self.options["temperature"])
            store_stage(path, {"indices": (idx, -1), "weights": (w, np.nan)}, key,
                        {"search_genes": search_genes.tolist()})
            searcher.remove()
        group = zarr.open_group(zarr_store(path, True), mode="r")
        return da.from_zarr(group["indices"]), da.from_zarr(group["weights"])

    def impute(self, name: str, search_genes: np.ndarray, reference_genes: np.ndarray
               ) -> tuple[da.Array, tuple]:
        """Impute ``reference_genes`` from neighbours found on ``search_genes``.

        Returns the stored imputation (lazy) and the lazy per-gene neighbour
        moments of those genes (for :func:`agreement`).
        """
        idx, w = self.neighbours(name, search_genes)
        ref = self._reference_genes(reference_genes)
        key = {**self.base_key, "search_genes": digest(search_genes),
               "genes": digest(reference_genes), "gene_chunk": ref.chunks[1][0],
               "average": self.average}
        blend = None
        if self.model is not None and not is_complete(self.zarr_dir / f"{name}_imputed.zarr",
                                                      {**key, **self.model}):
            blend = self.linear_model(search_genes, reference_genes)
        group = store_stage(self.zarr_dir / f"{name}_imputed.zarr",
                            {"X": (graph.impute_graph(idx, w, ref, average=self.average,
                                                      blend=blend), np.nan)},
                            {**key, **(self.model or {})}, {})
        return da.from_zarr(group["X"]), da.stack(graph.neighbour_moments(idx, w, ref))

    def linear_model(self, search_genes: np.ndarray, reference_genes: np.ndarray
                     ) -> graph.Blend:
        """The ridge model of the shared ``reference_genes`` on ``search_genes`` alone (both
        datasets' values of those genes, and the reference's of the genes it predicts),
        solved from the sub-blocks of the one Gram matrix."""
        test = np.searchsorted(self.r_cols, reference_genes)  # positions among the shared
        gram, (mean, sd) = self.sums.gram, self.sums.query
        factor = ridge.factor(gram.subset(search_genes), self.model["ridge_alpha"])
        coef = ridge.coefficients(factor, gram.sum[test], gram.outer[np.ix_(search_genes, test)])
        return graph.Blend(self.model["blend"],
                           graph.ridge_features(self.q_shared[:, search_genes],
                                                mean[search_genes], sd[search_genes]),
                           da.from_array(coef), da.from_array(gram.mean[test]),
                           da.from_array(self.sums.upper[reference_genes]))

    def moments(self, name: str, search_genes: np.ndarray, reference_genes: np.ndarray
                ) -> da.Array:
        """The per-gene neighbour moments of ``reference_genes`` alone: nothing imputed is kept.

        For the reference-only genes, which can be the whole transcriptome.
        """
        idx, w = self.neighbours(name, search_genes)
        return da.stack(graph.neighbour_moments(idx, w, self._reference_genes(reference_genes)))

    def _reference_genes(self, reference_genes: np.ndarray) -> da.Array:
        gb = max(1, min(len(reference_genes), self.blocks.gene_chunk))
        return self.reference[:, reference_genes].rechunk((-1, gb))


def _gene_scores(measured: np.ndarray, imputed: np.ndarray) -> np.ndarray:
    return paired_scores(measured, imputed, axis=0).T


def _score(measured: da.Array, imputed: da.Array, n_genes: int, limit: int, threads: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell (row blocks) and per-gene (whole columns of a gene block) scores."""
    imputed = imputed.rechunk(measured.chunks)
    cells = da.map_blocks(partial(paired_scores, axis=1), measured, imputed,
                          chunks=(measured.chunks[0], (len(METRICS),)), dtype=np.float64)
    valid = da.isfinite(imputed).all(axis=1)
    cells, valid = dask.compute(cells, valid)
    # a column block of all cells, a few float64 copies of it per thread (ranks included)
    n = max(1, int(valid.sum()))
    gb = int(max(1, min(n_genes, plan.available_bytes(limit) // (64 * n * threads))))
    m = measured[valid].rechunk((-1, gb))
    genes = da.map_blocks(_gene_scores, m,
                          imputed[valid].rechunk((-1, gb)),
                          chunks=((len(METRICS),), m.chunks[1]), dtype=np.float64)
    genes, zeros = dask.compute(genes, (m == 0).mean(axis=0))
    return cells, genes.T, zeros


def _reliability(search: _Search, inputs, genes: pd.DataFrame) -> pd.DataFrame:
    """Agreement of every reference gene and its calibrated predicted held-out Pearson."""
    shared = np.zeros(len(inputs.r_genes), dtype=bool)
    shared[inputs.r_cols] = True
    only = np.flatnonzero(~shared)
    agree = np.full(len(inputs.r_genes), np.nan)
    by_gene = genes.set_index("gene")
    agree[inputs.r_cols] = by_gene.loc[inputs.r_genes[inputs.r_cols], "agreement"].to_numpy()
    if len(only):
        moments = search.moments("all", np.arange(len(inputs.q_cols)), only)
        agree[only] = agreement(*moments.compute())
    fit = calibrate(genes["agreement"].to_numpy(), genes["pearson"].to_numpy())
    predicted = np.full(len(agree), np.nan)
    if fit is not None:
        ok = np.isfinite(agree)
        predicted[ok] = fit.predict(agree[ok])
    scored = np.full(len(agree), np.nan)
    scored[inputs.r_cols] = by_gene.loc[inputs.r_genes[inputs.r_cols], "pearson"].to_numpy()
    return pd.DataFrame({"gene": inputs.r_genes, "shared": shared, "agreement": agree,
                         "predicted_pearson": predicted, "heldout_pearson": scored})


def calibration_quality(genes: pd.DataFrame) -> float:
    """Spearman correlation of agreement and held-out Pearson over the shared genes."""
    ok = np.isfinite(genes["agreement"]) & np.isfinite(genes["pearson"])
    return float(spearmanr(genes.loc[ok, "agreement"], genes.loc[ok, "pearson"])[0])


def _write_tsv(path: Path, table: pd.DataFrame, index: bool) -> None:
    with atomic_file(path) as fh:
        table.to_csv(fh, sep="\t", index=index, float_format="%.6g", na_rep="nan")

