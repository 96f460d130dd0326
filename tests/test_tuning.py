"""Self-tuning: honest (no held-out gene chooses), exact (the k_max lists give what direct runs
give), deterministic; the log1p average and large k end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr

from scimpute_dask import cross_validate, run_imputation
from scimpute_dask.cli import main
from scimpute_dask.engine import graph, search
from scimpute_dask.kernels.imputation import neighbour_weights, weighted_mean
from scimpute_dask.kernels.metrics import paired_scores
from scimpute_dask.kernels.tuning import prefix_scores
from scimpute_dask.tools import tune as tuning
from scimpute_dask.tools import validate

from .conftest import brute_force

SMALL_GRID = tuning.Grid(normalizations=("none", "zscore"), ks=(3, 8, 40),
                         weightings=(("cosine+1", 0.1), ("uniform", 0.1), ("softmax", 0.05)))


def _shared(pair):
    genes = list(pair.query.columns)
    return pair.query[genes].to_numpy(np.float32), pair.reference[genes].to_numpy(np.float32)


# --------------------------------------------------------------------------- #
# Exactness of the one-pass derivation
# --------------------------------------------------------------------------- #
def _dense_knn(q: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: float64 cosine, stable sort (ties to the lower row)."""
    q, r = q.astype(np.float64), r.astype(np.float64)
    qn, rn = np.linalg.norm(q, axis=1), np.linalg.norm(r, axis=1)
    sim = (q / np.where(qn == 0, 1, qn)[:, None]) @ (r / np.where(rn == 0, 1, rn)[:, None]).T
    idx = np.argsort(-np.round(sim, 9), axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(sim, idx, axis=1)
    idx[qn == 0], s[qn == 0] = -1, np.nan
    return idx, s


@pytest.mark.parametrize(("weighting", "temperature"), [("cosine+1", 0.1), ("softmax", 0.05),
                                                        ("uniform", 0.1)])
def test_prefix_scores_equal_direct_runs_and_brute_force(small_pair, weighting, temperature):
    q, r = _shared(small_pair)
    q[:3] = 0  # cells without neighbours are left out of every score
    train, test = np.arange(0, 30, 2), np.arange(1, 30, 2)
    ks = np.array([1, 4, 25, 60])
    idx, sim = (np.asarray(a) for a in search.knn(
        *graph.search_space(*(_da(x[:, train]) for x in (q, r))), int(ks[-1])))
    w = neighbour_weights(sim.astype(np.float64), weighting, temperature)
    got = prefix_scores(idx, np.nan_to_num(w)[None], r[:, test], q[:, test], ks)
    ok = idx[:, 0] >= 0
    for j, k in enumerate(ks):
        # a direct run at this k: its own kNN, its own weights, the engine's weighted mean
        d_idx, d_sim = (np.asarray(a) for a in search.knn(
            *graph.search_space(*(_da(x[:, train]) for x in (q, r))), int(k)))
        np.testing.assert_array_equal(d_idx, idx[:, :k])  # the lists are prefixes
        b_idx, _ = _dense_knn(q[:, train], r[:, train], int(k))
        np.testing.assert_array_equal(b_idx, d_idx)  # and equal brute force
        d_w = neighbour_weights(d_sim.astype(np.float64), weighting, temperature)
        for a, average in enumerate(("mean", "log1p")):
            imputed = weighted_mean(d_idx, d_w, r[:, test], average=average)
            want = paired_scores(q[ok][:, test], imputed[ok], axis=0)
            np.testing.assert_allclose(got["pearson"][a, 0, j], want[:, 1], rtol=1e-9,
                                       atol=1e-12)
            np.testing.assert_allclose(got["css"][a, 0, j], want[:, 0], rtol=1e-9, atol=1e-12)
            logs = paired_scores(np.log1p(q[ok][:, test].astype(np.float64)),
                                 np.log1p(imputed[ok]), axis=0)
            np.testing.assert_allclose(got["log_pearson"][a, 0, j], logs[:, 1], rtol=1e-9,
                                       atol=1e-12)


def _da(x):
    import dask.array as da

    return da.from_array(x, chunks=(97, -1))


def test_tuning_table_scores_equal_an_independent_cross_validation(small_pair):
    """A candidate's score = the mean over genes of its out-of-fold per-gene Pearson,
    computed plainly with dense NumPy."""
    q, r = _shared(small_pair)
    result = tuning.tune(q, r, folds=3, seed=5, grid=SMALL_GRID)
    fold = validate.gene_folds(q.shape[1], 3, 5)
    neighbours_only = result.table[result.table["blend"] == 1]  # blends: tests/test_blend.py
    for _, row in neighbours_only.sample(6, random_state=0).iterrows():
        oof = np.full(q.shape, np.nan)
        for f in range(3):
            train, test = fold != f, fold == f
            a, b = q[:, train].astype(np.float64), r[:, train].astype(np.float64)
            if row["normalize"] == "zscore":
                a = (a - a.mean(0)) / np.where(a.std(0) > 0, a.std(0), 1)
                b = (b - b.mean(0)) / np.where(b.std(0) > 0, b.std(0), 1)
                a[~(q[:, train] != 0).any(1)] = 0
            idx, sim = _dense_knn(a, b, int(row["k"]))
            w = neighbour_weights(sim, row["weighting"], row["temperature"])
            oof[:, test] = weighted_mean(idx, np.nan_to_num(w), r[:, test],
                                         average=row["average"])
        ok = np.isfinite(oof).all(axis=1)
        want = np.nanmean(paired_scores(q[ok], oof[ok], axis=0)[:, 1])
        assert row["pearson"] == pytest.approx(want, rel=1e-6), row.to_dict()


def test_tuning_is_deterministic_for_a_seed(small_pair):
    q, r = _shared(small_pair)
    a = tuning.tune(q, r, seed=3, folds=4, max_cells=150, grid=SMALL_GRID)
    b = tuning.tune(q, r, seed=3, folds=4, max_cells=150, grid=SMALL_GRID)
    pd.testing.assert_frame_equal(a.table, b.table)
    assert a.best == b.best and a.n_cells == 150
    c = tuning.tune(q, r, seed=4, folds=4, max_cells=150, grid=SMALL_GRID)
    assert not a.table.equals(c.table)


def test_k_grid_is_capped_by_the_smallest_cluster(small_pair):
    q, r = _shared(small_pair)
    ids = small_pair.identities.set_index("cell")["id"]
    qc, rc = ids.loc[small_pair.query.index].to_numpy(), ids.loc[small_pair.reference.index]
    smallest = int(pd.Series(rc).value_counts().min())
    result = tuning.tune(q, r, query_clusters=qc, reference_clusters=rc.to_numpy(),
                         folds=3, grid=tuning.Grid(normalizations=("none",)))
    assert result.table["k"].max() == smallest
    assert sorted(result.table["k"].unique()) == [k for k in (10, 25, 50, 100, 200, 500)
                                                  if k < smallest] + [smallest]


# --------------------------------------------------------------------------- #
# Honesty: the tuner never sees a held-out or an imputed gene
# --------------------------------------------------------------------------- #
def test_validate_tune_never_lets_a_held_out_gene_choose(tmp_path, small_pair, monkeypatch):
    """Every neighbour search (inner tuning searches and the fold's own) is given only the
    outer fold's training genes: the raw values each search starts from, identified by
    content."""
    q, r = small_pair.query.iloc[:150], small_pair.reference
    shared = list(q.columns)
    q_cols, r_cols = q[shared].to_numpy(np.float32), r[shared].to_numpy(np.float32)
    current, seen = {}, []
    real_tune, search_space = tuning.tune_stores, graph.search_space

    def tune_spy(q_store, r_store, inputs, config, genes=None, folds=5):
        current["train"] = None if genes is None else sorted(int(g) for g in genes)
        return real_tune(q_store, r_store, inputs, config, genes=genes, folds=folds)

    def space_spy(query, reference, normalize="none"):
        qs, rs = np.asarray(query.compute()), np.asarray(reference.compute())
        seen.append((current.get("train"), qs, rs))
        return search_space(query, reference, normalize)

    monkeypatch.setattr(tuning, "tune_stores", tune_spy)
    monkeypatch.setattr(graph, "search_space", space_spy)
    real = tuning.tune
    monkeypatch.setattr(tuning, "tune", lambda a, b, **kw: real(a, b, **{**kw,
                                                                         "grid": SMALL_GRID}))
    res = cross_validate(q, r, tmp_path / "cv", k=5, folds=3, tune=True, reliability=False,
                         plot=False)
    assert res.tuning is not None and len(res.tuning) == 3
    fold = res.genes.set_index("gene").loc[shared, "fold"].to_numpy()
    inner = 0
    for train, qs, rs in seen:
        assert train is not None
        outer = [f for f in range(3) if list(np.flatnonzero(fold != f)) == train]
        assert len(outer) == 1  # the genes the tuner was given are one fold's training set
        # 150 query cells are under tune_cells: every search sees all of them, in order
        got_q = [int(np.flatnonzero((q_cols == qs[:, [j]]).all(axis=0))[0])
                 for j in range(qs.shape[1])]
        got_r = [int(np.flatnonzero((r_cols == rs[:, [j]]).all(axis=0))[0])
                 for j in range(rs.shape[1])]
        assert got_q == got_r and set(got_r) <= set(train), (got_r, train)
        inner += len(got_r) < len(train)  # an inner search: fewer genes than the fold has
    assert inner >= 3 * 3 * len(SMALL_GRID.normalizations) - 1


def test_run_tune_sees_only_the_shared_genes(tmp_path, small_inputs, monkeypatch):
    seen = []
    real = tuning.tune

    def spy(query, reference, **kwargs):
        seen.append((np.asarray(query), np.asarray(reference)))
        return real(query, reference, **{**kwargs, "grid": SMALL_GRID})

    monkeypatch.setattr(tuning, "tune", spy)
    out = tmp_path / "out"
    run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0,
                   out, k=5, tune=True, consider_clusters=False)
    (query, reference), = seen
    shared = list(small_inputs.query_df.columns)
    np.testing.assert_array_equal(query, small_inputs.query_df[shared].to_numpy(np.float32))
    np.testing.assert_array_equal(reference,
                                  small_inputs.reference_df[shared].to_numpy(np.float32))
    record = json.loads((out / "run.json").read_text())
    best = record["tuning"]["best"]
    for name in ("normalize", "k", "weighting", "temperature", "average"):
        assert record["parameters"][name] == best[name]
    table = pd.read_csv(out / "tuning.tsv", sep="\t")
    assert len(table) == 2 * 3 * 3 * 2 + len(SMALL_GRID.blends) * len(SMALL_GRID.ridge_alphas)
    assert table["pearson"].max() == pytest.approx(record["tuning"]["expected_score"])
    assert (out / "tuning.png").exists()
    assert "Tuning" in (out / "report.html").read_text()


