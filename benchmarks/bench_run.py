"""Time and peak memory of a whole ``scimpute-dask run`` on synthetic data.

Generates a spatial/single-cell pair of the requested size (scimpute TSVs),
runs the CLI in a child process and prints wall time per stage (from the run's
``run.json``), total wall time and the child's peak resident memory.

Example (the figure quoted in the README)::

    python benchmarks/bench_run.py --query-cells 20000 --reference-cells 5000 --genes 2000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scimpute_dask.synthetic import make_pair, write_scimpute_tsv


def _generate(work: Path, args: argparse.Namespace) -> None:
    pair = make_pair(args.query_cells, args.reference_cells, args.genes, args.panel,
                     n_types=args.types, seed=0)
    write_scimpute_tsv(pair.query, work / "query.tsv")
    write_scimpute_tsv(pair.reference, work / "reference.tsv")
    pair.identities.to_csv(work / "ids.tsv", sep="\t", index=False)


def _run_measured(cmd: list[str]) -> float:
    """Run ``cmd``; return its own peak RSS in MiB.

    Linux carries the parent's high-water RSS into a child at exec, so the
    inputs are generated in a separate process and this one stays small.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--query-cells", type=int, default=20000)
    p.add_argument("--reference-cells", type=int, default=5000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--panel", type=int, default=300)
    p.add_argument("--types", type=int, default=12)
    p.add_argument("--k", type=int, default=25)
    p.add_argument("--no-clusters", action="store_true")
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where to write inputs and outputs (default: a temporary directory)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        gen = multiprocessing.get_context("spawn").Process(target=_generate, args=(work, args))
        gen.start()
        gen.join()
        print(f"generated inputs in {time.perf_counter() - t0:.1f} s "
              f"(query.tsv {(work / 'query.tsv').stat().st_size / 2**20:.0f} MiB, "
              f"reference.tsv {(work / 'reference.tsv').stat().st_size / 2**20:.0f} MiB)")
        cmd = ["scimpute-dask", "run", "--query", str(work / "query.tsv"),
               "--reference", str(work / "reference.tsv"), "--identities", str(work / "ids.tsv"),
               "--name-column", "0", "--out", str(work / "out"), "--k", str(args.k),
               "--chunk-size", str(args.chunk_size), "--quiet", "--restart"]
        if args.no_clusters:
            cmd.append("--no-clusters")
        print("$", " ".join(cmd))
        t0 = time.perf_counter()
        peak_mib = _run_measured(cmd)
        wall = time.perf_counter() - t0
        record = json.loads((work / "out" / "run.json").read_text())
        print(f"shape: {args.query_cells} query × {args.reference_cells} reference cells × "
              f"{args.genes} genes ({args.panel} panel), k={args.k}, "
              f"clusters={'no' if args.no_clusters else args.types}")
        for stage, seconds in record["timings_s"].items():
            print(f"  {stage:<8} {seconds:8.1f} s")
        print(f"  total    {wall:8.1f} s   peak RSS {peak_mib:,.0f} MiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
