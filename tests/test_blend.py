"""The blend with a linear model: the blockwise ridge is scikit-learn's ``Ridge``, a blended
run is its formula, ``--blend 1`` is today's output byte for byte, tuning scores the blend
honestly, and no held-out gene ever reaches the model."""

from __future__ import annotations

import json

import anndata
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import sparse
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from scimpute_dask import cross_validate, plan, read_run, run_imputation
from scimpute_dask.cli import main
from scimpute_dask.engine import graph
from scimpute_dask.errors import InputError
from scimpute_dask.kernels import ridge
from scimpute_dask.kernels.tuning import gene_folds
from scimpute_dask.tools import tune as tuning

from .conftest import brute_force

K = 10


def _log(x) -> np.ndarray:
    return np.log1p(np.asarray(x, dtype=np.float64))


def _sklearn(features, targets, alpha: float) -> Ridge:
    """The model as scikit-learn fits it: StandardScaler'd log1p features, log1p targets."""
    return Ridge(alpha=alpha).fit(StandardScaler().fit_transform(_log(features)), _log(targets))


# --------------------------------------------------------------------------- #
# The blockwise fit is scikit-learn's Ridge
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("alpha", [0.5, 10.0, 1000.0])
@pytest.mark.parametrize(("rows", "genes"), [(7, 5), (64, 17), (1000, 200)])
@pytest.mark.parametrize("as_sparse", [False, True])
def test_blockwise_ridge_equals_scikit_learn(small_pair, alpha, rows, genes, as_sparse):
    shared = list(small_pair.query.columns)
    x = small_pair.reference[shared].to_numpy(np.float32)
    y = small_pair.reference.to_numpy(np.float32)
    def blocks(values, chunks):
        if as_sparse:  # CSR blocks, as a sparse store gives them
            return da.from_array(sparse.csr_matrix(values), chunks=chunks, asarray=False)
        return da.from_array(values, chunks=chunks)

    features, targets = blocks(x, (rows, -1)), blocks(y, (rows, genes))
    n = len(x)
    gram = ridge.Gram.from_packed(n, graph.ridge_gram(features).compute())
    np.testing.assert_allclose(gram.outer, _log(x).T @ _log(x), rtol=1e-12)
    cross = graph.ridge_cross(features, targets)
    coef, sums = da.compute(graph.ridge_coefficients(cross, ridge.factor(gram, alpha)), cross[0])
    want = _sklearn(x, y, alpha)
    np.testing.assert_allclose(coef, want.coef_.T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(sums / n, want.intercept_, rtol=1e-10, atol=1e-12)
    # a query z-scored over its own cells (its own statistics, as StandardScaler would)
    q = small_pair.query[shared].to_numpy(np.float32)
    total, squares = da.compute(*graph.log1p_sums(da.from_array(q, chunks=(50, -1))))
    z = ridge.zscore_log1p(q, total / len(q), ridge.standard_deviation(len(q), total, squares))
    np.testing.assert_allclose(z, StandardScaler().fit_transform(_log(q)), atol=1e-10)
    np.testing.assert_allclose(z @ coef + sums / n, want.predict(z), rtol=1e-7, atol=1e-9)


def test_constant_gene_gets_no_weight_as_in_scikit_learn():
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, (200, 6)).astype(np.float32)
    x[:, 2] = 3.0  # constant: StandardScaler leaves its scale at 1, the column all zero
    y = rng.poisson(1.0, (200, 4)).astype(np.float32)
    gram = ridge.Gram.of(x)
    assert gram.sd[2] == 1.0
    coef = ridge.coefficients(ridge.factor(gram, 5.0), _log(y).sum(0), _log(x).T @ _log(y))
    want = _sklearn(x, y, 5.0)
    np.testing.assert_allclose(coef, want.coef_.T, rtol=1e-7, atol=1e-9)
    assert np.all(coef[2] == 0)


