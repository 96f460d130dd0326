"""Held-out accuracy on real data: scimpute's defaults, a tuned setting, and Tangram.

On the Molecular Cartography mouse-cortex sections (``../shared/data/mc_cortex``)
one section is the reference and the other the query; the 100 shared genes
are split into 5 seeded folds, and every method imputes each fold's genes
from the other 80, on the same folds and scored on the same cells
(:func:`scimpute_dask.cross_validate`, :mod:`scimpute_dask.metrics`):

1. a sweep over ``normalize`` × ``weighting`` × ``k`` on the *selection*
   direction (A1 → A2) picks the recommended setting (best mean per-gene
   Pearson);
2. scimpute's defaults and that setting are then scored on both directions —
   the reverse (A2 → A1) was not used for the choice;
3. Tangram (``tangram-sc``, cells mode, CPU) on the same folds, when it is
   importable: install it in a separate environment, never as a project
   dependency, e.g. ``python3 -m venv --system-site-packages /tmp/benchenv &&
   /tmp/benchenv/bin/pip install torch==2.13.0 tangram-sc`` and run this
   script with that Python.

Each method runs in its own child process; the table gives its wall time and
its own peak RSS. Also printed: the reliability calibration (Spearman of the
neighbours' agreement against the held-out Pearson of the shared genes) and
the self-imputation dropout benchmark (DeepImpute's protocol) on the
reference section.

Example (the figures quoted in the README)::

    /tmp/benchenv/bin/python benchmarks/accuracy.py --tangram-epochs 200
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mc_cortex"
DEFAULT = {"k": 25, "normalize": "none", "weighting": "cosine+1", "temperature": 0.1}
SWEEP = {
    "k": [10, 25, 50],
    "normalize": ["none", "log1p_cpm", "scale", "zscore"],  # "cpm" finds those of "none"
    "weighting": [("cosine+1", 0.05), ("cosine", 0.05), ("uniform", 0.05), ("softmax", 0.01),
                  ("softmax", 0.05), ("softmax", 0.1)],
}


# --------------------------------------------------------------------------- #
# Children: each does one job and prints one JSON line
# --------------------------------------------------------------------------- #
def _load(section: str):
    import pandas as pd

    frame = pd.read_csv(DATA / section / "matrix.csv", index_col=0)
    frame.index = section + "_" + frame.index.astype(str)
    return frame


def _engine(job: dict) -> dict:
    import numpy as np

    from scimpute_dask import cross_validate
    from scimpute_dask.validate import calibration_quality

    ref, query = _load(job["reference"]), _load(job["query"])
    start = time.perf_counter()
    res = cross_validate(query, ref, job["out"], folds=job["folds"], seed=job["seed"],
                         reliability=False, plot=False, **job["setting"])
    seconds = time.perf_counter() - start
    g = res.genes
    return {"seconds": seconds, "pearson_mean": float(np.nanmean(g["pearson"])),
            "pearson_median": float(np.nanmedian(g["pearson"])),
            "spearman_median": float(np.nanmedian(g["spearman"])),
            "css_median": float(np.nanmedian(g["css"])),
            "rmse_median": float(np.nanmedian(g["rmse"])),
            "cell_css_median": float(np.nanmedian(res.cells["css"])),
            "calibration_spearman": calibration_quality(g)}


def _sweep(job: dict) -> dict:
    rows = []
    for k in SWEEP["k"]:
        for normalize in SWEEP["normalize"]:
            for weighting, temperature in SWEEP["weighting"]:
                setting = {"k": k, "normalize": normalize, "weighting": weighting,
                           "temperature": temperature}
                with tempfile.TemporaryDirectory() as tmp:
                    result = _engine({**job, "setting": setting, "out": tmp})
                rows.append({"setting": setting, **result})
    return {"rows": rows}


def _tangram(job: dict) -> dict:
    import anndata
    import numpy as np
    import pandas as pd
    import tangram as tg
    import torch

    from scimpute_dask.metrics import paired_scores

    torch.manual_seed(0)
    ref, query = _load(job["reference"]), _load(job["query"])
    genes = pd.read_csv(Path(job["folds_from"]) / "genes.tsv", sep="\t")
    cells = pd.read_csv(Path(job["folds_from"]) / "cells.tsv", sep="\t", index_col=0)
    scored = cells.notna().all(axis=1).to_numpy()  # the cells the engine scored
    pred = pd.DataFrame(np.nan, index=query.index, columns=genes["gene"])
    start = time.perf_counter()
    for f in sorted(genes["fold"].unique()):
        test = list(genes.loc[genes["fold"] == f, "gene"])
        train = [g for g in ref.columns if g in set(query.columns) and g not in set(test)]
        sc = anndata.AnnData(ref.to_numpy(np.float32), obs=pd.DataFrame(index=ref.index),
                             var=pd.DataFrame(index=ref.columns))
        sp = anndata.AnnData(query[train].to_numpy(np.float32),
                             obs=pd.DataFrame(index=query.index), var=pd.DataFrame(index=train))
        tg.pp_adatas(sc, sp, genes=train)
        mapping = tg.map_cells_to_space(sc, sp, mode="cells", device="cpu",
                                        num_epochs=job["epochs"], verbose=False)
        projected = tg.project_genes(mapping, sc)  # Tangram lower-cases gene names
        pred[test] = np.asarray(projected[:, [g.lower() for g in test]].X)
    seconds = time.perf_counter() - start
    s = paired_scores(query.loc[scored, pred.columns].to_numpy(), pred[scored].to_numpy(), axis=0)
    c = paired_scores(query.loc[scored, pred.columns].to_numpy(), pred[scored].to_numpy(), axis=1)
    return {"seconds": seconds, "pearson_mean": float(np.nanmean(s[:, 1])),
            "pearson_median": float(np.nanmedian(s[:, 1])),
            "spearman_median": float(np.nanmedian(s[:, 2])),
            "css_median": float(np.nanmedian(s[:, 0])),
            "rmse_median": float(np.nanmedian(s[:, 4])),
            "cell_css_median": float(np.nanmedian(c[:, 0]))}


def _dropout(job: dict) -> dict:
    import numpy as np

    from scimpute_dask.selfimpute import dropout_recovery

    ref = _load(job["reference"])
    out = {}
    for name, data in (("counts", ref), ("log1p", np.log1p(ref))):
        for label, setting in (("default", DEFAULT), ("recommended", job["setting"])):
            start = time.perf_counter()
            out[f"{name} {label}"] = {**dropout_recovery(data, fraction=0.1, seed=job["seed"],
                                                         **setting),
                                      "seconds": time.perf_counter() - start}
    return out


CHILDREN = {"engine": _engine, "sweep": _sweep, "tangram": _tangram, "dropout": _dropout}


# --------------------------------------------------------------------------- #
# Parent: stays small (no NumPy) so that the children's peak RSS is their own
# --------------------------------------------------------------------------- #
def _child(kind: str, job: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{kind} child failed: {cmd}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mib": usage.ru_maxrss / 1024}


def _label(setting: dict) -> str:
    w = setting["weighting"]
    if w == "softmax":
        w += f" T={setting['temperature']}"
    return f"k={setting['k']}, {setting['normalize']}, {w}"


def _row(direction: str, method: str, r: dict) -> str:
    return (f"| {direction} | {method} | {r['pearson_median']:.3f} | {r['pearson_mean']:.3f} | "
            f"{r['spearman_median']:.3f} | {r['css_median']:.3f} | {r['rmse_median']:.2f} | "
            f"{r['cell_css_median']:.3f} | {r['seconds']:.1f} s | {r['peak_mib']:.0f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tangram-epochs", type=int, default=1000,
                        help="Tangram training epochs per fold (its default: 1000)")
    parser.add_argument("--no-tangram", action="store_true")
    parser.add_argument("--tangram-reverse", action="store_true",
                        help="also run Tangram on A2 -> A1 (doubles the longest part)")
    parser.add_argument("--out", default=None, help="keep the per-gene tables here")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="accuracy_"))
    base = {"folds": args.folds, "seed": args.seed}

    print(f"sweep on A1 -> A2 ({len(SWEEP['k']) * len(SWEEP['normalize'])}"
          f" × {len(SWEEP['weighting'])} settings, {args.folds}-fold held-out genes)")
    sweep = _child("sweep", {**base, "reference": "A1", "query": "A2"})["rows"]
    sweep.sort(key=lambda r: -r["pearson_mean"])
    for r in sweep:
        print(f"  {_label(r['setting']):<40} mean per-gene Pearson {r['pearson_mean']:.3f}  "
              f"median {r['pearson_median']:.3f}  ({r['seconds']:.1f} s)")
    best = sweep[0]["setting"]
    print(f"recommended: {_label(best)}")

    table = []
    tangram = not args.no_tangram and importlib.util.find_spec("tangram") is not None
    if not args.no_tangram and not tangram:
        print("Tangram skipped: tangram-sc is not importable by this Python (see the docstring)")
    for ref, query in (("A1", "A2"), ("A2", "A1")):
        direction = f"{ref} → {query}"
        runs = {}
        for method, setting in (("scimpute defaults", DEFAULT), ("recommended", best)):
            target = out / f"{ref}_{query}_{method.split()[0]}"
            runs[method] = _child("engine", {**base, "reference": ref, "query": query,
                                             "setting": setting, "out": str(target)})
            table.append(_row(direction, f"{method} ({_label(setting)})", runs[method]))
            print(table[-1], flush=True)
        print(f"  reliability calibration ({direction}, recommended): Spearman "
              f"{runs['recommended']['calibration_spearman']:.3f}")
        if tangram and (ref == "A1" or args.tangram_reverse):
            r = _child("tangram", {**base, "reference": ref, "query": query,
                                   "epochs": args.tangram_epochs,
                                   "folds_from": str(out / f"{ref}_{query}_scimpute")})
            table.append(_row(direction, f"Tangram (cells mode, {args.tangram_epochs} epochs, "
                                         "CPU)", r))
            print(table[-1], flush=True)

    print("\n| direction | method | per-gene Pearson (median) | (mean) | Spearman (median) | "
          "CSS (median) | RMSE (median) | per-cell CSS (median) | time | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))

    drop = _child("dropout", {**base, "reference": "A1", "setting": best})
    print("\nself-imputation of A1, 10 % of the non-zero entries masked (seed "
          f"{args.seed}), scored on the masked entries:")
    for name, r in drop.items():
        if name == "peak_mib":
            continue
        print(f"  {name:<20} Pearson {r['pearson']:.3f} (cell mean {r['cell_mean_pearson']:.3f})"
              f"  MSE {r['mse']:.3g} (cell mean {r['cell_mean_mse']:.3g})  {r['seconds']:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))))
    else:
        main()
