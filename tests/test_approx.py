"""The approximate search: coarse lists probed, every candidate ranked exactly."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from scimpute_dask.engine import graph, search
from scimpute_dask.io.storage import location
from scimpute_dask.kernels import knn


def _clustered(n: int, g: int, types: int, seed: int) -> np.ndarray:
    """Counts of cell types with shared programmes: the structure single-cell data has."""
    rng = np.random.default_rng(seed)
    programmes = rng.lognormal(0.0, 1.0, (types, g)) * (rng.random((types, g)) < 0.3)
    cells = programmes[rng.integers(0, types, n)] * rng.lognormal(0.0, 0.3, (n, 1))
    return rng.poisson(cells).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return _clustered(900, 60, 30, 2), _clustered(6000, 60, 30, 1)


@pytest.mark.parametrize("stored", [False, True])
def test_recall_target_is_met_and_every_neighbour_is_ranked_exactly(data, tmp_path, stored):
    q, r = data
    k = 15
    rd = da.from_array(r, chunks=(1000, -1))
    coarse = search.fit_coarse(rd, search.n_lists_for(len(r)), seed=0)
    searcher = search.prepare(rd, 700, path=location(tmp_path / "s.zarr") if stored else None,
                              key={"t": 1}, coarse=coarse)
    chosen = searcher.choose_probes(q[:300], k, 0.95)
    assert chosen.recall >= 0.95 and chosen.probes < chosen.lists  # cheaper than exact
    assert chosen.interval[0] <= chosen.recall <= chosen.interval[1]
    # the recall foreseen from where the exact neighbours lie is what searching with
    # those probes measures (the choice searches only once, exactly)
    sample = da.from_array(q[:300], chunks=(150, -1))
    for foreseen in (searcher.choose_probes(q[:300], k, 0.0), chosen):  # 1 probe, chosen
        found = np.asarray(searcher.neighbours(sample, k, probes=foreseen.probes)[0].compute())
        assert foreseen.measured(found).recall == pytest.approx(foreseen.recall, abs=1e-12)
    assert chosen.recall > searcher.choose_probes(q[:300], k, 0.0).recall
    with dask.config.set(scheduler="sync"):
        idx, sim = dask.compute(*searcher.neighbours(da.from_array(q, chunks=(250, -1)), k,
                                                     probes=chosen.probes))
    dense = np.round(cosine_similarity(q.astype(np.float64), r.astype(np.float64)), 12)
    zero = knn.zero_rows(q)
    # each returned neighbour's cosine is the brute force's (the exact ranking)
    got = np.take_along_axis(dense, np.maximum(idx, 0), axis=1)
    np.testing.assert_allclose(sim[~zero], got[~zero], rtol=0, atol=1e-6)
    assert (np.diff(sim[~zero], axis=1) <= 1e-7).all()
    exact = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    recall = search.recall_at_k(idx[~zero], exact[~zero]).mean()
    assert recall >= 0.93, recall  # the sample's estimate holds on the whole query


@pytest.mark.parametrize("kind", ["clustered", "ties"])
def test_all_lists_probed_is_the_exact_search(data, tmp_path, kind):
    q, r = data
    if kind == "ties":  # small counts on 4 genes: groups of equal cosines wider than the
        rng = np.random.default_rng(5)  # screen's margin, searched exhaustively
        q, r = (rng.poisson(1.0, (n, 4)).astype(np.float32) for n in (300, 4000))
        screened = knn.screen(knn.normalize_rows(q), knn.normalize_rows(r),
                              np.arange(len(r)), 10)
        assert knn.incomplete(screened, 10, 4).mean() > 0.5
    rd = da.from_array(r, chunks=(1000, -1))
    coarse = search.fit_coarse(rd, 12, seed=3)
    approx = search.prepare(rd, 999, path=location(tmp_path / "a.zarr"), coarse=coarse)
    with dask.config.set(scheduler="sync"):
        a = dask.compute(*approx.neighbours(da.from_array(q, chunks=(300, -1)), 10, probes=12))
        e = dask.compute(*search.knn(da.from_array(q, chunks=(300, -1)), rd, 10))
    # the same neighbours, equal cosines too: candidates are named by their reference rows
    np.testing.assert_array_equal(a[0], e[0])
    np.testing.assert_array_equal(a[1], e[1])
    # the recall sample's exact search, by parts of the reference (whole tiles, in list
    # order), is the same search; a cell without expression has no neighbours
    sample = q[:200].copy()
    sample[3] = 0
    whole = list(approx.tiles.bounds())
    for n in (2, len(whole) + 3):  # never more parts than tiles, every tile in one
        parts = approx.tiles.parts(n)
        assert len(parts) == min(n, len(whole))
        assert [b for part in parts for b in part.bounds()] == whole
    for n in (1, 2, 3, 7):
        with dask.config.set(scheduler="sync"):
            (packed,) = dask.compute(graph.search_in_parts(sample, approx.tiles.parts(n), 10))
        np.testing.assert_array_equal(packed[..., 1].astype(np.int32), e[0][:200] * (
            np.arange(200) != 3)[:, None] - (np.arange(200) == 3)[:, None])
        np.testing.assert_array_equal(packed[..., 0].astype(np.float32)[:3], e[1][:3])
        assert np.isnan(packed[3, :, 0]).all()


def test_a_tiny_reference_gets_a_small_index():
    rng = np.random.default_rng(0)
    r = rng.poisson(2.0, (40, 8)).astype(np.float32)
    rd = da.from_array(r, chunks=(40, -1))
    assert search.n_lists_for(40) == 3
    searcher = search.prepare(rd, 40, coarse=search.fit_coarse(rd, search.n_lists_for(40)))
    assert searcher.choose_probes(r[:10] + 1, 5, 1.0).recall == 1.0


def test_a_slow_exact_search_is_told_about_approx(tmp_path, small_pair, monkeypatch, caplog):
    """The check stage projects the exact search's time from the shapes and the measured
    matrix-product rate; over the threshold it says so and names the alternative."""
    import json
    import logging

    from scimpute_dask import run_imputation

    projected = search.exact_seconds(10_000, 200_000, 2_000)
    # 8·10¹² flops: minutes, not seconds or hours, on any CPU this runs on
    assert 10 < projected < 3_600
    assert search.exact_too_slow(100, 100, 10) is None  # not even measured
    monkeypatch.setattr(search, "SLOW_EXACT_S", 0.0)
    monkeypatch.setattr(search, "FASTEST", 1e30)
    query, ref = small_pair.query.iloc[:50], small_pair.reference.iloc[:80]
    with caplog.at_level(logging.WARNING, logger="scimpute_dask"):
        run_imputation(query, ref, outdir=tmp_path / "out", k=5, consider_clusters=False,
                       report=False)
    assert "--search approx" in caplog.text and "projected" in caplog.text
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["search"]["mode"] == "exact"
    assert record["search"]["exact_projected_s"] >= 0
