"""The whole run, stage by stage: check → convert → kNN → impute → score → export.

Data flows one way. The settings are validated (:mod:`.config`), every
name-level check runs (:mod:`.engine.inputs`, on names read without parsing
values), inputs become Zarr stores (:mod:`.io`), the stages of
:mod:`.engine.stages` store their Dask graphs to Zarr block by block on the
scheduler :mod:`.engine.cluster` chooses, and :mod:`.export` streams the
scimpute files from those stores. The run is assembled in a hidden sibling of
the output directory, resumable there, and moved into place only when
complete (on an object store: marked complete by its ``run.json``, written
last; see :mod:`.export.outdir`). The output and its stores may live on any
fsspec URL (``s3://…``), which Dask workers then read and write themselves;
only the per-cell scores come back to the client.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from scimpute_dask import __version__, plan
from scimpute_dask.config import RUN_OPTIONS, RunConfig, documented, parse_memory
from scimpute_dask.engine import cluster, search, stages
from scimpute_dask.engine.inputs import RunInputs, check_inputs, store_for
from scimpute_dask.errors import InputError
from scimpute_dask.export import outdir as out
from scimpute_dask.export import provenance, tables
from scimpute_dask.export.adata import write_anndata
from scimpute_dask.io import anndata_io, spatialdata_io, xenium
from scimpute_dask.io.layout import ANNDATA, RESUMABLE, ZARR, RunLayout
from scimpute_dask.io.registry import as_source
from scimpute_dask.io.storage import Location, is_remote, location, remove_tree
from scimpute_dask.io.store import ExpressionStore
from scimpute_dask.kernels.scoring import summary_stats
from scimpute_dask.plotting import figures
from scimpute_dask.plotting.report import REPORT, write_report
from scimpute_dask.tools import heldout
from scimpute_dask.tools import tune as tuning

log = logging.getLogger("scimpute_dask")

#: Stores of the work directory that a rerun resumes rather than rebuilds.

#: Every name a run can write into its output directory.
OUTPUT_NAMES = frozenset({
    "imputation.tsv", "imputations", "sim_matrix.tsv", "scores.txt", "stats.txt",
    tables.HISTOGRAM, "unimputable_cells.txt", ZARR, ANNDATA, "imputed.h5ad", REPORT,
    figures.SHARED_PNG, figures.IMPUTED_PNG, out.MANIFEST, heldout.RELIABILITY,
    figures.SCORE_PNG, figures.TUNING_PNG, "tuning.tsv",
})
#: The tuning table of a run with ``tune``.
TUNING = "tuning.tsv"

#: The settings ``run.json`` (and ``uns["scimpute"]``) records, planned block sizes included.
RECORDED = ("k", "consider_clusters", "search", "recall", "chunk_size", "memory_limit",
            "threads",
            "reference_chunk_size", "gene_chunk_size", "save_chunks", "normalize",
            "weighting", "temperature", "average", "blend", "ridge_alpha", "tune",
            "impute_genes", "tsv_genes",
            "layer",
            "reference_layer", "table",
            "cluster_key", "coords", "validation")


@dataclass
class RunResult:
    """What a run produced and where; ``str()`` gives a human summary."""

    outdir: Location
    files: dict[str, Location]
    n_query: int
    n_reference: int
    n_genes: int
    n_shared: int
    unimputable: list[str]
    stats: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    n_imputed: int | None = None  # genes stored (--impute-genes); None: all of them

    def __str__(self) -> str:
        stored = self.n_genes if self.n_imputed is None else self.n_imputed
        lines = [
            f"Imputed {stored} of {self.n_genes} genes" if stored < self.n_genes
            else f"Imputed {self.n_genes} genes",
        ]
        lines[0] += (f" for {self.n_query} query cells from {self.n_reference} reference cells "
                     f"({self.n_shared} shared genes).")
        if stored < self.n_genes:
            lines.append(f"read_run('{self.outdir}') imputes any other gene on demand.")
        if self.unimputable:
            lines.append(
                f"{len(self.unimputable)} query cells have no shared-gene expression and were "
                f"left NaN (listed in {self.files['unimputable']})."
            )
        lines += [f"  {name:<12} {path}" for name, path in self.files.items()]
        return "\n".join(lines)


class _Clock:
    """Each stage's wall time, for ``run.json`` and ``--verbose``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._last, 3)
        log.debug("%s took %.2f s", stage, self.timings[stage])
        self._last = now


