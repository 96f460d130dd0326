"""The whole run, stage by stage: check → convert → kNN → impute → score → export.

Data flows one way. Every name- and parameter-level check runs first
(:mod:`.validation`, on names read without parsing values), inputs become Zarr
stores (:mod:`.conversion`), the Dask graphs of :mod:`.graph` are stored to
Zarr block by block on the scheduler :mod:`.cluster` chooses, and
:mod:`.export` streams the scimpute files from those stores. The run is
assembled in a hidden sibling of the output directory, resumable there, and
moved into place only when complete (on an object store: marked complete by
its ``run.json``, written last; see :mod:`.export`). The output and its stores
may live on any fsspec URL (``s3://…``), which Dask workers then read and
write themselves; only the per-cell scores come back to the client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial

import dask
import dask.array as da
import numpy as np
import pandas as pd
import zarr
from dask.diagnostics import ProgressBar
from upath import UPath

from . import (
    __version__,
    anndata_io,
    cluster,
    export,
    graph,
    heldout,
    plan,
    plotting,
    provenance,
)
from .conversion import (
    ExpressionStore,
    Layout,
    convert,
    is_store,
    read_names,
    source_fingerprint,
)
from .imputation import DEFAULT_TEMPERATURE, WEIGHTINGS, neighbour_weights
from .normalization import NORMALIZATIONS
from .report import REPORT, write_report
from .scoring import round_like_scimpute, summary_stats
from .storage import Location, location, remove_tree, zarr_store
from .validation import (
    InputError,
    check_choice,
    check_k,
    check_positive_float,
    check_positive_int,
    clusters_of,
    read_identities,
    shared_genes,
)

log = logging.getLogger("scimpute_dask")


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

    def __str__(self) -> str:
        lines = [
            f"Imputed {self.n_genes} genes for {self.n_query} query cells from "
            f"{self.n_reference} reference cells ({self.n_shared} shared genes).",
        ]
        if self.unimputable:
            lines.append(
                f"{len(self.unimputable)} query cells have no shared-gene expression and were "
                f"left NaN (listed in {self.files['unimputable']})."
            )
        lines += [f"  {name:<12} {path}" for name, path in self.files.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Input stores
# --------------------------------------------------------------------------- #
def _store_for(
    source, role: str, work: Location, outdir: Location, layout: Layout, restart: bool,
    progress: bool, memory_limit: int, layer: str | None = None, finished: bool = False,
) -> ExpressionStore:
    """The Zarr store of one input: an existing store, a reused conversion, or a new one.

    ``finished``: the output held a finished run when this one began.
    """
    target = work / "zarr" / f"{role}.zarr"
    if not isinstance(source, str | os.PathLike | UPath):  # a DataFrame or an AnnData
        return convert(source, target, name=_label(source, role), memory_limit=memory_limit,
                       layer=layer, progress=progress)
    src = location(source)  # existence already checked by read_names
    if is_store(src):
        if src != target:  # a conversion kept from another input is not published with it
            remove_tree(target)
        return ExpressionStore.open(src)
    previous = outdir / "zarr" / f"{role}.zarr"
    if previous == target:
        # An object-store output is its own work directory, so the finished run's
        # stores are the ones kept for resuming: one converted from another input
        # is dropped (on disk it would simply not be linked), not refused as an
        # interrupted conversion of a changed file.
        if finished and not _converted_from(target, src, layout, layer):
            remove_tree(target)
    elif not target.exists() and not restart and previous.exists() \
            and _converted_from(previous, src, layout, layer):
        # A finished run into the same output converted this very file: hard-link
        # its store instead of converting again (the old output stays intact).
        with contextlib.suppress(OSError):
            export.link_tree(previous, target)
    return convert(src, target, layout=layout, restart=restart, progress=progress,
                   memory_limit=memory_limit, layer=layer)


def _converted_from(store: Location, src: Location, layout: Layout, layer: str | None) -> bool:
    """Is ``store`` a complete conversion of ``src`` as it is now?"""
    try:
        return ExpressionStore.open(store).fingerprint == source_fingerprint(src, layout,
                                                                              layer=layer)
    except (InputError, OSError):
        return False


def _aligned(block: int, chunk: int) -> int:
    """A gene block that covers whole store chunks, or divides one: no chunk read twice."""
    if block >= chunk:
        return block // chunk * chunk
    return max(d for d in range(1, block + 1) if chunk % d == 0)


def _digest(values: np.ndarray) -> str:
    """A short content hash, for the keys that decide whether a stage can be resumed."""
    return hashlib.sha1(np.ascontiguousarray(values).tobytes()).hexdigest()


def _names_array(group: zarr.Group, name: str, names: np.ndarray) -> None:
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
                               chunks=tuple(c[0] for c in arr.chunks), fill_value=fill)
        group.create_array("done", shape=first.numblocks, dtype=bool, chunks=(1, 1),
                           fill_value=False)
        group.attrs.update({**attrs, "key": key, "complete": False})
    if group.attrs.get("complete"):
        return group
    done = group["done"]
    marked = done[:]
    targets = [group[name] for name in arrays]
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
# The run
# --------------------------------------------------------------------------- #
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
    query_layout: Layout = "genes_x_cells",
    reference_layout: Layout = "genes_x_cells",
    reference_chunk_size: int | None = None,
    gene_chunk_size: int | None = None,
    tsv_genes: str | list[str] | None = "all",
    h5ad: bool = False,
    restart: bool = False,
    progress: bool = False,
    scheduler: str | None = None,
    client=None,
    layer: str | None = None,
    reference_layer: str | None = None,
    cluster_key: str | None = None,
    coords: str | os.PathLike | None = None,
    anndata: bool | None = None,
    report: bool = True,
    plot_genes: list[str] | None = None,
    normalize: str = "none",
    weighting: str = "cosine+1",
    temperature: float = DEFAULT_TEMPERATURE,
    validation: str | os.PathLike | None = None,
) -> RunResult:
    """Impute every reference gene for every query cell, out of core.

    Parameters
    ----------
    query, reference
        Paths (TSV/CSV/``.h5ad``/scimpute-dask ``.zarr``) or DataFrames
        (cells × genes) of the spatial query and the single-cell reference.
        Text files and stores may also be fsspec URLs (``s3://…``).
    identities
        scimpute's cell identity table (path or DataFrame). Required when
        ``consider_clusters``; otherwise optional, used for the ``cluster``
        column of ``sim_matrix.tsv``.
    cell_name_column_idx
        0-based position of the cell-name column of ``identities``.
    outdir
        Output directory, a local path or an fsspec URL (``s3://bucket/run``).
        Replaced as a whole when the run completes, and only if it is empty
        or holds a previous scimpute-dask output.
    k
        Neighbours per query cell.
    consider_clusters
        Restrict neighbours to reference cells of the query cell's cluster.
    chunk_size
        Query cells per block (and per chunk file with ``save_chunks``);
        derived from ``memory_limit`` when not given.
    save_chunks
        Also write per-chunk imputation tables under ``imputations/``.
    query_layout, reference_layout
        Orientation of text inputs (see :func:`scimpute_dask.conversion.convert`).
    memory_limit
        Budget for the peak memory of the whole run (bytes or ``"2GB"``;
        default: half the available memory). Block sizes are derived from it
        and the data shape (:mod:`scimpute_dask.plan`).
    reference_chunk_size, gene_chunk_size
        Reference cells per similarity tile and genes per imputation block;
        derived from the budget when not given.
    tsv_genes
        Reference genes written to ``imputation.tsv``: ``"all"`` (scimpute's
        table), a list of gene names, or ``None``/``"none"`` for no text table
        (the Zarr store always holds every gene; text is the slowest and
        largest output at scale).
    h5ad
        Also write the imputed AnnData as ``imputed.h5ad`` (needs the ``h5ad``
        extra).
    restart
        Discard what an interrupted run left (conversions, finished kNN and
        imputation blocks) and start afresh.
    progress
        Show progress bars.
    scheduler
        Address of a Dask scheduler to run on (default: the
        ``DASK_SCHEDULER_ADDRESS`` environment variable, else this machine).
        Workers must reach the output: a shared volume at the same path, or
        an object-store URL (they open its stores themselves).
    client
        A ``distributed.Client`` to run on instead.
    layer, reference_layer
        AnnData inputs: the layer holding the expression (default ``X``);
        ``reference_layer`` defaults to ``layer``.
    cluster_key
        Take the clusters from this ``obs`` column of both AnnData inputs
        instead of an identity table.
    coords
        Spatial coordinates of the query cells: a table of cell name, x, y
        (``.csv`` or tab-separated). Default: ``obsm["spatial"]`` of an
        AnnData query, if any.
    anndata
        Write the imputed AnnData as the Zarr store ``adata.zarr`` (the
        query's ``obs``/``obsm``, ``var`` = reference genes with ``measured``,
        the neighbours in ``obsm``, the run in ``uns["scimpute"]``). Default:
        when the query is an AnnData.
    report
        Write ``report.html`` and the figures (spatial maps when there are
        coordinates).
    plot_genes
        Genes for the spatial maps (default: the three most variable measured
        and unmeasured genes of the reference).
    normalize
        Transform of the shared genes before the neighbour search only:
        ``"none"`` (scimpute), ``"cpm"``, ``"log1p_cpm"``, ``"scale"`` (each
        gene divided by its standard deviation in its own dataset) or
        ``"zscore"`` (also centred on its mean; negative cosines then occur, so
        prefer ``"softmax"`` or ``"cosine+1"`` weights). The imputed values stay
        weighted means of the raw reference.
    weighting
        Neighbour weights: ``"cosine+1"`` (scimpute), ``"cosine"``,
        ``"softmax"`` (with ``temperature``) or ``"uniform"``.
    temperature
        Softmax temperature (``weighting="softmax"`` only).
    validation
        The output directory of :func:`~scimpute_dask.cross_validate`
        (``scimpute-dask validate``) for the same query and reference: its
        per-gene reliability joins ``var`` of the AnnData outputs and is written
        as ``reliability.tsv``; the report shows its summary and the held-out
        score vs. sparsity plot. Refused (before any work) if it validated
        other inputs or did not rate the reference genes.

    Returns
    -------
    RunResult
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        log.debug("%s took %.2f s", stage, timings[stage])
        clock = now

    k = check_positive_int(k, "k_neighbors")
    options = search_options(normalize, weighting, temperature)
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    limit = plan.parse_memory(memory_limit)
    if identities is not None and cluster_key is not None:
        raise InputError("give the clusters either as an identity table or as cluster_key "
                         "(--cluster-key), not both")
    if consider_clusters and identities is None and cluster_key is None:
        raise InputError("consider_clusters=True needs the cell identity table (or "
                         "cluster_key for AnnData inputs)")
    if anndata is None:
        anndata = anndata_io.is_anndata(query)
    if (h5ad or anndata) and importlib.util.find_spec("anndata") is None:
        raise InputError("AnnData output needs anndata: pip install 'scimpute-dask[h5ad]'")
    layers = (layer, reference_layer if reference_layer is not None else layer)
    outdir = location(outdir)
    export.check_output_dir(outdir, OUTPUT_NAMES)
    work = export.work_dir_for(outdir)

    # 1. Every name-level check, in seconds, before any value is parsed.
    inputs = _check_inputs(query, reference, identities, cell_name_column_idx, k,
                           consider_clusters, query_layout, reference_layout, tsv_genes,
                           layers, cluster_key)
    if isinstance(plot_genes, str):
        plot_genes = [plot_genes]
    _check_plot_genes(plot_genes, inputs.r_genes, inputs.r_label)
    obs, obsm = _query_annotations(query, inputs.q_cells, coords)
    held = None if validation is None else heldout.load(
        validation, {"query": (query, query_layout, layers[0]),
                     "reference": (reference, reference_layout, layers[1])},
        {"query": inputs.q_label, "reference": inputs.r_label}, inputs.q_cells,
        inputs.r_genes, _measured(inputs), {"k": k, **options})
    checksums = provenance.checksums({"query": query, "reference": reference,
                                      "identities": identities, "coords": coords})
    lap("check")

    with export.exclusive(work):
        finished = export.is_finished(outdir)
        if restart:
            export.clear_work_dir(work, keep=set())
        else:
            export.clear_work_dir(work, keep=set(RESUMABLE))
        # 2. Inputs to Zarr (checks every value; reuses finished conversions).
        q_store = _store_for(query, "query", work, outdir, query_layout, restart, progress,
                             limit, layers[0], finished)
        r_store = _store_for(reference, "reference", work, outdir, reference_layout, restart,
                             progress, limit, layers[1], finished)
        lap("convert")

        blocks = plan.plan_run(limit, len(inputs.q_cells), len(inputs.r_cells),
                               len(inputs.q_cols), len(inputs.r_genes), query_chunk=chunk_size,
                               reference_chunk=reference_chunk_size,
                               gene_chunk=gene_chunk_size)
        blocks = dataclasses.replace(blocks,
                                     gene_chunk=_aligned(blocks.gene_chunk, r_store.chunks[1]))
        log.debug("block sizes: %s", blocks)
        with cluster.compute_on(client, scheduler, blocks.threads, progress):
            scores = _compute(work / "zarr", q_store, r_store, inputs, blocks, k,
                              consider_clusters, lap, options)

        # 6. Export, streamed from the stores.
        stats = summary_stats(scores)
        files = _export(work, inputs, blocks.query_chunk, save_chunks, scores, stats,
                        blocks.threads)
        parameters = {"k": k, "consider_clusters": consider_clusters,
                      "chunk_size": blocks.query_chunk, "memory_limit": limit,
                      "threads": blocks.threads,
                      "reference_chunk_size": blocks.reference_chunk,
                      "gene_chunk_size": blocks.gene_chunk, "save_chunks": save_chunks,
                      **options,
                      "tsv_genes": tsv_genes if isinstance(tsv_genes, str | None)
                      else list(tsv_genes),
                      "layer": layers[0], "reference_layer": layers[1],
                      "cluster_key": cluster_key,
                      "coords": None if coords is None else str(coords)}
        if held is not None:
            parameters["validation"] = str(held.directory)
            files["reliability"] = work / heldout.RELIABILITY
            with export.atomic_file(files["reliability"], "wb") as fh:
                fh.write((held.directory / heldout.RELIABILITY).read_bytes())
        if h5ad or anndata:
            # h5py files cannot travel to workers: written from this process
            with dask.config.set(scheduler="threads", num_workers=blocks.threads), \
                    (ProgressBar(minimum=1.0) if progress else contextlib.nullcontext()):
                files.update(_write_anndata(work, inputs, obs, obsm, scores, stats, parameters,
                                            h5ad, anndata, held))
        lap("export")
        record = {
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
        if report:
            with dask.config.set(scheduler="threads", num_workers=blocks.threads):
                figures = _figures(work, files, obsm.get("spatial"), q_store, r_store, inputs,
                                   plot_genes, held)
            lap("figures")
            record["peak_memory_mib"] = provenance.peak_memory_mib()
            record["finished"] = _now()
            record["outputs"] = sorted([*export.outputs(work), REPORT, export.MANIFEST])
            files["report"] = work / REPORT
            write_report(files["report"], record, figures,
                         None if held is None else held.summary)
        record["peak_memory_mib"] = provenance.peak_memory_mib()
        record["finished"] = _now()
        record["outputs"] = export.outputs(work)
        log.debug("timings (s): %s; peak memory (MiB): %s", timings, record["peak_memory_mib"])
        export.write_manifest(work / export.MANIFEST, record)
        export.publish(work, outdir)
    files = {name: outdir / path.relative_to(work).as_posix()
             for name, path in files.items()}
    return RunResult(outdir, files, len(inputs.q_cells), len(inputs.r_cells),
                     len(inputs.r_genes), len(inputs.q_cols),
                     list(inputs.q_cells[np.isnan(scores)]), stats, timings)


#: Stores of the work directory that a rerun resumes rather than rebuilds.
RESUMABLE = ("query.zarr", "reference.zarr", "neighbors.zarr", "imputed.zarr")

#: Every name a run can write into its output directory.
OUTPUT_NAMES = frozenset({
    "imputation.tsv", "imputations", "sim_matrix.tsv", "scores.txt", "stats.txt",
    export.HISTOGRAM, "unimputable_cells.txt", "zarr", "adata.zarr", "imputed.h5ad", REPORT,
    plotting.SHARED_PNG, plotting.IMPUTED_PNG, export.MANIFEST, heldout.RELIABILITY,
    plotting.SCORE_PNG,
})


@dataclass(frozen=True)
class _Inputs:
    """Names, labels and matched ids of a run's inputs, checked before any parsing."""

    q_label: str
    r_label: str
    table_label: str | None
    q_cells: np.ndarray
    r_cells: np.ndarray
    r_genes: np.ndarray
    q_cols: np.ndarray  # shared genes: positions in the query...
    r_cols: np.ndarray  # ...and in the reference, in reference order
    q_ids: np.ndarray | None
    r_ids: np.ndarray | None
    tsv_cols: np.ndarray | None  # reference genes written to imputation.tsv; None = no TSV


def _label(source, role: str) -> str:
    if isinstance(source, pd.DataFrame):
        return f"{role} DataFrame"
    return f"{role} AnnData" if anndata_io.is_anndata(source) and not isinstance(
        source, str | os.PathLike) else str(source)


def _check_inputs(query, reference, identities, cell_name_column_idx, k, consider_clusters,
                  query_layout, reference_layout, tsv_genes, layers=(None, None),
                  cluster_key=None) -> _Inputs:
    table = read_identities(identities, cell_name_column_idx) if identities is not None else None
    table_label = None if table is None else _label(identities, "identity table")
    q_label, r_label = _label(query, "query"), _label(reference, "reference")
    for source, label, layer in ((query, q_label, layers[0]), (reference, r_label, layers[1])):
        if layer not in (None, "X") and not anndata_io.is_anndata(source):
            raise InputError(f"{label}: a layer ('{layer}') can only be chosen for AnnData "
                             f"inputs (.h5ad or AnnData-Zarr)")
    q_cells, q_genes = read_names(query, query_layout, name=q_label, layer=layers[0])
    r_cells, r_genes = read_names(reference, reference_layout, name=r_label, layer=layers[1])
    q_cols, r_cols = shared_genes(q_genes, r_genes, q_label, r_label)
    q_ids = r_ids = None
    if cluster_key is not None:
        for source, label in ((query, q_label), (reference, r_label)):
            if not anndata_io.is_anndata(source):
                raise InputError(f"{label}: cluster_key (--cluster-key) needs AnnData inputs "
                                 f"(.h5ad or AnnData-Zarr); give an identity table instead")
        q_ids = anndata_io.obs_column(query, cluster_key, q_label)
        r_ids = anndata_io.obs_column(reference, cluster_key, r_label)
    if table is not None:
        q_ids = clusters_of(q_cells, table, q_label, table_label)
        r_ids = clusters_of(r_cells, table, r_label, table_label)
    check_k(k, q_ids if consider_clusters else None, r_ids if consider_clusters else None,
            len(r_cells))
    return _Inputs(q_label, r_label, table_label, q_cells, r_cells, r_genes, q_cols, r_cols,
                   q_ids, r_ids, _tsv_columns(tsv_genes, r_genes, r_label))


def _tsv_columns(tsv_genes, r_genes: np.ndarray, r_label: str) -> np.ndarray | None:
    if tsv_genes is None or (isinstance(tsv_genes, str) and tsv_genes == "none"):
        return None
    if isinstance(tsv_genes, str) and tsv_genes == "all":
        return np.arange(len(r_genes))
    wanted = pd.Index([tsv_genes] if isinstance(tsv_genes, str) else list(tsv_genes))
    pos = pd.Index(r_genes).get_indexer(wanted)
    if (pos < 0).any():
        missing = ", ".join(f"'{g}'" for g in wanted[pos < 0][:5])
        raise InputError(f"genes requested for imputation.tsv are not in {r_label}: {missing}")
    return pos


def search_options(normalize: str, weighting: str, temperature: float) -> dict:
    """The checked neighbour-search options, as the manifest and the stage keys record them."""
    return {"normalize": check_choice(normalize, NORMALIZATIONS, "normalize"),
            "weighting": check_choice(weighting, WEIGHTINGS, "weighting"),
            "temperature": check_positive_float(temperature, "temperature")}


def _compute(zarr_dir: Location, q_store: ExpressionStore, r_store: ExpressionStore,
             inputs: _Inputs, blocks: plan.Plan, k: int, consider_clusters: bool,
             lap, options: dict) -> np.ndarray:
    """Stages 3–5: kNN and imputation stored to Zarr (resumably), then the scores."""
    bq, br, gb = blocks.query_chunk, blocks.reference_chunk, blocks.gene_chunk
    n_q, n_r = len(inputs.q_cells), len(inputs.r_cells)
    q_shared = q_store.to_dask()[:, inputs.q_cols].rechunk((bq, -1))
    r_shared = r_store.to_dask()[:, inputs.r_cols].rechunk((br, -1))

    # 3. kNN on the shared genes.
    q_codes = r_codes = codes = None
    if consider_clusters:
        # through Zarr, not embedded in the graph: nothing large travels via the scheduler
        codes, _ = pd.factorize(np.concatenate([inputs.q_ids, inputs.r_ids]))
        stored = zarr.create_array(zarr_store(zarr_dir / "clusters.zarr"), shape=codes.shape,
                                   dtype="int32", chunks=(max(1, len(codes)),), overwrite=True)
        stored[:] = codes
        q_codes = da.from_zarr(stored)[:n_q].rechunk(bq)
        r_codes = da.from_zarr(stored)[n_q:].rechunk(br)
    indices, similarity = graph.knn_graph(*graph.search_space(q_shared, r_shared,
                                                              options["normalize"]),
                                          k, q_codes, r_codes)
    knn_key = {"query": q_store.fingerprint, "reference": r_store.fingerprint, "k": k,
               "clusters": _digest(codes) if consider_clusters else None, "chunks": [bq, br],
               **options}
    log.info("finding %d nearest neighbours of %d query cells", k, n_q)
    nbrs = store_stage(
        zarr_dir / "neighbors.zarr",
        {"indices": (indices, -1), "weights": (neighbour_weights(
            similarity, options["weighting"], options["temperature"]), np.nan)},
        knn_key,
        {"k": k, "consider_clusters": consider_clusters, "weight": options["weighting"]},
    )
    _names_array(nbrs, "obs_names", inputs.q_cells)
    _names_array(nbrs, "reference_names", inputs.r_cells)  # what the indices point at
    lap("knn")

    # 4. Imputation of every reference gene, streamed to Zarr.
    indices, weights = da.from_zarr(nbrs["indices"]), da.from_zarr(nbrs["weights"])
    imputed = graph.impute_graph(indices, weights, r_store.to_dask((n_r, gb)))
    log.info("imputing %d genes", len(inputs.r_genes))
    out = store_stage(
        zarr_dir / "imputed.zarr", {"X": (imputed, np.nan)}, {**knn_key, "genes": gb},
        {"format": "scimpute-dask-expression", "fingerprint": {"source": "imputation"}},
    )
    _names_array(out, "obs_names", inputs.q_cells)
    _names_array(out, "var_names", inputs.r_genes)
    lap("impute")

    # 5. scimpute's validation score per query cell.
    scores = graph.scores_graph(indices, weights, r_shared, q_shared).compute()
    lap("score")
    return scores


def _export(work: Location, inputs: _Inputs, chunk_size: int, save_chunks: bool,
            scores: np.ndarray, stats: dict[str, float], threads: int) -> dict[str, Location]:
    """Write scimpute's files into the work directory, streaming from the stores."""
    zarr_dir = work / "zarr"
    imputed = zarr.open_group(zarr_store(zarr_dir / "imputed.zarr", True), mode="r")["X"]
    nbrs = zarr.open_group(zarr_store(zarr_dir / "neighbors.zarr", True), mode="r")
    q_cells = inputs.q_cells
    starts = range(0, len(q_cells), chunk_size)
    files: dict[str, Location] = {}

    if inputs.tsv_cols is not None:
        cols = inputs.tsv_cols
        every = len(cols) == len(inputs.r_genes)

        def imputed_block(lo: int) -> tuple[np.ndarray, np.ndarray]:
            block = imputed[lo : lo + chunk_size]
            return q_cells[lo : lo + chunk_size], round_like_scimpute(
                block if every else block[:, cols])

        files["imputation"] = work / "imputation.tsv"
        if save_chunks:
            files["chunks"] = work / "imputations"
        export.write_matrix_tsv(files["imputation"],
                                (partial(imputed_block, lo) for lo in starts),
                                inputs.r_genes[cols], chunk_dir=files.get("chunks"),
                                n_chunks=len(starts), workers=threads)

    if inputs.q_ids is None:
        labels, q_codes = np.array(["NA"]), np.zeros(len(q_cells), dtype=np.int64)
    else:
        q_codes, labels = pd.factorize(inputs.q_ids)

    def neighbour_block(lo: int):
        idx = nbrs["indices"][lo : lo + chunk_size]
        w = nbrs["weights"][lo : lo + chunk_size]
        rows, slot = np.nonzero(idx >= 0)
        cells = lo + rows
        return q_codes[cells], cells, idx[rows, slot], w[rows, slot]

    files["sim_matrix"] = work / "sim_matrix.tsv"
    export.write_neighbours_tsv(files["sim_matrix"], np.asarray(labels), q_cells,
                                inputs.r_cells, (partial(neighbour_block, lo) for lo in starts),
                                workers=threads)
    files["scores"] = work / "scores.txt"
    export.write_scores(files["scores"], scores)
    files["stats"] = work / "stats.txt"
    export.write_stats(files["stats"], stats)
    files["histogram"] = work / export.HISTOGRAM
    export.write_histogram(files["histogram"], scores)
    files["unimputable"] = work / "unimputable_cells.txt"
    export.write_names(files["unimputable"], q_cells[np.isnan(scores)])
    files["zarr"] = zarr_dir
    return files


# --------------------------------------------------------------------------- #
# AnnData output, figures
# --------------------------------------------------------------------------- #
def _query_annotations(query, q_cells: np.ndarray, coords
                       ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The query's ``obs`` and ``obsm`` for the outputs; ``obsm["spatial"]`` from ``coords``."""
    obs, obsm = pd.DataFrame(index=pd.Index(q_cells.astype(str))), {}
    if anndata_io.is_anndata(query):
        obs, obsm = anndata_io.read_annotations(query)
        obs.index = pd.Index(q_cells.astype(str))
    if coords is not None:
        obsm["spatial"] = anndata_io.read_coords(coords, q_cells)
    spatial = obsm.get("spatial")
    if spatial is not None and (spatial.ndim != 2 or spatial.shape[1] < 2):
        raise InputError(f"query: obsm['spatial'] must be cells × 2 coordinates, "
                         f"got shape {spatial.shape}")
    return obs, obsm


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _measured(inputs: _Inputs) -> np.ndarray:
    """Per reference gene: was it measured in the query (a shared gene)?"""
    measured = np.zeros(len(inputs.r_genes), dtype=bool)
    measured[inputs.r_cols] = True
    return measured


def _write_anndata(work: Location, inputs: _Inputs, obs: pd.DataFrame, obsm: dict,
                   scores: np.ndarray, stats: dict, parameters: dict, h5ad: bool,
                   zarr_out: bool, held: heldout.HeldOut | None) -> dict[str, Location]:
    """The imputed AnnData, streamed from the stores, as ``adata.zarr`` and/or ``imputed.h5ad``.

    ``held``: a validation whose per-gene reliability columns join ``var``.
    """
    zarr_dir = work / "zarr"
    nbrs = zarr.open_group(zarr_store(zarr_dir / "neighbors.zarr", True), mode="r")
    obs = obs.assign(scimpute_score=scores)
    var = pd.DataFrame({"measured": _measured(inputs)},
                       index=pd.Index(inputs.r_genes.astype(str)))
    if held is not None:  # rows already checked to be the reference genes, in order
        var = var.assign(**{c: held.reliability[c].to_numpy() for c in heldout.VAR_COLUMNS})
    uns = {"parameters": {k: v for k, v in parameters.items() if v is not None},
           "stats": stats, "reference_cells": inputs.r_cells.astype(str),
           "neighbors": {"indices": f"obsm/{anndata_io.NEIGHBORS_KEY}",
                         "weights": f"obsm/{anndata_io.WEIGHTS_KEY}",
                         "meaning": "rows of uns/scimpute/reference_cells (-1 = none); "
                                    "weight = cosine similarity + 1"},
           "version": __version__}
    adata = anndata_io.imputed_anndata(
        zarr.open_group(zarr_store(zarr_dir / "imputed.zarr", True), mode="r")["X"], obs, obsm,
        var,
        da.from_zarr(nbrs["indices"]), da.from_zarr(nbrs["weights"]), uns)
    files = {}
    if zarr_out:
        files["anndata"] = work / "adata.zarr"
        anndata_io.write(adata, files["anndata"])
    if h5ad:
        files["h5ad"] = work / "imputed.h5ad"
        anndata_io.write(adata, files["h5ad"])
    return files


def _check_plot_genes(plot_genes, r_genes: np.ndarray, r_label: str) -> None:
    if plot_genes is None:
        return
    missing = pd.Index(list(plot_genes)).difference(pd.Index(r_genes))
    if len(missing):
        raise InputError(f"genes to plot are not in {r_label}: "
                         f"{', '.join(repr(g) for g in missing[:5])}")


def _figures(work: Location, files: dict[str, Location], xy: np.ndarray | None,
             q_store: ExpressionStore, r_store: ExpressionStore, inputs: _Inputs,
             plot_genes: list[str] | None, held: heldout.HeldOut | None
             ) -> list[tuple[str, str]]:
    """The report's figure list: a validation's held-out score plot, spatial maps of chosen
    genes (with coordinates)."""
    figures = [(export.HISTOGRAM, "Validation score of each query cell (scimpute's histogram)")]
    if held is not None:
        files["sparsity_plot"] = work / plotting.SCORE_PNG
        heldout.sparsity_plot(files["sparsity_plot"], held.genes)
        figures.append((plotting.SCORE_PNG, "Held-out score of each shared gene (imputed "
                        "with the gene hidden from the neighbour search) vs. its sparsity "
                        "in the query"))
    if xy is None:
        return figures
    measured = _measured(inputs)
    genes = pd.Index(inputs.r_genes)
    if plot_genes is None:
        shared, others = plotting.choose_genes(r_store.to_dask(), inputs.r_genes, measured)
    else:
        pos = genes.get_indexer(list(plot_genes))
        shared = [g for g, p in zip(plot_genes, pos, strict=True) if measured[p]]
        others = [g for g, p in zip(plot_genes, pos, strict=True) if not measured[p]]
    rows = plotting.sample_rows(len(inputs.q_cells))
    imputed = zarr.open_group(zarr_store(work / "zarr" / "imputed.zarr", True), mode="r")["X"]
    if shared:
        r_pos = genes.get_indexer(shared)
        q_of = dict(zip(inputs.r_cols.tolist(), inputs.q_cols.tolist(), strict=True))
        q_pos = np.array([q_of[p] for p in r_pos])
        files["measured_map"] = work / plotting.SHARED_PNG
        plotting.spatial_measured_vs_imputed(
            files["measured_map"], xy[rows], shared,
            q_store.group["X"].get_orthogonal_selection((rows, q_pos)),
            imputed.get_orthogonal_selection((rows, r_pos)))
        figures.append((plotting.SHARED_PNG, "Genes the query measured: measured (left) and "
                        "imputed (right) expression on the tissue"))
    if others:
        files["imputed_map"] = work / plotting.IMPUTED_PNG
        plotting.spatial_imputed(files["imputed_map"], xy[rows], others,
                                 imputed.get_orthogonal_selection((rows, genes.get_indexer(
                                     others))))
        figures.append((plotting.IMPUTED_PNG, "Genes the query did not measure: imputed "
                        "expression on the tissue"))
    return figures
