"""Held-out cross-validation: no leak, metrics against NumPy/SciPy, reliability, CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy.stats import pearsonr, spearmanr

from scimpute_dask import InputError, cross_validate, run_imputation
from scimpute_dask.cli import main
from scimpute_dask.engine import search
from scimpute_dask.kernels.metrics import METRICS, paired_scores, summarize
from scimpute_dask.tools.validate import gene_folds

from .conftest import MC_CORTEX

real_data = pytest.mark.skipif(not MC_CORTEX.exists(), reason="../shared data not present")


@pytest.fixture(scope="module")
def pair(small_pair):
    """Query with 30 panel genes (2 all-zero cells), reference with 120 genes."""
    q = small_pair.query.iloc[:120].copy()
    q.iloc[:2] = 0.0
    return q, small_pair.reference.iloc[:200]


def test_gene_folds_are_seeded_balanced_and_disjoint():
    a = gene_folds(23, 5, seed=3)
    assert np.array_equal(a, gene_folds(23, 5, seed=3))
    assert not np.array_equal(a, gene_folds(23, 5, seed=4))
    assert sorted(np.bincount(a)) == [4, 4, 5, 5, 5]


def test_no_held_out_gene_reaches_the_neighbour_search(tmp_path, pair, monkeypatch):
    """Record the values the searcher is given (the reference it prepares, the query it
    searches) and identify their genes by content."""
    q, r = pair
    references, queries = [], []
    prepare, neighbours = search.prepare, search.Searcher.neighbours

    def spy_prepare(reference, *args, **kwargs):
        references.append(np.asarray(reference.compute()))
        return prepare(reference, *args, **kwargs)

    def spy_neighbours(self, query, *args, **kwargs):
        queries.append(np.asarray(query.compute()))
        return neighbours(self, query, *args, **kwargs)

    monkeypatch.setattr(search, "prepare", spy_prepare)
    monkeypatch.setattr(search.Searcher, "neighbours", spy_neighbours)
    res = cross_validate(q, r, tmp_path / "cv", k=5, folds=4, reliability=False, plot=False)
    seen = list(zip(queries, references, strict=True))
    assert len(seen) == 4
    shared = [g for g in r.columns if g in set(q.columns)]
    q_cols = q[shared].to_numpy(np.float32)
    r_cols = r[shared].to_numpy(np.float32)
    fold = res.genes.set_index("gene").loc[shared, "fold"].to_numpy()
    for f, (qs, rs) in enumerate(seen):
        # each column seen is exactly one shared gene, in both datasets
        got_q = [int(np.flatnonzero((q_cols == qs[:, [j]]).all(axis=0))[0])
                 for j in range(qs.shape[1])]
        got_r = [int(np.flatnonzero((r_cols == rs[:, [j]]).all(axis=0))[0])
                 for j in range(rs.shape[1])]
        assert got_q == got_r == list(np.flatnonzero(fold != f))


def _brute_oof(q: pd.DataFrame, r: pd.DataFrame, fold: pd.Series, k: int) -> pd.DataFrame:
    """Out-of-fold imputation of every shared gene, written plainly (float64, dense)."""
    shared = list(fold.index)
    out = pd.DataFrame(np.nan, index=q.index, columns=shared)
    for f in np.unique(fold):
        train = [g for g in shared if fold[g] != f]
        test = [g for g in shared if fold[g] == f]
        a, b = q[train].to_numpy(np.float64), r[train].to_numpy(np.float64)
        an, bn = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        sim = (a / np.where(an == 0, 1, an)[:, None]) @ (b / bn[:, None]).T
        # equal cosines (e.g. of cells with one search gene) tie; the lower row wins
        idx = np.argsort(-np.round(sim, 9), axis=1, kind="stable")[:, :k]
        w = np.take_along_axis(sim, idx, axis=1) + 1
        vals = np.einsum("ik,ikg->ig", w, r[test].to_numpy(np.float64)[idx]) / w.sum(1)[:, None]
        vals[an == 0] = np.nan
        out[test] = vals
    return out


def test_scores_match_an_independent_computation(tmp_path, pair):
    q, r = pair
    q = q.astype(np.float32).astype(np.float64)
    r = r.astype(np.float32).astype(np.float64)
    res = cross_validate(q, r, tmp_path / "cv", k=6, folds=5, seed=1, chunk_size=50)
    fold = res.genes.set_index("gene")["fold"]
    oof = _brute_oof(q, r, fold, 6)
    ok = oof.notna().all(axis=1).to_numpy()
    assert (~ok).sum() == 2  # the all-zero cells are left out, not scored as 0
    genes = res.genes.set_index("gene")
    for g in fold.index:
        meas, imp = q.loc[ok, g].to_numpy(), oof.loc[ok, g].to_numpy()
        if meas.std() == 0:
            assert np.isnan(genes.loc[g, "pearson"])
            continue
        assert genes.loc[g, "pearson"] == pytest.approx(pearsonr(meas, imp)[0], abs=1e-4)
        assert genes.loc[g, "spearman"] == pytest.approx(spearmanr(meas, imp)[0], abs=1e-3)
        assert genes.loc[g, "mse"] == pytest.approx(np.mean((meas - imp) ** 2), rel=1e-4)
        assert genes.loc[g, "sparsity"] == pytest.approx(np.mean(meas == 0))
    cells = res.cells
    assert cells.loc[q.index[~ok]].isna().all().all()
    m, i = q.loc[ok, fold.index].to_numpy(), oof.loc[ok].to_numpy()
    css = (m * i).sum(1) / np.linalg.norm(m, axis=1) / np.linalg.norm(i, axis=1)
    np.testing.assert_allclose(cells.loc[ok, "css"], css, atol=1e-5)
    np.testing.assert_allclose(cells.loc[ok, "rmse"], np.sqrt(((m - i) ** 2).mean(1)),
                               rtol=1e-4)
    # files: per-gene, per-cell and summary tables, the plot
    table = pd.read_csv(res.files["genes"], sep="\t")
    assert list(table.columns) == ["gene", "fold", "sparsity", *METRICS, "agreement"]
    summary = pd.read_csv(res.files["summary"], sep="\t")
    row = summary[(summary.level == "gene") & (summary.metric == "pearson")].iloc[0]
    assert row["median"] == pytest.approx(np.nanmedian(genes["pearson"]), abs=1e-5)
    assert res.files["plot"].read_bytes()[:4] == b"\x89PNG"


def test_metrics_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    a = rng.poisson(2.0, (40, 7)).astype(float)
    b = a + rng.normal(0, 1, a.shape)
    a[:, 3] = 0.0  # all-zero column: cosine and correlations undefined
    b[:, 5] = 2.5  # constant imputed column: correlations undefined
    s = paired_scores(a, b, axis=0)
    for j in range(7):
        if j in (3, 5):
            assert np.isnan(s[j, 1]) and np.isnan(s[j, 2])
            assert np.isnan(s[j, 0]) == (j == 3)
            continue
        cos = a[:, j] @ b[:, j] / np.linalg.norm(a[:, j]) / np.linalg.norm(b[:, j])
        assert s[j, 0] == pytest.approx(cos)
        assert s[j, 1] == pytest.approx(pearsonr(a[:, j], b[:, j])[0])
        assert s[j, 2] == pytest.approx(spearmanr(a[:, j], b[:, j])[0])
        assert s[j, 3] == pytest.approx(np.mean((a[:, j] - b[:, j]) ** 2))
    np.testing.assert_allclose(paired_scores(a.T, b.T, axis=1), s)
    stats = summarize(s)
    assert stats["pearson"]["n"] == 5
    assert stats["mse"]["q75"] == pytest.approx(np.percentile(s[:, 3], 75))


def test_bad_folds(tmp_path, pair):
    with pytest.raises(InputError, match="folds must be between 2 and the number of shared"):
        cross_validate(*pair, tmp_path / "cv", folds=31)
    with pytest.raises(InputError, match="seed must be a non-negative integer, got -1"):
        cross_validate(*pair, tmp_path / "cv", seed=-1)
    assert not (tmp_path / "cv").exists()


@real_data
def test_reliability_predicts_accuracy_of_reference_only_genes(tmp_path):
    """A2 with 60 of its genes as query: rate the other 40, then measure them."""
    ref = pd.read_csv(MC_CORTEX / "A1" / "matrix.csv", index_col=0)
    query = pd.read_csv(MC_CORTEX / "A2" / "matrix.csv", index_col=0)
    ref.index, query.index = "A1_" + ref.index.astype(str), "A2_" + query.index.astype(str)
    visible = query.columns[::5].append(query.columns[1::5]).append(query.columns[2::5])
    res = cross_validate(query[visible], ref, tmp_path / "cv", k=15, plot=False)
    # the reference-only genes are rated from neighbour moments: no imputation is stored
    assert not list((tmp_path / "cv" / "zarr").glob("all_imputed*"))
    rel = res.reliability.set_index("gene")
    assert rel["shared"].sum() == 60
    hidden = rel.index[~rel["shared"]]
    run_imputation(query[visible], ref, outdir=tmp_path / "run", k=15, consider_clusters=False)
    imputed = zarr.open_group(tmp_path / "run" / "zarr" / "imputed.zarr")["X"][:]
    ok = np.isfinite(imputed).all(axis=1)
    actual = paired_scores(query.loc[ok, hidden].to_numpy(),
                           imputed[ok][:, ref.columns.get_indexer(hidden)], axis=0)[:, 1]
    predicted = rel.loc[hidden, "predicted_pearson"].to_numpy()
    assert spearmanr(predicted, actual)[0] > 0.8
    assert np.median(np.abs(predicted - actual)) < 0.1


@real_data
def test_cli_validate_on_real_data(tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["validate", "--query", str(MC_CORTEX / "A2" / "matrix.csv"),
                 "--reference", str(MC_CORTEX / "A1" / "matrix.csv"),
                 "--query-layout", "cells_x_genes", "--reference-layout", "cells_x_genes",
                 "--out", str(out), "--k", "10", "--quiet"]) == 0
    assert "per gene:" in capsys.readouterr().out
    genes = pd.read_csv(out / "genes.tsv", sep="\t")
    assert len(genes) == 100 and sorted(genes["fold"].value_counts()) == [20] * 5
    assert np.nanmedian(genes["pearson"]) > 0.3
    cells = pd.read_csv(out / "cells.tsv", sep="\t", index_col=0)
    assert len(cells) == 3794
    assert (out / "summary.tsv").exists() and (out / "reliability.tsv").exists()
    assert (out / "genes_vs_sparsity.png").stat().st_size > 10_000


def test_clusters_restrict_every_fold(tmp_path, small_pair):
    q, r = small_pair.query.iloc[:100], small_pair.reference
    ids = small_pair.identities
    cross_validate(q, r, tmp_path / "cv", identities=ids, consider_clusters=True, k=5,
                   folds=3, reliability=False, plot=False)
    table = ids.set_index("cell")["id"]
    for f in range(3):
        idx = zarr.open_group(tmp_path / "cv" / "zarr" / f"fold{f}_neighbors.zarr")["indices"][:]
        ref_ids = table.loc[r.index].to_numpy()[idx]
        assert (ref_ids == table.loc[q.index].to_numpy()[:, None]).all()
    with pytest.raises(InputError, match="needs the cell identity table"):
        cross_validate(q, r, tmp_path / "cv2", consider_clusters=True)
