"""Time, peak memory and agreement of scimpute-dask against the original scimpute.

For each query size, generates a synthetic spatial query / single-cell
reference pair (``scimpute_dask.synthetic.make_pair``, seed 0) as scimpute TSVs
plus the identity table, then runs, each in its own child process:

(a) the original scimpute (https://github.com/usadellab/scimpute, not on
    PyPI; install it with ``pip install git+https://github.com/usadellab/scimpute``):
    ``scimpute.expression_imputation(query, reference, identities, 0, outdir=...,
    k_neighbors=K, consider_clusters=True, save_chunks=False, chunk_size=1000)``;
(b) ``scimpute-dask run --query ... --reference ... --identities ...
    --name-column 0 --out ... --k K --quiet``.

Wall time is measured around each child, peak RSS is the child's own
(``os.wait4``). This process imports neither NumPy nor pandas: Linux carries a
parent's RSS high-water mark into an exec'd child, so data generation and the
agreement check run in separate spawned processes and this one stays small.

After each pair of runs the outputs are compared: ``imputation.tsv`` aligned by
cell and gene (fraction of values equal, max absolute difference) and the
neighbour sets of ``sim_matrix.tsv`` per query cell (sets of (x, y) pairs; a
differing set is checked for a tie at the k-th similarity). Without scimpute
installed only scimpute-dask is timed.

Example::

    python benchmarks/bench_vs_scimpute.py --query-cells 1000 2000 4000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

INSTALL_HINT = "pip install git+https://github.com/usadellab/scimpute"

# Runs in the scimpute child: argv = query, reference, identities, outdir, k, chunk size.
SCIMPUTE_CALL = """\
import sys
import scimpute
q, r, ids, out, k, chunk = sys.argv[1:7]
scimpute.expression_imputation(q, r, ids, 0, outdir=out, k_neighbors=int(k),
                               consider_clusters=True, save_chunks=False,
                               chunk_size=int(chunk))
"""

# Similarities (cosine + 1) closer than this to the k-th one count as a tie: scimpute-dask
# ranks float32-normalised rows and writes 7 decimals, so 1e-6 is its resolution.
TIE_TOL = 1e-6


# --------------------------------------------------------------------------- children


def _in_spawned(fn, *args):
    """Run ``fn(*args)`` in a fresh spawned interpreter and return its result."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def _generate(work: Path, n_query: int, n_reference: int, n_genes: int, n_panel: int,
              n_types: int) -> dict:
    from scimpute_dask.synthetic import make_pair, write_scimpute_tsv

    pair = make_pair(n_query, n_reference, n_genes, n_panel, n_types=n_types, seed=0,
                     truth=False)
    paths = {"query": work / "query.tsv", "reference": work / "reference.tsv",
             "identities": work / "identities.tsv"}
    write_scimpute_tsv(pair.query, paths["query"])
    write_scimpute_tsv(pair.reference, paths["reference"])
    pair.identities.to_csv(paths["identities"], sep="\t", index=False)  # names: column 0
    return paths


def _read_imputation(path: Path):
    import pandas as pd

    frame = pd.read_csv(path, sep="\t")
    unnamed = [c for c in frame.columns if str(c).startswith("Unnamed:")]
    if "cell" in frame.columns:
        frame = frame.drop(columns=unnamed)  # scimpute may write its row index too
        frame = frame.set_index("cell")
    else:
        frame = frame.set_index(frame.columns[0])
    frame.index = frame.index.astype(str)
    frame.columns = frame.columns.astype(str)
    return frame.astype("float64")


def _read_neighbours(path: Path) -> dict:
    """``{query cell: {reference cell: similarity + 1}}`` from a sim_matrix.tsv."""
    import pandas as pd

    sim = pd.read_csv(path, sep="\t", dtype={"x": str, "y": str})
    out: dict = {}
    for x, y, d in zip(sim["x"], sim["y"], sim["distance"], strict=True):
        out.setdefault(x, {})[y] = float(d)
    return out


