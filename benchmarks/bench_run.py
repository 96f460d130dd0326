"""Time, peak memory and kNN efficiency of whole ``scimpute-dask run``s on synthetic data.

For each query size, generates a spatial query (scimpute TSV, panel genes
only) against one single-cell reference, runs the CLI in a child process and
prints wall time per stage (from the run's ``run.json``), total, the child's
own peak RSS, and the kNN stage's achieved GFLOP/s next to the floor: a plain
NumPy float32 matrix product on the same tile shapes, measured in the same
run. A Markdown table of all runs closes the output.

Examples (the figures quoted in the README)::

    python benchmarks/bench_run.py --query-cells 20000 --reference-cells 5000 --genes 2000
    python benchmarks/bench_run.py --query-cells 10000 100000 1000000 --memory-limit 4GB
    python benchmarks/bench_run.py --query-cells 20000 --clusters no --memory-limit 4GB \
        --blend 0.7      # the linear model's fit on the 1M-query benchmark's reference
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import in_child

from scimpute_dask.synthetic import make_pair, write_scimpute_tsv


def _generate(work: Path, n_query: int, args: argparse.Namespace, reference: bool) -> None:
    pair = make_pair(n_query, args.reference_cells, args.genes, args.panel,
                     n_types=args.types, seed=0, truth=False)
    write_scimpute_tsv(pair.query, work / f"query_{n_query}.tsv")
    pair.identities.to_csv(work / f"ids_{n_query}.tsv", sep="\t", index=False)
    if reference:
        write_scimpute_tsv(pair.reference, work / "reference.tsv")


def _run_measured(cmd: list[str]) -> float:
    """Run ``cmd``; return its own peak RSS in MiB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise subprocess.CalledProcessError(code, cmd)
    return usage.ru_maxrss / 1024


def _sgemm_floor(bq: int, br: int, g: int, seconds: float = 3.0) -> float:
    """GFLOP/s of NumPy's float32 product on one (bq × g) @ (g × br) tile shape."""
    rng = np.random.default_rng(0)
    a = rng.random((bq, g), dtype=np.float32)
    b = rng.random((br, g), dtype=np.float32)
    a @ b.T
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b.T
        n += 1
    return 2.0 * bq * br * g * n / (time.perf_counter() - t0) / 1e9


def _gather_floor(n_reference: int, gene_block: int, k: int, seconds: float = 2.0) -> float:
    """GB/s of NumPy gathering random float32 reference rows of one gene block into a reused
    buffer (``np.take``, 256 cells × k rows at a time): the reads the imputation's weighted
    mean must do, without its arithmetic."""
    rng = np.random.default_rng(0)
    ref = rng.random((n_reference, gene_block), dtype=np.float32)
    rows = rng.integers(0, n_reference, (64, 256 * k))
    out = np.empty((256 * k, gene_block), dtype=np.float32)
    np.take(ref, rows[0], axis=0, out=out, mode="clip")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.take(ref, rows[n % len(rows)], axis=0, out=out, mode="clip")
        n += 1
    return out.nbytes * n / (time.perf_counter() - t0) / 1e9


