"""Block kernels against plain NumPy/scikit-learn."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from scimpute_dask.engine import search
from scimpute_dask.kernels import imputation, knn, scoring


def _reference_topk(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best first, ties to the lower index: a stable sort of the negated similarity."""
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, axis=1), order


@pytest.mark.parametrize("k", [1, 3, 10, 40, 200, 450])
def test_topk_with_ties_matches_stable_sort(k):
    rng = np.random.default_rng(k)
    sim = rng.integers(0, 6, size=(50, 900)).astype(np.float32) / 5  # many exact ties
    packed = knn.topk(sim, np.broadcast_to(np.arange(900), sim.shape), k)
    want_sim, want_idx = _reference_topk(sim, k)
    np.testing.assert_array_equal(packed[..., 1].astype(int), want_idx)
    np.testing.assert_array_equal(packed[..., 0], want_sim)


def test_merging_tiles_equals_one_pass():
    """Any split of the candidates, merged in any grouping, gives the one-pass top-k."""
    rng = np.random.default_rng(1)
    sim = rng.integers(0, 20, size=(30, 97)).astype(np.float32)
    k = 7
    tiles = [knn.topk(sim[:, lo:hi], np.broadcast_to(np.arange(lo, hi), (30, hi - lo)), k)
             for lo, hi in [(0, 10), (10, 11), (11, 60), (60, 97)]]
    left = knn.merge_topk(np.concatenate(tiles[:2], axis=1), k)
    right = knn.merge_topk(np.concatenate(tiles[2:], axis=1), k)
    merged = knn.merge_topk(np.concatenate([right, left], axis=1), k)
    want_sim, want_idx = _reference_topk(sim, k)
    np.testing.assert_array_equal(merged[..., 1].astype(int), want_idx)
    np.testing.assert_array_equal(merged[..., 0], want_sim)


@pytest.mark.parametrize("select", [False, True])
@pytest.mark.parametrize("k", [1, 25, 199, 300, 700])
def test_selection_and_insertion_give_the_same_lists_fed_in_any_blocks(k, select, monkeypatch):
    """Insertion (small k) and buffered selection (large k), fed column blocks of any
    width, both give the one-pass total order (sim desc, row asc)."""
    monkeypatch.setattr(knn, "SELECT_FROM_K", 1 if select else 10**9)
    rng = np.random.default_rng(k)
    sim = np.round(rng.normal(size=(40, 1500)), 1).astype(np.float32)  # near-ties galore
    idx = np.tile(rng.permutation(5000)[:1500], (40, 1))
    idx[rng.random(idx.shape) < 0.2] = knn.EMPTY  # gaps, as merged lists have
    best = knn.TopK(40, k, np.float32)
    assert best.select == select
    cuts = np.sort(rng.choice(np.arange(1, 1500), 6, replace=False))
    for lo, hi in zip([0, *cuts], [*cuts, 1500], strict=True):
        best.add(sim[:, lo:hi], idx[:, lo:hi])
    got = best.result()
    key = np.where(idx == knn.EMPTY, np.inf, -sim.astype(np.float64))
    order = np.lexsort((idx, key), axis=1)[:, :k]
    want_idx = np.where(np.isinf(np.take_along_axis(key, order, 1)), knn.EMPTY,
                        np.take_along_axis(idx, order, 1))
    np.testing.assert_array_equal(got[..., 1].astype(int), want_idx)
    want_sim = np.where(want_idx == knn.EMPTY, -np.inf, np.take_along_axis(sim, order, 1))
    np.testing.assert_array_equal(got[..., 0], want_sim)


def test_fewer_candidates_than_k_leaves_empty_slots():
    packed = knn.topk(np.array([[0.5, 0.9]], dtype=np.float32), np.array([[4, 2]]), 4)
    assert packed[0, :, 1].tolist() == [2, 4, knn.EMPTY, knn.EMPTY]


@pytest.mark.parametrize("k", [2, 300])
def test_fewer_candidates_than_a_large_k(k):
    packed = knn.topk(np.array([[0.5, 0.9, 0.9]]), np.array([[4, 7, 2]]), k)
    assert packed[0, :3, 1].tolist() == [2, 7, 4][:k]
    assert (packed[0, 3:, 1] == knn.EMPTY).all()


