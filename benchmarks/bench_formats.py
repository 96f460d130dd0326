"""Conversion of the formats single-cell users have: sparse .h5ad and 10x matrix.mtx.

Writes one sparse count matrix (cells × genes, a given density) as a CSR
``.h5ad`` and as a 10x directory (entries shuffled, as no order is
guaranteed), then runs ``scimpute-dask convert`` on each in a child process
and prints its wall time and own peak RSS next to the size of the matrix
densified whole, and of a 1,000-cell conversion of the same kind (the
interpreter and libraries)::

    python benchmarks/bench_formats.py --cells 200000 --genes 3000 --density 0.005
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

from bench_run import _in_child, _run_measured


def _write(work: Path, n_cells: int, n_genes: int, density: float) -> None:
    import anndata
    import numpy as np
    import pandas as pd
    from scipy import io as spio
    from scipy import sparse

    rng = np.random.default_rng(0)
    nnz = int(n_cells * n_genes * density)
    X = sparse.csr_matrix((rng.integers(1, 30, nnz).astype(np.float32),
                           (rng.integers(0, n_cells, nnz), rng.integers(0, n_genes, nnz))),
                          shape=(n_cells, n_genes))
    X.sum_duplicates()
    cells = [f"c{i}" for i in range(n_cells)]
    genes = [f"g{i}" for i in range(n_genes)]
    for n, suffix in ((n_cells, ""), (1000, "_small")):
        anndata.AnnData(X=X[:n], obs=pd.DataFrame(index=cells[:n]),
                        var=pd.DataFrame(index=genes)).write_h5ad(work / f"m{suffix}.h5ad")
        tenx = work / f"10x{suffix}"
        tenx.mkdir()
        coo = X[:n].T.tocoo()
        order = rng.permutation(coo.nnz)
        spio.mmwrite(tenx / "matrix.mtx", sparse.coo_matrix(
            (coo.data[order], (coo.row[order], coo.col[order])), shape=coo.shape),
            field="integer")
        pd.Series(cells[:n]).to_csv(tenx / "barcodes.tsv", header=False, index=False)
        pd.DataFrame({"id": genes, "name": genes, "type": "Gene Expression"}).to_csv(
            tenx / "features.tsv", sep="\t", header=False, index=False)
    print(f"{n_cells} cells × {n_genes} genes, {X.nnz} non-zeros; dense float32 "
          f"{n_cells * n_genes * 4 / 2**20:.0f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=3_000)
    parser.add_argument("--density", type=float, default=0.005)
    parser.add_argument("--memory-limit", default="2GB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _in_child(_write, work, args.cells, args.genes, args.density)
        print("| input | cells | convert | peak RSS | peak RSS, 1,000 cells |")
        print("|---|---|---|---|---|")
        for name, label in (("m.h5ad", "CSR .h5ad"), ("10x", "10x matrix.mtx")):
            peaks = []
            for src in (name, name.replace("m.h5ad", "m_small.h5ad").replace("10x", "10x_small")):
                cmd = [sys.executable, "-m", "scimpute_dask.cli", "convert", str(work / src),
                       str(work / f"{src}.zarr"), "-q", "--memory-limit", args.memory_limit]
                t0 = time.perf_counter()
                peaks.append(_run_measured(cmd))
                if not peaks[1:]:
                    seconds = time.perf_counter() - t0
            print(f"| {label} | {args.cells:,} | {seconds:.1f} s | {peaks[0]:.0f} MiB | "
                  f"{peaks[1]:.0f} MiB |", flush=True)


if __name__ == "__main__":
    multiprocessing.freeze_support()
    main()
