"""Errors at the edges: whatever a user gets wrong ends as ``scimpute-dask: error: …``,
exit code 2, before any work, with nothing left behind."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scimpute_dask import InputError, run_imputation
from scimpute_dask.cli import main
from scimpute_dask.synthetic import make_pair, write_scimpute_tsv

from .conftest import write_inputs


def _cli(capsys, argv: list[str], *, leaves: Path | None = None) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("scimpute-dask: error: "), err
    assert "Traceback" not in err
    if leaves is not None:
        assert not leaves.exists(), f"{leaves} was left behind"
        assert not list(leaves.parent.glob(f".{leaves.name}*")), "a work directory was left"
    return err


def _run_argv(inputs, out, *extra: str) -> list[str]:
    return ["run", "--query", str(inputs.query), "--reference", str(inputs.reference),
            "--identities", str(inputs.identities), "--out", str(out), "--k", "5", "-q",
            *extra]


# --------------------------------------------------------------------------- #
# Output locations
# --------------------------------------------------------------------------- #
def test_output_that_cannot_be_created(capsys, small_inputs):
    err = _cli(capsys, _run_argv(small_inputs, "/proc/scimpute-x"))
    assert "/proc/scimpute-x: cannot be created in /proc" in err
    assert not Path("/proc/scimpute-x").exists()


def test_output_below_a_file(capsys, small_inputs, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "out"
    err = _cli(capsys, _run_argv(small_inputs, out))
    assert f"{out}: cannot be created: {tmp_path / 'file.txt'} is not a directory" in err


@pytest.mark.parametrize("command", ["validate", "convert", "demo"])
def test_other_commands_refuse_an_uncreatable_output(capsys, small_inputs, command):
    if command == "validate":
        argv = ["validate", "--query", str(small_inputs.query), "--reference",
                str(small_inputs.reference), "--out", "/proc/scimpute-v", "-q"]
    elif command == "convert":
        argv = ["convert", str(small_inputs.query), "/proc/scimpute-v.zarr", "-q"]
    else:
        argv = ["demo", "--out", "/proc/scimpute-v", "-q"]
    assert "cannot be created in /proc" in _cli(capsys, argv)


# --------------------------------------------------------------------------- #
# Inputs of unknown or binary kind
# --------------------------------------------------------------------------- #
def test_binary_input(capsys, small_inputs, tmp_path):
    blob = tmp_path / "query.tsv"
    blob.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8)
                     .tobytes())
    out = tmp_path / "out"
    argv = _run_argv(small_inputs, out)
    argv[argv.index("--query") + 1] = str(blob)
    err = _cli(capsys, argv, leaves=out)
    assert f"{blob}: a binary file, not delimited text" in err


def test_directory_of_unknown_kind(capsys, small_inputs, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    argv = _run_argv(small_inputs, out)
    argv[argv.index("--reference") + 1] = str(folder)
    err = _cli(capsys, argv, leaves=out)
    assert f"{folder}: a directory of no known input kind (readable: " in err
    assert "10x directory" in err


# --------------------------------------------------------------------------- #
# Values that overflow, quoted as written
# --------------------------------------------------------------------------- #
def test_text_value_beyond_float32_is_quoted_as_written(capsys, small_inputs, tmp_path):
    lines = small_inputs.query.read_text().splitlines()
    fields = lines[3].split("\t")
    fields[5] = "1e300"
    lines[3] = "\t".join(fields)
    bad = tmp_path / "query.tsv"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = _run_argv(small_inputs, out)
    argv[argv.index("--query") + 1] = str(bad)
    err = _cli(capsys, argv, leaves=out)
    cell = lines[0].split("\t")[5]
    assert f"gene '{fields[0]}', cell '{cell}': value '1e300' is larger than float32 can " \
           f"hold" in err


def test_dataframe_value_beyond_float32(tmp_path, small_pair):
    query = small_pair.query.copy()
    query.iloc[2, 3] = 1e300
    with pytest.raises(InputError, match=r"value 1e\+300 is larger than float32 can hold"):
        run_imputation(query, small_pair.reference, small_pair.identities, 0,
                       tmp_path / "out", k=5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--k", "1e300", "--k must be a positive integer, got '1e300'"),
    ("--temperature", "1e400", "--temperature must be a positive finite number, got '1e400'"),
    ("--temperature", "nan", "--temperature must be a positive finite number, got 'nan'"),
    ("--chunk-size", "0", "--chunk-size must be a positive integer, got '0'"),
    ("--memory-limit", "lots", "--memory-limit must be a size such as '2GB'"),
    ("--normalize", "log", "invalid choice: 'log'"),
])
def test_option_values_are_refused_as_written(capsys, small_inputs, tmp_path, flag, value,
                                              message):
    out = tmp_path / "out"
    if flag == "--normalize":  # argparse's own choices check: exit 2 with usage
        with pytest.raises(SystemExit) as info:
            main(_run_argv(small_inputs, out, flag, value))
        assert info.value.code == 2
        assert message in capsys.readouterr().err
        return
    assert message in _cli(capsys, _run_argv(small_inputs, out, flag, value), leaves=out)


# --------------------------------------------------------------------------- #
# The memory budget's floor
# --------------------------------------------------------------------------- #
def test_budget_below_the_floor_is_refused_at_once(capsys, tmp_path):
    pair = make_pair(n_query=1000, n_reference=800, n_genes=2000, n_panel=100, seed=1)
    inputs = write_inputs(tmp_path / "in", pair)
    out = tmp_path / "out"
    start = time.perf_counter()
    err = _cli(capsys, _run_argv(inputs, out, "--memory-limit", "1MB"), leaves=out)
    elapsed = time.perf_counter() - start
    assert "memory limit 1000000 bytes is below the" in err
    minimum = int(err.split("--memory-limit ")[1].split("MiB")[0])
    assert 400 < minimum < 2000, err
    assert elapsed < 1.0, elapsed
    # the minimum it names is enough: a run there is accepted and finishes
    assert main(_run_argv(inputs, out, "--memory-limit", f"{minimum}MiB")) == 0
    assert (out / "imputation.tsv").exists()


def test_python_api_refuses_the_floor_too(tmp_path, small_pair):
    with pytest.raises(InputError, match=r"memory limit .* is below the .* this data needs"):
        run_imputation(small_pair.query, small_pair.reference, small_pair.identities, 0,
                       tmp_path / "out", k=5, memory_limit="100MB")
    assert not (tmp_path / "out").exists()


def test_write_scimpute_tsv_round_trip_is_unaffected(tmp_path, small_pair):
    """The new value checks accept every value a real matrix has."""
    path = tmp_path / "r.tsv"
    write_scimpute_tsv(small_pair.reference, path)
    assert main(["convert", str(path), str(tmp_path / "r.zarr"), "-q"]) == 0
    back = pd.read_csv(path, sep="\t", index_col=0)
    assert back.shape == small_pair.reference.T.shape