def test_log1p_average_equals_numpy():
    rng = np.random.default_rng(5)
    ref = rng.gamma(0.3, 50.0, (60, 17)).astype(np.float32)
    idx = rng.integers(0, 60, (25, 9))
    idx[3, 4:] = -1
    idx[7] = -1
    w = rng.random((25, 9))
    got = imputation.weighted_mean(idx, w, ref, average="log1p")
    logs = np.log1p(ref.astype(np.float64))[np.maximum(idx, 0)]
    ww = np.where(idx >= 0, w, 0.0)
    with np.errstate(invalid="ignore"):
        want = np.expm1(np.einsum("ik,ikg->ig", ww, logs) / ww.sum(axis=1)[:, None])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isnan(got[7]).all()
    plain = imputation.weighted_mean(idx, w, ref)
    assert (got[~np.isnan(got)] <= plain[~np.isnan(plain)] + 1e-9).all()  # AM-GM


def test_normalize_rows_keeps_zero_rows_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(knn.normalize_rows(x), [[0.6, 0.8], [0.0, 0.0]])
    assert knn.zero_rows(x).tolist() == [False, True]


def test_knn_graph_matches_dense_cosine():
    rng = np.random.default_rng(2)
    q, r = rng.gamma(1.0, 1.0, (123, 20)), rng.gamma(1.0, 1.0, (211, 20))
    with dask.config.set(scheduler="sync"):
        idx, sim = dask.compute(*search.knn(
            da.from_array(q, chunks=(40, 7)), da.from_array(r, chunks=(33, 20)), 5))
    dense = cosine_similarity(q, r)
    want_sim, want_idx = _reference_topk(dense, 5)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sim, want_sim, atol=1e-6)


def test_weighted_mean_matches_numpy():
    rng = np.random.default_rng(3)
    ref = rng.random((50, 9)).astype(np.float32)
    idx = rng.integers(0, 50, (20, 4))
    idx[3] = -1
    w = rng.random((20, 4)) + 1
    got = imputation.weighted_mean(idx, w, ref, dtype=np.float64)
    want = (w[..., None] * ref[idx].astype(np.float64)).sum(1) / w.sum(1, keepdims=True)
    np.testing.assert_allclose(got[np.arange(20) != 3], want[np.arange(20) != 3], rtol=1e-12)
    assert np.isnan(got[3]).all()


def test_rowwise_cosine_matches_sklearn():
    rng = np.random.default_rng(4)
    a, b = rng.random((10, 6)), rng.random((10, 6))
    a[2] = 0
    want = np.diag(cosine_similarity(a, b))
    np.testing.assert_allclose(scoring.rowwise_cosine(a, b), want)
    assert np.isnan(scoring.rowwise_cosine(np.full((1, 3), np.nan), b[:1, :3])).all()


def test_summary_stats_ignores_undefined_cells():
    stats = scoring.summary_stats(np.array([0.2, np.nan, 0.4, 0.9]))
    assert stats["Mean"] == pytest.approx(0.5)
    assert stats["Median"] == pytest.approx(0.4)


def test_exact_ties_resolve_the_same_whatever_the_tiling():
    """Cells expressing one shared gene are all equally similar: lowest rows win, always."""
    rng = np.random.default_rng(5)
    r = np.zeros((600, 4), dtype=np.float32)
    r[:, 0] = rng.integers(1, 500, 600)  # only gene 0: cosine 1 with any gene-0 query
    q = np.zeros((7, 4), dtype=np.float32)
    q[:, 0] = rng.integers(1, 500, 7)
    results = []
    for br in (600, 256, 64, 37):
        with dask.config.set(scheduler="sync"):
            idx, _ = dask.compute(*search.knn(
                da.from_array(q, chunks=(3, -1)), da.from_array(r, chunks=(br, -1)), 5))
        results.append(idx)
    for idx in results:
        np.testing.assert_array_equal(idx, np.tile(np.arange(5), (7, 1)))


