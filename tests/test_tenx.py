"""10x matrix.mtx directories stream into the same store as the dense path."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import io as spio
from scipy import sparse

from scimpute_dask import InputError, convert
from scimpute_dask.cli import main
from scimpute_dask.io import tenx


def _write_10x(directory, frame: pd.DataFrame, symbols, gz: bool, seed: int = 0) -> None:
    """Cell Ranger's layout: genes × cells MatrixMarket, entries in shuffled order."""
    directory.mkdir(parents=True)
    coo = sparse.coo_matrix(frame.to_numpy(np.float64).T)
    order = np.random.default_rng(seed).permutation(coo.nnz)
    shuffled = sparse.coo_matrix((coo.data[order], (coo.row[order], coo.col[order])),
                                 shape=coo.shape)
    spio.mmwrite(directory / "matrix.mtx", shuffled, field="real")
    pd.DataFrame({"id": [f"ENSG{i:05d}" for i in range(frame.shape[1])], "name": symbols,
                  "type": "Gene Expression"}).to_csv(directory / "features.tsv", sep="\t",
                                                     header=False, index=False)
    pd.Series(frame.index).to_csv(directory / "barcodes.tsv", header=False, index=False)
    if gz:
        for name in ("matrix.mtx", "features.tsv", "barcodes.tsv"):
            with open(directory / name, "rb") as src, gzip.open(directory / f"{name}.gz",
                                                                 "wb") as dst:
                shutil.copyfileobj(src, dst)
            (directory / name).unlink()


@pytest.fixture
def counts(small_pair) -> pd.DataFrame:
    frame = small_pair.reference.round(0)
    frame.index = [f"AAAC{i:04d}-1" for i in range(len(frame))]
    return frame


@pytest.mark.parametrize("gz", [False, True])
def test_10x_directory_equals_the_dense_path(tmp_path, counts, gz, monkeypatch):
    symbols = list(counts.columns)
    symbols[5] = symbols[3]  # a repeated symbol, as real feature tables have
    _write_10x(tmp_path / "10x", counts, symbols, gz)
    monkeypatch.setattr(tenx, "BATCH", 1000)  # many batches, many buckets per batch
    store = convert(tmp_path / "10x", tmp_path / "10x.zarr", memory_limit="700MB")
    expected = counts.set_axis(tenx.make_unique(np.array(symbols, dtype=object)), axis=1)
    assert list(store.gene_names)[5] == f"{symbols[3]}-1"
    dense = convert(expected, tmp_path / "dense.zarr", memory_limit="700MB")
    assert list(store.cell_names) == list(counts.index)
    assert list(store.gene_names) == list(dense.gene_names)
    np.testing.assert_array_equal(store.read(), dense.read())
    np.testing.assert_array_equal(store.read(), counts.to_numpy(np.float32))
    assert not list(tmp_path.glob(".*buckets*"))


@pytest.mark.filterwarnings("ignore:Suffix used:UserWarning")  # anndata's, on collisions
@pytest.mark.parametrize("names", [
    ["A", "A", "A-1"], ["A-1", "A", "A"], ["A", "A", "A-1", "A-2", "A"], ["B", "A", "B-1", "B"],
])
def test_make_unique_matches_anndata(names):
    anndata = pytest.importorskip("anndata")
    expected = list(anndata.utils.make_index_unique(pd.Index(names)))
    got = list(tenx.make_unique(np.array(names, dtype=object)))
    assert got == expected
    assert len(set(got)) == len(got)


def test_10x_through_the_cli_and_bad_files(tmp_path, counts, capsys):
    _write_10x(tmp_path / "10x", counts, list(counts.columns), gz=False)
    assert main(["convert", str(tmp_path / "10x"), str(tmp_path / "out.zarr"), "-q"]) == 0
    assert "311 cells × 120 genes" in capsys.readouterr().out

    text = (tmp_path / "10x" / "matrix.mtx").read_text().splitlines()
    header = next(i for i, line in enumerate(text) if not line.startswith("%"))
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "10x", bad)
    (bad / "matrix.mtx").write_text("\n".join([*text[: header + 1], "999 1 3.0",
                                               *text[header + 2 :]]) + "\n")
    with pytest.raises(InputError, match=r"entry 1 refers to gene 999"):
        convert(bad, tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()  # no unfinished store left behind
    (bad / "barcodes.tsv").write_text("only-one\n")
    with pytest.raises(InputError, match=r"311 cells, but there are 120 features and 1 barcodes"):
        convert(bad, tmp_path / "bad.zarr")
    (bad / "barcodes.tsv").unlink()
    with pytest.raises(InputError, match=r"needs one of barcodes\.tsv"):
        convert(bad, tmp_path / "bad.zarr")