def test_run_with_the_tuned_setting_equals_a_run_given_it(tmp_path, small_inputs, monkeypatch):
    monkeypatch.setattr(tuning, "GRID", SMALL_GRID)
    real = tuning.tune
    monkeypatch.setattr(tuning, "tune", lambda q, r, **kw: real(q, r, **{**kw,
                                                                         "grid": SMALL_GRID}))
    tuned = tmp_path / "tuned"
    run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0,
                   tuned, k=5, tune=True, consider_clusters=False, report=False)
    best = json.loads((tuned / "run.json").read_text())["tuning"]["best"]
    given = tmp_path / "given"
    run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0,
                   given, consider_clusters=False, report=False, **best)
    for name in ("imputation.tsv", "sim_matrix.tsv", "scores.txt"):
        assert (tuned / name).read_bytes() == (given / name).read_bytes()


# --------------------------------------------------------------------------- #
# The log1p average and large k, end to end
# --------------------------------------------------------------------------- #
def test_log1p_average_run_equals_brute_force(tmp_path, small_inputs):
    q, r = small_inputs.query_df, small_inputs.reference_df
    k = 40
    run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0,
                   tmp_path / "out", k=k, consider_clusters=False, average="log1p")
    got = zarr.open_group(tmp_path / "out" / "zarr" / "imputed.zarr", mode="r")["X"][:]
    bf = brute_force(q, r, None, None, k, False)
    clear = ~bf.ambiguous & (bf.indices[:, 0] >= 0)
    w = bf.similarity + 1
    logs = np.log1p(r.to_numpy(np.float64))[bf.indices[clear]]
    want = np.expm1(np.einsum("ik,ikg->ig", w[clear], logs) / w[clear].sum(1)[:, None])
    np.testing.assert_allclose(got[clear], want, rtol=1e-6)  # float32 weights, as stored
    assert np.isnan(got[bf.indices[:, 0] < 0]).all()