@pytest.mark.parametrize("k", [5, 40, 230])
def test_search_equals_brute_force_float64_on_near_ties(k):
    """Small integer counts on few genes: thousands of exact ties and near-ties within
    float32 rounding. Whatever the tiling and with clusters or not, the search returns
    exactly the brute-force float64 order (cosine on a 1e-12 grid desc, row asc)."""
    rng = np.random.default_rng(k)
    r = rng.integers(0, 3, (700, 6)).astype(np.float32) * rng.choice([1, 2, 3], (700, 1))
    q = rng.integers(0, 3, (90, 6)).astype(np.float32)
    q[0] = 0  # undefined cosine
    zero = knn.zero_rows(q)
    qc, rc = rng.integers(0, 2, 90), rng.integers(0, 2, 700)
    for clustered in (False, True):
        dense = np.round(cosine_similarity(q.astype(np.float64), r.astype(np.float64)), 12)
        if clustered:
            dense = np.where(qc[:, None] == rc[None, :], dense, -np.inf)
        want_sim, want_idx = _reference_topk(dense, k)
        for bq, br in ((90, 700), (32, 256), (7, 61)):
            codes = ((da.from_array(qc, chunks=bq), da.from_array(rc, chunks=br)) if clustered
                     else (None, None))
            with dask.config.set(scheduler="sync"):
                idx, sim = dask.compute(*search.knn(
                    da.from_array(q, chunks=(bq, -1)), da.from_array(r, chunks=(br, -1)), k,
                    *codes))
            np.testing.assert_array_equal(idx[~zero], want_idx[~zero])
            np.testing.assert_allclose(sim[~zero], want_sim[~zero], rtol=0, atol=1e-7)
            assert (idx[zero] == knn.EMPTY).all() and np.isnan(sim[zero]).all()


def test_a_reference_prepared_in_a_store_is_searched_as_in_memory(tmp_path):
    """The one searcher: a reference prepared into a Zarr store (tiles read inside the tasks)
    gives the brute-force float64 kNN, for any tile, with and without clusters; a second
    prepare with the same key reuses the store, another key rebuilds it."""
    from scimpute_dask.io.storage import location

    rng = np.random.default_rng(21)
    r = (rng.gamma(0.4, 3.0, (900, 30)) * (rng.random((900, 30)) < 0.4)).astype(np.float32)
    q = (rng.gamma(0.4, 3.0, (130, 30)) * (rng.random((130, 30)) < 0.4)).astype(np.float32)
    q[3] = 0
    qc, rc = rng.integers(0, 3, 130), rng.integers(0, 3, 900)
    zero = knn.zero_rows(q)
    for clustered in (False, True):
        dense = np.round(cosine_similarity(q.astype(np.float64), r.astype(np.float64)), 12)
        if clustered:
            dense = np.where(qc[:, None] == rc[None, :], dense, -np.inf)
        want_sim, want_idx = _reference_topk(dense, 12)
        for tile in (900, 256, 77):
            path = location(tmp_path / f"search_{clustered}.zarr")
            key = {"tile": tile, "clustered": clustered}
            codes = da.from_array(rc, chunks=300) if clustered else None
            searcher = search.prepare(da.from_array(r, chunks=(300, -1)), tile, codes, path, key)
            assert searcher.tiles.tile == tile and (path / "values").exists()
            with dask.config.set(scheduler="sync"):
                idx, sim = dask.compute(*searcher.neighbours(
                    da.from_array(q, chunks=(40, -1)), 12,
                    da.from_array(qc, chunks=40) if clustered else None))
            np.testing.assert_array_equal(idx[~zero], want_idx[~zero])
            np.testing.assert_allclose(sim[~zero], want_sim[~zero], rtol=0, atol=1e-7)
            assert (idx[zero] == knn.EMPTY).all() and np.isnan(sim[zero]).all()
            mtime = (path / "values" / "zarr.json").stat().st_mtime_ns
            again = search.prepare(da.from_array(r, chunks=(300, -1)), tile, codes, path, key)
            assert (path / "values" / "zarr.json").stat().st_mtime_ns == mtime  # reused
            again.remove()
            assert not path.exists()


