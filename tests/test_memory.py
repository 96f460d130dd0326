"""Peak memory of a whole run stays under --memory-limit, measured from outside."""

from __future__ import annotations

import os
import subprocess
import sys

from scimpute_dask.synthetic import make_pair

from .conftest import write_inputs

BUDGET_MIB = 800


def test_run_stays_under_a_budget_ten_times_smaller_than_the_similarity(tmp_path):
    n_query, n_reference = 48_000, 48_000
    dense_similarity = n_query * n_reference * 4
    assert dense_similarity >= 10 * BUDGET_MIB * 2**20
    pair = make_pair(n_query=n_query, n_reference=n_reference, n_genes=150, n_panel=30,
                     seed=11)
    inputs = write_inputs(tmp_path / "in", pair)
    del pair
    cmd = [sys.executable, "-m", "scimpute_dask.cli", "run", "--query", str(inputs.query),
           "--reference", str(inputs.reference), "--identities", str(inputs.identities),
           "--no-clusters", "--k", "10", "--out", str(tmp_path / "out"), "-q",
           "--memory-limit", f"{BUDGET_MIB}MiB"]
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
    peak_mib = peak_kib / 1024
    assert peak_mib < BUDGET_MIB, f"peak RSS {peak_mib:.0f} MiB over the {BUDGET_MIB} MiB budget"
    assert (tmp_path / "out" / "imputation.tsv").stat().st_size > 0
