"""The scanpy-style API: AnnData in, AnnData out.

:func:`impute` runs the same out-of-core pipeline as :func:`~scimpute_dask.run_imputation`
(the in-memory AnnData objects are streamed into Zarr stores block by block)
and returns the imputed genes as a new AnnData, annotating the spatial AnnData
with the neighbours and scores the way ``scanpy.pp.neighbors`` annotates its
input.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from scimpute_dask.io import anndata_io, spatialdata_io
from scimpute_dask.io.layout import RunLayout
from scimpute_dask.io.storage import location
from scimpute_dask.pipeline import run_imputation


def impute(
    adata_spatial,
    adata_ref,
    k: int = 25,
    *,
    cluster_key: str | None = None,
    layer: str | None = None,
    reference_layer: str | None = None,
    copy: bool = False,
    outdir: str | os.PathLike | None = None,
    memory_limit: int | str | None = None,
    progress: bool = False,
    scheduler: str | None = None,
    client=None,
    validation: str | os.PathLike | None = None,
    tune: bool = False,
    tune_metric: str = "pearson",
    blend: float = 1.0,
    ridge_alpha: float = 100.0,
    table: str | None = None,
    key_added: str = "scimpute",
):
    """Impute every gene of a single-cell reference for the cells of a spatial dataset.

    Each spatial cell gets the similarity-weighted mean profile (weight =
    cosine similarity + 1) of its ``k`` most cosine-similar reference cells on
    the genes both datasets share (scimpute's method).

    Parameters
    ----------
    adata_spatial
        The spatial AnnData (cells × measured genes): in memory, backed, or
        the path of an ``.h5ad`` file or AnnData-Zarr store. Or a
        :class:`spatialdata.SpatialData` object: its table (``table``) is the
        query, and the imputed table is added to it as ``key_added``,
        annotating the same region (and written into its store if it has
        one); needs ``pip install 'scimpute-dask[spatialdata]'``.
    adata_ref
        The single-cell reference AnnData (cells × genes), in the same forms.
    k
        Neighbours per spatial cell.
    cluster_key
        An ``obs`` column present in both AnnData objects (e.g. from a joint
        clustering): neighbours are then searched only within a cell's cluster.
        ``None`` searches all reference cells.
    layer
        Layer holding the expression of both datasets (default ``X``). Like
        scimpute, nothing is normalised: use comparable scales (e.g. CPM).
    reference_layer
        Layer of ``adata_ref`` if it differs from ``layer``.
    copy
        If ``False`` (default), annotate ``adata_spatial`` in place (in-memory
        inputs only) with ``obsm["scimpute_neighbors"]`` (rows of
        ``adata_ref``, −1 = none), ``obsm["scimpute_weights"]``,
        ``obs["scimpute_score"]`` and ``uns["scimpute"]``. If ``True``, leave it
        untouched. The imputed AnnData is returned either way.
    outdir
        Keep the run's output directory here, a local path or a URL such as
        ``s3://bucket/run`` (scimpute's files, ``report.html``
        and ``adata.zarr``); the returned AnnData's ``X`` is then a lazy Dask
        array over ``adata.zarr``, so it need not fit in memory. By default the
        run goes to a temporary directory and ``X`` is loaded into memory.
    memory_limit
        Peak memory budget (e.g. ``"4GB"``; default half the available memory).
    progress
        Show progress bars.
    scheduler, client
        Run on a Dask cluster (see :func:`~scimpute_dask.run_imputation`).
    tune
        Choose the search transform, ``k``, weighting, averaging space and
        blend by held-out validation on the shared genes, then impute with the winner
        (``uns["scimpute"]["parameters"]`` records it). Recommended across
        technologies; off by default, which is scimpute's method exactly.
    tune_metric
        What tuning maximises: ``"pearson"``, ``"log_pearson"`` or ``"css"``.
    blend, ridge_alpha
        The neighbours' share of a blend with a linear model, ``expm1(blend ·
        log1p(kNN) + (1 − blend) · ridge)``, and the model's ridge penalty (see
        :func:`~scimpute_dask.run_imputation`); 1, the default, is the
        neighbours alone. ``tune=True`` chooses both.
    validation
        The output directory of :func:`~scimpute_dask.cross_validate` for the
        same data: ``var`` then also holds each gene's ``agreement``,
        ``predicted_pearson`` and ``heldout_pearson`` (see
        :func:`~scimpute_dask.run_imputation`).
    table
        A SpatialData query (object or store): the table to impute (default:
        its only one).
    key_added
        A SpatialData query: the name of the imputed table added to it.

    Returns
    -------
    anndata.AnnData
        Spatial cells × reference genes: ``X`` float32 imputed expression;
        ``obs``/``obsm`` of ``adata_spatial`` plus ``obs["scimpute_score"]``
        (cosine of imputed vs. measured shared genes) and the neighbours;
        ``var["measured"]`` flags the genes ``adata_spatial`` measured;
        ``uns["scimpute"]`` holds the parameters and summary statistics.

    Examples
    --------
    >>> import scimpute_dask
    >>> imputed = scimpute_dask.impute(adata_spatial, adata_ref, k=25, cluster_key="leiden")
    >>> sc.pl.embedding(imputed, basis="spatial", color=["Gad1"])  # doctest: +SKIP

    A SpatialData object gets the imputed table beside its own:

    >>> sdata = spatialdata.read_zarr("xenium.zarr")  # doctest: +SKIP
    >>> scimpute_dask.impute(sdata, adata_ref, key_added="imputed")  # doctest: +SKIP
    >>> sdata.tables["imputed"]  # doctest: +SKIP
    """
    if spatialdata_io.is_spatialdata_object(adata_spatial):
        source, query = spatialdata_io.table_of(adata_spatial, table)
        result = impute(query, adata_ref, k, cluster_key=cluster_key, layer=layer,
                        reference_layer=reference_layer, copy=True, outdir=outdir,
                        memory_limit=memory_limit, progress=progress, scheduler=scheduler,
                        client=client, validation=validation, tune=tune,
                        tune_metric=tune_metric, blend=blend, ridge_alpha=ridge_alpha)
        return spatialdata_io.add_table(adata_spatial, source, result, key_added)
    with tempfile.TemporaryDirectory(prefix="scimpute-") as tmp:
        out = location(outdir) if outdir is not None else Path(tmp) / "run"
        run_imputation(
            adata_spatial, adata_ref, None, 0, out, k=k,
            consider_clusters=cluster_key is not None, cluster_key=cluster_key,
            layer=layer, reference_layer=reference_layer, tsv_genes=None, anndata=True,
            report=outdir is not None, memory_limit=memory_limit, progress=progress,
            scheduler=scheduler, client=client, validation=validation, tune=tune,
            tune_metric=tune_metric, blend=blend, ridge_alpha=ridge_alpha, table=table,
        )
        result = anndata_io.read_lazy(RunLayout(out).anndata)
        if outdir is None:
            result.X = result.X.compute()
    if not copy and anndata_io.is_anndata(adata_spatial) and \
            not isinstance(adata_spatial, str | os.PathLike):
        for key in (anndata_io.NEIGHBORS_KEY, anndata_io.WEIGHTS_KEY):
            adata_spatial.obsm[key] = result.obsm[key]
        adata_spatial.obs["scimpute_score"] = result.obs["scimpute_score"].to_numpy()
        adata_spatial.uns[anndata_io.UNS_KEY] = result.uns[anndata_io.UNS_KEY]
    return result