@documented(*[o for o in RUN_OPTIONS if o != "cell_name_column_idx"])
def run_imputation(
    query,
    reference,
    identities=None,
    cell_name_column_idx: int = 0,
    outdir: str | os.PathLike = "imputation_output",
    *,
    k: int = 25,
    consider_clusters: bool = True,
    chunk_size: int | None = None,
    save_chunks: bool = False,
    memory_limit: int | str | None = None,
    query_layout: str = "genes_x_cells",
    reference_layout: str = "genes_x_cells",
    reference_chunk_size: int | None = None,
    gene_chunk_size: int | None = None,
    impute_genes: str | list[str] = "all",
    tsv_genes: str | list[str] | None = "all",
    h5ad: bool = False,
    restart: bool = False,
    progress: bool = False,
    scheduler: str | None = None,
    client=None,
    layer: str | None = None,
    reference_layer: str | None = None,
    table: str | None = None,
    cluster_key: str | None = None,
    coords: str | os.PathLike | None = None,
    anndata: bool | None = None,
    report: bool = True,
    plot_genes: list[str] | None = None,
    search: str = "exact",
    recall: float = 0.95,
    normalize: str = "none",
    weighting: str = "cosine+1",
    temperature: float = 0.1,
    average: str = "mean",
    blend: float = 1.0,
    ridge_alpha: float = 100.0,
    tune: bool = False,
    tune_metric: str = "pearson",
    tune_cells: int = 10_000,
    seed: int = 0,
    validation: str | os.PathLike | None = None,
) -> RunResult:
    """Impute every reference gene for every query cell, out of core.

    Every option is validated (:class:`~scimpute_dask.config.RunConfig`)
    and every input checked by name before any work; a rerun into the same
    ``outdir`` resumes what an interrupted run left.

    Parameters
    ----------
    query, reference
        Paths (TSV/CSV, plain or compressed; ``.h5ad``; AnnData-Zarr; 10x
        directory or ``.h5``; Xenium bundle; SpatialData store;
        scimpute-dask ``.zarr``), DataFrames (cells × genes) or AnnData
        objects of the spatial query and the single-cell reference.
        Text files and stores may also be fsspec URLs (``s3://…``).
    identities
        scimpute's cell identity table (path or DataFrame). Required when
        ``consider_clusters`` (unless ``cluster_key``); otherwise optional,
        used for the ``cluster`` column of ``sim_matrix.tsv``.
    cell_name_column_idx
        0-based position of the cell-name column of ``identities``.
    outdir
        Output directory, a local path or an fsspec URL (``s3://bucket/run``).
        Replaced as a whole when the run completes, and only if it is empty
        or holds a previous scimpute-dask output.
    client
        A ``distributed.Client`` to run on instead of ``scheduler``.
    {options}

    Returns
    -------
    RunResult
    """
    config = RunConfig.create(
        k=k, consider_clusters=consider_clusters, cell_name_column_idx=cell_name_column_idx,
        chunk_size=chunk_size, save_chunks=save_chunks, memory_limit=memory_limit,
        query_layout=query_layout, reference_layout=reference_layout,
        reference_chunk_size=reference_chunk_size, gene_chunk_size=gene_chunk_size,
        impute_genes=impute_genes, tsv_genes=tsv_genes, h5ad=h5ad, restart=restart,
        progress=progress,
        scheduler=scheduler, layer=layer, reference_layer=reference_layer, table=table,
        cluster_key=cluster_key, coords=coords, anndata=anndata, report=report,
        plot_genes=plot_genes, search=search, recall=recall, normalize=normalize,
        weighting=weighting,
        temperature=temperature, average=average, blend=blend, ridge_alpha=ridge_alpha,
        tune=tune, tune_metric=tune_metric, tune_cells=tune_cells, seed=seed,
        validation=validation)
    return run(query, reference, identities, outdir, config, client=client)


@dataclass
class _Checked:
    """What the check stage settled, before any value is parsed."""

    outdir: Location
    work: Location
    limit: int
    inputs: RunInputs
    layers: tuple[str | None, str | None]
    obs: object  # the query's obs (DataFrame) and obsm for the AnnData outputs
    obsm: dict
    held: heldout.HeldOut | None
    checksums: object  # Future of the inputs' checksums for run.json
    write_adata: bool
    exact_s: float | None = None  # the exact search's projected time, when slow