# --------------------------------------------------------------------------- #
# A blended run is its formula, computed by brute force
# --------------------------------------------------------------------------- #
def test_blended_run_equals_its_formula(tmp_path, small_inputs):
    q, r = small_inputs.query_df, small_inputs.reference_df
    out = tmp_path / "out"
    run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0, out,
                   k=K, consider_clusters=False, blend=0.6, ridge_alpha=10.0, chunk_size=50,
                   gene_chunk_size=16)
    got = zarr.open_group(out / "zarr" / "imputed.zarr", mode="r")["X"][:]
    bf = brute_force(q, r, None, None, K, False)
    shared = [g for g in r.columns if g in set(q.columns)]
    model = _sklearn(r[shared], r, 10.0)
    z = StandardScaler().fit_transform(_log(q[shared]))  # the query over its own cells
    predicted = np.clip(model.predict(z), 0, _log(r).max(axis=0))
    want = np.expm1(0.6 * np.log1p(bf.imputed) + 0.4 * predicted)
    ok = ~bf.ambiguous & (bf.indices[:, 0] >= 0)
    assert ok.sum() > 200
    np.testing.assert_allclose(got[ok], want[ok], rtol=2e-6, atol=1e-6)
    assert np.isnan(got[:2]).all()  # cells without shared expression stay unimputable
    # genes too large for float32's 2-decimal text keep their float64 values in the table
    wide = zarr.open_group(out / "zarr" / "imputed.zarr", mode="r").attrs["wide_genes"]
    assert wide
    table = pd.read_csv(out / "imputation.tsv", sep="\t", index_col=0)
    np.testing.assert_allclose(table.iloc[2:, wide].to_numpy()[ok[2:]],
                               np.round(want[2:, wide], 2)[ok[2:]], rtol=0, atol=0.0100001)
    record = json.loads((out / "run.json").read_text())
    assert record["parameters"]["blend"] == 0.6 and record["parameters"]["ridge_alpha"] == 10.0
    assert "ridge" in record["timings_s"]
    assert "ridge_alpha" in (out / "report.html").read_text()
    # imputed on demand, the same values
    lazy = read_run(out)
    np.testing.assert_array_equal(lazy.X.compute(), got)
    assert lazy.uns["scimpute"]["parameters"]["blend"] == 0.6


def test_blend_one_is_todays_output_byte_for_byte(tmp_path, small_inputs):
    args = ["run", "--query", str(small_inputs.query), "--reference",
            str(small_inputs.reference), "--no-clusters", "--k", str(K), "-q", "--no-report"]
    assert main([*args, "--out", str(tmp_path / "today")]) == 0
    # a blended run first, then --blend 1 into the same directory: nothing of the model stays
    assert main([*args, "--out", str(tmp_path / "again"), "--blend", "0.5"]) == 0
    blended = (tmp_path / "again" / "imputation.tsv").read_bytes()
    assert main([*args, "--out", str(tmp_path / "again"), "--blend", "1",
                 "--ridge-alpha", "7"]) == 0
    for name in ("imputation.tsv", "sim_matrix.tsv", "scores.txt", "stats.txt"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "today" / name).read_bytes()
    assert blended != (tmp_path / "today" / "imputation.tsv").read_bytes()
    assert not (tmp_path / "again" / "zarr" / "ridge.zarr").exists()
    today = zarr.open_group(tmp_path / "today" / "zarr" / "imputed.zarr", mode="r")["X"][:]
    again = zarr.open_group(tmp_path / "again" / "zarr" / "imputed.zarr", mode="r")["X"][:]
    np.testing.assert_array_equal(today, again)


def test_sparse_reference_blends_as_the_dense_one(tmp_path, small_pair):
    shared = list(small_pair.query.columns)
    counts = small_pair.reference.to_numpy(np.float32)
    var = pd.DataFrame(index=small_pair.reference.columns)
    paths = {}
    for name, X in (("dense", counts), ("sparse", sparse.csr_matrix(counts))):
        paths[name] = tmp_path / f"reference_{name}.h5ad"
        anndata.AnnData(X=X, obs=pd.DataFrame(index=small_pair.reference.index),
                        var=var).write_h5ad(paths[name])
    query = tmp_path / "query.h5ad"
    anndata.AnnData(X=small_pair.query[shared].to_numpy(np.float32),
                    obs=pd.DataFrame(index=small_pair.query.index),
                    var=pd.DataFrame(index=shared)).write_h5ad(query)
    got = {}
    for name, path in paths.items():
        out = tmp_path / name
        run_imputation(query, path, None, 0, out, k=K, consider_clusters=False, blend=0.7,
                       tsv_genes=None, report=False)
        got[name] = zarr.open_group(out / "zarr" / "imputed.zarr", mode="r")["X"][:]
    np.testing.assert_allclose(got["sparse"], got["dense"], rtol=1e-6)