def _compare_neighbours(na: dict, nb: dict) -> dict:
    """Per query cell: same neighbour set, same order, or a set differing by a tie."""
    shared = sorted(set(na) & set(nb))
    same_sets = same_order = ties = 0
    max_sim_diff = 0.0
    differing, unexplained = [], []
    for x in shared:
        da, db = na[x], nb[x]
        for y in set(da) & set(db):
            max_sim_diff = max(max_sim_diff, abs(da[y] - db[y]))
        if set(da) == set(db):
            same_sets += 1
            same_order += list(da) == list(db)
            continue
        differing.append(x)
        # A differing set is a tie if every swapped neighbour is as similar as the
        # k-th neighbour of the list that lacks it (within TIE_TOL).
        kth_a, kth_b = min(da.values()), min(db.values())
        swapped_a = [da[y] for y in set(da) - set(db)]
        swapped_b = [db[y] for y in set(db) - set(da)]
        if all(abs(v - kth_b) <= TIE_TOL for v in swapped_a) and all(
                abs(v - kth_a) <= TIE_TOL for v in swapped_b):
            ties += 1
        else:
            unexplained.append(x)
    return {
        "query_cells": (len(na), len(nb), len(shared)),
        "same_sets": same_sets,
        "same_order": same_order,
        "tie_sets": ties,
        "differing_examples": [
            (x, sorted(set(na[x]) - set(nb[x])), sorted(set(nb[x]) - set(na[x])),
             min(na[x].values()))
            for x in differing[:5]
        ],
        "differing": differing,
        "unexplained_sets": len(unexplained),
        "max_sim_diff": max_sim_diff,
    }


def _compare(ours: Path, theirs: Path, reference: Path) -> dict:
    """Agreement of two output directories (run in a spawned child)."""
    import numpy as np
    import pandas as pd

    na, nb = _read_neighbours(theirs / "sim_matrix.tsv"), _read_neighbours(ours / "sim_matrix.tsv")
    result = _compare_neighbours(na, nb)

    a, b = _read_imputation(theirs / "imputation.tsv"), _read_imputation(ours / "imputation.tsv")
    cells = a.index.intersection(b.index)
    genes = a.columns.intersection(b.columns)
    diff = np.abs(a.loc[cells, genes].to_numpy() - b.loc[cells, genes].to_numpy())
    result.update({
        "cells": (len(a.index), len(b.index), len(cells)),
        "genes": (len(a.columns), len(b.columns), len(genes)),
        "same_cell_order": list(a.index) == list(b.index),
        "same_gene_order": list(a.columns) == list(b.columns),
        "values": diff.size,
        "equal": int((diff == 0).sum()),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
    })

    # The same on the cells whose neighbour sets agree: there the only difference left
    # is arithmetic. Where a 2-decimal value differs, recompute scimpute's unrounded
    # weighted mean (float64, its neighbours and weights) and measure how far it lies
    # from a rounding boundary (…5 in the third decimal), relative to the value: a
    # flip caused by float32 storage (7 significant digits) lies within ~1e-7 of one.
    same = ~cells.isin(result.pop("differing"))
    d_same = diff[same]
    result.update({
        "same_set_values": d_same.size,
        "same_set_equal": int((d_same == 0).sum()),
        "same_set_max_abs_diff": float(d_same.max()) if d_same.size else 0.0,
        "same_set_over_cent": int((d_same > 0.01 + 1e-9).sum()),
        "boundary_flips": 0,
        "max_boundary_rel": 0.0,
    })
    rows, cols = np.nonzero(diff * same[:, None])
    if rows.size:
        ref = pd.read_csv(reference, sep="\t", index_col=0).T
        ref.index = ref.index.astype(str)
        ref.columns = ref.columns.astype(str)
        rel = np.empty(rows.size)
        for i in np.unique(rows):
            sel = rows == i
            neigh = na[cells[i]]
            w = np.fromiter(neigh.values(), dtype=np.float64)
            block = ref.loc[list(neigh), genes[cols[sel]]].to_numpy(np.float64)
            mean = w @ block / w.sum()
            gap = np.abs(mean * 100 - np.floor(mean * 100) - 0.5) / 100
            rel[sel] = gap / np.maximum(np.abs(mean), 1e-12)
        result["boundary_flips"] = int((rel <= 1e-6).sum())
        result["max_boundary_rel"] = float(rel.max())
    return result


