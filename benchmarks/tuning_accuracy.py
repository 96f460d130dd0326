"""Held-out accuracy of the tuned mode against fixed settings, same and cross technology.

For each pair and fold seed, the shared genes are split into 10 seeded folds
(Li et al. 2022's protocol); every method imputes each fold's genes from
neighbours found on the other 90 % and is scored by the mean over genes of
the per-gene Pearson (raw values, and log1p values) against the measured
values — :func:`scimpute_dask.cross_validate`, the same folds and cells for
every method:

- ``scimpute``: scimpute's defaults (no transform, cosine+1, k = 25);
- ``recommended``: the README's old recommended setting (zscore, softmax
  T = 0.1, k = 50);
- ``tuned``: ``validate --tune`` — inside each outer fold, the setting is
  chosen by an inner validation on that fold's training genes alone
  (``--tune-metric`` pearson; ``tuned (log)`` maximises log1p Pearson);
- ``hindsight``: the best fixed setting of the tuner's grid chosen on the
  test folds themselves (its outer-fold score over all shared genes) — an
  upper bound no honest method can use.

Pairs: the Molecular Cartography sections (``../shared/data/mc_cortex``),
A1 → A2 and A2 → A1 (query → reference... the first named is the reference),
and the synthetic cross-technology pair
(:func:`scimpute_dask.synthetic.make_cross_technology_pair`: gene-specific
capture, saturating detection, ambient background). Each method runs in its
own child process: its wall time and peak RSS are printed beside its scores.

    python benchmarks/tuning_accuracy.py                       # everything (~45 min)
    python benchmarks/tuning_accuracy.py --pairs A1-A2 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mc_cortex"
SCIMPUTE = {"k": 25, "normalize": "none", "weighting": "cosine+1", "temperature": 0.1}
RECOMMENDED = {"k": 50, "normalize": "zscore", "weighting": "softmax", "temperature": 0.1}
METHODS = ("scimpute", "recommended", "tuned", "tuned (log)", "hindsight")
FOLDS = 10


def _pair(name: str):
    import pandas as pd

    if name == "cross-tech":
        from scimpute_dask.synthetic import make_cross_technology_pair

        pair = make_cross_technology_pair(seed=0)
        return pair.query, pair.reference
    reference, query = name.split("-")

    def load(section):
        frame = pd.read_csv(DATA / section / "matrix.csv", index_col=0)
        frame.index = section + "_" + frame.index.astype(str)
        return frame.astype("float64")

    return load(query), load(reference)


def _job(job: dict) -> dict:
    """One method on one pair and fold seed, in this (child) process."""
    from scimpute_dask import cross_validate
    from scimpute_dask.tools.tune import tune

    query, reference = _pair(job["pair"])
    clock = time.perf_counter()
    options = {"scimpute": SCIMPUTE, "recommended": RECOMMENDED, "tuned": {"tune": True},
               "tuned (log)": {"tune": True, "tune_metric": "log_pearson"}}.get(job["method"])
    extra = {}
    if job["method"] == "hindsight":
        genes = list(query.columns)
        found = tune(query[genes].to_numpy(), reference[genes].to_numpy(), folds=FOLDS,
                     seed=job["seed"])
        options = {k: v for k, v in found.best.items()}
        extra["setting"] = options
    with tempfile.TemporaryDirectory() as tmp:
        result = cross_validate(query, reference, Path(tmp) / "cv", folds=FOLDS,
                                seed=job["seed"], reliability=False, plot=False, **options)
    scores = result.mean_gene_scores
    return {**job, **extra, "pearson": scores["pearson"], "log_pearson": scores["log_pearson"],
            "seconds": round(time.perf_counter() - clock, 1),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "tuning": result.tuning}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["A1-A2", "A2-A1", "cross-tech"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--json", type=Path, help="also append every result to this file")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(_job(json.loads(args.job))))
        return
    rows = []
    for pair in args.pairs:
        for seed in args.seeds:
            for method in args.methods:
                job = {"pair": pair, "seed": seed, "method": method}
                done = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)],
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{job} failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{pair:10} seed {seed} {method:12} pearson {row['pearson']:.4f} "
                      f"log1p {row['log_pearson']:.4f}  {row['seconds']:7.1f} s "
                      f"{row['peak_mib']:5d} MiB", flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    print("\nmean ± sd over fold seeds (mean per-gene Pearson; log1p Pearson; time; peak RSS)")
    print("| pair | method | Pearson | log1p Pearson | time (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for pair in args.pairs:
        for method in args.methods:
            sel = [r for r in rows if r["pair"] == pair and r["method"] == method]
            if not sel:
                continue

            def fmt(key, sel=sel):
                values = [r[key] for r in sel]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):.3f} ± {sd:.3f}"

            print(f"| {pair} | {method} | {fmt('pearson')} | {fmt('log_pearson')} | "
                  f"{statistics.mean(r['seconds'] for r in sel):.0f} | "
                  f"{max(r['peak_mib'] for r in sel)} |")


if __name__ == "__main__":
    main()