# --------------------------------------------------------------------------- #
# Bad values: one-line errors before any work
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--blend", "0", r"--blend must be a finite number in \(0, 1\], got '0'"),
    ("--blend", "1.5", r"--blend must be a finite number in \(0, 1\], got '1.5'"),
    ("--blend", "nan", r"--blend must be a finite number in \(0, 1\]"),
    ("--ridge-alpha", "0", r"--ridge-alpha must be a positive finite number, got '0'"),
    ("--ridge-alpha", "-3", r"--ridge-alpha must be a positive finite number"),
    ("--ridge-alpha", "inf", r"--ridge-alpha must be a positive finite number"),
])
def test_bad_blend_values_are_refused(tmp_path, small_inputs, capsys, flag, value, message):
    out = tmp_path / "out"
    code = main(["run", "--query", str(small_inputs.query), "--reference",
                 str(small_inputs.reference), "--out", str(out), "--no-clusters", "-q",
                 flag, value])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert pd.Series([err]).str.contains(message).all(), err
    assert not out.exists()


def test_a_blend_needs_two_shared_genes(tmp_path, small_pair):
    gene = small_pair.query.columns[0]
    query = small_pair.query[[gene]].assign(notInReference=1.0)
    with pytest.raises(InputError, match=r"blend 0.5 needs a linear model of at least 2 "
                                         r"shared genes; .* share 1"):
        run_imputation(query, small_pair.reference, None, 0, tmp_path / "out", k=K,
                       consider_clusters=False, blend=0.5)
    assert not (tmp_path / "out").exists()
    # the neighbours alone are fine with one shared gene
    run_imputation(query, small_pair.reference, None, 0, tmp_path / "ok", k=K,
                   consider_clusters=False, report=False)


def test_the_plan_holds_the_model_beside_the_reference_block():
    base = plan.plan_run(2 * 2**30, 100_000, 30_000, 300, 2000, threads=2)
    same = plan.plan_run(2 * 2**30, 100_000, 30_000, 300, 2000, threads=2, linear=0)
    blended = plan.plan_run(2 * 2**30, 100_000, 30_000, 300, 2000, threads=2, linear=300)
    assert base == same
    assert blended.gene_chunk < base.gene_chunk
    assert blended.query_chunk == base.query_chunk


