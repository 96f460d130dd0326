"""Compressed text inputs, as GEO and most labs ship them: streamed, resumable, identical."""

from __future__ import annotations

import bz2
import gzip
import lzma
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from scimpute_dask import ExpressionStore, InputError, convert
from scimpute_dask.cli import main
from scimpute_dask.io import text

from .test_resume import CLI, SMALL, _kill_when, _progress

zstandard = pytest.importorskip("zstandard")

COMPRESSORS = {
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
}
OUTPUTS = ("imputation.tsv", "sim_matrix.tsv", "scores.txt", "stats.txt",
           "unimputable_cells.txt")


def _compressed(path: Path, suffix: str, name: str | None = None) -> Path:
    out = path.with_name((name or path.name) + suffix)
    out.write_bytes(COMPRESSORS[suffix](path.read_bytes()))
    return out


def _run(query: Path, reference: Path, identities: Path, out: Path, *extra: str) -> dict:
    assert main(["run", "--query", str(query), "--reference", str(reference),
                 "--identities", str(identities), "--out", str(out), "--k", "7", "--quiet",
                 "--no-report", *extra]) == 0
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def test_tsv_gz_and_csv_gz_give_byte_identical_outputs(tmp_path, small_inputs):
    plain = _run(small_inputs.query, small_inputs.reference, small_inputs.identities,
                 tmp_path / "plain")
    # scimpute's TSV, gzipped
    q_gz = _compressed(small_inputs.query, ".gz")
    assert q_gz.name == "query.tsv.gz"
    assert _run(q_gz, _compressed(small_inputs.reference, ".gz"), small_inputs.identities,
                tmp_path / "gz") == plain
    # a cells × genes CSV, gzipped: the separator comes from ".csv" before ".gz"
    csv = tmp_path / "reference.csv"
    small_inputs.reference_df.to_csv(csv, float_format="%.9g")
    assert _run(small_inputs.query, _compressed(csv, ".gz"), small_inputs.identities,
                tmp_path / "csvgz", "--reference-layout", "cells_x_genes") == plain


@pytest.mark.parametrize("suffix", [".bz2", ".xz", ".zst"])
def test_other_compressions_give_byte_identical_outputs(tmp_path, small_inputs, suffix):
    plain = _run(small_inputs.query, small_inputs.reference, small_inputs.identities,
                 tmp_path / "plain")
    assert _run(_compressed(small_inputs.query, suffix), small_inputs.reference,
                small_inputs.identities, tmp_path / "c") == plain


def test_compression_is_recognised_by_content_not_name(tmp_path, small_inputs):
    disguised = _compressed(small_inputs.query, ".gz", name="query_gzipped")
    renamed = disguised.rename(tmp_path / "query.txt")
    assert text.compression(renamed) == "gzip"
    a = convert(small_inputs.query, tmp_path / "a.zarr")
    b = convert(renamed, tmp_path / "b.zarr")
    np.testing.assert_array_equal(a.group["X"][:], b.group["X"][:])
    assert list(a.cell_names) == list(b.cell_names)


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".zst"])
def test_compressed_conversion_interrupted_resumes_to_the_same_store(tmp_path, small_inputs,
                                                                    monkeypatch, suffix):
    src = _compressed(small_inputs.reference, suffix)
    budget = "400.05MiB"  # a few gene lines per block: many blocks
    whole = convert(src, tmp_path / "whole.zarr", memory_limit=budget)
    real, calls = text._parse_block, {"n": 0}

    def dies_on_fourth_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(text, "_parse_block", dies_on_fourth_block)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "resumed.zarr", memory_limit=budget)
    with pytest.raises(InputError, match="did not finish"):
        ExpressionStore.open(tmp_path / "resumed.zarr")
    done = zarr.open_group(tmp_path / "resumed.zarr").attrs["progress"]["rows_done"]
    assert 0 < done < whole.shape[1]
    monkeypatch.setattr(text, "_parse_block", real)
    resumed = convert(src, tmp_path / "resumed.zarr", memory_limit=budget)
    assert resumed.group["X"][:].tobytes() == whole.group["X"][:].tobytes()


def test_gzip_conversion_killed_mid_way_resumes_identically(tmp_path):
    """kill -9 of the real CLI, twice, then the same command finishes the same store."""
    rng = np.random.default_rng(1)
    src = tmp_path / "wide.tsv"
    values = np.round(rng.gamma(0.4, 20.0, (120, 20000)), 2)
    with open(src, "w") as fh:
        fh.write("\t" + "\t".join(f"c{i}" for i in range(values.shape[1])) + "\n")
        for g, row in enumerate(values):
            fh.write(f"g{g}\t" + "\t".join(map(str, row)) + "\n")
    gz = _compressed(src, ".gz")
    whole = tmp_path / "whole.zarr"
    subprocess.run([*CLI, "convert", str(src), str(whole), "-q", "--memory-limit", SMALL],
                   check=True)
    resumed = tmp_path / "resumed.zarr"
    cmd = [*CLI, "convert", str(gz), str(resumed), "-q", "--memory-limit", SMALL]
    killed_at = [_progress(resumed) for threshold in (4, 40)
                 if _kill_when(cmd, lambda t=threshold: _progress(resumed) >= t)]
    assert killed_at and all(0 < n < 120 for n in killed_at), killed_at
    subprocess.run(cmd, check=True)
    expected = zarr.open_group(whole, mode="r")["X"][:]
    assert zarr.open_group(resumed, mode="r")["X"][:].tobytes() == expected.tobytes()


def test_decompression_is_streamed_not_whole(tmp_path, small_inputs, monkeypatch):
    """The decompressor is asked for bounded pieces, many of them: never the whole text
    (the scan's block shrunk below this small file's text, as a million cells' text
    is far above the real one)."""
    from scimpute_dask.io import text

    monkeypatch.setattr(text, "SCAN_BLOCK", 4096)
    src = _compressed(small_inputs.reference, ".gz")
    sizes = []
    real = gzip._GzipReader.read  # what GzipFile's buffer pulls decompressed bytes through

    def read(self, size=-1):
        sizes.append(size)
        return real(self, size)

    monkeypatch.setattr(gzip._GzipReader, "read", read)
    convert(src, tmp_path / "m.zarr")
    text_bytes = len(gzip.decompress(src.read_bytes()))
    assert len(sizes) > 2 and all(0 <= s < text_bytes for s in sizes), sizes


def test_damaged_and_binary_files_are_refused_by_name(tmp_path, small_inputs):
    gz = _compressed(small_inputs.query, ".gz")
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
    with pytest.raises(InputError, match=r"cut\.tsv\.gz: damaged gzip file"):
        convert(cut, tmp_path / "cut.zarr")
    assert not (tmp_path / "cut.zarr").exists()
    binary = tmp_path / "matrix.tsv"
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(InputError, match=r"matrix\.tsv: a binary file, not delimited text"):
        convert(binary, tmp_path / "bin.zarr")
