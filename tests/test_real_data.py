"""End to end through the CLI on real Molecular Cartography mouse cortex sections."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans

from scimpute_dask.cli import main

from .conftest import MC_CORTEX

pytestmark = pytest.mark.skipif(not MC_CORTEX.exists(), reason="../shared data not present")


@pytest.fixture(scope="module")
def mc_inputs(tmp_path_factory):
    """A1 as reference (all 100 genes, its CSV as is); A2 as query with 60 genes visible."""
    tmp = tmp_path_factory.mktemp("mc")
    ref = pd.read_csv(MC_CORTEX / "A1" / "matrix.csv", index_col=0)
    query = pd.read_csv(MC_CORTEX / "A2" / "matrix.csv", index_col=0)
    ref.index = "A1_" + ref.index.astype(str)
    query.index = "A2_" + query.index.astype(str)
    rng = np.random.default_rng(0)
    visible = np.sort(rng.choice(ref.columns, 60, replace=False))
    hidden = ref.columns.difference(visible)
    ref_csv = tmp / "A1.csv"
    ref.to_csv(ref_csv)
    query_tsv = tmp / "A2_panel.tsv"
    query[visible].T.to_csv(query_tsv, sep="\t")
    # A joint clustering of both sections on the visible genes (log-normalised).
    both = pd.concat([query[visible], ref[visible]])
    lib = both.sum(axis=1).replace(0, 1)
    logn = np.log1p(both.div(lib, axis=0) * 1e3)
    ids = KMeans(n_clusters=6, n_init=4, random_state=0).fit_predict(logn)
    table = tmp / "identities.tsv"
    pd.DataFrame({"cell": both.index, "id": ids}).to_csv(table, sep="\t", index=False)
    return tmp, ref_csv, query_tsv, table, query, hidden, visible


@pytest.mark.parametrize("clusters", [True, False])
def test_mc_cortex_end_to_end(mc_inputs, clusters, capsys):
    tmp, ref_csv, query_tsv, table, query, hidden, visible = mc_inputs
    out = tmp / f"out_{clusters}"
    argv = ["run", "--query", str(query_tsv), "--reference", str(ref_csv),
            "--reference-layout", "cells_x_genes", "--out", str(out), "--k", "15", "--quiet"]
    argv += ["--identities", str(table), "--name-column", "0"] if clusters else ["--no-clusters"]
    assert main(argv) == 0
    assert "imputation.tsv" in capsys.readouterr().out

    imputed = pd.read_csv(out / "imputation.tsv", sep="\t", index_col=0)
    assert imputed.shape == (len(query), 100)
    assert list(imputed.index) == list(query.index)

    # Cells with no counts on the visible genes cannot be placed: reported, NaN.
    empty = query.index[(query[visible] == 0).all(axis=1)]
    listed = (out / "unimputable_cells.txt").read_text().split()
    assert sorted(listed) == sorted(empty)
    assert imputed.loc[empty].isna().all().all()

    # The hidden genes are predicted: per-gene correlation with the measured counts.
    ok = imputed.index.difference(empty)
    truth = np.log1p(query.loc[ok, hidden].to_numpy(float))
    pred = np.log1p(imputed.loc[ok, hidden].to_numpy(float))
    varies = (truth.std(axis=0) > 0) & (pred.std(axis=0) > 0)
    t = truth[:, varies] - truth[:, varies].mean(axis=0)
    p = pred[:, varies] - pred[:, varies].mean(axis=0)
    r = (t * p).sum(axis=0) / np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0))
    assert np.median(r) > 0.2

    sim = pd.read_csv(out / "sim_matrix.tsv", sep="\t")
    assert len(sim) == 15 * len(ok)
    assert sim["distance"].between(0, 2).all()
    scores = np.array((out / "scores.txt").read_text().split(), dtype=float)
    assert len(scores) == len(query)
    assert np.nanmedian(scores) > 0.5


def test_float32_store_writes_the_float64_table_byte_for_byte(mc_inputs, monkeypatch):
    """Raw counts stay far below the float32 limit: the imputed store is float32 (half
    the disk) and imputation.tsv is byte-identical to the one written from float64."""
    import zarr

    from scimpute_dask.kernels import imputation

    tmp, ref_csv, query_tsv, *_ = mc_inputs
    argv = ["run", "--query", str(query_tsv), "--reference", str(ref_csv),
            "--reference-layout", "cells_x_genes", "--k", "30", "--quiet", "--no-clusters",
            "--weighting", "softmax", "--average", "log1p"]
    assert main([*argv, "--out", str(tmp / "f32")]) == 0
    monkeypatch.setattr(imputation, "FLOAT32_TEXT_LIMIT", 0.0)  # nothing fits: float64
    assert main([*argv, "--out", str(tmp / "f64")]) == 0
    stores = {d: zarr.open_group(tmp / d / "zarr" / "imputed.zarr", mode="r")["X"]
              for d in ("f32", "f64")}
    assert stores["f32"].dtype == np.float32 and stores["f64"].dtype == np.float64
    assert (tmp / "f32" / "imputation.tsv").read_bytes() == \
        (tmp / "f64" / "imputation.tsv").read_bytes()
    np.testing.assert_allclose(stores["f32"][:], stores["f64"][:], rtol=2.5e-7)


def _per_gene_pearson(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    t, p = np.log1p(truth), np.log1p(pred)
    t, p = t - t.mean(axis=0), p - p.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (t * p).sum(axis=0) / np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0))


def test_approximate_search_keeps_the_held_out_accuracy(tmp_path):
    """A1 -> A2 with half the genes held out: --search approx, forced onto this small data,
    gives the held-out accuracy of the exact search, and records the recall it measured."""
    import json

    ref = pd.read_csv(MC_CORTEX / "A1" / "matrix.csv", index_col=0)
    query = pd.read_csv(MC_CORTEX / "A2" / "matrix.csv", index_col=0)
    ref.index, query.index = "A1_" + ref.index.astype(str), "A2_" + query.index.astype(str)
    visible = np.sort(np.random.default_rng(1).choice(ref.columns, 50, replace=False))
    hidden = ref.columns.difference(visible)
    ref.to_csv(tmp_path / "A1.csv")
    query[visible].to_csv(tmp_path / "A2.csv")
    pearson, runs = {}, {}
    for mode in ("exact", "approx"):
        out = tmp_path / mode
        assert main(["run", "--query", str(tmp_path / "A2.csv"), "--query-layout",
                     "cells_x_genes", "--reference", str(tmp_path / "A1.csv"),
                     "--reference-layout", "cells_x_genes", "--no-clusters", "--k", "15",
                     "--search", mode, "--tsv-genes", ",".join(hidden), "--no-report",
                     "--out", str(out), "--quiet"]) == 0
        imputed = pd.read_csv(out / "imputation.tsv", sep="\t", index_col=0).dropna()
        r = _per_gene_pearson(query.loc[imputed.index, hidden].to_numpy(float),
                              imputed[hidden].to_numpy(float))
        pearson[mode] = float(np.nanmean(r))
        runs[mode] = json.loads((out / "run.json").read_text())["search"]
    assert runs["exact"] == {"mode": "exact"}
    approx = runs["approx"]
    assert approx["recall_at_k"] >= 0.95 and approx["probes"] < approx["lists"]
    assert approx["recall_ci95"][0] <= approx["recall_at_k"] <= approx["recall_ci95"][1]
    assert abs(pearson["approx"] - pearson["exact"]) <= 0.005, pearson