# --------------------------------------------------------------------------- #
# Tuning: the blend's scores are a cross-validation of the formula
# --------------------------------------------------------------------------- #
def _knn(q: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: float64 cosine, stable sort (ties to the lower row)."""
    q, r = q.astype(np.float64), r.astype(np.float64)
    qn, rn = np.linalg.norm(q, axis=1), np.linalg.norm(r, axis=1)
    sim = (q / np.where(qn == 0, 1, qn)[:, None]) @ (r / np.where(rn == 0, 1, rn)[:, None]).T
    idx = np.argsort(-np.round(sim, 9), axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, axis=1)


def test_tuned_blend_scores_equal_an_independent_cross_validation(small_pair):
    shared = list(small_pair.query.columns)
    q = small_pair.query[shared].to_numpy(np.float32)
    r = small_pair.reference[shared].to_numpy(np.float32)
    grid = tuning.Grid(normalizations=("none",), ks=(8, 40), weightings=(("cosine+1", 0.1),),
                       blends=(0.6,), ridge_alphas=(10.0,))
    result = tuning.tune(q, r, folds=3, seed=4, grid=grid)
    table = result.table
    knn_best = table[table["blend"] == 1]["pearson"].idxmax()
    (row,) = table.index[table["blend"] < 1]
    k = int(table.at[knn_best, "k"])
    assert table.at[row, "k"] == k and table.at[row, "ridge_alpha"] == 10.0
    fold = gene_folds(len(shared), 3, 4)
    z_all = StandardScaler().fit_transform(_log(q))
    scores = np.full(len(shared), np.nan)
    for f in range(3):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        idx, sim = _knn(q[:, train], r[:, train], k)
        w = sim + 1
        knn = np.einsum("ik,ikg->ig", w, r[:, test].astype(np.float64)[idx]) / w.sum(1)[:, None]
        model = _sklearn(r[:, train], r[:, test], 10.0)
        predicted = np.clip(model.predict(z_all[:, train]), 0, _log(r[:, test]).max(axis=0))
        blended = np.expm1(0.6 * np.log1p(knn) + 0.4 * predicted)
        scores[test] = [np.corrcoef(q[:, g], blended[:, j])[0, 1] for j, g in enumerate(test)]
    assert table.at[row, "pearson"] == pytest.approx(np.nanmean(scores), rel=1e-6)
    # pure kNN stays a candidate: the winner is the best row of the whole table
    assert result.score == pytest.approx(table["pearson"].max())
    only = result.neighbours_only()
    assert only.best["blend"] == 1.0 and only.score == pytest.approx(table.at[knn_best,
                                                                              "pearson"])


def test_validate_tune_never_lets_the_model_see_a_held_out_gene(tmp_path, small_pair,
                                                                monkeypatch):
    """Every linear model (the inner tunings' and each outer fold's own) is fitted on and
    applied to the outer fold's training genes only: the features' per-gene statistics
    identify the genes each model was given."""
    q, r = small_pair.query.iloc[:150], small_pair.reference
    shared = list(q.columns)
    q_means = _log(q[shared]).mean(axis=0)
    r_means = _log(r[shared]).mean(axis=0)
    current, seen = {}, []
    real_tune_stores, real_tune = tuning.tune_stores, tuning.tune
    real_factor, real_zscore = ridge.factor, ridge.zscore_log1p

    def genes_of(means, known):
        hits = [np.flatnonzero(np.isclose(known, m, rtol=1e-9, atol=1e-12)) for m in means]
        assert all(len(h) == 1 for h in hits), "a gene not identified"
        return {int(h[0]) for h in hits}

    def tune_stores_spy(q_store, r_store, inputs, config, genes=None, folds=5):
        current["train"] = None if genes is None else {int(g) for g in genes}
        return real_tune_stores(q_store, r_store, inputs, config, genes=genes, folds=folds)

    def tune_spy(a, b, **kwargs):
        found = real_tune(a, b, **{**kwargs, "grid": tuning.Grid(
            normalizations=("none",), ks=(5, 20), weightings=(("cosine+1", 0.1),),
            blends=(0.7,), ridge_alphas=(10.0,))})
        # the outer fold blends whatever the inner one chose: its own model runs too
        found.best = {**found.best, "blend": 0.7, "ridge_alpha": 10.0}
        return found

    def factor_spy(gram, alpha):
        seen.append(("reference", current.get("train"), genes_of(gram.mean, r_means)))
        return real_factor(gram, alpha)

    def zscore_spy(x, mean, sd):
        seen.append(("query", current.get("train"), genes_of(mean, q_means)))
        return real_zscore(x, mean, sd)

    monkeypatch.setattr(tuning, "tune_stores", tune_stores_spy)
    monkeypatch.setattr(tuning, "tune", tune_spy)
    monkeypatch.setattr(ridge, "factor", factor_spy)
    monkeypatch.setattr(ridge, "zscore_log1p", zscore_spy)
    res = cross_validate(q, r, tmp_path / "cv", k=5, folds=3, tune=True, reliability=False,
                         plot=False)
    assert all(chosen["blend"] == 0.7 for chosen in res.tuning.values())
    kinds = {kind for kind, _, _ in seen}
    assert kinds == {"reference", "query"}
    for _, train, genes in seen:
        assert train is not None and genes <= train, (sorted(genes), sorted(train))
    # the outer folds' own models (all of a fold's training genes) ran, and inner ones
    # on fewer genes
    assert sum(genes == train for _, train, genes in seen) >= 3
    assert sum(len(genes) < len(train) for _, train, genes in seen) >= 3 * 3
    # the scores are those of the blended imputation
    manifest = json.loads((tmp_path / "cv" / "validate.json").read_text())
    assert manifest["tuning"]["chosen"]["0"]["blend"] == 0.7
