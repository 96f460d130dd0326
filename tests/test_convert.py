"""Conversion of every input form into the Zarr working format."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from scimpute_dask import ExpressionStore, InputError, convert, plan
from scimpute_dask.io import text as convert_module
from scimpute_dask.synthetic import write_scimpute_tsv


def _same(store: ExpressionStore, frame: pd.DataFrame) -> None:
    assert list(store.cell_names) == list(frame.index.astype(str))
    assert list(store.gene_names) == list(frame.columns.astype(str))
    np.testing.assert_array_equal(store.read(),
                                  frame.to_numpy(np.float32))


@pytest.fixture
def frame(small_pair) -> pd.DataFrame:
    return small_pair.reference.round(3)


#: A budget that leaves ~16 kB for text blocks: a small file spans many blocks.
SMALL = plan.BASE_BYTES + 64_000


def test_scimpute_tsv_is_streamed_into_cells_by_genes(tmp_path, frame):
    path = tmp_path / "m.tsv"
    write_scimpute_tsv(frame, path)
    store = convert(path, tmp_path / "m.zarr", memory_limit=SMALL)
    assert store.chunks == (311, 2)  # two gene lines per block
    _same(store, pd.read_csv(path, sep="\t", index_col=0).T)


def test_cells_by_genes_csv(tmp_path, frame):
    path = tmp_path / "m.csv"
    frame.to_csv(path)
    store = convert(path, tmp_path / "m.zarr", layout="cells_x_genes", memory_limit=SMALL)
    assert store.chunks[0] < 311
    _same(store, frame)


def test_dataframe_and_h5ad_sparse(tmp_path, frame):
    anndata = pytest.importorskip("anndata")
    from scipy import sparse

    _same(convert(frame, tmp_path / "df.zarr"), frame)
    adata = anndata.AnnData(sparse.csr_matrix(frame.to_numpy(np.float32)),
                            obs=pd.DataFrame(index=frame.index),
                            var=pd.DataFrame(index=frame.columns))
    adata.write_h5ad(tmp_path / "m.h5ad")
    _same(convert(tmp_path / "m.h5ad", tmp_path / "h5.zarr"), frame)


def test_converted_store_is_reused_not_reconverted(tmp_path, frame, monkeypatch):
    path = tmp_path / "m.tsv"
    write_scimpute_tsv(frame, path)
    store = convert(path, tmp_path / "m.zarr")
    stamp = os.stat(store.path / "X" / "zarr.json").st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert_module, "_parse_block", fail)
    monkeypatch.setattr(convert_module, "scan_text", fail)
    again = convert(path, tmp_path / "m.zarr")
    assert os.stat(again.path / "X" / "zarr.json").st_mtime_ns == stamp
    # a store passed as the input is used as it is
    assert convert(store.path, tmp_path / "other.zarr").path == store.path


def test_interrupted_conversion_resumes_to_the_same_store(tmp_path, frame, monkeypatch):
    path = tmp_path / "m.tsv"
    write_scimpute_tsv(frame, path)
    whole = convert(path, tmp_path / "whole.zarr", memory_limit=SMALL)

    real = convert_module._parse_block
    calls = {"n": 0}

    def dies_on_third_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_parse_block", dies_on_third_block)
    with pytest.raises(KeyboardInterrupt):
        convert(path, tmp_path / "resumed.zarr", memory_limit=SMALL)
    with pytest.raises(InputError, match="did not finish"):
        ExpressionStore.open(tmp_path / "resumed.zarr")
    monkeypatch.setattr(convert_module, "_parse_block", real)
    resumed = convert(path, tmp_path / "resumed.zarr", memory_limit=SMALL)
    assert ExpressionStore.open(resumed.path).shape == whole.shape
    np.testing.assert_array_equal(resumed.group["X"][:], whole.group["X"][:])


def test_changed_input_is_refused_then_restarted(tmp_path, frame):
    path = tmp_path / "m.tsv"
    write_scimpute_tsv(frame, path)
    convert(path, tmp_path / "m.zarr")
    write_scimpute_tsv(frame * 2, path)
    os.utime(path, ns=(1, 1))
    with pytest.raises(InputError, match="different input"):
        convert(path, tmp_path / "m.zarr")
    _same(convert(path, tmp_path / "m.zarr", restart=True),
          pd.read_csv(path, sep="\t", index_col=0).T)