def test_parser_reads_numbers_as_float_does():
    from scimpute_dask.io import textcodec as textio

    fields = ["0e400", "0.0E+999", "1e-400", ".5", "5.", "-2.5e3", '"3"', " 12 ", "Infinity",
              "-nan", "1e400"]
    values, status = textio.parse_rows(("g\t" + "\t".join(fields) + "\n").encode(), "\t", 1,
                                       len(fields))
    assert status[0] == textio.OK
    want = np.array([float(f.strip().strip('"')) for f in fields], dtype=np.float32)
    np.testing.assert_array_equal(values[0], want)
    for bad in ["infxxxxx", "1e", "-", "0x10", "1.2.3", "abc"]:
        assert textio.parse_rows(f"g\t{bad}\n".encode(), "\t", 1, 1)[1][0] == textio.BAD_FIELD


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_parser_split_over_threads_names_the_right_row(threads):
    from scimpute_dask.io import textcodec as textio

    rng = np.random.default_rng(3)
    values = np.round(rng.random((37, 11)) * 10.0 ** rng.integers(-2, 5, (37, 11)), 3)
    lines = [f"g{i}\t" + "\t".join(map(repr, row)) for i, row in enumerate(values.tolist())]
    got, status = textio.parse_rows(("\n".join(lines) + "\n").encode(), "\t", 37, 11,
                                    threads=threads)
    assert status == (textio.OK, 0, 0)
    np.testing.assert_array_equal(got, values.astype(np.float32))
    lines[29] = lines[29].replace("\t", "\tx", 1)
    assert textio.parse_rows("\n".join(lines).encode(), "\t", 37, 11, threads=threads)[1] \
        == (textio.BAD_FIELD, 29, 0)
    lines[29] = lines[29].rsplit("\t", 1)[0].replace("\tx", "\t", 1)
    assert textio.parse_rows("\n".join(lines).encode(), "\t", 37, 11, threads=threads)[1] \
        == (textio.SHORT_ROW, 29, 10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("decimals", [0, 2, 4, 7])
def test_formatter_writes_what_python_writes_after_numpy_rounding(dtype, decimals):
    """``'%.{d}f' % np.round(x, d)`` for every value: ties at every digit, signs, -0.0,
    NaN and infinities, magnitudes from 1e-3 to 1e9, a patch of float64 columns, and
    values beyond the compiled path's exact range."""
    from scimpute_dask.io import textcodec as textio

    rng = np.random.default_rng(11)
    x = rng.random((300, 40)) * 10.0 ** rng.integers(-3, 10 - decimals, (300, 40))
    x[::3] = np.round(x[::3], decimals + 1)  # halfway cases for the rounding
    x[::5] *= -1
    x[0, :8] = [np.nan, np.inf, -np.inf, -0.0, -1e-9, 0.5, 2.5, 2.675]
    x = x.astype(dtype)
    names = [f"cell{i}" for i in range(len(x))]
    cols, patch = np.array([3, 17]), rng.random((len(x), 2)) * 1e4
    want_values = x.astype(np.float64)
    want_values[:, cols] = patch

    def python(values):
        return "".join(f"{n}\t" + "\t".join(f"{v:.{decimals}f}" for v in row) + "\n"
                       for n, row in zip(names, np.round(values, decimals), strict=True))

    got = textio.format_matrix(names, x, decimals, patch=(cols, patch))
    assert bytes(got).decode() == python(want_values)
    huge = want_values.copy()
    huge[1, 1] = 1e300  # beyond 2**45 once scaled: Python formats the block
    assert bytes(textio.format_matrix(names, huge, decimals)).decode() == python(huge)


def test_neighbour_lines_write_names_and_distances_as_python_does():
    from scimpute_dask.io import textcodec as textio

    rng = np.random.default_rng(5)
    lists = (["NA", "neuron"], [f"q{i}" for i in range(50)], [f"ref_{i}" for i in range(70)])
    table = textio.string_table(np.concatenate([np.asarray(x, dtype=object) for x in lists]))
    codes = np.column_stack([rng.integers(0, len(x), 400) for x in lists])
    dist = (rng.random(400) * 2).astype(np.float32)
    dist[:3] = [0.0, 2.0, np.nan]
    got = textio.format_columns(table, codes + np.cumsum([0, 2, 50]), dist, 7)
    want = "".join(f"{lists[0][a]}\t{lists[1][b]}\t{lists[2][c]}\t{v:.7f}\n"
                   for (a, b, c), v in zip(codes, np.round(dist.astype(np.float64), 7),
                                           strict=True))
    assert bytes(got).decode() == want


@pytest.mark.parametrize("average", ["mean", "log1p"])
def test_score_kernel_equals_rounded_imputation_then_cosine(average):
    """The score from the float32 store equals the brute-force score from float64 means."""
    rng = np.random.default_rng(9)
    reference = (rng.random((60, 12)) * 200).astype(np.float32)
    reference[:, 3] = 0
    measured = (rng.random((40, 12)) * 50).astype(np.float32)
    measured[5] = 0  # a cell with nothing measured: cosine 0, as scikit-learn's
    indices = rng.integers(0, 60, (40, 7))
    indices[7, 4:] = -1
    indices[9] = -1  # no neighbours: NaN
    weights = rng.random((40, 7)) + 1
    means = imputation.weighted_mean(indices, weights, reference, average=average)
    want = scoring.rowwise_cosine(scoring.round_like_scimpute(means), measured)
    stored = imputation.float32_keeping_text(means)
    got = scoring.rounded_cosine(stored, measured)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
    np.testing.assert_array_equal(got, scoring.rounded_cosine(means, measured))
    assert np.isnan(got[9]) and got[5] == 0


def test_float32_keeping_text_rounds_as_float64_does():
    """Values on and around every kind of 2-decimal rounding boundary: the float32 kept
    rounds to the float64's 2 decimals, within one float32 step of it."""
    rng = np.random.default_rng(7)
    centi = rng.integers(0, 3_276_700, 200_000)
    edges = (centi + 0.5) / 100  # the .xx5 boundaries, where float32 rounding crosses
    jitter = rng.normal(scale=1e-3, size=edges.size) * np.spacing(edges.astype(np.float32))
    values = np.concatenate([edges, edges + jitter, rng.random(50_000) * 32767,
                             [0.0, np.nan, 0.005, 0.015, 32767.995, 1e-9]])
    got = imputation.float32_keeping_text(values)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(scoring.round_like_scimpute(got),
                                  scoring.round_like_scimpute(values))
    finite = np.isfinite(values)
    assert (np.abs(got[finite] - values[finite])
            <= np.spacing(np.abs(values[finite]).astype(np.float32))).all()
    # the plain cast does cross boundaries here: the test covers the correction
    assert (scoring.round_like_scimpute(values.astype(np.float32))
            != scoring.round_like_scimpute(values))[finite].any()
    with pytest.raises(ValueError, match="need float64"):
        imputation.float32_keeping_text(np.array([1e7 + 0.005]))


def test_column_max_of_csr_blocks_equals_the_dense_one():
    from scipy import sparse

    from scimpute_dask.kernels.imputation import column_max

    rng = np.random.default_rng(3)
    dense = sparse.random(300, 70, density=0.05, random_state=3).toarray() * 1e6
    dense[rng.random(dense.shape) < 0.01] *= -1  # magnitudes
    np.testing.assert_array_equal(column_max(sparse.csr_matrix(dense)), column_max(dense))
    assert column_max(sparse.csr_matrix((4, 3))).tolist() == [[0.0, 0.0, 0.0]]


def test_the_reference_is_prepared_in_whole_store_chunks_where_they_fit():
    from scimpute_dask import plan

    roomy = plan.Plan(8 * 10**9, 2, 1024, 512, 64, 8192)
    assert plan.preparation_rows(roomy, 4096, 5000) == 4096  # 1.3 GB in a 3.8 GB share
    tight = plan.Plan(plan.BASE_BYTES + 10**9, 2, 1024, 512, 64, 8192)
    assert plan.preparation_rows(tight, 4096, 5000) == 512  # the tile, which divides it
    assert plan.preparation_rows(roomy, 256, 5000) == 512  # a tile of whole chunks
