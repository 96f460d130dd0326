"""10x HDF5 matrices (Cell Ranger v3+, Xenium) in the schema Cell Ranger writes."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from scimpute_dask import ExpressionStore, InputError, convert, plan
from scimpute_dask.cli import main
from scimpute_dask.io import tenx_h5
from scimpute_dask.synthetic import write_10x_h5, write_10x_matrix_h5

h5py = pytest.importorskip("h5py")


@pytest.fixture
def blocks_of_64(monkeypatch):
    """Stores in blocks of 64 cells: several, the last one short."""
    monkeypatch.setattr(plan, "store_chunks", lambda cells, genes, *_: (64, genes))


@pytest.fixture
def counts(small_pair) -> pd.DataFrame:
    frame = small_pair.reference.round(0)
    frame.index = [f"AAAC{i:04d}-1" for i in range(len(frame))]
    return frame


@pytest.mark.filterwarnings("ignore:Variable names are not unique")  # scanpy's, before
def test_10x_h5_equals_scanpy(tmp_path, counts, caplog, blocks_of_64):
    sc = pytest.importorskip("scanpy")
    symbols = list(counts.columns)
    symbols[7] = symbols[2]  # a repeated symbol
    write_10x_h5(tmp_path / "m.h5", counts, symbols, controls=4)
    with caplog.at_level(logging.INFO, logger="scimpute_dask"):
        store = convert(tmp_path / "m.h5", tmp_path / "m.zarr", memory_limit="700MB")
    assert "left out 4 Antibody Capture" in caplog.text
    expected = sc.read_10x_h5(tmp_path / "m.h5")  # Gene Expression only, as here
    expected.var_names_make_unique()
    assert store.sparse
    assert list(store.cell_names) == list(expected.obs_names)
    assert list(store.gene_names) == list(expected.var_names)
    np.testing.assert_array_equal(store.read(), expected.X.toarray())
    np.testing.assert_array_equal(store.read(), counts.to_numpy(np.float32))


def test_an_interrupted_h5_conversion_resumes(tmp_path, counts, monkeypatch, blocks_of_64):
    write_10x_h5(tmp_path / "m.h5", counts, list(counts.columns))
    real = tenx_h5._blocks

    def dies(*args, **kwargs):
        for i, block in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield block

    monkeypatch.setattr(tenx_h5, "_blocks", dies)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "m.h5", tmp_path / "m.zarr")
    starts = []

    def records(path, matrix, start, step, label):
        starts.append(start)
        return real(path, matrix, start, step, label)

    monkeypatch.setattr(tenx_h5, "_blocks", records)
    store = convert(tmp_path / "m.h5", tmp_path / "m.zarr")
    assert starts == [128]  # two blocks were written before the kill
    np.testing.assert_array_equal(store.read(), counts.to_numpy(np.float32))


def test_bad_h5_files_are_one_line_errors(tmp_path, counts, capsys):
    with h5py.File(tmp_path / "other.h5", "w") as fh:
        fh.create_dataset("counts", data=np.zeros((3, 3)))
    (tmp_path / "damaged.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    write_10x_h5(tmp_path / "ok.h5", counts, list(counts.columns))
    with h5py.File(tmp_path / "ok.h5", "a") as fh:
        fh["matrix/indices"][3] = 10_000  # an entry outside the features
    for name, message in [
        ("other.h5", r"not a 10x HDF5 feature-barcode matrix .* no matrix/data.* found counts"),
        ("damaged.h5", r"not a readable HDF5 file"),
        ("ok.h5", r"cell 'AAAC0000-1' has an entry for feature 10000, outside the 120"),
    ]:
        with pytest.raises(InputError, match=message):
            convert(tmp_path / name, tmp_path / "out.zarr")
        assert not (tmp_path / "out.zarr").exists()
        assert main(["convert", str(tmp_path / name), str(tmp_path / "out.zarr"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("scimpute-dask: error:") and "\n" not in err


def test_an_h5_larger_than_the_memory_budget_converts_within_it(tmp_path):
    """A 10x matrix whose entries outweigh the budget given to its conversion: the peak
    RSS, measured from outside, stays under the budget, and the store is the matrix."""
    import os
    import subprocess
    import sys

    n_cells, n_genes, per_cell, budget_mib = 160_000, 3_000, 300, 500
    rng = np.random.default_rng(0)
    features = np.sort(rng.choice(n_genes, (n_cells, per_cell)), axis=1)
    keep = np.ones(features.shape, dtype=bool)
    keep[:, 1:] = features[:, 1:] != features[:, :-1]  # Cell Ranger lists a gene once
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
    indices = features[keep].astype(np.int64)
    data = rng.integers(1, 30, len(indices)).astype(np.int32)
    del features, keep
    path = tmp_path / "big.h5"
    # Cell Ranger's schema, left uncompressed: the file is as large as its entries
    write_10x_matrix_h5(path, sparse.csr_matrix((data, indices, indptr),
                                                shape=(n_cells, n_genes)),
                        [f"C{i:06d}-1" for i in range(n_cells)],
                        [f"G{i}" for i in range(n_genes)], ["Gene Expression"] * n_genes,
                        "mm10", compression=None)
    entries_mib = (data.nbytes + indices.nbytes) / 2**20
    assert path.stat().st_size / 2**20 > budget_mib and entries_mib > budget_mib
    launcher = ("import os, subprocess, sys; "
                "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
                "_, status, usage = os.wait4(p.pid, 0); "
                "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")
    cmd = [sys.executable, "-m", "scimpute_dask.cli", "convert", str(path),
           str(tmp_path / "big.zarr"), "-q", "--memory-limit", f"{budget_mib}MB"]
    done = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=True)
    code, peak_kib = map(int, done.stdout.split())
    assert code == 0, done.stderr
    print(f"{entries_mib:.0f} MiB of entries converted in a {budget_mib} MB budget: peak RSS "
          f"{peak_kib / 1024:.0f} MiB")
    assert peak_kib * 1024 < budget_mib * 1e6
    # a budget with no room beside the interpreter's is refused, not met in 1-row blocks
    small = subprocess.run([*cmd[:-1], "300MB"], capture_output=True, text=True)
    assert small.returncode == 2 and "a conversion needs" in small.stderr
    store = ExpressionStore.open(tmp_path / "big.zarr")
    assert store.sparse and store.shape == (n_cells, n_genes)
    rows = [0, 77_777, n_cells - 1]
    expected = np.zeros((len(rows), n_genes), dtype=np.float32)
    for i, row in enumerate(rows):
        expected[i, indices[indptr[row] : indptr[row + 1]]] = data[indptr[row] : indptr[row + 1]]
    np.testing.assert_array_equal(store.select(rows, np.arange(n_genes)), expected)