def run(query, reference, identities, outdir, config: RunConfig, *, client=None) -> RunResult:
    """:func:`run_imputation` on validated settings: check, then the stages in a work directory.

    A run that this call started and that fails on a bad input value leaves no
    work directory behind; an interrupted one (killed, or a failing cluster) keeps
    it, to resume.
    """
    clock = _Clock()
    query = spatialdata_io.resolve(query, config.table)
    reference = spatialdata_io.resolve(reference)
    checked = _check(query, reference, identities, outdir, config)
    clock.lap("check")
    fresh = not checked.work.exists()
    try:
        return _stages(query, reference, config, checked, clock, client)
    except InputError:
        # a bad value found while converting: nothing of this run is worth resuming
        if fresh and not is_remote(checked.work):
            remove_tree(checked.work)
        raise


def _check(query, reference, identities, outdir, config: RunConfig) -> _Checked:
    """1. Every check, in seconds, before any value is parsed or any output exists."""
    write_adata = anndata_io.is_anndata(query) if config.anndata is None else config.anndata
    if (config.h5ad or write_adata) and importlib.util.find_spec("anndata") is None:
        raise InputError("AnnData output needs anndata: pip install 'scimpute-dask[h5ad]'")
    outdir = location(outdir)
    out.check_output_dir(outdir, OUTPUT_NAMES)
    inputs = check_inputs(query, reference, identities, config)
    layers = (config.layer, config.reference_layer if config.reference_layer is not None
              else config.layer)
    obs, obsm = anndata_io.query_annotations(query, inputs.q_cells, config.coords)
    if config.coords is None and xenium.is_xenium(as_source(query)):
        xy = xenium.read_coordinates(as_source(query), inputs.q_cells, inputs.q_label)
        if xy is not None:  # the bundle's cell centroids
            obsm["spatial"] = xy
    held = None if config.validation is None else heldout.load(
        config.validation, {"query": (query, config.query_layout, layers[0]),
                            "reference": (reference, config.reference_layout, layers[1])},
        {"query": inputs.q_label, "reference": inputs.r_label}, inputs.q_cells,
        inputs.r_genes, inputs.measured,
        {"k": config.k, **config.search_settings(), "average": config.average,
         **config.model_settings()})
    exact_s = None
    if config.search == "exact":
        exact_s = search.exact_too_slow(len(inputs.q_cells), len(inputs.r_cells),
                                        len(inputs.q_cols))
        if exact_s is not None:
            log.warning("the exact search of %d query × %d reference cells on %d genes is "
                        "projected at %.0f minutes on this machine; --search approx ranks "
                        "the same candidates exactly, probing only the lists that reach "
                        "--recall (measured on the data), in a fraction of it",
                        len(inputs.q_cells), len(inputs.r_cells), len(inputs.q_cols),
                        exact_s / 60)
    checksums = provenance.checksums({"query": query, "reference": reference,
                                      "identities": identities, "coords": config.coords})
    return _Checked(outdir, out.work_dir_for(outdir), parse_memory(config.memory_limit),
                    inputs, layers, obs, obsm, held, checksums, write_adata, exact_s)


def _stages(query, reference, config: RunConfig, checked: _Checked, clock: _Clock,
            client) -> RunResult:
    """2–6: convert, (tune,) kNN, impute, score, export and report, each a function that
    returns what the next needs; in the work directory, published at the end."""
    outdir, work, inputs = checked.outdir, checked.work, checked.inputs
    with out.exclusive(work):
        q_store, r_store = _convert(query, reference, config, checked)
        clock.lap("convert")
        tuned = None
        if config.tune:
            # settings chosen on the shared genes alone, each scored while held out
            tuned = tuning.tune_stores(q_store, r_store, inputs, config)
            config = dataclasses.replace(config, **tuned.best)
            clock.lap("tune")
        blocks = _plan(checked.limit, inputs, config, r_store)
        with cluster.compute_on(client, config.scheduler, blocks.threads, config.progress):
            scores = _compute(RunLayout(work), q_store, r_store, inputs, config, blocks, clock)
        files, record = _export(work, inputs, config, checked, blocks, scores, tuned,
                                clock.timings)
        clock.lap("export")
        if config.report:
            _report(work, files, record, q_store, r_store, config, checked, blocks, tuned)
            clock.lap("figures")
        _finish(record, out.outputs(work))
        log.debug("timings (s): %s; peak memory (MiB): %s", clock.timings,
                  record["peak_memory_mib"])
        tables.write_manifest(work / out.MANIFEST, record)
        out.publish(work, outdir)
    files = {name: outdir / path.relative_to(work).as_posix()
             for name, path in files.items()}
    return RunResult(outdir, files, len(inputs.q_cells), len(inputs.r_cells),
                     len(inputs.r_genes), len(inputs.q_cols),
                     list(inputs.q_cells[np.isnan(scores)]), record["stats"], clock.timings,
                     len(inputs.imputed))


