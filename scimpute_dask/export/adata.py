"""The imputed AnnData (``adata.zarr``, ``imputed.h5ad``), streamed from a run's stores."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from scimpute_dask import __version__
from scimpute_dask.engine.inputs import RunInputs
from scimpute_dask.io import anndata_io
from scimpute_dask.io.layout import RunLayout
from scimpute_dask.io.storage import Location, is_remote, zarr_store


def write_anndata(work: Location, inputs: RunInputs, obs: pd.DataFrame, obsm: dict,
                  scores: np.ndarray, stats: dict, parameters: dict, h5ad: bool,
                  zarr_out: bool, reliability: pd.DataFrame | None) -> dict[str, Location]:
    """The imputed AnnData, streamed from the stores, as ``adata.zarr`` and/or ``imputed.h5ad``.

    ``reliability``: a validation's per-gene reliability columns, one row per
    reference gene in reference order, to join ``var``.
    """
    layout = RunLayout(work)
    nbrs = zarr.open_group(zarr_store(layout.neighbours, True), mode="r")
    obs = obs.assign(scimpute_score=scores)
    genes = inputs.imputed
    var = pd.DataFrame({"measured": inputs.measured[genes]},
                       index=pd.Index(inputs.r_genes[genes].astype(str)))
    if reliability is not None:  # rows already checked to be the reference genes, in order
        var = var.assign(**{c: reliability[c].to_numpy()[genes] for c in reliability.columns})
    uns = {"parameters": {k: v for k, v in parameters.items() if v is not None},
           "stats": stats, "reference_cells": inputs.r_cells.astype(str),
           "neighbors": {"indices": f"obsm/{anndata_io.NEIGHBORS_KEY}",
                         "weights": f"obsm/{anndata_io.WEIGHTS_KEY}",
                         "meaning": "rows of uns/scimpute/reference_cells (-1 = none); "
                                    "weight = cosine similarity + 1"},
           "version": __version__}
    imputed = (zarr.open_group(zarr_store(layout.imputed, True), mode="r")["X"] if len(genes)
               else np.zeros((len(inputs.q_cells), 0), dtype=np.float32))

    def anndata(X):
        return anndata_io.imputed_anndata(
            X, obs, obsm, var, da.from_zarr(nbrs["indices"]), da.from_zarr(nbrs["weights"]),
            uns)

    files = {}
    if zarr_out:
        files["anndata"] = layout.anndata
        # float32 as stored (wide genes too, as their nearest float32): the imputation
        # store's chunks are the AnnData-Zarr's, linked in rather than written again
        linked = (len(genes) and imputed.dtype == np.float32 and not is_remote(layout.imputed)
                  and not is_remote(layout.anndata))
        if linked:
            anndata_io.write(anndata(None), files["anndata"], layout.imputed / "X")
        else:
            anndata_io.write(anndata(imputed), files["anndata"])
    if h5ad:
        files["h5ad"] = work / "imputed.h5ad"
        anndata_io.write(anndata(imputed), files["h5ad"])
    return files
