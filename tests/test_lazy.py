"""A finished run's genes imputed on demand (``read_run``), against the stored imputation."""

from __future__ import annotations

import shutil

import dask
import numpy as np
import pytest
import zarr

from scimpute_dask import InputError, read_run, run_imputation
from scimpute_dask.synthetic import make_pair

from .conftest import write_inputs


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A clustered CPM run whose reference has genes over 2**15 (stored beside in float64)."""
    tmp = tmp_path_factory.mktemp("lazy")
    pair = make_pair(n_query=700, n_reference=500, n_genes=220, n_panel=40, seed=8)
    inputs = write_inputs(tmp / "in", pair, zero_cells=2)
    out = tmp / "out"
    run_imputation(inputs.query, inputs.reference, inputs.identities, 0, out, k=7,
                   chunk_size=128, average="log1p", report=False)
    return out


def test_read_run_gives_the_stored_values_of_every_gene(wide_run):
    stored = zarr.open_group(wide_run / "zarr" / "imputed.zarr", mode="r")
    assert stored.attrs["wide_genes"], "the data should have genes beyond float32's text"
    adata = read_run(wide_run)
    assert adata.shape == stored["X"].shape
    np.testing.assert_array_equal(adata.X.compute(), stored["X"][:].astype(np.float32))
    np.testing.assert_array_equal(adata.obs_names, stored["obs_names"][:])
    np.testing.assert_array_equal(adata.var_names, stored["var_names"][:])
    scores = np.array((wide_run / "scores.txt").read_text().split(), dtype=float)
    np.testing.assert_array_equal(adata.obs["scimpute_score"], scores)
    assert adata.var["measured"].sum() == 40
    assert adata.uns["scimpute"]["parameters"]["average"] == "log1p"


def test_one_gene_is_computed_alone(wide_run, monkeypatch):
    from scimpute_dask.tools import lazy

    monkeypatch.setattr(lazy, "BLOCK_BYTES", 500 * 4 * 16)  # 16-gene blocks
    adata = read_run(wide_run)
    assert len(adata.X.chunks[1]) > 10
    gene = adata.var_names[137]
    column = adata[:, [gene]].X
    # only the gene block holding it is computed (one task per query block)
    (culled,) = dask.optimize(column)
    tasks = [k for k in dict(culled.__dask_graph__()) if "impute_block" in str(k)]
    assert len(tasks) == len(adata.X.chunks[0])
    stored = zarr.open_group(wide_run / "zarr" / "imputed.zarr", mode="r")["X"]
    np.testing.assert_array_equal(column.compute()[:, 0], stored[:, 137].astype(np.float32))


def test_read_run_follows_a_moved_output(wide_run, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(wide_run, moved)
    a = read_run(moved)[:, :5].X.compute()
    np.testing.assert_array_equal(a, read_run(wide_run)[:, :5].X.compute())


def test_read_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(InputError, match="not a finished scimpute-dask run"):
        read_run(tmp_path)
