"""The drop-in API, its step-wise functions and the CLI agree on the same input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import zarr

import scimpute_dask
from scimpute_dask.cli import main

TEXT_OUTPUTS = ["imputation.tsv", "sim_matrix.tsv", "scores.txt", "stats.txt",
                "unimputable_cells.txt"]


def test_api_and_cli_write_the_same_files(tmp_path, small_inputs, capsys):
    api_out, cli_out = tmp_path / "api", tmp_path / "cli"
    scimpute_dask.expression_imputation(
        str(small_inputs.query), str(small_inputs.reference), str(small_inputs.identities), 0,
        outdir=str(api_out), k_neighbors=7, save_chunks=False, chunk_size=100,
    )
    code = main(["run", "--query", str(small_inputs.query), "--reference",
                 str(small_inputs.reference), "--identities", str(small_inputs.identities),
                 "--name-column", "0", "--out", str(cli_out), "--k", "7", "--chunk-size", "100",
                 "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in TEXT_OUTPUTS:
        assert (api_out / name).read_bytes() == (cli_out / name).read_bytes(), name
        assert str(cli_out / name) in printed
    assert (api_out / "cosine_similarities.png").stat().st_size > 5000
    for store, arrays in [("imputed.zarr", ["X"]), ("neighbors.zarr", ["indices", "weights"])]:
        for arr in arrays:
            a = zarr.open_group(api_out / "zarr" / store, mode="r")[arr][:]
            b = zarr.open_group(cli_out / "zarr" / store, mode="r")[arr][:]
            np.testing.assert_array_equal(a, b)


def test_step_wise_functions_reproduce_the_pipeline(tmp_path, small_inputs, capsys):
    whole = tmp_path / "whole"
    scimpute_dask.expression_imputation(
        small_inputs.query, small_inputs.reference, small_inputs.identities, 0,
        outdir=whole, k_neighbors=5, save_chunks=True, chunk_size=60)
    assert len(list((whole / "imputations").iterdir())) == 5  # 257 cells / 60

    steps = tmp_path / "steps"
    x, y, clusters, save_location = scimpute_dask.read_inputs(
        small_inputs.query, small_inputs.reference, small_inputs.identities, 0, steps)
    assert x.shape == (257, 30) and y.shape == (311, 120) and "id" in clusters.columns
    sim = scimpute_dask.similarity_matrix(x, y, clusters, 0, save_location, k_neighbors=5)
    assert list(sim.columns) == ["cluster", "x", "y", "distance"]
    assert (steps / "sim_matrix.tsv").read_bytes() == (whole / "sim_matrix.tsv").read_bytes()
    imputed = scimpute_dask.impute_expression(x, y, sim, save_location, chunk_size=60)
    assert list(imputed.columns) == ["cell", *y.columns]
    final = scimpute_dask.merge_imputation_chunks(save_location, save_location,
                                                  save_chunks=False)
    assert not (steps / "imputations").exists()
    assert (steps / "imputation.tsv").read_bytes() == (whole / "imputation.tsv").read_bytes()
    scores = scimpute_dask.validate_results(x, final, save_location)
    assert "Mean:" in capsys.readouterr().out
    expected = np.array((whole / "scores.txt").read_text().split(), dtype=float)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)  # summation order only

    def stats(d):
        return [float(v.split(": ")[1]) for v in (d / "stats.txt").read_text().splitlines()]

    np.testing.assert_allclose(stats(steps), stats(whole), rtol=1e-12)


def test_dataframe_inputs_as_scimpute_accepts(tmp_path, small_pair):
    out = tmp_path / "out"
    ids = small_pair.identities.rename(columns={"cell": "name"})[["id", "name"]]
    ids["name"] = "_" + ids["name"]  # scimpute strips leading underscores
    result = scimpute_dask.expression_imputation(
        small_pair.query, small_pair.reference, ids, 1, outdir=out, k_neighbors=3,
        save_chunks=False)
    table = pd.read_csv(out / "imputation.tsv", sep="\t", index_col=0)
    assert table.shape == (257, 120)
    assert result.files["imputation"] == out.absolute() / "imputation.tsv"


def test_merge_keeps_row_order_past_a_thousand_chunks(tmp_path):
    chunks = tmp_path / "imputations"
    chunks.mkdir()
    for i in range(1003):  # scimpute's 3-digit names: 1000 sorts before 101
        (chunks / f"CPM_imputation_{i:03}_{i}_{i + 1}.tsv").write_text(
            f"\tcell\tg\n0\tc{i}\t{i}.0\n")
    merged = scimpute_dask.merge_imputation_chunks(chunks, tmp_path, save_chunks=True)
    assert list(merged.index) == [f"c{i}" for i in range(1003)]
    assert list(merged.columns) == ["g"]


def test_step_wise_api_keeps_numeric_cell_names_as_strings(tmp_path, small_pair):
    q = small_pair.query.set_axis([f"{i:04d}" for i in range(257)])
    r = small_pair.reference.set_axis([f"{i:05d}" for i in range(311)])
    ids = pd.DataFrame({"cell": [*q.index, *r.index],
                        "id": [*small_pair.identities["id"]]})
    sim = scimpute_dask.similarity_matrix(q, r, ids, 0, tmp_path, k_neighbors=3)
    (tmp_path / "sim.tsv").write_bytes((tmp_path / "sim_matrix.tsv").read_bytes())
    table = scimpute_dask.impute_expression(q, r, tmp_path / "sim.tsv", tmp_path)
    assert table["cell"].iloc[0] == "0000"
    final = scimpute_dask.merge_imputation_chunks(tmp_path, tmp_path)
    assert final.index[0] == "0000"
    scores = scimpute_dask.validate_results(q, tmp_path / "imputation.tsv", tmp_path)
    assert np.isfinite(scores).sum() > 250
    assert len(sim) == 3 * 257


def test_demo_report_shows_the_tissue_and_the_unmeasured_genes_accuracy(tmp_path, capsys):
    from scimpute_dask.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--query-cells", "400", "--reference-cells", "300",
                 "--genes", "600", "--panel", "60", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "median per-gene Pearson r vs. ground truth" in printed
    run = out / "imputation"
    assert (run / "spatial_imputed.png").exists()
    assert (run / "spatial_measured_vs_imputed.png").exists()
    page = (run / "report.html").read_text()
    assert "Accuracy on the genes the panel did not measure" in page
    median = float(printed.rsplit("= ", 1)[1])
    assert f"{median:.4f}"[:5] in page
    coords = (out / "inputs" / "coords.csv").read_text().splitlines()
    assert coords[0] == "cell,x,y" and len(coords) == 401
