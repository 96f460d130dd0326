"""The same run on a real Dask cluster: a ``dask scheduler`` and ``dask worker`` processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from scimpute_dask.export import outdir as export
from scimpute_dask.synthetic import make_pair

from .conftest import write_inputs

distributed = pytest.importorskip("distributed")

CLI = [sys.executable, "-m", "scimpute_dask.cli"]
OUTPUTS = ["imputation.tsv", "sim_matrix.tsv", "scores.txt", "stats.txt",
           "unimputable_cells.txt"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster_inputs(tmp_path):
    pair = make_pair(n_query=3000, n_reference=800, n_genes=400, n_panel=40, seed=3)
    inputs = write_inputs(tmp_path / "in", pair, zero_cells=3)
    args = ["run", "--query", str(inputs.query), "--reference", str(inputs.reference),
            "--identities", str(inputs.identities), "--k", "10", "--chunk-size", "50", "-q"]
    local = tmp_path / "local"
    subprocess.run([*CLI, *args, "--out", str(local)], check=True)
    return args, local


def _same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for store, arrays in [("imputed.zarr", ["X"]), ("neighbors.zarr", ["indices", "weights"])]:
        for arr in arrays:
            x = zarr.open_group(a / "zarr" / store, mode="r")[arr][:]
            y = zarr.open_group(b / "zarr" / store, mode="r")[arr][:]
            np.testing.assert_array_equal(x, y)


def test_cli_on_a_real_cluster_matches_the_local_run(tmp_path, dask_cluster, cluster_inputs):
    address, _ = dask_cluster
    args, local = cluster_inputs
    out = tmp_path / "cluster"
    loud = [a for a in args if a != "-q"]  # with progress bars: distributed's on a cluster
    done = subprocess.run([*CLI, *loud, "--out", str(out), "--scheduler", address],
                          capture_output=True, text=True, check=True)
    _same_outputs(local, out)
    assert "unimputable" in done.stdout
    assert "100% Completed" in done.stdout, done.stdout
    with distributed.Client(address) as client:  # the stage tasks ran on the cluster
        prefixes = client.run_on_scheduler(
            lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert any("write_blocks" in p for p in prefixes), prefixes
    # the reference was prepared by the workers, and searched by them from its store
    assert "norms_column" in prefixes, prefixes
    assert "search" in prefixes, prefixes


def test_worker_killed_mid_run_still_gives_identical_outputs(tmp_path, dask_cluster,
                                                             cluster_inputs):
    address, workers = dask_cluster
    args, local = cluster_inputs
    out = tmp_path / "cluster"
    imputed = export.work_dir_for(out) / "zarr" / "imputed.zarr"
    run = subprocess.Popen([*CLI, *args, "--out", str(out), "--scheduler", address],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = False
    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline:
        try:
            marked = int(zarr.open_group(imputed, mode="r")["done"][:].sum())
        except Exception:  # not created yet
            marked = 0
        if marked >= 3 and not killed:
            workers[0].kill()
            killed = True
        time.sleep(0.02)
    _, err = run.communicate(timeout=300)
    assert killed, "the run ended before a worker could be killed"
    assert run.returncode == 0, err
    assert workers[0].poll() is not None  # really dead
    _same_outputs(local, out)


def test_compose_file_describes_the_cluster():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"scheduler", "worker", "demo"} <= set(services)
    assert "dask scheduler" in " ".join(services["scheduler"]["command"])
    assert "tcp://scheduler:8786" in services["worker"]["command"]
    for name in ("scheduler", "worker", "demo"):
        svc = {**compose["x-scimpute"], **services[name]}
        assert "data:/data" in svc["volumes"]
    assert "data" in compose["volumes"]
    assert (ROOT / compose["x-scimpute"]["build"]["dockerfile"]).exists()
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                        "-q"], check=True)


def test_approx_search_of_a_sparse_atlas_on_a_cluster_matches_the_local_run(tmp_path,
                                                                             dask_cluster):
    """The atlas path on workers: a CSR reference read sparse from its store, the index built
    once, the same probes chosen, the same neighbours found and imputed."""
    import json

    from scimpute_dask.synthetic import write_atlas_pair

    address, _ = dask_cluster
    data = write_atlas_pair(tmp_path / "atlas", 6000, 1500, n_genes=1200, n_panel=300,
                            n_truth=10, seed=4)
    args = ["run", "--query", str(data["query"]), "--reference", str(data["reference"]),
            "--no-clusters", "--search", "approx", "--recall", "0.9", "--k", "10",
            "--impute-genes", "unmeasured", "--no-report", "-q"]
    runs = {}
    for name, extra in (("local", []), ("cluster", ["--scheduler", address])):
        runs[name] = tmp_path / name
        subprocess.run([*CLI, *args, *extra, "--out", str(runs[name])], check=True)
    _same_outputs(runs["local"], runs["cluster"])
    local, cluster = (json.loads((runs[n] / "run.json").read_text())["search"] for n in runs)
    assert local["mode"] == "approx" and 1 <= local["probes"] < local["lists"]
    assert {k: v for k, v in local.items() if k != "seconds"} == \
        {k: v for k, v in cluster.items() if k != "seconds"}
    stored = zarr.open_group(runs["cluster"] / "zarr" / "reference.zarr", mode="r")
    assert stored["X"].attrs["encoding"] == "blocked-csr"