def _write_floor(directory: Path, nbytes: int) -> float:
    """MB/s of writing ``nbytes`` (at most 2 GiB, in 64 MiB writes) to a file in ``directory``
    and flushing it to the disk: the floor for the export's tables (gigabytes of tables
    outrun the page cache's dirty limit, so the export runs at the disk's pace too)."""
    nbytes = max(1, min(nbytes, 2 << 30))
    chunk = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    path = directory / "write_floor.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(0, nbytes, len(chunk)):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    written = path.stat().st_size
    path.unlink()
    return written / seconds / 1e6


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
        else path.stat().st_size if path.exists() else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--query-cells", type=int, nargs="+", default=[20000])
    p.add_argument("--reference-cells", type=int, default=30000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--panel", type=int, default=300)
    p.add_argument("--types", type=int, default=12)
    p.add_argument("--k", type=int, nargs="+", default=[25],
                   help="neighbours per query cell; several values run one after the other")
    p.add_argument("--clusters", choices=["both", "yes", "no"], default="both")
    p.add_argument("--memory-limit", default=None, help="passed to the run (e.g. 4GB)")
    p.add_argument("--tsv-genes", default="all", help="passed to the run")
    p.add_argument("--blend", default=None,
                   help="passed to the run: blend with the linear model (its fit is the "
                        "'ridge' stage)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where to write inputs and outputs (default: a temporary directory)")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for i, n_query in enumerate(args.query_cells):
            t0 = time.perf_counter()
            in_child(_generate, work, n_query, args, i == 0)
            q = work / f"query_{n_query}.tsv"
            print(f"generated {n_query} query cells in {time.perf_counter() - t0:.0f} s "
                  f"({q.stat().st_size / 2**20:,.0f} MiB of TSV)", flush=True)
            for clustered, k in [(c, k) for c in {"both": (True, False), "yes": (True,),
                                                  "no": (False,)}[args.clusters]
                                 for k in args.k]:
                out = work / f"out_{n_query}_{'cl' if clustered else 'all'}_{k}"
                # the CLI of the Python running this script: no need for it on PATH
                cmd = [sys.executable, "-m", "scimpute_dask.cli", "run", "--query", str(q),
                       "--reference", str(work / "reference.tsv"),
                       "--identities", str(work / f"ids_{n_query}.tsv"), "--out", str(out),
                       "--k", str(k), "--tsv-genes", args.tsv_genes, "--quiet",
                       "--restart"]
                cmd += [] if clustered else ["--no-clusters"]
                cmd += ["--memory-limit", args.memory_limit] if args.memory_limit else []
                cmd += ["--blend", args.blend] if args.blend else []
                print("$", " ".join(cmd), flush=True)
                t0 = time.perf_counter()
                peak = _run_measured(cmd)
                wall = time.perf_counter() - t0
                record = json.loads((out / "run.json").read_text())
                params, stages = record["parameters"], record["timings_s"]
                floor = _sgemm_floor(params["chunk_size"], params["reference_chunk_size"],
                                     args.panel)
                flops = 2.0 * n_query * args.reference_cells * args.panel
                knn_rate = flops / stages["knn"] / 1e9
                for stage, seconds in stages.items():
                    print(f"  {stage:<8} {seconds:8.1f} s")
                print(f"  total    {wall:8.1f} s   peak RSS {peak:,.0f} MiB")
                print(f"  kNN {knn_rate:.1f} GFLOP/s {'(all-pairs equivalent) ' * clustered}"
                      f"vs sgemm floor {floor:.1f} GFLOP/s on {params['chunk_size']} × "
                      f"{params['reference_chunk_size']} tiles", flush=True)
                # imputation: every query cell reads k reference rows of every gene
                gathered = 4.0 * n_query * k * args.genes
                gather = _gather_floor(args.reference_cells, params["gene_chunk_size"], k)
                print(f"  impute {gathered / stages['impute'] / 1e9:.1f} GB/s gathered vs NumPy "
                      f"gather floor {gather:.1f} GB/s ({gathered / gather / 1e9:.0f} s)")
                tables = sum(_size(out / f) for f in ("imputation.tsv", "sim_matrix.tsv"))
                disk = _write_floor(out, tables)
                print(f"  export {tables / stages['export'] / 1e6:.0f} MB/s of tables vs raw "
                      f"write floor {disk:.0f} MB/s ({tables / disk / 1e6:.0f} s)")
                store = sum(_size(p) for p in (out / "zarr").glob("imputed*.zarr"))
                print(f"  on disk: imputation.tsv {_size(out / 'imputation.tsv') / 1e9:.2f} GB,"
                      f" imputed store {store / 1e9:.2f} GB", flush=True)
                rows.append((n_query, clustered, k, stages, wall, peak, knn_rate, floor))
                shutil.rmtree(out)  # the next size needs the disk

    print("\n| query cells | clusters | k | convert | kNN | impute | export | total | peak RSS "
          "| kNN GFLOP/s (floor) |\n|---|---|---|---|---|---|---|---|---|---|")
    for n_query, clustered, k, st, wall, peak, rate, floor in rows:
        print(f"| {n_query:,} | {'yes' if clustered else 'no'} | {k} | {st['convert']:.0f} s "
              f"| {st['knn']:.0f} s | {st['impute']:.0f} s | {st['export']:.0f} s "
              f"| {wall:.0f} s | {peak / 1024:.2f} GiB | {rate:.0f} ({floor:.0f}) |")


if __name__ == "__main__":
    main()
