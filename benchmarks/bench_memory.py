"""Peak memory of whole runs as the reference grows, under one ``--memory-limit``.

Writes a query and references of several sizes straight into the Zarr working
format (block by block, in a child process: clustered counts, ~7 % non-zero;
:func:`scimpute_dask.synthetic.write_counts_store`), runs ``scimpute-dask run`` on each in a child
process, samples the child's resident memory every 0.2 s and prints, per
reference size, each stage's time and peak RSS (stages from the run's own log
lines), the whole run's peak (``ru_maxrss``) and the size of the reference's
shared-gene block against the budget. The budget holds when every peak is
below it and the peaks do not grow with the reference.

Example (the figures quoted in the README)::

    python benchmarks/bench_memory.py --reference-cells 100000 200000 400000 \\
        --query-cells 20000 --shared 2000 --reference-genes 3000 --memory-limit 2GB
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import in_child, run_sampled

from scimpute_dask.synthetic import write_counts_store


def _generate(work: Path, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    shared = np.sort(rng.choice(args.reference_genes, args.shared, replace=False))
    write_counts_store(work / "query.zarr", args.query_cells, shared,
                       n_genes=args.reference_genes, prefix="q")
    for n in args.reference_cells:
        write_counts_store(work / f"reference_{n}.zarr", n, np.arange(args.reference_genes),
                           prefix="r")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-cells", type=int, nargs="+", default=[100_000, 200_000, 400_000])
    p.add_argument("--query-cells", type=int, default=20_000)
    p.add_argument("--shared", type=int, default=2000, help="panel genes (all in the reference)")
    p.add_argument("--reference-genes", type=int, default=3000)
    p.add_argument("--k", type=int, default=25)
    p.add_argument("--memory-limit", default="2GB")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        in_child(_generate, work, args)
        print(f"generated in {time.perf_counter() - t0:.0f} s", flush=True)
        for n in args.reference_cells:
            out = work / f"out_{n}"
            cmd = [sys.executable, "-m", "scimpute_dask.cli", "run",
                   "--query", str(work / "query.zarr"),
                   "--reference", str(work / f"reference_{n}.zarr"), "--out", str(out),
                   "--no-clusters", "--k", str(args.k), "--tsv-genes", "none", "--no-report",
                   "--memory-limit", args.memory_limit, "--restart", "--verbose"]
            print("$", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            peak, stage_peaks, _ = run_sampled(cmd)
            wall = time.perf_counter() - t0
            timings = json.loads((out / "run.json").read_text())["timings_s"]
            block = n * args.shared * 4 / 2**30
            print(f"  reference {n:,} cells: shared-gene block {block:.2f} GiB (float32)")
            for stage, seconds in timings.items():
                sampled = stage_peaks.get(stage)
                print(f"  {stage:<8} {seconds:8.1f} s" + (
                    f"   peak {sampled:,.0f} MiB" if sampled else ""))
            print(f"  total    {wall:8.1f} s   peak RSS {peak:,.0f} MiB", flush=True)
            rows.append((n, block, timings, stage_peaks, wall, peak))
            shutil.rmtree(out)

    print(f"\n`--memory-limit {args.memory_limit}`, {args.query_cells:,} query cells, "
          f"{args.shared:,} shared of {args.reference_genes:,} reference genes, k = {args.k}\n")
    print("| reference cells | shared block | kNN | impute | score | total "
          "| peak kNN | peak impute | peak score | peak RSS |")
    print("|---" * 10 + "|")
    for n, block, st, sp, wall, peak in rows:
        print(f"| {n:,} | {block:.2f} GiB | {st['knn']:.0f} s | {st['impute']:.0f} s "
              f"| {st.get('score', 0):.0f} s | {wall:.0f} s | {sp.get('knn', 0):,.0f} MiB "
              f"| {sp.get('impute', 0):,.0f} MiB | {sp.get('score', 0):,.0f} MiB "
              f"| {peak:,.0f} MiB |")


if __name__ == "__main__":
    main()
