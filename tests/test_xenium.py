"""A Xenium output bundle as the query, a Cell Ranger ``.h5`` as the reference: one command
to report.html with spatial maps."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from scimpute_dask import InputError, convert
from scimpute_dask.cli import main
from scimpute_dask.io import xenium
from scimpute_dask.plotting import figures
from scimpute_dask.synthetic import write_10x_h5
from scimpute_dask.synthetic import write_xenium_bundle as write_bundle

pytest.importorskip("h5py")
pytest.importorskip("pyarrow")

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
