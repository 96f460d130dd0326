"""The engine against an independent brute-force NumPy implementation of the method."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

from scimpute_dask import run_imputation

from .conftest import brute_force


def _ids(inputs, frame):
    table = inputs.identities_df.set_index("cell")["id"]
    return table.loc[frame.index].to_numpy()


def _smallest_cluster(inputs) -> int:
    r_ids = _ids(inputs, inputs.reference_df)
    q_ids = _ids(inputs, inputs.query_df)
    return int(pd.Series(r_ids)[np.isin(r_ids, q_ids)].value_counts().min())


def _check_neighbours(idx, sim, bf):
    """Identical neighbour sets, except where float32 cannot order a near-tie at rank k."""
    clear = ~bf.ambiguous
    assert clear.mean() > 0.97
    np.testing.assert_array_equal(np.sort(idx[clear], axis=1), np.sort(bf.indices[clear], axis=1))
    clear = clear & (bf.indices[:, 0] >= 0)
    # most similar first, each similarity that of the neighbour it stands next to
    assert (np.diff(sim[clear], axis=1) <= 0).all()
    exact = np.take_along_axis(bf.full_similarity[clear], idx[clear], axis=1)
    np.testing.assert_allclose(sim[clear], exact, atol=1e-6)
    np.testing.assert_allclose(sim[clear], bf.similarity[clear], atol=1e-6)
    for row in np.flatnonzero(bf.ambiguous):
        # our k-th neighbour is as similar as the brute force's k-th, to float32 precision
        chosen = bf.full_similarity[row, idx[row]]
        assert chosen.min() >= bf.similarity[row].min() - 1e-6
    return clear


@pytest.mark.parametrize("consider_clusters", [True, False])
@pytest.mark.parametrize("k_edge", ["one", "smallest_cluster", "default"])
@pytest.mark.parametrize(
    ("chunk_size", "reference_chunk_size", "gene_chunk_size"),
    [(64, 50, 17), (1000, None, None)],
)
def test_matches_brute_force(tmp_path, small_inputs, consider_clusters, k_edge, chunk_size,
                             reference_chunk_size, gene_chunk_size):
    k = {"one": 1, "smallest_cluster": _smallest_cluster(small_inputs), "default": 25}[k_edge]
    out = tmp_path / "out"
    result = run_imputation(
        small_inputs.query, small_inputs.reference, small_inputs.identities, 0, out,
        k=k, consider_clusters=consider_clusters, chunk_size=chunk_size,
        reference_chunk_size=reference_chunk_size, gene_chunk_size=gene_chunk_size,
    )
    q, r = small_inputs.query_df, small_inputs.reference_df
    bf = brute_force(q, r, _ids(small_inputs, q), _ids(small_inputs, r), k, consider_clusters)

    nbrs = zarr.open_group(out / "zarr" / "neighbors.zarr", mode="r")
    idx = nbrs["indices"][:]
    weights = nbrs["weights"][:]
    clear = _check_neighbours(idx, weights.astype(np.float64) - 1, bf)

    # Unrounded imputation in Zarr equals the brute force to 1e-4.
    imputed = zarr.open_group(out / "zarr" / "imputed.zarr", mode="r")["X"][:]
    np.testing.assert_allclose(imputed[clear], bf.imputed[clear], atol=1e-4, rtol=1e-6)

    # Cells without shared-gene expression: NaN rows, reported, never neighbours.
    undefined = np.all(q.to_numpy() == 0, axis=1)
    assert undefined.sum() == 2
    assert np.all(idx[undefined] == -1)
    assert np.isnan(imputed[undefined]).all()
    assert sorted(result.unimputable) == sorted(q.index[undefined])

    # imputation.tsv: query order, reference gene order, values rounded to 2 decimals.
    table = pd.read_csv(out / "imputation.tsv", sep="\t", index_col=0)
    assert table.index.name == "cell"
    assert list(table.index) == list(q.index)
    assert list(table.columns) == list(r.columns)
    np.testing.assert_allclose(table.to_numpy()[clear], bf.imputed[clear], atol=0.005 + 1e-4)
    assert table.iloc[np.flatnonzero(undefined)].isna().all().all()

    # sim_matrix.tsv: k rows per defined query cell, most similar first, each neighbour once.
    sim = pd.read_csv(out / "sim_matrix.tsv", sep="\t")
    assert list(sim.columns) == ["cluster", "x", "y", "distance"]
    assert len(sim) == k * (~undefined).sum()
    assert not sim.duplicated(["x", "y"]).any()
    first = sim.groupby("x", sort=False).head(1).set_index("x")
    rows = np.flatnonzero(clear & ~undefined)
    best = pd.Series(r.index.to_numpy()[idx[rows, 0]], index=q.index[rows])
    assert (first.loc[best.index, "y"] == best).all()
    np.testing.assert_allclose(first.loc[best.index, "distance"],
                               bf.similarity[rows, 0] + 1, atol=1e-6)
    listed = sim.groupby("x", sort=False)["y"].apply(frozenset)
    expected = pd.Series([frozenset(r.index.to_numpy()[bf.indices[i]]) for i in rows],
                         index=q.index[rows])
    assert (listed.loc[expected.index] == expected).all()
    ids = _ids(small_inputs, q)
    assert (sim["cluster"].astype(str).to_numpy()
            == pd.Series(ids, index=q.index).loc[sim["x"]].astype(str).to_numpy()).all()


def test_scores_match_brute_force(tmp_path, small_inputs):
    """scimpute's validation score: cosine of the rounded imputation vs measured values."""
    out = tmp_path / "out"
    run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0, out,
                   k=10, chunk_size=100)
    table = pd.read_csv(out / "imputation.tsv", sep="\t", index_col=0)
    q = small_inputs.query_df
    shared = [g for g in table.columns if g in set(q.columns)]
    a, b = table[shared].to_numpy(np.float64), q[shared].to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        expected = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    scores = np.array((out / "scores.txt").read_text().split(), dtype=float)
    np.testing.assert_allclose(scores, expected, atol=1e-9)
    stats = dict(line.split(": ") for line in (out / "stats.txt").read_text().splitlines())
    valid = expected[np.isfinite(expected)]
    assert float(stats["Mean"]) == pytest.approx(valid.mean())
    assert float(stats["Lower quantile"]) == pytest.approx(np.percentile(valid, 25))
    assert float(stats["Standard deviation"]) == pytest.approx(valid.std())


def test_clustered_tile_compares_only_same_cluster():
    """With clusters a tile multiplies only same-cluster pairs and never returns others."""
    from scimpute_dask.kernels import knn

    rng = np.random.default_rng(0)
    q = knn.normalize_rows(rng.random((400, 30)))
    r = knn.normalize_rows(rng.random((900, 30)))
    qc, rc = rng.integers(0, 8, 400), rng.integers(0, 8, 900)
    restricted = knn.screen(q, r, np.arange(900), 5, qc, rc)
    full = knn.screen(q, r, np.arange(900), 5)
    assert (rc[restricted[..., 1].astype(int)] == qc[:, None]).all()
    assert not (rc[full[..., 1].astype(int)] == qc[:, None]).all()
