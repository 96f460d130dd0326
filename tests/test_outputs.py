"""The output directory is replaced whole or not at all; conversions are reused."""

from __future__ import annotations

import os

import pytest

from scimpute_dask import InputError, export, run_imputation


def _run(inputs, out, **kwargs):
    kwargs = {"k": 5, "chunk_size": 100, **kwargs}
    return run_imputation(inputs.query, inputs.reference, inputs.identities, 0, out, **kwargs)


def test_failed_rerun_leaves_previous_output_intact(tmp_path, small_inputs, monkeypatch):
    out = tmp_path / "out"
    _run(small_inputs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_histogram", broken)
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
