"""The output directory is replaced whole or not at all; conversions are reused."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import zarr

from scimpute_dask import InputError, run_imputation
from scimpute_dask.export import outdir as export
from scimpute_dask.export import tables


def _run(inputs, out, **kwargs):
    kwargs = {"k": 5, "chunk_size": 100, **kwargs}
    return run_imputation(inputs.query, inputs.reference, inputs.identities, 0, out, **kwargs)


def test_failed_rerun_leaves_previous_output_intact(tmp_path, small_inputs, monkeypatch):
    out = tmp_path / "out"
    _run(small_inputs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tables, "write_histogram", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(small_inputs, out, consider_clusters=False)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))

    monkeypatch.undo()
    result = _run(small_inputs, out, consider_clusters=False)
    assert (out / "imputation.tsv").read_bytes() != b""
    assert not export.work_dir_for(out).exists()
    assert result.outdir == out.absolute()


def test_rerun_links_the_previous_conversion(tmp_path, small_inputs):
    out = tmp_path / "out"
    _run(small_inputs, out)
    chunk = next((out / "zarr" / "reference.zarr" / "X").rglob("c/*/*"))
    inode = chunk.stat().st_ino
    _run(small_inputs, out, k=3)
    again = out / "zarr" / "reference.zarr" / "X" / chunk.relative_to(
        out / "zarr" / "reference.zarr" / "X")
    assert again.stat().st_ino == inode  # hard link: not converted again


def test_foreign_directory_is_never_replaced(tmp_path, small_inputs):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not written by scimpute-dask"):
        _run(small_inputs, out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert os.listdir(out) == ["notes.txt"]


def test_a_file_added_to_a_previous_output_is_never_deleted(tmp_path, small_inputs):
    out = tmp_path / "out"
    _run(small_inputs, out)
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"my_notes\.txt"):
        _run(small_inputs, out)
    assert (out / "my_notes.txt").read_text() == "mine"


def test_two_runs_into_one_directory_do_not_interleave(tmp_path, small_inputs):
    out = tmp_path / "out"
    with export.exclusive(export.work_dir_for(out.absolute())), \
            pytest.raises(InputError, match="another scimpute-dask run"):
        _run(small_inputs, out)


def test_tsv_restricted_to_chosen_genes_or_skipped(tmp_path, small_inputs):
    genes = list(small_inputs.reference_df.columns[[5, 0, 77]])
    full = tmp_path / "full"
    _run(small_inputs, full)
    chosen = tmp_path / "chosen"
    _run(small_inputs, chosen, tsv_genes=genes)
    a = pd.read_csv(full / "imputation.tsv", sep="\t", index_col=0)
    b = pd.read_csv(chosen / "imputation.tsv", sep="\t", index_col=0)
    assert list(b.columns) == genes
    pd.testing.assert_frame_equal(a[genes], b)
    assert (chosen / "scores.txt").read_bytes() == (full / "scores.txt").read_bytes()

    none = tmp_path / "none"
    result = _run(small_inputs, none, tsv_genes=None)
    assert not (none / "imputation.tsv").exists()
    assert "imputation" not in result.files
    assert zarr.open_group(none / "zarr" / "imputed.zarr", mode="r")["X"].shape == (257, 120)
    with pytest.raises(InputError, match="'nope'"):
        _run(small_inputs, tmp_path / "bad", tsv_genes=["nope"])


def test_h5ad_output_matches_the_zarr_store(tmp_path, small_inputs):
    anndata = pytest.importorskip("anndata")
    import numpy as np

    out = tmp_path / "out"
    result = _run(small_inputs, out, h5ad=True, tsv_genes=None)
    adata = anndata.read_h5ad(result.files["h5ad"])
    X = zarr.open_group(out / "zarr" / "imputed.zarr", mode="r")["X"][:]
    assert adata.shape == X.shape == (257, 120)
    assert list(adata.obs_names) == list(small_inputs.query_df.index)
    assert list(adata.var_names) == list(small_inputs.reference_df.columns)
    np.testing.assert_allclose(adata.X, X, rtol=1e-6)
