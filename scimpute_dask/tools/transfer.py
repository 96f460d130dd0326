"""Label transfer: each query cell takes the reference label its neighbours vote for.

The vote of a neighbour is its imputation weight, and the winner's share of
the total weight is the confidence, as Tangram's ``project_cell_annotations``
projects cell types through its mapping. The kernel is
:func:`scimpute_dask.kernels.vote.vote`, its Dask graph
:func:`scimpute_dask.engine.graph.label_graph`; :func:`transfer_labels` runs it
on the neighbours a run stored.
"""

from __future__ import annotations

import logging
import os

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from scimpute_dask.engine import graph
from scimpute_dask.errors import InputError
from scimpute_dask.io.layout import RunLayout
from scimpute_dask.io.storage import location, zarr_store

log = logging.getLogger("scimpute_dask")


def transfer_labels(run_dir: str | os.PathLike, labels: pd.Series) -> pd.DataFrame:
    """Reference labels projected onto the query cells of a finished run.

    Parameters
    ----------
    run_dir
        Output directory of ``scimpute-dask run``, a path or a URL (its
        ``zarr/neighbors.zarr`` is read, block by block).
    labels
        Label (cluster, cell type) of each reference cell, indexed by reference
        cell name; every reference cell must have one.

    Returns
    -------
    pandas.DataFrame
        Indexed by query cell: ``label`` (NaN for cells without neighbours) and
        ``confidence``, the winner's share of the neighbours' weight (0..1).
    """
    path = RunLayout(location(run_dir)).neighbours
    if not (path / "zarr.json").exists():
        raise InputError(f"{run_dir}: not a scimpute-dask run output (no zarr/neighbors.zarr)")
    nbrs = zarr.open_group(zarr_store(path, read_only=True), mode="r")
    if "reference_names" not in nbrs:
        raise InputError(f"{run_dir}: written by an older scimpute-dask that did not record "
                         f"the reference cells of its neighbours; rerun it")
    if nbrs.attrs.get("consider_clusters"):
        log.warning("%s searched neighbours within clusters only: labels that follow those "
                    "clusters are transferred by construction (run with --no-clusters)", run_dir)
    ref_cells = pd.Index(nbrs["reference_names"][:])
    labels = pd.Series(labels)
    pos = labels.index.astype(str).get_indexer(ref_cells.astype(str))
    if (pos < 0).any():
        missing = ", ".join(f"'{c}'" for c in ref_cells[pos < 0][:5])
        raise InputError(f"reference cells without a label: {missing}")
    codes, names = pd.factorize(labels.to_numpy()[pos])
    if (codes < 0).any():
        missing = ", ".join(f"'{c}'" for c in ref_cells[codes < 0][:5])
        raise InputError(f"reference cells with an empty (NaN) label: {missing}")
    label, share = graph.label_graph(da.from_zarr(nbrs["indices"]), da.from_zarr(nbrs["weights"]),
                                     codes, len(names))
    label, share = da.compute(label, share)
    out = pd.DataFrame({"label": np.asarray(names, dtype=object)[np.maximum(label, 0)],
                        "confidence": share}, index=pd.Index(nbrs["obs_names"][:], name="cell"))
    out.loc[label < 0, "label"] = np.nan
    return out