def _convert(query, reference, config: RunConfig, checked: _Checked
             ) -> tuple[ExpressionStore, ExpressionStore]:
    """2. Inputs to Zarr (checks every value; resumes or reuses finished conversions)."""
    outdir, work, limit, layers = checked.outdir, checked.work, checked.limit, checked.layers
    finished = out.is_finished(outdir)
    out.clear_work_dir(work, keep=set() if config.restart else set(RESUMABLE))
    q_store = store_for(query, "query", work, outdir, config.query_layout, config.restart,
                        config.progress, limit, layers[0], finished)
    r_store = store_for(reference, "reference", work, outdir, config.reference_layout,
                        config.restart, config.progress, limit, layers[1], finished)
    return q_store, r_store


def _compute(layout: RunLayout, q_store: ExpressionStore, r_store: ExpressionStore,
             inputs: RunInputs, config: RunConfig, blocks: plan.Plan, clock: _Clock
             ) -> np.ndarray:
    """3–5: kNN, imputation and score on the current scheduler; returns the scores."""
    data = stages.search_data(layout, q_store, r_store, inputs, blocks,
                              config.consider_clusters)
    key = {"query": q_store.fingerprint, "reference": r_store.fingerprint,
           "k": config.k, "clusters": data.codes_digest,
           "chunks": [blocks.query_chunk, blocks.reference_chunk], **config.search_settings()}
    if config.search == "approx":  # exact keeps the key it always had: older runs resume
        key.update({"search": "approx", "recall": config.recall, "seed": config.seed})
    # 3. kNN on the shared genes.
    log.info("finding %d nearest neighbours of %d query cells", config.k, len(inputs.q_cells))
    nbrs = stages.neighbours_stage(layout, data, key, inputs, config, blocks)
    stages.describe_run(layout, nbrs, r_store, inputs, config.average, q_store, config.blend)
    clock.lap("knn")
    blend = None
    if config.blend < 1:
        log.info("fitting the linear model of %d genes on %d shared genes (ridge alpha %g)",
                 len(inputs.r_genes), len(inputs.r_cols), config.ridge_alpha)
        stages.ridge_stage(layout, q_store, r_store, inputs, config.ridge_alpha, blocks)
        blend = stages.linear_model(layout.ridge, q_store, inputs.q_cols, blocks.query_chunk,
                                    config.blend)
        clock.lap("ridge")
    else:
        remove_tree(layout.ridge)
    # 4. Imputation of the chosen reference genes, streamed to Zarr.
    if len(inputs.imputed):
        log.info("imputing %d genes", len(inputs.imputed))
        stages.imputation_stage(layout, nbrs, r_store, key, inputs, blocks.gene_chunk,
                                config.average, blend=blend)
    else:  # only the neighbours are kept: read_run() imputes on demand
        remove_tree(layout.imputed)
        remove_tree(layout.wide)
    clock.lap("impute")
    # 5. scimpute's validation score per query cell.
    log.info("scoring %d query cells", len(inputs.q_cells))
    scores = stages.score_stage(layout, nbrs, r_store, key, inputs, data, blocks,
                                config.average, blend)
    clock.lap("score")
    return scores


