"""Figures, report.html (checked in headless chromium) and run.json provenance."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy import sparse

from scimpute_dask import InputError, run_imputation
from scimpute_dask.cli import main
from scimpute_dask.plotting import figures as plotting

from .conftest import MC_CORTEX

anndata = pytest.importorskip("anndata")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _not_blank(path, size: tuple[int, int] | None = None) -> np.ndarray:
    image = imread(path)
    if size is not None:
        assert image.shape[:2] == size, (path, image.shape)
    assert image[..., :3].std() > 0.05, f"{path} looks blank"
    return image


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory):
    """A2 as an .h5ad query (60 genes, sparse, obsm['spatial']); A1's CSV as the reference."""
    if not MC_CORTEX.exists():
        pytest.skip("../shared data not present")
    tmp = tmp_path_factory.mktemp("mc_report")
    a2 = pd.read_csv(MC_CORTEX / "A2" / "matrix.csv", index_col=0)
    xy = pd.read_csv(MC_CORTEX / "A2" / "coords.csv", index_col=0).loc[a2.index, ["X", "Y"]]
    visible = np.sort(np.random.default_rng(0).choice(a2.columns, 60, replace=False))
    query = anndata.AnnData(X=sparse.csr_matrix(a2[visible].to_numpy(np.float32)),
                            obs=pd.DataFrame(index=a2.index.astype(str)),
                            var=pd.DataFrame(index=visible))
    query.obsm["spatial"] = xy.to_numpy()
    query.write_h5ad(tmp / "A2_panel.h5ad")
    out = tmp / "out"
    assert main(["run", "--query", str(tmp / "A2_panel.h5ad"), "--reference",
                 str(MC_CORTEX / "A1" / "matrix.csv"), "--reference-layout", "cells_x_genes",
                 "--no-clusters", "--k", "15", "--out", str(out), "--quiet"]) == 0
    return out, a2, visible


def test_spatial_maps_of_the_real_data(mc_run):
    out, _, _ = mc_run
    side = int(plotting.PANEL_INCHES * plotting.DPI)
    shared = _not_blank(out / plotting.SHARED_PNG, (3 * side, 2 * side))
    _not_blank(out / plotting.IMPUTED_PNG, (side, 3 * side))
    # the measured and imputed columns are different pictures of the same tissue
    half = shared.shape[1] // 2
    assert np.abs(shared[:, :half, :3] - shared[:, half:, :3]).mean() > 0.01
    _not_blank(out / "cosine_similarities.png")
    adata = anndata.read_zarr(out / "adata.zarr")  # the query's coordinates travel along
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)


def test_held_out_score_vs_sparsity_on_the_real_data(mc_run, tmp_path):
    out, a2, visible = mc_run
    adata = anndata.read_zarr(out / "adata.zarr")
    hidden = adata.var_names[~adata.var["measured"].to_numpy()]
    assert set(hidden) == set(a2.columns) - set(visible)
    ok = ~np.isnan(adata.X).any(axis=1)
    truth = a2.set_axis(a2.index.astype(str)).loc[adata.obs_names[ok], hidden].to_numpy(float)
    pred = adata[ok, hidden].X.astype(float)
    t, p = truth - truth.mean(axis=0), pred - pred.mean(axis=0)
    r = (t * p).sum(axis=0) / np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0))
    sparsity = (truth == 0).mean(axis=0)
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    plotting.score_vs_sparsity(tmp_path / plotting.SCORE_PNG, sparsity, {"Pearson r": r})
    _not_blank(tmp_path / plotting.SCORE_PNG, (400, 600))
    assert np.nanmedian(r) > 0.2
    # drawn outside pyplot: a notebook's inline backend and its figures are left alone
    assert matplotlib.get_backend() == before and plt.get_fignums() == []


def test_run_json_records_provenance(mc_run):
    out, _, _ = mc_run
    record = json.loads((out / "run.json").read_text())
    assert {"python", "numpy", "dask", "zarr", "anndata"} <= set(record["versions"])
    for role, path in (("query", out.parent / "A2_panel.h5ad"),
                       ("reference", MC_CORTEX / "A1" / "matrix.csv")):
        entry = record["input_checksums"][role]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["peak_memory_mib"]["process"] > 50
    assert {"check", "convert", "knn", "impute", "score", "export", "figures"} <= set(
        record["timings_s"])
    assert {"report.html", "adata.zarr", plotting.SHARED_PNG} <= set(record["outputs"])


def test_report_is_self_contained(mc_run):
    out, _, _ = mc_run
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "Median" in page and "knn" in page and "sha256" in page
    assert "<script" not in page and "http" not in page  # static, nothing fetched


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(mc_run, tmp_path):
    out, _, _ = mc_run
    url = (out / "report.html").as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1800", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    _not_blank(shot, (1800, 1200))
    assert "CONSOLE" not in run.stderr and "Uncaught" not in run.stderr, run.stderr[-2000:]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert "scimpute-dask imputation report" in dom.stdout
    assert dom.stdout.count("<img") == 3