# --------------------------------------------------------------------------- timing


def _run_measured(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, its own peak RSS in MiB)."""
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4
    if code:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}\n{tail}")
    return wall, usage.ru_maxrss / 1024


def _have_scimpute() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import scimpute"], capture_output=True)
    return probe.returncode == 0


def _fmt_mib(mib: float | None) -> str:
    if mib is None:
        return "—"
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:,.0f} MiB"


def _fmt_s(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.1f} s"


def _report_agreement(agree: dict) -> None:
    qa, qb, qc = agree["query_cells"]
    print(f"  sim_matrix.tsv: query cells scimpute {qa}, scimpute-dask {qb}, shared {qc}")
    print(f"    identical neighbour sets: {agree['same_sets']:,} / {qc:,} "
          f"({100 * agree['same_sets'] / max(qc, 1):.2f} %), of which in identical order: "
          f"{agree['same_order']:,}; max |Δ similarity| on shared (x, y) pairs: "
          f"{agree['max_sim_diff']:.3g}")
    n_diff = qc - agree["same_sets"]
    if n_diff:
        print(f"    differing sets: {n_diff:,}, of which a tie at the k-th similarity "
              f"(within {TIE_TOL:g}): {agree['tie_sets']:,}; not a tie: "
              f"{agree['unexplained_sets']:,}")
        for x, only_a, only_b, kth in agree["differing_examples"]:
            print(f"      {x}: only scimpute {only_a}, only scimpute-dask {only_b} "
                  f"(scimpute's k-th similarity + 1 = {kth!r})")
    ca, cb, cc = agree["cells"]
    ga, gb, gc = agree["genes"]
    print(f"  imputation.tsv: scimpute {ca} cells × {ga} genes, scimpute-dask {cb} × {gb}; "
          f"compared {cc} × {gc} (same cell order: {agree['same_cell_order']}, "
          f"same gene order: {agree['same_gene_order']})")
    n = agree["values"]
    print(f"    all cells: values equal {agree['equal']:,} / {n:,} "
          f"({100 * agree['equal'] / max(n, 1):.4f} %), max |Δ| {agree['max_abs_diff']:.4g}")
    m, eq = agree["same_set_values"], agree["same_set_equal"]
    print(f"    cells with identical neighbour sets: values equal {eq:,} / {m:,} "
          f"({100 * eq / max(m, 1):.4f} %), max |Δ| {agree['same_set_max_abs_diff']:.4g}, "
          f"|Δ| > 0.01: {agree['same_set_over_cent']:,}")
    if eq < m:
        print(f"      differing values whose unrounded float64 value lies within 1e-6 "
              f"(relative) of a rounding boundary: {agree['boundary_flips']:,} / {m - eq:,} "
              f"(largest relative gap {agree['max_boundary_rel']:.2g})")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--query-cells", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--reference-cells", type=int, default=3000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--panel", type=int, default=200)
    p.add_argument("--types", type=int, default=8)
    p.add_argument("--k", type=int, default=25)
    p.add_argument("--scimpute-chunk-size", type=int, default=1000,
                   help="scimpute's chunk_size (query cells per imputation chunk)")
    p.add_argument("--memory-limit", default=None, help="passed to scimpute-dask (e.g. 4GB)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where to write inputs and outputs (default: a temporary directory)")
    args = p.parse_args()

    have_scimpute = _have_scimpute()
    if not have_scimpute:
        print("scimpute (the original) is not installed; timing scimpute-dask only. "
              f"Install it with:\n  {INSTALL_HINT}", flush=True)
    env = dict(os.environ, MPLBACKEND="Agg")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.workdir or Path(tmp)
        for n_query in args.query_cells:
            work = base / f"q{n_query}"
            shutil.rmtree(work, ignore_errors=True)  # outputs and hidden partial runs
            work.mkdir(parents=True)
            t0 = time.perf_counter()
            paths = _in_spawned(_generate, work, n_query, args.reference_cells, args.genes,
                                args.panel, args.types)
            print(f"\n== {n_query:,} query cells × {args.reference_cells:,} reference cells, "
                  f"{args.genes:,} genes, panel {args.panel}, {args.types} clusters "
                  f"(generated in {time.perf_counter() - t0:.0f} s)", flush=True)

            theirs_t = theirs_rss = agree = None
            if have_scimpute:
                theirs_out = work / "out_scimpute"
                cmd = [sys.executable, "-c", SCIMPUTE_CALL, str(paths["query"]),
                       str(paths["reference"]), str(paths["identities"]), str(theirs_out),
                       str(args.k), str(args.scimpute_chunk_size)]
                print(f"$ python -c 'scimpute.expression_imputation(query, reference, "
                      f"identities, 0, outdir={theirs_out}, k_neighbors={args.k}, "
                      f"consider_clusters=True, save_chunks=False, "
                      f"chunk_size={args.scimpute_chunk_size})'", flush=True)
                theirs_t, theirs_rss = _run_measured(cmd, work / "scimpute.log", env)
                print(f"  scimpute:      {theirs_t:.1f} s, peak RSS {_fmt_mib(theirs_rss)}",
                      flush=True)

            ours_out = work / "out_scimpute_dask"
            cmd = [sys.executable, "-m", "scimpute_dask.cli", "run", "--query", str(paths["query"]),
                   "--reference", str(paths["reference"]),
                   "--identities", str(paths["identities"]), "--name-column", "0",
                   "--out", str(ours_out), "--k", str(args.k), "--quiet"]
            cmd += ["--memory-limit", args.memory_limit] if args.memory_limit else []
            print("$", " ".join(cmd), flush=True)
            ours_t, ours_rss = _run_measured(cmd, work / "scimpute_dask.log", env)
            print(f"  scimpute-dask: {ours_t:.1f} s, peak RSS {_fmt_mib(ours_rss)}", flush=True)

            if have_scimpute:
                agree = _in_spawned(_compare, ours_out, theirs_out, paths["reference"])
                _report_agreement(agree)
            rows.append((n_query, theirs_t, theirs_rss, ours_t, ours_rss, agree))

    print("\n| query cells | scimpute time | scimpute peak RSS | scimpute-dask time | peak RSS "
          "| speed-up | identical neighbour sets (%) | max \\|Δ\\| imputed |\n"
          "|---|---|---|---|---|---|---|---|")
    for n_query, theirs_t, theirs_rss, ours_t, ours_rss, agree in rows:
        speedup = f"{theirs_t / ours_t:.1f}×" if theirs_t is not None else "—"
        same = (f"{100 * agree['same_sets'] / max(agree['query_cells'][2], 1):.2f}"
                if agree else "—")
        maxd = "—"
        if agree:
            maxd = f"{agree['max_abs_diff']:.4g}"
            if agree["same_set_max_abs_diff"] != agree["max_abs_diff"]:
                maxd += f" ({agree['same_set_max_abs_diff']:.4g} on identical sets)"
        print(f"| {n_query:,} | {_fmt_s(theirs_t)} | {_fmt_mib(theirs_rss)} | {_fmt_s(ours_t)} "
              f"| {_fmt_mib(ours_rss)} | {speedup} | {same} | {maxd} |")
    if not have_scimpute:
        print(f"\nscimpute not installed; to compare, run: {INSTALL_HINT}")


if __name__ == "__main__":
    main()
