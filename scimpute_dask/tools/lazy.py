"""A finished run as an AnnData whose genes are imputed on demand.

A run keeps each query cell's neighbours and weights (``zarr/neighbors.zarr``)
and knows its reference store; that is all any gene's imputation needs.
:func:`read_run` returns every reference gene as a lazy Dask array computed
from those two, so a run that stored no imputed gene at all
(``--impute-genes none``) can still give any gene later, and nothing is
computed until it is asked for: ``adata[:, ["Gad1"]].X.compute()`` reads one
block of reference genes and the neighbour lists, never the whole matrix.
"""

from __future__ import annotations

import json
import os

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from scimpute_dask.engine import graph
from scimpute_dask.engine.stages import imputed_format, linear_model
from scimpute_dask.errors import InputError
from scimpute_dask.io import anndata_io
from scimpute_dask.io.layout import RunLayout
from scimpute_dask.io.storage import location, zarr_store
from scimpute_dask.io.store import ExpressionStore

#: Reference values one task of the lazy imputation holds at most (a block of genes
#: across every reference cell).
BLOCK_BYTES = 64 * 2**20


def gene_block(n_reference: int, store_genes: int, density: float = 1.0) -> int:
    """Genes per task: within :data:`BLOCK_BYTES`, covering whole store chunks or dividing one.

    ``density`` < 1: a sparse store's fraction of stored values (8 bytes each).
    """
    per_gene = 4 * n_reference if density >= 1 else 8 * n_reference * density
    fit = max(1, int(BLOCK_BYTES // max(1.0, per_gene)))
    if fit >= store_genes:
        return fit // store_genes * store_genes
    return max(d for d in range(1, fit + 1) if store_genes % d == 0)


def _within(layout: RunLayout, path: str):
    """A path the run recorded: relative to its directory, or absolute, or a URL."""
    return path if "://" in path or os.path.isabs(path) else layout.root / path


def read_run(outdir: str | os.PathLike):
    """A finished run's query cells × every reference gene, imputed on demand.

    Parameters
    ----------
    outdir
        The output directory of :func:`~scimpute_dask.run_imputation` (or the
        ``scimpute-dask run`` command), a local path or an fsspec URL.

    Returns
    -------
    anndata.AnnData
        ``X`` is a lazy float32 Dask array, chunked (query block × gene block):
        each value the one the run stores in ``imputed.zarr`` (the weighted
        mean of the neighbours' reference values, in the run's averaging
        space, blended with the run's linear model if it had one, as float32
        that keeps scimpute's 2-decimal text; genes whose
        reference values reach 2¹⁵ get their nearest float32). ``var["measured"]``
        flags the shared genes; ``obs["scimpute_score"]`` is the run's score;
        ``obsm`` holds the neighbours and weights and ``uns["scimpute"]`` the
        run's parameters.

    Examples
    --------
    >>> adata = scimpute_dask.read_run("imputation_output")  # doctest: +SKIP
    >>> adata[:, ["Gad1", "Sst"]].X.compute()  # two genes, computed now  # doctest: +SKIP
    """
    anndata = anndata_io.anndata_module()
    layout = RunLayout(location(outdir))
    if not (layout.neighbours / "zarr.json").exists():
        raise InputError(f"{outdir}: not a finished scimpute-dask run "
                         f"(no {layout.neighbours.relative_to(layout.root)})")
    nbrs = zarr.open_group(zarr_store(layout.neighbours, True), mode="r")
    attrs = dict(nbrs.attrs)
    if not attrs.get("complete") or "reference_store" not in attrs:
        raise InputError(f"{outdir}: the run did not finish its neighbour search; rerun it")
    r_store = ExpressionStore.open(_within(layout, attrs["reference_store"]))
    n_ref, _ = r_store.shape
    wide, dtype = imputed_format(nbrs)
    indices, weights = da.from_zarr(nbrs["indices"]), da.from_zarr(nbrs["weights"])
    blend = None
    if attrs.get("blend"):  # the linear model's part: one small product per block
        model = attrs["blend"]
        blend = linear_model(_within(layout, model["store"]),
                             ExpressionStore.open(_within(layout, model["query_store"])),
                             model["query_genes"], indices.chunks[0][0], model["weight"])
    values = graph.impute_graph(
        indices, weights, r_store.gene_blocks(
            gene_block(n_ref, r_store.chunks[1], r_store.density)),
        dtype=dtype, average=attrs["average"], wide=wide, blend=blend)
    genes = pd.Index(r_store.gene_names.astype(str))
    measured = np.zeros(len(genes), dtype=bool)
    measured[np.asarray(attrs["shared_genes"], dtype=np.int64)] = True
    obs = pd.DataFrame(index=pd.Index(np.asarray(nbrs["obs_names"][:], dtype=object)))
    scores = layout.root / "scores.txt"
    if scores.exists():
        obs["scimpute_score"] = np.array(scores.read_text().split(), dtype=np.float64)
    manifest = layout.root / "run.json"
    uns = {"version": None}
    if manifest.exists():
        record = json.loads(manifest.read_text())
        uns = {"parameters": {k: v for k, v in record.get("parameters", {}).items()
                              if v is not None},
               "stats": record.get("stats", {}), "version": record.get("scimpute_dask")}
    uns["reference_cells"] = np.asarray(nbrs["reference_names"][:], dtype=object).astype(str)
    return anndata.AnnData(
        X=values.astype(np.float32), obs=obs, var=pd.DataFrame({"measured": measured},
                                                               index=genes),
        obsm={anndata_io.NEIGHBORS_KEY: indices, anndata_io.WEIGHTS_KEY: weights},
        uns={anndata_io.UNS_KEY: {k: v for k, v in uns.items() if v is not None}})
