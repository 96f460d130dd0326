"""A run's inputs, checked by name before any value is parsed, and their stores.

:func:`check_inputs` reads only names (cells, genes, the identity table, obs
columns) and settles every name-level question in seconds: the shared genes,
each cell's cluster, whether *k* candidates exist, the genes asked for, and
whether the memory budget can hold this data's smallest blocks. Only then does
:func:`store_for` convert each input (or reuse a finished conversion).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
from upath import UPath

from scimpute_dask import plan
from scimpute_dask.checks import check_k, shared_genes
from scimpute_dask.config import RunConfig, parse_memory
from scimpute_dask.errors import InputError
from scimpute_dask.io import anndata_io
from scimpute_dask.io.convert import Layout, convert, label_of, read_names, source_fingerprint
from scimpute_dask.io.identities import clusters_of, read_identities
from scimpute_dask.io.layout import RunLayout
from scimpute_dask.io.storage import Location, check_creatable, link_tree, location, remove_tree
from scimpute_dask.io.store import ExpressionStore, is_store


@dataclass(frozen=True)
class RunInputs:
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
    impute_cols: np.ndarray | None = None  # reference genes imputed and stored (None: all)

    @property
    def imputed(self) -> np.ndarray:
        """Positions (in the reference) of the genes imputed and stored, ascending."""
        return np.arange(len(self.r_genes)) if self.impute_cols is None else self.impute_cols

    @property
    def measured(self) -> np.ndarray:
        """Per reference gene: was it measured in the query (a shared gene)?"""
        measured = np.zeros(len(self.r_genes), dtype=bool)
        measured[self.r_cols] = True
        return measured


def check_inputs(query, reference, identities, config: RunConfig, *, tsv: bool = True,
                 budget: bool = True) -> RunInputs:
    """Every name-level check of a run's (or a validation's) inputs and settings.

    Parameters
    ----------
    query, reference, identities
        As given to the run (paths, URLs, DataFrames, AnnData).
    config
        The validated settings.
    tsv
        Resolve ``config.tsv_genes`` (runs) or not (validations).
    budget
        Refuse a memory limit below what this data's smallest blocks need.
    """
    if identities is not None and config.cluster_key is not None:
        raise InputError("give the clusters either as an identity table or as cluster_key "
                         "(--cluster-key), not both")
    if config.consider_clusters and identities is None and config.cluster_key is None:
        raise InputError("consider_clusters=True needs the cell identity table (or "
                         "cluster_key for AnnData inputs)")
    layers = (config.layer, config.reference_layer if config.reference_layer is not None
              else config.layer)
    table = read_identities(identities, config.cell_name_column_idx) \
        if identities is not None else None
    table_label = None if table is None else label_of(identities, "identity table")
    q_label, r_label = label_of(query, "query"), label_of(reference, "reference")
    for source, label, layer in ((query, q_label, layers[0]), (reference, r_label, layers[1])):
        if layer not in (None, "X") and not anndata_io.is_anndata(source):
            raise InputError(f"{label}: a layer ('{layer}') can only be chosen for AnnData "
                             f"inputs (.h5ad or AnnData-Zarr)")
    q_cells, q_genes = read_names(query, config.query_layout, name=q_label, layer=layers[0])
    r_cells, r_genes = read_names(reference, config.reference_layout, name=r_label,
                                  layer=layers[1])
    q_cols, r_cols = shared_genes(q_genes, r_genes, q_label, r_label)
    if config.blend < 1 and len(q_cols) < 2:
        raise InputError(f"blend {config.blend:g} needs a linear model of at least 2 shared "
                         f"genes; {q_label} and {r_label} share {len(q_cols)}")
    q_ids = r_ids = None
    if config.cluster_key is not None:
        for source, label in ((query, q_label), (reference, r_label)):
            if not anndata_io.is_anndata(source):
                raise InputError(f"{label}: cluster_key (--cluster-key) needs AnnData inputs "
                                 f"(.h5ad or AnnData-Zarr); give an identity table instead")
        q_ids = anndata_io.obs_column(query, config.cluster_key, q_label)
        r_ids = anndata_io.obs_column(reference, config.cluster_key, r_label)
    if table is not None:
        q_ids = clusters_of(q_cells, table, q_label, table_label)
        r_ids = clusters_of(r_cells, table, r_label, table_label)
    clusters = config.consider_clusters
    check_k(config.k, q_ids if clusters else None, r_ids if clusters else None, len(r_cells))
    if budget:
        plan.check_budget(parse_memory(config.memory_limit), len(q_cells), len(r_cells),
                          len(q_cols), len(r_genes), k=config.k)
    impute_cols = imputed_columns(config.impute_genes, r_genes, r_label, r_cols) if tsv \
        else None
    imputed = np.arange(len(r_genes)) if impute_cols is None else impute_cols
    tsv_cols = tsv_columns(config.tsv_genes, r_genes, r_label, imputed) if tsv else None
    check_plot_genes(config.plot_genes, r_genes, r_label, imputed)
    return RunInputs(q_label, r_label, table_label, q_cells, r_cells, r_genes, q_cols, r_cols,
                     q_ids, r_ids, tsv_cols, impute_cols)


def check_study(query, reference, identities, config: RunConfig) -> RunInputs:
    """:func:`check_inputs` for the commands that study a pair (validate, tune): no TSV,
    and clusters only from an identity table."""
    if config.consider_clusters and identities is None:
        raise InputError("consider_clusters=True needs the cell identity table")
    return check_inputs(query, reference, identities, config, tsv=False)


def study_stores(query, reference, outdir: Location, config: RunConfig
                 ) -> tuple[ExpressionStore, ExpressionStore]:
    """The stores of a studied pair, converted into (or reused from) ``outdir/zarr``."""
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: output path exists and is not a directory")
    if not outdir.exists():
        check_creatable(outdir)
    RunLayout(outdir).zarr.mkdir(parents=True, exist_ok=True)
    limit = parse_memory(config.memory_limit)
    return (store_for(query, "query", outdir, outdir, config.query_layout, False,
                      config.progress, limit),
            store_for(reference, "reference", outdir, outdir, config.reference_layout, False,
                      config.progress, limit))


def check_plot_genes(plot_genes, r_genes: np.ndarray, r_label: str,
                     imputed: np.ndarray | None = None) -> None:
    """Refuse genes asked for the spatial maps that the reference does not have, or that
    are not imputed."""
    if plot_genes is None or plot_genes == "none":
        return
    missing = pd.Index(list(plot_genes)).difference(pd.Index(r_genes))
    if len(missing):
        raise InputError(f"genes to plot are not in {r_label}: "
                         f"{', '.join(repr(g) for g in missing[:5])}")
    if imputed is not None:
        _not_imputed(pd.Index(r_genes).get_indexer(list(plot_genes)), r_genes, imputed,
                     "genes to plot")


def _gene_positions(genes, r_genes: np.ndarray, r_label: str, what: str) -> np.ndarray:
    wanted = pd.Index([genes] if isinstance(genes, str) else list(genes))
    pos = pd.Index(r_genes).get_indexer(wanted)
    if (pos < 0).any():
        missing = ", ".join(f"'{g}'" for g in wanted[pos < 0][:5])
        raise InputError(f"genes requested for {what} are not in {r_label}: {missing}")
    return pos


def _not_imputed(pos: np.ndarray, r_genes: np.ndarray, imputed: np.ndarray, what: str) -> None:
    outside = pos[~np.isin(pos, imputed)]
    if len(outside):
        names = ", ".join(f"'{g}'" for g in r_genes[outside[:5]])
        raise InputError(f"{what} must be imputed genes (--impute-genes): {names} "
                         "is not; read_run() imputes any gene of a finished run")


def imputed_columns(impute_genes, r_genes: np.ndarray, r_label: str,
                    shared: np.ndarray | None = None) -> np.ndarray | None:
    """Reference columns imputed and stored, ascending (``None``: all of them;
    ``"unmeasured"``: all but the ``shared`` ones)."""
    if isinstance(impute_genes, str) and impute_genes == "all":
        return None
    if isinstance(impute_genes, str) and impute_genes == "none":
        return np.zeros(0, dtype=np.int64)
    if isinstance(impute_genes, str) and impute_genes == "unmeasured":
        return np.setdiff1d(np.arange(len(r_genes)), np.asarray(shared, dtype=np.int64))
    return np.unique(_gene_positions(impute_genes, r_genes, r_label, "imputation"))


def tsv_columns(tsv_genes, r_genes: np.ndarray, r_label: str,
                imputed: np.ndarray | None = None) -> np.ndarray | None:
    """Reference columns written to ``imputation.tsv`` (``None``: no TSV); ``'all'`` is every
    imputed gene."""
    if tsv_genes is None or (isinstance(tsv_genes, str) and tsv_genes == "none"):
        return None
    if isinstance(tsv_genes, str) and tsv_genes == "all":
        cols = np.arange(len(r_genes)) if imputed is None else imputed
        return cols if len(cols) else None
    pos = _gene_positions(tsv_genes, r_genes, r_label, "imputation.tsv")
    if imputed is not None:
        _not_imputed(pos, r_genes, imputed, "genes requested for imputation.tsv")
    return pos


def store_for(
    source, role: str, work: Location, outdir: Location, layout: Layout, restart: bool,
    progress: bool, memory_limit: int, layer: str | None = None, finished: bool = False,
) -> ExpressionStore:
    """The Zarr store of one input: an existing store, a reused conversion, or a new one.

    ``finished``: the output held a finished run when this one began.
    """
    target = RunLayout(work).input(role)
    if not isinstance(source, str | os.PathLike | UPath):  # a DataFrame or an AnnData
        return convert(source, target, name=label_of(source, role), memory_limit=memory_limit,
                       layer=layer, progress=progress)
    src = location(source)  # existence already checked by read_names
    if is_store(src):
        if src != target:  # a conversion kept from another input is not published with it
            remove_tree(target)
        return ExpressionStore.open(src)
    previous = RunLayout(outdir).input(role)
    if previous == target:
        # An object-store output is its own work directory, so the finished run's
        # stores are the ones kept for resuming: one converted from another input
        # is dropped (on disk it would simply not be linked), not refused as an
        # interrupted conversion of a changed file.
        if finished and not converted_from(target, src, layout, layer):
            remove_tree(target)
    elif not target.exists() and not restart and previous.exists() \
            and converted_from(previous, src, layout, layer):
        # A finished run into the same output converted this very file: hard-link
        # its store instead of converting again (the old output stays intact).
        with contextlib.suppress(OSError):
            link_tree(previous, target)
    return convert(src, target, layout=layout, restart=restart, progress=progress,
                   memory_limit=memory_limit, layer=layer)


def converted_from(store: Location, src: Location, layout: Layout, layer: str | None) -> bool:
    """Is ``store`` a complete conversion of ``src`` as it is now?"""
    try:
        return ExpressionStore.open(store).fingerprint == source_fingerprint(src, layout,
                                                                              layer=layer)
    except (InputError, OSError):
        return False
