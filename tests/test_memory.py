"""Peak memory of a whole run stays under --memory-limit, measured from outside."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from scimpute_dask.synthetic import make_pair, write_counts_store

from .conftest import write_inputs

BUDGET_MIB = 800


def _peak_mib(cmd: list[str]) -> float:
    """Run ``cmd`` (stdout discarded) and return its own peak RSS in MiB."""
    # A fresh interpreter: Linux carries a parent's high-water RSS into an exec'd
    # child, and this test process holds the generated data.
    launcher = ("import os, subprocess, sys; "
                "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
                "_, status, usage = os.wait4(p.pid, 0); "
                "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True,
                          text=True, env=env, check=True)
    code, peak_kib = map(int, done.stdout.split())
    assert code == 0, done.stderr
    return peak_kib / 1024


def test_run_stays_under_a_budget_ten_times_smaller_than_the_similarity(tmp_path):
    n_query, n_reference = 48_000, 48_000
    dense_similarity = n_query * n_reference * 4
    assert dense_similarity >= 10 * BUDGET_MIB * 2**20
    pair = make_pair(n_query=n_query, n_reference=n_reference, n_genes=150, n_panel=30,
                     seed=11)
    inputs = write_inputs(tmp_path / "in", pair)
    del pair
    peak_mib = _peak_mib([
        sys.executable, "-m", "scimpute_dask.cli", "run", "--query", str(inputs.query),
        "--reference", str(inputs.reference), "--identities", str(inputs.identities),
        "--no-clusters", "--k", "10", "--out", str(tmp_path / "out"), "-q",
        "--memory-limit", f"{BUDGET_MIB}MiB"])
    assert peak_mib < BUDGET_MIB, f"peak RSS {peak_mib:.0f} MiB over the {BUDGET_MIB} MiB budget"
    assert (tmp_path / "out" / "imputation.tsv").stat().st_size > 0


def test_a_reference_twice_the_budget_is_never_held_whole(tmp_path):
    """The reference's shared-gene block alone is more than twice the budget: the kNN
    (prepared tiles read one at a time, screen and exact passes), the imputation (one
    gene block at a time) and the score (from the stored imputation) stay under it."""
    budget_mib, n_shared, n_reference = 600, 1000, 320_000
    assert n_reference * n_shared * 4 >= 2 * budget_mib * 2**20
    shared = np.arange(0, 2 * n_shared, 2)  # every other reference gene is on the panel
    write_counts_store(tmp_path / "query.zarr", 600, shared, n_genes=2 * n_shared, seed=4,
                       prefix="q")
    # gene chunks as narrow as the imputation's gene blocks at this budget: a block
    # narrower than the store's chunks re-reads them (the atlas issue's imputation)
    write_counts_store(tmp_path / "reference.zarr", n_reference, np.arange(2 * n_shared),
                       seed=4, prefix="r", gene_chunk=16)
    out = tmp_path / "out"
    peak_mib = _peak_mib([
        sys.executable, "-m", "scimpute_dask.cli", "run", "--query",
        str(tmp_path / "query.zarr"), "--reference", str(tmp_path / "reference.zarr"),
        "--no-clusters", "--k", "15", "--out", str(out), "-q", "--no-report",
        "--memory-limit", f"{budget_mib}MiB"])
    assert peak_mib < budget_mib, f"peak RSS {peak_mib:.0f} MiB over the {budget_mib} MiB budget"
    # the search's prepared copy of the reference is gone once the neighbours are stored
    assert not (out / "zarr" / "search.zarr").exists()
    scores = np.array((out / "scores.txt").read_text().split(), dtype=float)
    assert np.isfinite(scores).all() and scores.mean() > 0.5
