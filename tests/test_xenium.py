"""A Xenium output bundle as the query, a Cell Ranger ``.h5`` as the reference: one command
to report.html with spatial maps."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import io as spio
from scipy import sparse

from scimpute_dask import InputError, convert
from scimpute_dask.cli import main
from scimpute_dask.io import xenium
from scimpute_dask.plotting import figures

from .test_tenx_h5 import write_10x_h5, write_h5_matrix

pytest.importorskip("h5py")
pytest.importorskip("pyarrow")

CONTROLS = {"Negative Control Probe": 3, "Negative Control Codeword": 2,
            "Unassigned Codeword": 2}


def write_bundle(bundle, section: pd.DataFrame, xy: np.ndarray, seed: int = 0,
                 cells_table: str | None = "cells.parquet", matrix: str = "h5") -> None:
    """A Xenium Onboard Analysis bundle as it writes one: ``cell_feature_matrix.h5`` (or its
    MatrixMarket folder) with control probes and codewords after the panel's genes,
    ``cells.parquet`` (cell_id, centroids in µm, counts, areas) and ``experiment.xenium``."""
    bundle.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n_extra = sum(CONTROLS.values())
    counts = np.hstack([section.to_numpy(np.int64), rng.poisson(0.2, (len(section), n_extra))])
    names = [*section.columns, *(f"{kind.split()[-1]}_{i:04d}" for kind, n in CONTROLS.items()
                                 for i in range(n))]
    types = ["Gene Expression"] * section.shape[1] + [kind for kind, n in CONTROLS.items()
                                                      for _ in range(n)]
    ids = [f"ENSMUSG{i:05d}" for i in range(len(names))]
    if matrix == "h5":
        write_h5_matrix(bundle / xenium.MATRIX_H5, counts, section.index, names, types,
                        "Unknown")
    else:
        folder = bundle / xenium.MATRIX_MTX
        folder.mkdir()
        spio.mmwrite(folder / "matrix.mtx", sparse.coo_matrix(counts.T.astype(np.float64)),
                     field="integer")
        pd.DataFrame({"id": ids, "name": names, "type": types}).to_csv(
            folder / "features.tsv", sep="\t", header=False, index=False)
        pd.Series(section.index).to_csv(folder / "barcodes.tsv", header=False, index=False)
    if cells_table:
        cells = pd.DataFrame({"cell_id": section.index, "x_centroid": xy[:, 0],
                              "y_centroid": xy[:, 1],
                              "transcript_counts": counts[:, : section.shape[1]].sum(axis=1),
                              "cell_area": rng.uniform(40, 120, len(section))})
        if cells_table.endswith(".parquet"):
            cells.to_parquet(bundle / cells_table, index=False)
        else:
            cells.to_csv(bundle / cells_table, index=False)
    (bundle / "experiment.xenium").write_text(json.dumps(
        {"major_version": 5, "run_name": "test", "panel_name": "synthetic"}))


@pytest.fixture
def section(small_pair):
    query = small_pair.query.round(0).clip(lower=0)
    query.index = [f"aaab{i:04x}-1" for i in range(len(query))]
    xy = np.random.default_rng(3).uniform(0, 2000, (len(query), 2))
    return query, xy


@pytest.fixture
def reference(tmp_path, small_pair):
    frame = small_pair.reference.round(0)
    frame.index = [f"AAAC{i:04d}-1" for i in range(len(frame))]
    write_10x_h5(tmp_path / "reference.h5", frame, list(frame.columns), controls=3)
    return tmp_path / "reference.h5"


def test_xenium_bundle_and_10x_h5_to_report_in_one_command(tmp_path, section, reference):
    query, xy = section
    write_bundle(tmp_path / "xenium", query, xy)
    out = tmp_path / "out"
    assert main(["run", "--query", str(tmp_path / "xenium"), "--reference", str(reference),
                 "--out", str(out), "--k", "10", "--no-clusters", "--anndata", "-q"]) == 0
    assert (out / "report.html").is_file()
    assert (out / figures.SHARED_PNG).is_file() and (out / figures.IMPUTED_PNG).is_file()
    anndata = pytest.importorskip("anndata")
    adata = anndata.read_zarr(out / "adata.zarr")
    np.testing.assert_array_equal(adata.obsm["spatial"], xy)  # the centroids, in order
    assert list(adata.obs_names) == list(query.index)
    # the panel's genes only: no control probe or codeword was shared or imputed
    assert not any("Probe" in g or "Codeword" in g for g in adata.var_names)


@pytest.mark.parametrize("matrix", ["h5", "mtx"])
def test_bundle_counts_are_the_panel(tmp_path, section, matrix):
    query, xy = section
    write_bundle(tmp_path / "xenium", query, xy, matrix=matrix)
    store = convert(tmp_path / "xenium", tmp_path / "q.zarr")
    assert list(store.gene_names) == list(query.columns)
    assert list(store.cell_names) == list(query.index)
    np.testing.assert_array_equal(store.read(), query.to_numpy(np.float32))
    shuffled = xy[::-1].copy()  # a table in another order is matched by cell_id
    table = pd.DataFrame({"cell_id": query.index[::-1], "x_centroid": shuffled[:, 0],
                          "y_centroid": shuffled[:, 1]})
    table.to_csv(tmp_path / "xenium" / "cells.csv.gz", index=False)
    (tmp_path / "xenium" / "cells.parquet").unlink()
    np.testing.assert_array_equal(
        xenium.read_coordinates(tmp_path / "xenium", store.cell_names, "x"), xy)


def test_a_bundle_without_centroids_runs_without_maps(tmp_path, section, reference, caplog):
    query, xy = section
    write_bundle(tmp_path / "xenium", query, xy, cells_table=None)
    out = tmp_path / "out"
    assert main(["run", "--query", str(tmp_path / "xenium"), "--reference", str(reference),
                 "--out", str(out), "--k", "10", "--no-clusters", "-q", "--no-report"]) == 0
    assert "no cells.parquet" in caplog.text
    assert not (out / figures.SHARED_PNG).exists()
    assert (out / "imputation.tsv").is_file()


def test_a_bundle_without_counts_is_a_one_line_error(tmp_path, section, reference, capsys):
    query, xy = section
    write_bundle(tmp_path / "xenium", query, xy)
    (tmp_path / "xenium" / xenium.MATRIX_H5).unlink()
    with pytest.raises(InputError, match=r"Xenium bundle without a count matrix"):
        convert(tmp_path / "xenium", tmp_path / "q.zarr")
    out = tmp_path / "out"
    assert main(["run", "--query", str(tmp_path / "xenium"), "--reference", str(reference),
                 "--out", str(out), "--no-clusters", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scimpute-dask: error:") and "\n" not in err
    assert "without a count matrix" in err
    assert not out.exists()
    shutil.rmtree(tmp_path / "xenium")