def _export(work: Location, inputs: RunInputs, config: RunConfig, checked: _Checked,
            blocks: plan.Plan, scores: np.ndarray, tuned, timings: dict
            ) -> tuple[dict[str, Location], dict]:
    """6. scimpute's files and the AnnData, streamed from the stores; the run's record
    (whose ``timings_s`` is ``timings``, filled in as the run goes on)."""
    log.info("exporting the tables")
    held = checked.held
    stats = summary_stats(scores)
    files = tables.write_run_tables(work, inputs, blocks.query_chunk, config.save_chunks,
                                    scores, stats, blocks.threads)
    parameters = _recorded(config, blocks, checked.limit, held)
    if tuned is not None:
        files["tuning"] = work / TUNING
        tuning.write_table(files["tuning"], tuned)
    if held is not None:
        files["reliability"] = work / heldout.RELIABILITY
        with out.atomic_file(files["reliability"], "wb") as fh:
            fh.write((held.directory / heldout.RELIABILITY).read_bytes())
    if config.h5ad or checked.write_adata:
        # h5py files cannot travel to workers: written from this process
        with cluster.local_threads(blocks.threads, config.progress):
            files.update(write_anndata(
                work, inputs, checked.obs, checked.obsm, scores, stats, parameters,
                config.h5ad, checked.write_adata, None if held is None else held.reliability))
    record = _record(inputs, parameters, scores, stats, timings, checked.checksums)
    record["search"] = stages.search_record(RunLayout(work))
    if checked.exact_s is not None:
        record["search"]["exact_projected_s"] = round(checked.exact_s, 1)
    if tuned is not None:
        record["tuning"] = tuned.record()
    return files, record


def _report(work: Location, files: dict[str, Location], record: dict,
            q_store: ExpressionStore, r_store: ExpressionStore, config: RunConfig,
            checked: _Checked, blocks: plan.Plan, tuned) -> None:
    """The figures and ``report.html`` (added to ``files``)."""
    held = checked.held
    with cluster.local_threads(blocks.threads, False):
        drawn = figures.run_figures(
            work, files, checked.obsm.get("spatial"), q_store, r_store, checked.inputs,
            _plot_genes(config.plot_genes), None if held is None else held.genes)
        if tuned is not None:
            files["tuning_plot"] = work / figures.TUNING_PNG
            figures.tuning_heatmap(files["tuning_plot"], tuned.table, tuned.metric, tuned.best)
            drawn.append((figures.TUNING_PNG, f"Inner-validation {tuned.metric} of "
                          f"every candidate setting (the winner outlined)"))
    files["report"] = work / REPORT
    write_report(files["report"], _finish(record, sorted(
        [*out.outputs(work), REPORT, out.MANIFEST])), drawn,
        None if held is None else held.summary)


# --------------------------------------------------------------------------- #
# Helpers of the run
# --------------------------------------------------------------------------- #
def _plan(limit: int, inputs: RunInputs, config: RunConfig, r_store: ExpressionStore
          ) -> plan.Plan:
    blocks = plan.plan_run(limit, len(inputs.q_cells), len(inputs.r_cells),
                           len(inputs.q_cols), len(inputs.r_genes),
                           query_chunk=config.chunk_size,
                           reference_chunk=config.reference_chunk_size,
                           gene_chunk=config.gene_chunk_size, k=config.k,
                           density=r_store.density,
                           linear=len(inputs.q_cols) if config.blend < 1 else 0)
    blocks = plan.align_to_store(blocks, r_store.chunks)
    log.debug("block sizes: %s", blocks)
    return blocks


def _plot_genes(plot_genes) -> list[str] | None:
    return [] if plot_genes == "none" else plot_genes


def _recorded(config: RunConfig, blocks: plan.Plan, limit: int, held) -> dict:
    """The settings as run.json records them: the planned blocks in place of the overrides."""
    planned = {"chunk_size": blocks.query_chunk, "memory_limit": limit,
               "threads": blocks.threads, "reference_chunk_size": blocks.reference_chunk,
               "gene_chunk_size": blocks.gene_chunk,
               "validation": None if held is None else str(held.directory)}
    given = config.record([n for n in RECORDED if n not in planned])
    return {name: planned[name] if name in planned else given[name] for name in RECORDED
            if name != "validation" or held is not None}


def _record(inputs: RunInputs, parameters: dict, scores: np.ndarray, stats: dict,
            timings: dict, checksums) -> dict:
    return {
        "scimpute_dask": __version__,
        "query": inputs.q_label, "reference": inputs.r_label,
        "identities": inputs.table_label,
        "parameters": parameters,
        "shape": {"query_cells": len(inputs.q_cells),
                  "reference_cells": len(inputs.r_cells),
                  "reference_genes": len(inputs.r_genes),
                  "shared_genes": len(inputs.q_cols)},
        "unimputable_cells": int(np.isnan(scores).sum()),
        "stats": stats,
        "timings_s": timings,
        "versions": provenance.versions(),
        "input_checksums": checksums.result(),
    }


def _finish(record: dict, outputs: list[str]) -> dict:
    record["peak_memory_mib"] = provenance.peak_memory_mib()
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    record["outputs"] = outputs
    return record

