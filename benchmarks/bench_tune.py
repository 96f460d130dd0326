"""What ``--tune`` costs beside the run's own kNN stage, at a large query.

Tuning works on a seeded subsample of at most ``--tune-cells`` query cells
(default 10,000), so its cost does not grow with the query; the run's kNN
stage grows linearly with it. This script builds a query of ``--query-cells``
(default 1,000,000) panel cells and a reference as ``bench_run.py`` does,
then times, in this process and on the same data:

1. the tuning (:func:`scimpute_dask.tools.tune.tune` on the subsample: one kNN
   per gene fold × search transform at the largest k, every candidate scored
   from those lists), with its kNN and scoring parts;
2. the run's kNN stage at scimpute's defaults (k = 25, no clusters), the same
   Dask graph a run stores, computed over every query cell.

It prints both, their ratio, and the peak RSS of the process.

    python benchmarks/bench_tune.py                                 # 1M × 30k × 300 panel
    python benchmarks/bench_tune.py --query-cells 100000 --reference-cells 20000
"""

from __future__ import annotations

import argparse
import resource
import time

import dask
import dask.array as da
import numpy as np

from scimpute_dask import plan
from scimpute_dask.engine import cluster, search
from scimpute_dask.synthetic import make_pair
from scimpute_dask.tools.tune import tune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--query-cells", type=int, default=1_000_000)
    p.add_argument("--reference-cells", type=int, default=30_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--panel", type=int, default=300)
    p.add_argument("--tune-cells", type=int, default=10_000)
    args = p.parse_args()

    t0 = time.perf_counter()
    pair = make_pair(args.query_cells, args.reference_cells, args.genes, args.panel,
                     n_types=12, seed=0, truth=False)
    query = pair.query.to_numpy(np.float32)
    reference = pair.reference[pair.query.columns].to_numpy(np.float32)
    del pair
    print(f"generated {args.query_cells:,} × {args.panel} query and {args.reference_cells:,} "
          f"reference cells in {time.perf_counter() - t0:.0f} s", flush=True)

    t0 = time.perf_counter()
    result = tune(query, reference, max_cells=args.tune_cells)
    tuning = time.perf_counter() - t0
    print(result)
    print(f"tuning: {tuning:.1f} s (kNN {result.timings['knn']:.1f} s, scoring "
          f"{result.timings['scores']:.1f} s)", flush=True)

    # the run's kNN stage: the same graph, blocks as a run plans them for a 4 GB budget
    blocks = plan.plan_run(4 * 10**9, len(query), len(reference), args.panel, args.genes)
    q = da.from_array(query, chunks=(blocks.query_chunk, -1))
    r = da.from_array(reference, chunks=(blocks.reference_chunk, -1))
    t0 = time.perf_counter()
    with cluster.compute_on(threads=blocks.threads):
        indices, similarity = search.knn(q, r, 25)
        dask.compute(indices.sum(), similarity.sum())
    knn = time.perf_counter() - t0
    print(f"run's kNN stage (k = 25, {args.query_cells:,} query cells): {knn:.1f} s")
    print(f"tuning / kNN stage = {tuning / knn:.2f}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
