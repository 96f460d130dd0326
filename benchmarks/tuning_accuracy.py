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
  (``--tune-metric`` pearson; ``tuned (log)`` maximises log1p Pearson),
  the blend with the linear model among the candidates;
- ``tuned kNN``: the same inner validations' best candidate of the
  neighbours alone (what tuning chose before the blend), imputed on the same
  outer folds; it comes with each ``tuned`` job (replayed, not re-tuned), and
  its tuning time is the same tuning's without the blend stage;
- ``hindsight``: the best fixed setting of the tuner's grid chosen on the
  test folds themselves (its outer-fold score over all shared genes) — an
  upper bound no honest method can use.

Pairs: the Molecular Cartography sections (``../shared/data/mc_cortex``),
A1 → A2 and A2 → A1 (query → reference... the first named is the reference),
and the synthetic cross-technology pair
(:func:`scimpute_dask.synthetic.make_cross_technology_pair`: gene-specific
capture, saturating detection, ambient background). Each method runs in its
own child process: its wall time, its tuning time (summed over the outer
folds) and peak RSS are printed beside its scores.

    python benchmarks/tuning_accuracy.py                       # everything (~45 min)
    python benchmarks/tuning_accuracy.py --pairs A1-A2 --seeds 0 --methods scimpute tuned
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
#: Rows each tuned job adds: the neighbours-only choice of the same tuning.
REPLAYED = {"tuned": "tuned kNN", "tuned (log)": "tuned kNN (log)"}
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


def _job(job: dict) -> list[dict]:
    """One method on one pair and fold seed, in this (child) process; a tuned method
    also gives its neighbours-only replay."""
    from scimpute_dask import cross_validate
    from scimpute_dask.tools import tune as tuning

    query, reference = _pair(job["pair"])
    clock = time.perf_counter()
    options = {"scimpute": SCIMPUTE, "recommended": RECOMMENDED, "tuned": {"tune": True},
               "tuned (log)": {"tune": True, "tune_metric": "log_pearson"}}.get(job["method"])
    extra = {}
    if job["method"] == "hindsight":
        genes = list(query.columns)
        found = tuning.tune(query[genes].to_numpy(), reference[genes].to_numpy(),
                            folds=job["folds"], seed=job["seed"])
        options = {k: v for k, v in found.best.items()}
        extra["setting"] = options
    captured, real = [], tuning.tune

    def capture(q, r, **kwargs):
        captured.append(real(q, r, **kwargs))
        return captured[-1]

    tuning.tune = capture
    rows = [{**job, **extra, **_validate(cross_validate, query, reference, job, options)}]
    rows[0]["seconds"] = round(time.perf_counter() - clock, 1)
    if captured:
        rows[0]["tune_s"] = round(sum(t.timings["total"] for t in captured), 1)
        replay = iter([t.neighbours_only() for t in captured])
        tuning.tune = lambda q, r, **kwargs: next(replay)
        rows.append({**job, "method": REPLAYED[job["method"]],
                     **_validate(cross_validate, query, reference, job, options),
                     "seconds": None, "tune_s": round(sum(
                         t.neighbours_only().timings["total"] for t in captured), 1)})
    for row in rows:
        row["peak_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return rows


def _validate(cross_validate, query, reference, job: dict, options: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = cross_validate(query, reference, Path(tmp) / "cv", folds=job["folds"],
                                seed=job["seed"], reliability=False, plot=False, **options)
    scores = result.mean_gene_scores
    return {"pearson": scores["pearson"], "log_pearson": scores["log_pearson"],
            "tuning": result.tuning}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["A1-A2", "A2-A1", "cross-tech"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--folds", type=int, default=FOLDS,
                        help="outer gene folds (Li et al.: 10; benchmarks/accuracy.py's "
                             "Tangram runs: 5)")
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
                job = {"pair": pair, "seed": seed, "method": method, "folds": args.folds}
                done = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)],
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{job} failed:\n{done.stderr[-3000:]}")
                for row in json.loads(done.stdout.strip().splitlines()[-1]):
                    rows.append(row)
                    seconds = "" if row["seconds"] is None else f"{row['seconds']:7.1f} s"
                    tune_s = f"tuning {row['tune_s']:6.1f} s" if "tune_s" in row else ""
                    print(f"{pair:10} seed {seed} {row['method']:16} pearson "
                          f"{row['pearson']:.4f} log1p {row['log_pearson']:.4f}  {seconds:>9} "
                          f"{tune_s:>15} {row['peak_mib']:5d} MiB", flush=True)
                    if args.json:
                        with open(args.json, "a") as fh:
                            fh.write(json.dumps(row) + "\n")
    print("\nmean ± sd over fold seeds (mean per-gene Pearson; log1p Pearson; time; tuning "
          "time; peak RSS)")
    print("| pair | method | Pearson | log1p Pearson | time (s) | tuning (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    methods = [m for method in args.methods for m in (method, REPLAYED.get(method)) if m]
    for pair in args.pairs:
        for method in methods:
            sel = [r for r in rows if r["pair"] == pair and r["method"] == method]
            if not sel:
                continue

            def fmt(key, sel=sel):
                values = [r[key] for r in sel]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):.3f} ± {sd:.3f}"

            seconds = [r["seconds"] for r in sel if r["seconds"] is not None]
            tune_s = [r["tune_s"] for r in sel if "tune_s" in r]
            print(f"| {pair} | {method} | {fmt('pearson')} | {fmt('log_pearson')} | "
                  f"{f'{statistics.mean(seconds):.0f}' if seconds else '–'} | "
                  f"{f'{statistics.mean(tune_s):.0f}' if tune_s else '–'} | "
                  f"{max(r['peak_mib'] for r in sel)} |")


if __name__ == "__main__":
    main()
