"""Normalisation and weighting options against a brute-force NumPy computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from scimpute_dask import InputError, run_imputation
from scimpute_dask.cli import main


def _search_space(x: np.ndarray, normalize: str) -> np.ndarray:
    """Independent NumPy versions of the transforms."""
    if normalize == "none":
        return x
    if normalize in ("cpm", "log1p_cpm"):
        lib = x.sum(axis=1, keepdims=True)
        c = np.divide(x * 1e6, lib, out=np.zeros_like(x), where=lib > 0)
        return c if normalize == "cpm" else np.log(1 + c)
    sd = np.where(x.std(axis=0) > 0, x.std(axis=0), 1)
    if normalize == "scale":
        return x / sd
    z = (x - x.mean(axis=0)) / sd
    z[(x == 0).all(axis=1)] = 0
    return z


def _weights(s: np.ndarray, weighting: str, temperature: float) -> np.ndarray:
    if weighting == "cosine+1":
        return s + 1
    if weighting == "cosine":
        return np.maximum(s, 0)
    if weighting == "uniform":
        return np.ones_like(s)
    e = np.exp(s / temperature)
    return e / e.sum(axis=1, keepdims=True)


def _brute(q, r, k, normalize, weighting, temperature):
    qs = _search_space(q[:, :q.shape[1]], normalize)
    rs = _search_space(r, normalize)
    qn = qs / np.linalg.norm(qs, axis=1, keepdims=True)
    rn = rs / np.linalg.norm(rs, axis=1, keepdims=True)
    sim = qn @ rn.T
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(sim, idx, axis=1)
    gap = np.sort(sim, axis=1)[:, ::-1]
    clear = gap[:, k - 1] - gap[:, k] > 1e-6
    return idx, s, clear


@pytest.mark.parametrize("normalize", ["none", "cpm", "log1p_cpm", "scale", "zscore"])
@pytest.mark.parametrize("weighting", ["cosine+1", "cosine", "softmax", "uniform"])
def test_options_match_brute_force(tmp_path, small_pair, normalize, weighting):
    k, temperature = 7, 0.02
    query, ref = small_pair.query.iloc[:90], small_pair.reference.iloc[:150]
    out = tmp_path / "out"
    run_imputation(query, ref, outdir=out, k=k, consider_clusters=False, chunk_size=40,
                   reference_chunk_size=64, normalize=normalize, weighting=weighting,
                   temperature=temperature)
    q = zarr.open_group(out / "zarr" / "query.zarr")["X"][:].astype(np.float64)
    r_full = zarr.open_group(out / "zarr" / "reference.zarr")["X"][:].astype(np.float64)
    r = r_full[:, ref.columns.get_indexer(query.columns)]
    idx, s, clear = _brute(q, r, k, normalize, weighting, temperature)
    assert clear.mean() > 0.9
    nbrs = zarr.open_group(out / "zarr" / "neighbors.zarr")
    np.testing.assert_array_equal(nbrs["indices"][:][clear], idx[clear])
    w = nbrs["weights"][:].astype(np.float64)
    expected_w = _weights(s, weighting, temperature)
    # the engine's softmax is unnormalised (the row maximum cancels in the mean)
    if weighting == "softmax":
        w = w / w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(w[clear], expected_w[clear], rtol=2e-5, atol=1e-6)
    imputed = zarr.open_group(out / "zarr" / "imputed.zarr")["X"][:]
    expected = np.einsum("ik,ikg->ig", expected_w, r_full[idx]) / expected_w.sum(axis=1)[:, None]
    np.testing.assert_allclose(imputed[clear], expected[clear], rtol=1e-4, atol=1e-3)
    params = json.loads((out / "run.json").read_text())["parameters"]
    assert (params["normalize"], params["weighting"]) == (normalize, weighting)


def test_cpm_finds_the_same_neighbours_as_none(tmp_path, small_pair):
    """The cosine ignores a per-cell factor: CPM alone must not change the neighbours."""
    got = {}
    for normalize in ("none", "cpm"):
        out = tmp_path / normalize
        run_imputation(small_pair.query, small_pair.reference, outdir=out, k=5,
                       consider_clusters=False, normalize=normalize)
        got[normalize] = zarr.open_group(out / "zarr" / "neighbors.zarr")["indices"][:]
    assert (got["none"] == got["cpm"]).mean() > 0.99


@pytest.mark.parametrize(("option", "value", "message"), [
    ("normalize", "log", "normalize must be one of 'none', 'cpm', 'log1p', 'log1p_cpm', 's"),
    ("weighting", "gauss", r"weighting must be one of 'cosine\+1', 'cosine', 'softmax'"),
    ("temperature", 0.0, "temperature must be a positive finite number"),
])
def test_bad_options_are_named(tmp_path, small_pair, option, value, message):
    with pytest.raises(InputError, match=message):
        run_imputation(small_pair.query, small_pair.reference, outdir=tmp_path / "o",
                       consider_clusters=False, **{option: value})
    assert not (tmp_path / "o").exists()


def test_cli_options(tmp_path, small_inputs, capsys):
    out = tmp_path / "out"
    assert main(["run", "--query", str(small_inputs.query), "--reference",
                 str(small_inputs.reference), "--no-clusters", "--out", str(out), "--k", "5",
                 "--normalize", "log1p_cpm", "--weighting", "softmax", "--temperature", "0.1",
                 "--quiet"]) == 0
    params = json.loads((out / "run.json").read_text())["parameters"]
    assert params["normalize"] == "log1p_cpm"
    assert params["temperature"] == 0.1


def test_zscore_keeps_cells_without_expression_unimputable(tmp_path, small_inputs):
    """Centring would give an all-zero cell a profile (minus the means); it must not."""
    result = run_imputation(small_inputs.query, small_inputs.reference, outdir=tmp_path / "o",
                            k=5, consider_clusters=False, normalize="zscore",
                            weighting="softmax")
    assert len(result.unimputable) == 2
    idx = zarr.open_group(tmp_path / "o" / "zarr" / "neighbors.zarr")["indices"][:]
    assert (idx[:2] == -1).all() and (idx[2:] >= 0).all()


def test_cosine_weights_never_extrapolate_with_centred_genes(tmp_path, small_pair):
    """zscore gives negative cosines; far neighbours must weigh 0, not push values out."""
    query, ref = small_pair.query.iloc[:60], small_pair.reference.iloc[:60]
    out = tmp_path / "out"
    run_imputation(query, ref, outdir=out, k=55, consider_clusters=False,
                   normalize="zscore", weighting="cosine")
    w = zarr.open_group(out / "zarr" / "neighbors.zarr")["weights"][:]
    assert np.nanmin(w) >= 0
    assert (w == 0).any()  # some of the 55 neighbours were anti-correlated
    imputed = zarr.open_group(out / "zarr" / "imputed.zarr")["X"][:]
    r = ref.to_numpy(np.float64)
    ok = np.isfinite(imputed).all(axis=1)
    assert ok.mean() > 0.9
    assert (imputed[ok] >= r.min(axis=0) - 1e-6).all()
    assert (imputed[ok] <= r.max(axis=0) + 1e-6).all()