def test_large_k_run_equals_brute_force(tmp_path, small_inputs):
    q, r = small_inputs.query_df, small_inputs.reference_df
    k = 300  # of 311 reference cells
    run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0,
                   tmp_path / "out", k=k, consider_clusters=False, reference_chunk_size=64,
                   chunk_size=50)
    got = zarr.open_group(tmp_path / "out" / "zarr" / "imputed.zarr", mode="r")["X"][:]
    bf = brute_force(q, r, None, None, k, False)
    ok = bf.indices[:, 0] >= 0
    np.testing.assert_allclose(got[ok], bf.imputed[ok], rtol=1e-5)


def test_large_k_with_clusters_smaller_than_k_is_refused_by_cluster(tmp_path, small_inputs,
                                                                     capsys):
    code = main(["run", "--query", str(small_inputs.query), "--reference",
                 str(small_inputs.reference), "--identities", str(small_inputs.identities),
                 "--out", str(tmp_path / "out"), "--k", "300", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "k_neighbors=300 is larger than the candidate reference cells" in err
    assert "cluster '" in err
    assert not (tmp_path / "out").exists()


def test_validate_tune_records_each_fold_setting(tmp_path, small_pair, monkeypatch):
    real = tuning.tune
    monkeypatch.setattr(tuning, "tune", lambda q, r, **kw: real(q, r, **{**kw,
                                                                         "grid": SMALL_GRID}))
    res = cross_validate(small_pair.query, small_pair.reference, tmp_path / "cv", k=5,
                         folds=3, tune=True, plot=False)
    manifest = json.loads((tmp_path / "cv" / "validate.json").read_text())
    assert set(manifest["tuning"]["chosen"]) == {"0", "1", "2", "all"}
    assert manifest["parameters"]["tune"] is True
    assert res.reliability is not None
    assert "tuned per fold" in str(res)
    assert validate.METRICS[1] == "pearson"


def test_tune_command_writes_its_table_winner_and_heat_map(tmp_path, small_inputs, capsys,
                                                          monkeypatch):
    real = tuning.tune
    monkeypatch.setattr(tuning, "tune", lambda q, r, **kw: real(q, r, **{**kw,
                                                                         "grid": SMALL_GRID}))
    out = tmp_path / "t"
    assert main(["tune", "--query", str(small_inputs.query), "--reference",
                 str(small_inputs.reference), "--out", str(out), "--folds", "3", "--seed", "2",
                 "--tune-metric", "log_pearson", "-q"]) == 0
    assert "expected held-out log_pearson" in capsys.readouterr().out
    winner = json.loads((out / "tuning.json").read_text())
    table = pd.read_csv(out / "tuning.tsv", sep="\t")
    assert winner["metric"] == "log_pearson" and winner["folds"] == 3 and winner["seed"] == 2
    assert table["log_pearson"].max() == pytest.approx(winner["expected_score"])
    assert (out / "tuning.png").stat().st_size > 0
    with pytest.raises(SystemExit) as info:  # argparse's own choices check
        main(["tune", "--query", str(small_inputs.query), "--reference",
              str(small_inputs.reference), "--out", str(out), "--tune-metric", "r2"])
    assert info.value.code == 2