def test_tsv_query_with_a_coordinates_file(tmp_path, small_inputs):
    xy = pd.DataFrame({"cell": small_inputs.query_df.index,
                       "x": np.arange(257) % 16, "y": np.arange(257) // 16})
    xy.to_csv(tmp_path / "xy.csv", index=False)
    genes = [small_inputs.query_df.columns[0], small_inputs.reference_df.columns[-1]]
    out = tmp_path / "out"
    result = run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities,
                            0, out, k=5, coords=tmp_path / "xy.csv", plot_genes=genes)
    side = int(plotting.PANEL_INCHES * plotting.DPI)
    _not_blank(result.files["measured_map"], (side, 2 * side))
    _not_blank(result.files["imputed_map"], (side, 3 * side))
    assert not (out / "adata.zarr").exists()  # a TSV query: no AnnData unless asked
    with pytest.raises(InputError, match="genes to plot are not in"):
        run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0,
                       tmp_path / "bad", k=5, coords=tmp_path / "xy.csv", plot_genes=["nope"])
    plain = tmp_path / "plain"
    run_imputation(small_inputs.query, small_inputs.reference, small_inputs.identities, 0,
                   plain, k=5, report=False)
    assert not (plain / "report.html").exists()
    for name in ("imputation.tsv", "sim_matrix.tsv", "scores.txt"):
        assert (plain / name).read_bytes() == (out / name).read_bytes()


def test_verbose_logs_timings_and_quiet_logs_nothing(tmp_path, small_inputs, caplog, capsys):
    argv = ["run", "--query", str(small_inputs.query), "--reference",
            str(small_inputs.reference), "--identities", str(small_inputs.identities),
            "--k", "5", "--no-report"]
    with caplog.at_level("DEBUG", logger="scimpute_dask"):
        assert main([*argv, "--out", str(tmp_path / "v"), "--verbose"]) == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "scimpute_dask"]
    assert any(m.startswith("knn took") for m in messages)
    assert any(m.startswith("block sizes: Plan(") for m in messages)
    assert any("peak memory (MiB)" in m for m in messages)
    assert "%|" in capsys.readouterr().err  # progress bars
    caplog.clear()
    assert main([*argv, "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert not [r for r in caplog.records if r.name == "scimpute_dask"
                and r.levelname in ("DEBUG", "INFO")]
    assert "%|" not in capsys.readouterr().err  # no progress bars


def test_inputs_are_identified_cheaply_and_never_fail_the_run(tmp_path, small_pair,
                                                              monkeypatch):
    from scimpute_dask import convert
    from scimpute_dask.export import provenance
    from scimpute_dask.plotting import report

    text = tmp_path / "q.tsv"
    small_pair.query.T.to_csv(text, sep="\t")
    store = convert(small_pair.query, tmp_path / "q.zarr", memory_limit="700MB")
    # a store is identified by what it was converted from, never by re-reading its chunks
    monkeypatch.setattr(provenance, "sha256", lambda path: pytest.fail(f"hashed {path}"))
    found = provenance.checksums({"store": tmp_path / "q.zarr",
                                  "memory": small_pair.query}).result()
    assert found == {"store": {"path": str(tmp_path / "q.zarr"),
                               "fingerprint": store.fingerprint}}
    monkeypatch.undo()
    found.update(provenance.checksums({"text": text, "moved": tmp_path / "gone.tsv"}).result())
    assert found["text"]["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert set(found["moved"]) == {"path", "error"} and "gone.tsv" in found["moved"]["error"]
    report.write_report(tmp_path / "report.html", {"input_checksums": found}, [])
    page = (tmp_path / "report.html").read_text()
    assert "store fingerprint" in page and "moved error" in page


def test_plot_genes_none_draws_no_maps(tmp_path, small_inputs, capsys):
    pd.DataFrame({"cell": small_inputs.query_df.index, "x": np.arange(257) % 16,
                  "y": np.arange(257) // 16}).to_csv(tmp_path / "xy.csv", index=False)
    args = ["run", "--query", str(small_inputs.query), "--reference",
            str(small_inputs.reference), "--identities", str(small_inputs.identities),
            "--k", "5", "--coords", str(tmp_path / "xy.csv"), "-q"]
    assert main([*args, "--out", str(tmp_path / "all"), "--plot-genes", "all"]) == 2
    assert "--plot-genes all" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "out"), "--plot-genes", "none"]) == 0
    assert (tmp_path / "out" / "report.html").exists()
    assert not list((tmp_path / "out").glob("spatial_*.png"))
