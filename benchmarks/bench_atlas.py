"""Atlas scale: a sparse reference atlas and a wide-panel section, ``approx`` against ``exact``.

Generates, block by block in a child process
(:func:`scimpute_dask.synthetic.write_atlas_pair`), a reference atlas as a
CSR ``.h5ad`` (hierarchical cell types: classes, subclasses, types; shared
activity programmes; multinomial counts of per-cell mixtures with log-normal
library sizes, ~5 % non-zero at 20,000 genes) and a spatial section of the
same types measured on a panel (binomial capture), keeping the full
transcriptome of a seeded sample of section cells as the truth. Then:

1. the whole run, ``scimpute-dask run --search approx --impute-genes
   unmeasured --tsv-genes none`` (every gene the panel left out imputed into
   ``adata.zarr``), conversion included: time and peak RSS per stage
   (sampled from outside), the disk it took, the lists and probes chosen and
   the recall the run measured;
2. the sampled cells alone with ``--search exact`` (same settings, reading the
   reference converted in 1): its kNN time, projected to the whole section
   (the exact search's cost is linear in query cells), beside the run's own
   check-stage projection;
3. on the sampled cells: recall@k of the approximate neighbours against the
   exact ones, and the held-out accuracy of both (Pearson per unmeasured gene
   of ``log1p`` imputed vs ``log1p`` of the true counts per 10,000, over the
   sampled cells; genes constant in the truth left out).

Example (the figures quoted in the README)::

    python benchmarks/bench_atlas.py --reference-cells 200000 --query-cells 40000 \\
        --genes 20000 --panel 5000 --memory-limit 8GB --workdir /tmp/atlas
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import zarr
from measure import in_child, run_sampled
from scipy import sparse

from scimpute_dask.engine.search import exact_seconds
from scimpute_dask.synthetic import write_atlas_pair


def _generate(work: Path, args: argparse.Namespace) -> None:
    write_atlas_pair(work, args.reference_cells, args.query_cells, args.genes, args.panel,
                     args.truth_cells, seed=args.seed)


def _du(path: Path) -> float:
    """GiB of the files under ``path``, each hard-linked file once (``adata.zarr``'s ``X``
    links the imputation store's chunks)."""
    sizes = {(s.st_dev, s.st_ino): s.st_size
             for s in (f.stat() for f in path.rglob("*") if f.is_file())}
    return sum(sizes.values()) / 2**30


def _run(args: argparse.Namespace, query: Path, reference: Path, out: Path, search: str,
         work: Path) -> tuple[dict, float, dict, float, float]:
    cmd = [sys.executable, "-m", "scimpute_dask.cli", "run", "--query", str(query),
           "--reference", str(reference), "--out", str(out), "--search", search,
           "--recall", str(args.recall), "--k", str(args.k), "--impute-genes", "unmeasured",
           "--tsv-genes", "none", "--no-report", "--no-clusters", "--memory-limit",
           args.memory_limit, "--restart", "--verbose"]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    peak, stage_peaks, disk = run_sampled(cmd, disk=work)
    wall = time.perf_counter() - start
    record = json.loads((out / "run.json").read_text())
    return record, peak, stage_peaks, disk, wall


def _pearson_per_gene(imputed: np.ndarray, truth: np.ndarray) -> np.ndarray:
    a = imputed - imputed.mean(axis=0)
    b = truth - truth.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    keep = (b * b).sum(axis=0) > 0
    return (a * b).sum(axis=0)[keep] / np.where(denom[keep] > 0, denom[keep], np.inf)


def _imputed_rows(out: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(out / "zarr" / "imputed.zarr", mode="r")
    values = group["X"].get_orthogonal_selection((rows, slice(None)))
    return (np.asarray(values, dtype=np.float64),
            np.asarray(group["var_names"][:], dtype=object).astype(str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-cells", type=int, default=200_000)
    p.add_argument("--query-cells", type=int, default=40_000)
    p.add_argument("--genes", type=int, default=20_000, help="reference genes")
    p.add_argument("--panel", type=int, default=5_000, help="genes the section measured")
    p.add_argument("--truth-cells", type=int, default=2_000,
                   help="section cells compared with the exact search and the truth")
    p.add_argument("--k", type=int, default=25)
    p.add_argument("--recall", type=float, default=0.95)
    p.add_argument("--memory-limit", default="8GB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, required=True,
                   help="where the data and runs go (its disk is measured)")
    p.add_argument("--keep", action="store_true", help="keep the data and the runs")
    args = p.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    in_child(_generate, work, args)
    inputs = {name: _du(work / name) if (work / name).is_dir() else
              (work / name).stat().st_size / 2**30 for name in ("reference.h5ad", "query.h5ad")}
    print(f"generated in {time.perf_counter() - start:.0f} s: reference.h5ad "
          f"{inputs['reference.h5ad']:.2f} GiB, query.h5ad {inputs['query.h5ad']:.2f} GiB",
          flush=True)

    out = work / "approx"
    record, peak, stage_peaks, disk, wall = _run(args, work / "query.h5ad",
                                                 work / "reference.h5ad", out, "approx", work)
    search = record["search"]
    print(f"approx run: {wall:.0f} s, peak RSS {peak / 1024:.2f} GiB, disk taken "
          f"{disk:.1f} GiB (output {_du(out):.1f} GiB); {search['probes']} of "
          f"{search['lists']} lists, recall@{args.k} {search['recall_at_k']} on "
          f"{search['sample_cells']} cells (chosen in {search['seconds']:.0f} s)", flush=True)
    for stage, seconds in record["timings_s"].items():
        sampled = stage_peaks.get(stage)
        print(f"  {stage:<8} {seconds:8.1f} s" + (f"   peak {sampled / 1024:.2f} GiB"
                                                   if sampled else ""))

    # the sampled cells alone, exact, against the reference the approx run converted
    converted = out / "zarr" / "reference.zarr"
    exact_out = work / "exact_sample"
    e_record, e_peak, _, _, e_wall = _run(
        args, work / "query_truth.h5ad",
        converted if converted.exists() else work / "reference.h5ad", exact_out, "exact", work)
    cells = np.load(work / "truth_cells.npy")
    exact_knn = e_record["timings_s"]["knn"]
    projected = exact_knn * args.query_cells / len(cells)
    approx_knn = record["timings_s"]["knn"]
    # what a run's check stage projects for the exact search of the whole section
    check = exact_seconds(args.query_cells, args.reference_cells, args.panel)
    print(f"exact on {len(cells):,} sampled cells: kNN {exact_knn:.1f} s (run {e_wall:.0f} s, "
          f"peak {e_peak / 1024:.2f} GiB); projected to {args.query_cells:,} cells: "
          f"{projected / 60:.1f} min (the check stage's projection: {check / 60:.1f} min); "
          f"approx kNN {approx_knn:.0f} s: {projected / approx_knn:.1f}× faster", flush=True)

    a_idx = zarr.open_group(out / "zarr" / "neighbors.zarr", mode="r")["indices"]
    a_idx = a_idx.get_orthogonal_selection((cells, slice(None)))
    e_idx = zarr.open_group(exact_out / "zarr" / "neighbors.zarr", mode="r")["indices"][:]
    hits = (e_idx[:, :, None] == a_idx[:, None, :]).any(axis=2) & (e_idx >= 0)
    recall = hits.sum(axis=1) / np.maximum((e_idx >= 0).sum(axis=1), 1)

    truth = sparse.load_npz(work / "truth.npz").tocsr()
    per_10k = sparse.diags(1e4 / np.maximum(1, np.asarray(truth.sum(axis=1)).ravel())) @ truth
    approx_values, genes = _imputed_rows(out, cells)
    exact_values, exact_genes = _imputed_rows(exact_out, np.arange(len(cells)))
    assert (genes == exact_genes).all()
    columns = np.array([int(g[len("gene"):]) for g in genes])
    truth_log = np.log1p(per_10k[:, columns].toarray())
    r_approx = _pearson_per_gene(np.log1p(approx_values), truth_log)
    r_exact = _pearson_per_gene(np.log1p(exact_values), truth_log)
    print(f"on the {len(cells):,} sampled cells: recall@{args.k} {recall.mean():.4f} "
          f"(min {recall.min():.2f}); held-out Pearson per gene ({len(r_exact):,} genes): "
          f"approx {np.nanmean(r_approx):.4f}, exact {np.nanmean(r_exact):.4f}, "
          f"difference {np.nanmean(r_approx) - np.nanmean(r_exact):+.4f}")

    t = record["timings_s"]
    print(f"\n| reference | section | panel | convert | kNN | impute | export | total "
          f"| peak RSS | disk | lists (probes) | recall@{args.k} | Pearson approx / exact "
          f"| exact kNN projected |")
    print("|---" * 14 + "|")
    print(f"| {args.reference_cells:,} × {args.genes:,} | {args.query_cells:,} "
          f"| {args.panel:,} | {t['convert']:.0f} s | {t['knn']:.0f} s | {t['impute']:.0f} s "
          f"| {t['export']:.0f} s | {wall:.0f} s | {peak / 1024:.2f} GiB | {disk:.1f} GiB "
          f"| {search['lists']} ({search['probes']}) | {recall.mean():.3f} "
          f"| {np.nanmean(r_approx):.4f} / {np.nanmean(r_exact):.4f} "
          f"| {projected / 60:.1f} min ({projected / approx_knn:.1f}×) |")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
