"""The kNN stage alone, beside faiss-cpu, scikit-learn and the matrix-product floor.

Every contender runs in its own fresh process on the same seeded data (random
non-negative shared-gene matrices, built before the clock starts) and reports
its search time and the process's peak RSS:

- ``scimpute-dask``: the Dask kNN graph the pipeline runs (same tile sizes as a
  run with ``--memory-limit``, one BLAS thread per Dask thread), exact
  float64 ranking included; loading the compiled (numba-cached) kernels is
  done once per process, on a tiny search before the clock starts, and
  printed apart;
- ``faiss``: ``faiss.IndexFlatIP`` on the L2-normalised float32 rows (exact
  inner-product search, the tool a user who knows faiss would pick);
- ``sklearn``: ``NearestNeighbors(metric="cosine", algorithm="brute")``;
- ``floor``: a NumPy float32 product of the same shapes, in tiles, with all
  cores (what any exact search must pay).

faiss-cpu and scikit-learn are benchmark-only peers, not dependencies; a peer
that is not installed is skipped. Example::

    python benchmarks/bench_knn.py --query-cells 100000 --reference-cells 20000 --genes 300
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

import numpy as np


def _data(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    q = rng.gamma(0.5, 1.0, (args.query_cells, args.genes)).astype(np.float32)
    r = rng.gamma(0.5, 1.0, (args.reference_cells, args.genes)).astype(np.float32)
    qc = rng.integers(0, max(1, args.clusters), args.query_cells)
    rc = rng.integers(0, max(1, args.clusters), args.reference_cells)
    return q, r, qc, rc


def _normalized(x: np.ndarray) -> np.ndarray:
    from scimpute_dask.kernels.knn import normalize_rows  # the rows our screen multiplies

    return normalize_rows(x)


def _ours(args, q, r, qc, rc) -> np.ndarray:
    import dask
    import dask.array as da
    from threadpoolctl import threadpool_limits

    from scimpute_dask.config import parse_memory
    from scimpute_dask.engine import search
    from scimpute_dask.plan import plan_run

    plan = plan_run(parse_memory(args.memory_limit), *q.shape[:1], r.shape[0], q.shape[1],
                    args.reference_genes)
    # the query in the run's search blocks, the reference in its tiles (held in memory here)
    qd = da.from_array(q, chunks=(plan.search_chunk, -1))
    rd = da.from_array(r, chunks=(plan.reference_chunk, -1))
    codes = ((da.from_array(qc, chunks=plan.search_chunk),
              da.from_array(rc, chunks=plan.reference_chunk)) if args.clusters else ())
    print(f"  (tiles {plan.search_chunk} × {plan.reference_chunk}, {plan.threads} threads)",
          file=sys.stderr)
    with dask.config.set(scheduler="threads"), threadpool_limits(1, user_api="blas"):
        idx, _ = dask.compute(*search.knn(qd, rd, args.k, *codes))
    return idx


def _warm_ours(args, q, r, qc, rc) -> None:
    import dask
    import dask.array as da

    from scimpute_dask.engine import search

    small = [da.from_array(x[:64], chunks=(32, -1)) for x in (q, r)]
    codes = [da.from_array(c[:64], chunks=32) for c in (qc, rc)] if args.clusters else []
    with dask.config.set(scheduler="sync"):
        dask.compute(*search.knn(*small, args.k, *codes))


def _faiss(args, q, r, qc, rc) -> np.ndarray:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = faiss.IndexFlatIP(q.shape[1])
    index.add(_normalized(r))
    return index.search(_normalized(q), args.k)[1]


def _sklearn(args, q, r, qc, rc) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=args.k, metric="cosine", algorithm="brute", n_jobs=-1)
    return nn.fit(r).kneighbors(q, return_distance=False)


def _floor(args, q, r, qc, rc) -> None:
    qn, rn = _normalized(q), _normalized(r)
    out = np.empty((min(4096, len(qn)), len(rn)), dtype=np.float32)
    for lo in range(0, len(qn), 4096):
        block = qn[lo : lo + 4096]
        np.matmul(block, rn.T, out=out[: len(block)])


CONTENDERS = {"scimpute-dask": _ours, "faiss": _faiss, "sklearn": _sklearn, "floor": _floor}


def _child(name: str, args, conn) -> None:
    try:
        data = _data(args)
        warm = 0.0
        if name == "scimpute-dask":
            start = time.perf_counter()
            _warm_ours(args, *data)
            warm = time.perf_counter() - start
        start = time.perf_counter()
        idx = CONTENDERS[name](args, *data)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        conn.send((seconds, warm, peak, idx))
    except ImportError as exc:
        conn.send(exc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--query-cells", type=int, default=100000)
    p.add_argument("--reference-cells", type=int, default=20000)
    p.add_argument("--genes", type=int, default=300, help="shared genes")
    p.add_argument("--reference-genes", type=int, default=2000,
                   help="reference genes: only sets the pipeline's tile sizes")
    p.add_argument("--k", type=int, default=25)
    p.add_argument("--clusters", type=int, default=0,
                   help="restrict our search to this many random clusters (peers ignore it)")
    p.add_argument("--memory-limit", default="4GB")
    p.add_argument("--only", nargs="*", default=list(CONTENDERS), choices=list(CONTENDERS))
    args = p.parse_args()

    flops = 2.0 * args.query_cells * args.reference_cells * args.genes
    print(f"{args.query_cells} query × {args.reference_cells} reference cells × {args.genes} "
          f"genes, k={args.k}{f', {args.clusters} clusters' if args.clusters else ''}, "
          f"{os.cpu_count()} cores")
    ctx = mp.get_context("spawn")
    results = {}
    for name in args.only:
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(name, args, there))
        proc.start()
        got = here.recv()
        proc.join()
        if isinstance(got, Exception):
            print(f"  {name:<14} skipped ({got})")
            continue
        seconds, warm, peak, idx = got
        results[name] = (seconds, idx)
        print(f"  {name:<14} {seconds:8.2f} s  {flops / seconds / 1e9:7.1f} GFLOP/s  "
              f"peak RSS {peak / 2**30:5.2f} GiB"
              + (f"  (+{warm:.2f} s loading the compiled kernels, once per process)"
                 if warm else ""))
    if "scimpute-dask" in results:
        ours, idx = results["scimpute-dask"]
        for name, (seconds, other) in results.items():
            if name == "scimpute-dask":
                continue
            line = f"  scimpute-dask / {name}: {ours / seconds:.2f}× the time"
            if other is not None and not args.clusters:
                same = np.mean([set(a) == set(b) for a, b in zip(idx, other, strict=True)])
                line += f", identical neighbour sets {100 * same:.2f} %"
            print(line)


if __name__ == "__main__":
    main()
