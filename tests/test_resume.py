"""kill -9 at any point, rerun the same command: nothing lost, nothing mixed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from scimpute_dask.export import outdir as export
from scimpute_dask.synthetic import make_pair, write_scimpute_tsv

from .conftest import write_inputs

CLI = [sys.executable, "-m", "scimpute_dask.cli"]


def _progress(store: Path) -> int:
    try:
        attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1
    return -1 if attrs.get("complete") else attrs.get("progress", {}).get("rows_done", -1)


def _kill_when(cmd: list[str], ready, timeout: float = 120) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``ready()``; True if it was killed mid-way."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


@pytest.fixture(scope="module")
def wide_tsv(tmp_path_factory) -> Path:
    """120 genes × 30,000 cells in scimpute's layout: each line is a gene across all cells."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("wide") / "query.tsv"
    values = np.round(rng.gamma(0.4, 20.0, (120, 30000)), 2)
    with open(path, "w") as fh:
        fh.write("\t" + "\t".join(f"c{i}" for i in range(values.shape[1])) + "\n")
        for g, row in enumerate(values):
            fh.write(f"g{g}\t" + "\t".join(map(str, row)) + "\n")
    return path


# Two gene lines per block: the 120-line file converts in ~60 blocks.
SMALL = "402MiB"


def test_conversion_killed_at_several_points_resumes_identically(tmp_path, wide_tsv):
    whole = tmp_path / "whole.zarr"
    subprocess.run([*CLI, "convert", str(wide_tsv), str(whole), "-q", "--memory-limit", SMALL],
                   check=True)
    expected = zarr.open_group(whole, mode="r")["X"][:]

    resumed = tmp_path / "resumed.zarr"
    killed_at = []
    for threshold in (2, 30, 90):
        cmd = [*CLI, "convert", str(wide_tsv), str(resumed), "-q", "--memory-limit", SMALL]
        if _kill_when(cmd, lambda t=threshold: _progress(resumed) >= t):
            killed_at.append(_progress(resumed))
    assert len(killed_at) >= 2, killed_at  # really interrupted, at different points
    assert killed_at == sorted(killed_at)
    subprocess.run([*CLI, "convert", str(wide_tsv), str(resumed), "-q", "--memory-limit", SMALL],
                   check=True)
    group = zarr.open_group(resumed, mode="r")
    assert group.attrs["complete"]
    np.testing.assert_array_equal(group["X"][:], expected)
    assert group["X"][:].tobytes() == expected.tobytes()
    # the genes' maxima, recorded block by block across the kills
    np.testing.assert_array_equal(group["column_max"][:], np.abs(expected).max(axis=0))
    assert list(group["obs_names"][:]) == list(zarr.open_group(whole, mode="r")["obs_names"][:])


def test_changed_input_after_a_kill_is_refused(tmp_path, wide_tsv):
    src = tmp_path / "q.tsv"
    src.write_bytes(wide_tsv.read_bytes())
    store = tmp_path / "q.zarr"
    cmd = [*CLI, "convert", str(src), str(store), "-q", "--memory-limit", SMALL]
    assert _kill_when(cmd, lambda: _progress(store) >= 10)
    with open(src, "a") as fh:
        fh.write("extra\t" + "\t".join(["1"] * 30000) + "\n")
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 2
    assert "different input" in failed.stderr and "--restart" in failed.stderr
    subprocess.run([*cmd, "--restart"], check=True)
    assert zarr.open_group(store, mode="r")["X"].shape == (30000, 121)


def _marked(path: Path) -> int:
    try:
        return int(zarr.open_group(path, mode="r")["done"][:].sum())
    except Exception:  # not created yet, or being replaced
        return 0


def test_run_killed_mid_imputation_resumes_without_recomputing(tmp_path):
    pair = make_pair(n_query=3000, n_reference=800, n_genes=400, n_panel=40, seed=3)
    inputs = write_inputs(tmp_path / "in", pair)
    args = ["run", "--query", str(inputs.query), "--reference", str(inputs.reference),
            "--identities", str(inputs.identities), "--k", "10", "--chunk-size", "50", "-q"]
    subprocess.run([*CLI, *args, "--out", str(tmp_path / "whole")], check=True)

    out = tmp_path / "out"
    imputed = export.work_dir_for(out) / "zarr" / "imputed.zarr"
    assert _kill_when([*CLI, *args, "--out", str(out)], lambda: _marked(imputed) >= 5)
    assert not out.exists()  # nothing published yet
    done = zarr.open_group(imputed, mode="r")["done"][:]
    assert 0 < done.sum() < done.size
    first = tuple(int(i) for i in np.argwhere(done)[0])
    chunk = imputed / "X" / "c" / str(first[0]) / str(first[1])
    stamp = chunk.stat().st_mtime_ns

    subprocess.run([*CLI, *args, "--out", str(out)], check=True)
    for name in ["imputation.tsv", "sim_matrix.tsv", "scores.txt", "stats.txt"]:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # the block finished before the kill was not computed again
    assert (out / "zarr" / "imputed.zarr" / "X" / "c" / str(first[0]) / str(first[1])
            ).stat().st_mtime_ns == stamp


def test_outputs_do_not_depend_on_chunking(tmp_path):
    pair = make_pair(n_query=700, n_reference=500, n_genes=300, n_panel=50, seed=5)
    inputs = write_inputs(tmp_path / "in", pair)
    write_scimpute_tsv(pair.query, inputs.query)
    outs = []
    for i, extra in enumerate([["--chunk-size", "37"], ["--chunk-size", "700"],
                               ["--memory-limit", "700MB"]]):
        out = tmp_path / f"out{i}"
        subprocess.run([*CLI, "run", "--query", str(inputs.query), "--reference",
                        str(inputs.reference), "--identities", str(inputs.identities),
                        "--out", str(out), "-q", *extra], check=True)
        outs.append(out)
    for name in ["imputation.tsv", "sim_matrix.tsv", "scores.txt", "stats.txt"]:
        texts = {(o / name).read_bytes() for o in outs}
        assert len(texts) == 1, name


def test_stage_rebuilt_for_a_new_key_never_leaves_the_old_key_trusted(tmp_path, monkeypatch):
    """A rebuild cut short after the old store went must not resume as the old stage."""
    import dask.array as da

    from scimpute_dask.engine import resumable as pipeline

    path = tmp_path / "stage.zarr"
    x = da.arange(24, dtype="f8").reshape(6, 4).rechunk((3, 4))
    pipeline.store_stage(path, {"X": (x, np.nan)}, {"k": 1}, {})
    assert zarr.open_group(path, mode="r").attrs["complete"]
    real = zarr.open_group

    def dies_creating(store, mode="a", **kw):
        if mode == "w":
            raise KeyboardInterrupt  # killed between removing the old stage and the new one
        return real(store, mode=mode, **kw)

    monkeypatch.setattr(pipeline.zarr, "open_group", dies_creating)
    with pytest.raises(KeyboardInterrupt):
        pipeline.store_stage(path, {"X": (x + 1, np.nan)}, {"k": 2}, {})
    monkeypatch.undo()
    assert not (path / "zarr.json").exists()  # nothing left claims to be the k=1 stage
    group = pipeline.store_stage(path, {"X": (x, np.nan)}, {"k": 1}, {})
    np.testing.assert_array_equal(group["X"][:], x.compute())
