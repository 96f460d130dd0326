"""A finished run's genes imputed on demand (``read_run``), against the stored imputation."""

from __future__ import annotations

import shutil

import anndata
import dask
import numpy as np
import pandas as pd
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


def _tsv(path):
    return pd.read_csv(path, sep="\t", index_col=0)


def test_impute_genes_stores_a_subset_and_none_stores_only_the_neighbours(tmp_path,
                                                                           small_inputs):
    args = (small_inputs.query, small_inputs.reference, small_inputs.identities, 0)
    full = tmp_path / "full"
    run_imputation(*args, full, k=5, chunk_size=100, report=False)
    table = _tsv(full / "imputation.tsv")
    genes = list(table.columns[[3, 40, 41, 119]])  # shared and unmeasured genes alike
    part = tmp_path / "part"
    result = run_imputation(*args, part, k=5, chunk_size=100, report=False,
                            impute_genes=genes, anndata=True)
    assert result.n_genes == len(table.columns)
    subset = _tsv(part / "imputation.tsv")
    assert list(subset.columns) == genes  # 'all' of the TSV: every imputed gene
    pd.testing.assert_frame_equal(subset, table[genes])
    assert (part / "scores.txt").read_bytes() == (full / "scores.txt").read_bytes()
    adata = anndata.read_zarr(part / "adata.zarr")
    assert list(adata.var_names) == genes
    assert not (part / "zarr" / "imputed_shared.zarr").exists()

    none = tmp_path / "none"
    run_imputation(*args, none, k=5, chunk_size=100, report=False, impute_genes="none")
    assert not (none / "zarr" / "imputed.zarr").exists()
    assert not (none / "imputation.tsv").exists()
    assert (none / "scores.txt").read_bytes() == (full / "scores.txt").read_bytes()
    assert (none / "sim_matrix.tsv").read_bytes() == (full / "sim_matrix.tsv").read_bytes()
    stored = zarr.open_group(full / "zarr" / "imputed.zarr", mode="r")["X"]
    lazy = read_run(none)
    pick = [0, 17, 99, len(table.columns) - 1]
    np.testing.assert_array_equal(lazy[:, pick].X.compute(), stored[:, pick])


@pytest.mark.parametrize(("options", "message"), [
    ({"impute_genes": ["no_such_gene"]}, "genes requested for imputation are not in"),
    ({"impute_genes": "none", "tsv_genes": ["G"]}, "must be imputed genes"),
    ({"impute_genes": "none", "plot_genes": ["G"]}, "must be imputed genes"),
])
def test_genes_outside_the_imputation_are_refused_up_front(tmp_path, small_inputs, options,
                                                            message):
    gene = _tsv(small_inputs.reference).index[0]  # the reference's first gene
    options = {k: [gene] if v == ["G"] else v for k, v in options.items()}
    with pytest.raises(InputError, match=message):
        run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0,
                       tmp_path / "out", k=5, **options)
    assert not (tmp_path / "out").exists()
