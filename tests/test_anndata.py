"""AnnData in and out: .h5ad / AnnData-Zarr inputs, layers, cluster_key, the imputed AnnData."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import sparse

import scimpute_dask
from scimpute_dask import InputError, run_imputation
from scimpute_dask.cli import main

from .conftest import brute_force

anndata = pytest.importorskip("anndata")

TEXT_OUTPUTS = ["imputation.tsv", "sim_matrix.tsv", "scores.txt", "stats.txt",
                "unimputable_cells.txt"]


def _adata(frame: pd.DataFrame, ids: pd.DataFrame, as_sparse: bool, layer: str | None = None,
           xy: np.ndarray | None = None):
    """An AnnData of a cells × genes frame; with ``layer``, X holds junk and the layer the data."""
    values = frame.to_numpy(np.float32)
    matrix = sparse.csr_matrix(values) if as_sparse else values
    cluster = ids.set_index("cell")["id"].astype(str).reindex(frame.index)
    adata = anndata.AnnData(X=matrix, obs=pd.DataFrame({"cluster": cluster.to_numpy(),
                                                        "batch": "b1"}, index=frame.index),
                            var=pd.DataFrame(index=frame.columns))
    if layer is not None:
        adata.layers[layer] = adata.X
        adata.X = np.full(values.shape, 7.0, dtype=np.float32)
    if xy is not None:
        adata.obsm["spatial"] = xy
    return adata


def _same_run(a, b) -> None:
    for name in TEXT_OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for store, arrays in [("imputed.zarr", ["X"]), ("neighbors.zarr", ["indices", "weights"])]:
        for arr in arrays:
            np.testing.assert_array_equal(zarr.open_group(a / "zarr" / store, mode="r")[arr][:],
                                          zarr.open_group(b / "zarr" / store, mode="r")[arr][:])


@pytest.fixture
def tsv_run(tmp_path, small_inputs):
    out = tmp_path / "tsv"
    run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0, out,
                   k=5, chunk_size=100)
    return out


def test_h5ad_and_anndata_zarr_give_the_tsv_numbers(tmp_path, small_inputs, tsv_run):
    ids = small_inputs.identities_df
    q = _adata(small_inputs.query_df, ids, as_sparse=True)
    r = _adata(small_inputs.reference_df, ids, as_sparse=False)
    q.write_h5ad(tmp_path / "q.h5ad")
    r.write_h5ad(tmp_path / "r.h5ad")
    out = tmp_path / "h5ad"
    assert main(["run", "--query", str(tmp_path / "q.h5ad"), "--reference",
                 str(tmp_path / "r.h5ad"), "--identities", str(small_inputs.identities),
                 "--out", str(out), "--k", "5", "--chunk-size", "100", "-q"]) == 0
    _same_run(tsv_run, out)

    # AnnData-Zarr (Zarr v2 and v3), expression in a layer, clusters from obs
    for fmt in (2, 3):
        path = tmp_path / f"q{fmt}.zarr"
        with anndata.settings.override(zarr_write_format=fmt):
            _adata(small_inputs.query_df, ids, True, layer="counts").write_zarr(path)
            _adata(small_inputs.reference_df, ids, False, layer="counts").write_zarr(
                tmp_path / f"r{fmt}.zarr")
        out = tmp_path / f"zarr{fmt}"
        assert main(["run", "--query", str(path), "--reference", str(tmp_path / f"r{fmt}.zarr"),
                     "--cluster-key", "cluster", "--layer", "counts", "--out", str(out),
                     "--k", "5", "--chunk-size", "100", "-q"]) == 0
        _same_run(tsv_run, out)


def test_cluster_key_equals_the_identity_table(tmp_path, small_inputs, tsv_run):
    ids = small_inputs.identities_df
    q = _adata(small_inputs.query_df, ids, as_sparse=True)
    r = _adata(small_inputs.reference_df, ids, as_sparse=True)
    out = tmp_path / "key"
    run_imputation(q, r, None, 0, out, k=5, chunk_size=100, cluster_key="cluster")
    _same_run(tsv_run, out)
    # and it is really clustered: the brute force with clusters has the same neighbours
    bf = brute_force(small_inputs.query_df, small_inputs.reference_df,
                     q.obs["cluster"].to_numpy(), r.obs["cluster"].to_numpy(), 5, True)
    got = zarr.open_group(out / "zarr" / "neighbors.zarr", mode="r")["indices"][:]
    ok = ~bf.ambiguous
    np.testing.assert_array_equal(np.sort(got[ok], axis=1), np.sort(bf.indices[ok], axis=1))


def test_bad_anndata_inputs_are_named(tmp_path, small_inputs):
    ids = small_inputs.identities_df
    q = _adata(small_inputs.query_df, ids, as_sparse=True)
    r = _adata(small_inputs.reference_df, ids, as_sparse=False)
    q.write_h5ad(tmp_path / "q.h5ad")
    r.write_h5ad(tmp_path / "r.h5ad")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"no layer 'spliced'; layers are \[\]"):
        run_imputation(tmp_path / "q.h5ad", tmp_path / "r.h5ad", None, 0, out,
                       consider_clusters=False, layer="spliced")
    with pytest.raises(InputError, match=r"no obs column 'leiden'.*\['cluster', 'batch'\]"):
        run_imputation(tmp_path / "q.h5ad", tmp_path / "r.h5ad", None, 0, out,
                       cluster_key="leiden")
    with pytest.raises(InputError, match="needs AnnData inputs"):
        run_imputation(small_inputs.query, tmp_path / "r.h5ad", None, 0, out,
                       cluster_key="cluster")
    with pytest.raises(InputError, match="not both"):
        run_imputation(tmp_path / "q.h5ad", tmp_path / "r.h5ad", small_inputs.identities, 0,
                       out, cluster_key="cluster")
    with pytest.raises(InputError, match="have no coordinates"):
        pd.DataFrame({"cell": ["nope"], "x": [1.0], "y": [2.0]}).to_csv(tmp_path / "xy.csv",
                                                                        index=False)
        run_imputation(tmp_path / "q.h5ad", tmp_path / "r.h5ad", None, 0, out,
                       consider_clusters=False, coords=tmp_path / "xy.csv")
    assert not out.exists()


def test_output_anndata_opens_in_anndata_and_scanpy(tmp_path, small_inputs):
    sc = pytest.importorskip("scanpy")
    ids = small_inputs.identities_df
    xy = np.random.default_rng(0).uniform(0, 1000, (len(small_inputs.query_df), 2))
    q = _adata(small_inputs.query_df, ids, as_sparse=True, xy=xy)
    r = _adata(small_inputs.reference_df, ids, as_sparse=False)
    q.write_h5ad(tmp_path / "q.h5ad")
    r.write_h5ad(tmp_path / "r.h5ad")
    out = tmp_path / "out"
    result = run_imputation(tmp_path / "q.h5ad", tmp_path / "r.h5ad", None, 0, out, k=5,
                            cluster_key="cluster", h5ad=True)
    assert set(result.files) >= {"anndata", "h5ad", "report"}
    X = zarr.open_group(out / "zarr" / "imputed.zarr", mode="r")["X"][:]
    nbrs = zarr.open_group(out / "zarr" / "neighbors.zarr", mode="r")
    scores = np.array((out / "scores.txt").read_text().split(), dtype=float)
    for adata in (anndata.read_zarr(out / "adata.zarr"), anndata.read_h5ad(out / "imputed.h5ad")):
        assert adata.shape == (257, 120)
        assert adata.X.dtype == np.float32
        np.testing.assert_array_equal(adata.X, X.astype(np.float32))
        assert list(adata.obs_names) == list(q.obs_names)
        assert list(adata.var_names) == list(r.var_names)
        pd.testing.assert_frame_equal(adata.obs[["cluster", "batch"]], q.obs,
                                      check_categorical=False)
        np.testing.assert_array_equal(adata.obs["scimpute_score"], scores)
        np.testing.assert_array_equal(adata.obsm["spatial"], xy)
        np.testing.assert_array_equal(adata.obsm["scimpute_neighbors"], nbrs["indices"][:])
        np.testing.assert_array_equal(adata.obsm["scimpute_weights"], nbrs["weights"][:])
        assert adata.var["measured"].to_numpy().tolist() == \
            r.var_names.isin(q.var_names).tolist()
        params = adata.uns["scimpute"]["parameters"]
        assert params["k"] == 5 and params["cluster_key"] == "cluster"
        assert list(adata.uns["scimpute"]["reference_cells"]) == list(r.obs_names)
        # scanpy works on it directly
        sub = adata[~np.isnan(adata.X).any(axis=1)][:50, :20].copy()
        expected = np.log1p(sub.X)
        sc.pp.log1p(sub)
        np.testing.assert_allclose(sub.X, expected, rtol=1e-6)
        sc.pp.pca(sub, n_comps=5)
        assert sub.obsm["X_pca"].shape == (50, 5)
    # adata.zarr's X is the imputation store's chunks, linked, not a second copy
    chunks = [f for f in (out / "adata.zarr" / "X").rglob("*") if f.is_file()
              and f.name != "zarr.json"]
    assert chunks and all(f.stat().st_nlink == 2 for f in chunks)
    assert anndata.read_zarr(out / "adata.zarr").X.dtype == np.float32
    assert "encoding-type" not in zarr.open_group(out / "zarr" / "imputed.zarr",
                                                  mode="r")["X"].attrs


def test_scanpy_style_api(tmp_path, small_inputs, tsv_run):
    ids = small_inputs.identities_df
    q = _adata(small_inputs.query_df, ids, as_sparse=True)
    r = _adata(small_inputs.reference_df, ids, as_sparse=False)
    before = q.copy()
    imputed = scimpute_dask.impute(q, r, k=5, cluster_key="cluster", copy=True)
    X = zarr.open_group(tsv_run / "zarr" / "imputed.zarr", mode="r")["X"][:]
    np.testing.assert_array_equal(imputed.X, X.astype(np.float32))
    assert isinstance(imputed.X, np.ndarray)
    assert "scimpute_neighbors" not in q.obsm and q.obs.equals(before.obs)

    out = tmp_path / "kept"
    lazy = scimpute_dask.impute(q, r, k=5, cluster_key="cluster", outdir=out)
    assert type(lazy.X).__name__ == "Array"  # dask: out of core
    np.testing.assert_array_equal(lazy.X.compute(), X.astype(np.float32))
    np.testing.assert_array_equal(
        q.obsm["scimpute_neighbors"],
        zarr.open_group(tsv_run / "zarr" / "neighbors.zarr", mode="r")["indices"][:])
    assert "scimpute_score" in q.obs and q.uns["scimpute"]["parameters"]["k"] == 5
    assert (out / "report.html").exists() and (out / "adata.zarr").is_dir()


def test_sparse_input_is_never_densified_whole(tmp_path):
    """Peak RSS of converting a CSR .h5ad, measured from outside, vs. its dense size."""
    import os
    import subprocess
    import sys

    n_cells, n_genes, density = 120_000, 2_500, 0.005
    rng = np.random.default_rng(0)
    nnz = int(n_cells * n_genes * density)
    X = sparse.csr_matrix((rng.integers(1, 20, nnz).astype(np.float32),
                           (np.sort(rng.integers(0, n_cells, nnz)),
                            rng.integers(0, n_genes, nnz))), shape=(n_cells, n_genes))
    adata = anndata.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                            var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    adata.write_h5ad(tmp_path / "big.h5ad")
    adata[:100].write_h5ad(tmp_path / "tiny.h5ad")  # the same, 100 cells: the baseline
    probe = X[[0, 4_567, 119_999]].toarray()
    del adata, X
    dense_mib = n_cells * n_genes * 4 / 2**20
    launcher = ("import os, subprocess, sys; "
                "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
                "_, status, usage = os.wait4(p.pid, 0); "
                "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")

    def peak_mib(name: str) -> float:
        cmd = [sys.executable, "-m", "scimpute_dask.cli", "convert", str(tmp_path / name),
               str(tmp_path / f"{name}.zarr"), "-q", "--memory-limit", "1GB"]
        done = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              check=True)
        code, peak_kib = map(int, done.stdout.split())
        assert code == 0, done.stderr
        return peak_kib / 1024

    big, baseline = peak_mib("big.h5ad"), peak_mib("tiny.h5ad")
    print(f"peak RSS {big:.0f} MiB, {baseline:.0f} MiB for 100 cells; dense float32 matrix "
          f"{dense_mib:.0f} MiB")
    assert big - baseline < dense_mib / 4
    store = scimpute_dask.ExpressionStore.open(tmp_path / "big.h5ad.zarr")
    np.testing.assert_array_equal(store.select([0, 4_567, 119_999], np.arange(n_genes)), probe)
    # stored sparse: within 1.5 times its CSR bytes (float32 values, int32 genes, int64 rows)
    assert store.sparse
    stored = sum(f.stat().st_size for f in (tmp_path / "big.h5ad.zarr").rglob("*")
                 if f.is_file())
    assert stored <= 1.5 * (8 * nnz + 8 * (n_cells + 1)), stored


def test_csc_and_integer_layers_convert_like_dense(tmp_path, small_inputs):
    frame = small_inputs.reference_df.round(0)
    dense = scimpute_dask.convert(frame, tmp_path / "dense.zarr")
    obs, var = pd.DataFrame(index=frame.index), pd.DataFrame(index=frame.columns)
    csc = anndata.AnnData(X=sparse.csc_matrix(frame.to_numpy(np.float32)), obs=obs, var=var)
    csc.layers["counts"] = sparse.csr_matrix(frame.to_numpy(np.int64))
    csc.write_h5ad(tmp_path / "csc.h5ad")
    for layer in (None, "counts"):
        store = scimpute_dask.convert(tmp_path / "csc.h5ad", tmp_path / f"{layer}.zarr",
                                      layer=layer, memory_limit="700MB")
        np.testing.assert_array_equal(store.read(), dense.read())
    in_memory = scimpute_dask.convert(csc, tmp_path / "mem.zarr")
    np.testing.assert_array_equal(in_memory.read(), dense.read())
    with pytest.raises(InputError, match="only be chosen for AnnData"):
        run_imputation(small_inputs.query, tmp_path / "csc.h5ad", None, 0, tmp_path / "o",
                       consider_clusters=False, layer="counts")


def _annotated(small_inputs):
    """A query AnnData with valid annotations the output must carry: sparse and DataFrame
    obsm entries and (in memory only: files cannot hold it) a non-string obs column name."""
    q = _adata(small_inputs.query_df, small_inputs.identities_df, as_sparse=True)
    n = q.n_obs
    q.obsm["X_sparse"] = sparse.random(n, 3, density=0.5, format="csr", random_state=0)
    q.obsm["X_frame"] = pd.DataFrame({"a": np.arange(n, dtype=float), "b": 1.0},
                                     index=q.obs_names)
    q.obs[0] = np.arange(n)
    return q


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")
def test_annotations_are_normalised_alike_in_memory_and_from_files(tmp_path, small_inputs):
    from scimpute_dask.io import anndata_io

    q = _annotated(small_inputs)
    del q.obs[0]
    q.write_zarr(tmp_path / "q.zarr")
    for source in (q, tmp_path / "q.zarr"):
        obs, obsm = anndata_io.read_annotations(source)
        assert list(obs.columns) == ["cluster", "batch"]
        assert sorted(obsm) == ["X_frame", "X_sparse"]
        assert sparse.issparse(obsm["X_sparse"]) and obsm["X_sparse"].shape == (q.n_obs, 3)
        np.testing.assert_array_equal(obsm["X_frame"], q.obsm["X_frame"].to_numpy())


def test_annotated_query_writes_its_annotations(small_inputs, caplog):
    q = _annotated(small_inputs)
    r = _adata(small_inputs.reference_df, small_inputs.identities_df, as_sparse=False)
    imputed = scimpute_dask.impute(q, r, k=5, cluster_key="cluster", copy=True)
    assert sparse.issparse(imputed.obsm["X_sparse"])
    np.testing.assert_array_equal(imputed.obs["0"], np.arange(q.n_obs))
    np.testing.assert_array_equal(imputed.obsm["X_frame"], q.obsm["X_frame"].to_numpy())


def test_obsm_that_cannot_be_written_is_dropped_with_a_warning(small_inputs, caplog):
    from scimpute_dask.io import anndata_io

    q = _annotated(small_inputs)
    q.obsm["labels"] = pd.DataFrame({"name": "x"}, index=q.obs_names)
    _, obsm = anndata_io.read_annotations(q)
    assert "labels" not in obsm
    assert "obsm['labels'] (DataFrame) is not a numeric" in caplog.text


def test_coordinates_table(tmp_path):
    from scimpute_dask.io import anndata_io

    cells = np.array(["001", "002"], dtype=object)
    path = tmp_path / "xy.csv"
    path.write_text("cell,x,y\n002,3,4\n001,1,2\n")
    np.testing.assert_array_equal(anndata_io.read_coords(path, cells), [[1, 2], [3, 4]])
    path.write_text("cell,x,y\n002,3,4\n001,1,2\n002,5,6\n")
    with pytest.raises(InputError, match=r"xy\.csv: cells listed more than once: '002'"):
        anndata_io.read_coords(path, cells)
