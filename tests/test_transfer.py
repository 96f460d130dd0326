"""Label transfer and self-imputation on synthetic data with known answers."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from scimpute_dask import InputError, run_imputation
from scimpute_dask.engine import graph, search
from scimpute_dask.kernels.knn import drop_self
from scimpute_dask.kernels.vote import vote
from scimpute_dask.tools.selfimpute import dropout_recovery, mask_nonzero, self_impute
from scimpute_dask.tools.transfer import transfer_labels


def test_vote_matches_a_loop():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, 50)
    idx = rng.integers(0, 50, (30, 6))
    idx[3, 2:] = -1
    idx[4] = -1
    w = rng.uniform(0, 2, idx.shape)
    label, share = vote(idx, w, codes, 4)
    for i in range(30):
        tally = np.zeros(4)
        for j in range(6):
            if idx[i, j] >= 0:
                tally[codes[idx[i, j]]] += w[i, j]
        if tally.sum() == 0:
            assert label[i] == -1 and np.isnan(share[i])
        else:
            assert label[i] == tally.argmax()
            assert share[i] == pytest.approx(tally.max() / tally.sum())


def test_label_transfer_recovers_cell_types(tmp_path, small_pair):
    out = tmp_path / "run"
    run_imputation(small_pair.query, small_pair.reference, outdir=out, k=10,
                   consider_clusters=False)
    types = small_pair.identities.set_index("cell")["id"].map(lambda t: f"type{t}")
    got = transfer_labels(out, types.loc[small_pair.reference.index])
    assert list(got.index) == list(small_pair.query.index)
    truth = types.loc[small_pair.query.index]
    correct = got["label"] == truth
    assert correct.mean() > 0.95
    assert got["confidence"].between(0, 1).all() and got["confidence"].median() > 0.9
    # cells halfway between two types: the vote splits and the confidence says so
    q = small_pair.query
    a, b = np.flatnonzero(truth == "type0")[:20], np.flatnonzero(truth == "type1")[:20]
    mixed = pd.DataFrame((q.iloc[a].to_numpy() + q.iloc[b].to_numpy()) / 2, columns=q.columns,
                         index=[f"mix{i}" for i in range(20)])
    run_imputation(mixed, small_pair.reference, outdir=tmp_path / "mixed", k=10,
                   consider_clusters=False)
    blurred = transfer_labels(tmp_path / "mixed", types.loc[small_pair.reference.index])
    assert blurred["label"].isin(["type0", "type1"]).all()
    assert blurred["confidence"].mean() < got["confidence"].mean() - 0.1
    with pytest.raises(InputError, match="reference cells without a label"):
        transfer_labels(out, types.loc[small_pair.reference.index[1:]])


def test_drop_self_keeps_exactly_k_others_with_duplicates():
    rng = np.random.default_rng(0)
    base = rng.poisson(3.0, (40, 12)).astype(np.float32)
    x = np.concatenate([base, base[:5], base[:5]])  # each of cells 0..4 three times
    k = 4
    idx, sim = search.knn(da.from_array(x, chunks=(16, -1)),
                               da.from_array(x, chunks=(23, -1)), k + 1)
    idx, sim = graph.exclude_self(idx, sim)
    idx, sim = idx.compute(), sim.compute()
    assert idx.shape == (len(x), k)
    assert not (idx == np.arange(len(x))[:, None]).any()
    for i in range(5):  # both copies of a triplicated cell are its nearest others
        copies = {i, 40 + i, 45 + i} - {i}
        assert set(idx[i, :2]) == copies
        assert np.allclose(sim[i, :2], 1.0)
    # a cell pushed out of its own k + 1 list by its duplicates: the last goes instead
    i2, s2 = drop_self(np.array([[7, 9, 11]]), np.array([[1.0, 1.0, 0.5]]), np.array([3]))
    assert i2.tolist() == [[7, 9]] and s2.tolist() == [[1.0, 1.0]]


def test_self_impute_matches_brute_force(small_pair):
    x = small_pair.reference.iloc[:120, :40]
    got = self_impute(x, k=5, chunk_size=50).to_numpy()
    v = x.to_numpy(np.float32).astype(np.float64)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    sim = (v / n) @ (v / n).T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    top = np.take_along_axis(sim, order, axis=1)
    clear = top[:, 4] - top[:, 5] > 1e-6
    idx = order[:, :5]
    w = np.take_along_axis(sim, idx, axis=1) + 1
    expected = np.einsum("ik,ikg->ig", w, v[idx]) / w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got[clear], expected[clear], rtol=1e-5, atol=1e-3)
    assert clear.mean() > 0.95


def test_mask_nonzero_is_seeded_and_hits_only_nonzeros():
    v = np.random.default_rng(0).poisson(0.5, (60, 30)).astype(float)
    masked, mask = mask_nonzero(v, 0.1, seed=2)
    assert mask.sum() == round(0.1 * (v != 0).sum())
    assert (v[mask] > 0).all() and (masked[mask] == 0).all()
    assert (masked[~mask] == v[~mask]).all()
    assert (mask_nonzero(v, 0.1, seed=2)[1] == mask).all()


def test_dropout_recovery_beats_the_cell_mean(small_pair):
    scores = dropout_recovery(small_pair.reference.iloc[:, :80], k=10, fraction=0.1, seed=0)
    assert scores["n_masked"] > 1000
    assert scores["pearson"] > scores["cell_mean_pearson"] + 0.3
    assert scores["mse"] < 0.9 * scores["cell_mean_mse"]


def test_self_impute_checks_k(small_pair):
    with pytest.raises(InputError, match="must be below the number of cells"):
        self_impute(small_pair.reference.iloc[:10], k=10)
    with pytest.raises(InputError, match="weighting must be one of"):
        self_impute(small_pair.reference.iloc[:10], k=3, weighting="x")


def test_cli_transfer(tmp_path, small_inputs, capsys):
    from scimpute_dask.cli import main

    out = tmp_path / "run"
    assert main(["run", "--query", str(small_inputs.query), "--reference",
                 str(small_inputs.reference), "--identities", str(small_inputs.identities),
                 "--out", str(out), "--k", "5", "--quiet", "--no-clusters"]) == 0
    labels = tmp_path / "labels.tsv"
    assert main(["transfer", "--run", str(out), "--labels", str(small_inputs.identities),
                 "--out", str(labels)]) == 0
    assert "query cells labelled" in capsys.readouterr().out
    got = pd.read_csv(labels, sep="\t", index_col=0)
    truth = small_inputs.identities_df.set_index("cell")["id"]
    defined = got["label"].notna()
    assert (~defined).sum() == 2  # the all-zero query cells have no neighbours
    assert (got.loc[defined, "label"] == truth.loc[got.index[defined]]).mean() > 0.95


def test_transfer_reads_the_run_not_its_inputs_and_refuses_empty_labels(tmp_path, small_inputs):
    """A run whose reference was a ready store (no zarr/reference.zarr of its own) works."""
    from scimpute_dask import convert

    store = convert(small_inputs.reference, tmp_path / "ref.zarr")
    out = tmp_path / "run"
    run_imputation(small_inputs.query, store.path, small_inputs.identities, 0, out, k=5,
                   consider_clusters=False)
    assert not (out / "zarr" / "reference.zarr").exists()
    labels = small_inputs.identities_df.set_index("cell")["id"]
    got = transfer_labels(out, labels)
    assert got["label"].notna().sum() == len(got) - 2
    unlabelled = labels.astype(object)
    unlabelled.loc[small_inputs.reference_df.index[:3]] = np.nan
    with pytest.raises(InputError, match="empty \\(NaN\\) label: '"
                       + str(small_inputs.reference_df.index[0])):
        transfer_labels(out, unlabelled)
