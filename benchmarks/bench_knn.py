"""The kNN stage alone: clustered vs unrestricted search vs the matrix-product floor.

Builds random non-negative shared-gene matrices in memory, times the Dask kNN
graph with and without clusters, and times a plain NumPy float32 matrix
product of the same shapes (tile by tile, so it fits in memory) — the floor
that any exact cosine kNN must pay.

Example::

    python benchmarks/bench_knn.py --query-cells 20000 --reference-cells 30000 --genes 300
"""

from __future__ import annotations

import argparse
import time

import dask
import dask.array as da
import numpy as np
from threadpoolctl import threadpool_limits

from scimpute_dask.engine import graph
from scimpute_dask.kernels import knn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--query-cells", type=int, default=20000)
    p.add_argument("--reference-cells", type=int, default=30000)
    p.add_argument("--genes", type=int, default=300)
    p.add_argument("--clusters", type=int, default=12)
    p.add_argument("--k", type=int, default=25)
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--reference-chunk-size", type=int, default=8192)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    q = rng.gamma(0.5, 1.0, (args.query_cells, args.genes)).astype(np.float32)
    r = rng.gamma(0.5, 1.0, (args.reference_cells, args.genes)).astype(np.float32)
    qc = rng.integers(0, args.clusters, args.query_cells)
    rc = rng.integers(0, args.clusters, args.reference_cells)
    qd = da.from_array(q, chunks=(args.chunk_size, -1))
    rd = da.from_array(r, chunks=(args.reference_chunk_size, -1))
    flops = 2.0 * args.query_cells * args.reference_cells * args.genes

    qn, rn = knn.normalize_rows(q), knn.normalize_rows(r)
    t0 = time.perf_counter()
    for lo in range(0, args.query_cells, args.chunk_size):
        qn[lo : lo + args.chunk_size] @ rn.T
    floor = time.perf_counter() - t0

    def timed(clustered: bool) -> float:
        codes = (da.from_array(qc, chunks=args.chunk_size),
                 da.from_array(rc, chunks=args.reference_chunk_size)) if clustered else (None,
                                                                                          None)
        t0 = time.perf_counter()
        # as the pipeline runs it: one BLAS thread per Dask thread
        with dask.config.set(scheduler="threads"), threadpool_limits(1, user_api="blas"):
            dask.compute(*graph.knn_graph(qd, rd, args.k, *codes))
        return time.perf_counter() - t0

    unrestricted = timed(False)
    clustered = timed(True)
    print(f"{args.query_cells} query × {args.reference_cells} reference cells × {args.genes} "
          f"genes, k={args.k}, tiles {args.chunk_size} × {args.reference_chunk_size}")
    print(f"  NumPy sgemm floor (same tiles)   {floor:7.2f} s  {flops / floor / 1e9:6.1f} GFLOP/s")
    print(f"  kNN, all reference cells         {unrestricted:7.2f} s  "
          f"{flops / unrestricted / 1e9:6.1f} GFLOP/s  ({unrestricted / floor:.2f}× floor)")
    print(f"  kNN, {args.clusters} clusters                 {clustered:7.2f} s  "
          f"({clustered / unrestricted:.2f}× unrestricted)")


if __name__ == "__main__":
    main()
