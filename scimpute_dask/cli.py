"""The ``scimpute-dask`` command: ``run``, ``validate``, ``transfer``, ``convert``, ``demo``.

The options of ``run`` and ``validate`` come from their declarations in
:mod:`scimpute_dask.config`; values arrive as typed and are validated there,
so a refusal quotes them. Every error a user can cause ends as
``scimpute-dask: error: …`` and exit code 2, never a traceback. Heavy
libraries are imported by the command that needs them, so ``--help`` is
instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from scimpute_dask import __version__
from scimpute_dask.config import (
    LAYOUTS,
    OPTIONS,
    RUN_OPTIONS,
    TUNE_OPTIONS,
    VALIDATE_OPTIONS,
    Interval,
    RunConfig,
    add_cli_options,
)
from scimpute_dask.errors import InputError

#: The options of each command that take part in the configuration (the rest of
#: RUN_OPTIONS/VALIDATE_OPTIONS are Python-only or set by the command itself).
_RUN = RUN_OPTIONS
_VALIDATE = tuple(o for o in VALIDATE_OPTIONS if o != "consider_clusters")
_TUNE = tuple(o for o in TUNE_OPTIONS if o != "consider_clusters")


def _add_common(p: argparse.ArgumentParser) -> None:
    level = p.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bars, only warnings and errors")
    level.add_argument("-v", "--verbose", action="store_true",
                       help="also log block sizes, stage timings and peak memory")


def _add_pair(p: argparse.ArgumentParser, identities_help: str) -> None:
    """The inputs and output of the commands that study a pair (validate, tune)."""
    p.add_argument("--query", required=True, metavar="PATH",
                   help="spatial matrix (same forms as for run)")
    p.add_argument("--reference", required=True, metavar="PATH",
                   help="single-cell matrix (same forms as for run)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--identities", metavar="TSV", help=identities_help)


def build_parser() -> argparse.ArgumentParser:
    """The ``scimpute-dask`` command line, its options declared once in
    :data:`scimpute_dask.config.OPTIONS`; the documentation's CLI reference is
    generated from it."""
    parser = argparse.ArgumentParser(
        prog="scimpute-dask",
        description="Out-of-core gene-expression imputation for spatial transcriptomics "
        "(a Dask re-implementation of scimpute).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="impute the reference genes for every query cell",
        description="Find each query cell's k most cosine-similar reference cells on the shared "
        "genes and write the similarity-weighted mean of their profiles, plus scimpute's "
        "sim_matrix.tsv, scores.txt, stats.txt and histogram, and the Zarr stores.",
    )
    run.add_argument("--query", required=True, metavar="PATH",
                     help="spatial matrix to impute for (.tsv/.csv, plain or .gz/.bz2/.xz/.zst; "
                     ".h5ad; AnnData-Zarr; .zarr; 10x matrix.mtx directory; a path, or an "
                     "fsspec URL such as s3://bucket/query.zarr)")
    run.add_argument("--reference", required=True, metavar="PATH",
                     help="single-cell matrix to impute from (same forms as --query)")
    run.add_argument("--identities", metavar="TSV",
                     help="cell identity table with an 'id' cluster column for the cells of both "
                     "datasets (required unless --no-clusters or --cluster-key)")
    run.add_argument("--out", required=True, metavar="DIR",
                     help="output directory: a path, or an fsspec URL (s3://bucket/run) that "
                     "cluster workers write to directly")
    add_cli_options(run, _RUN)
    _add_common(run)

    conv = sub.add_parser(
        "convert", help="convert an expression matrix to a chunked Zarr store",
        description="Stream a text matrix (plain or compressed), .h5ad, AnnData-Zarr store or "
        "10x directory into a cells × genes float32 Zarr store. An interrupted conversion "
        "resumes when rerun; a finished one is reused.",
    )
    conv.add_argument("input", metavar="IN", help="matrix file (.tsv/.txt/.csv, plain or "
                      ".gz/.bz2/.xz/.zst; .h5ad), AnnData-Zarr store or 10x matrix.mtx "
                      "directory")
    conv.add_argument("output", metavar="OUT.zarr",
                      help="Zarr store to write: a path or an fsspec URL (s3://bucket/x.zarr)")
    conv.add_argument("--layout", choices=LAYOUTS, default="genes_x_cells",
                      help=OPTIONS["query_layout"].help.replace("a text query", "a text input"))
    conv.add_argument("--sep", default=None,
                      help="field separator (default: ',' for .csv, tab otherwise)")
    add_cli_options(conv, ("layer", "restart", "memory_limit"))
    _add_common(conv)

    val = sub.add_parser(
        "validate", help="held-out accuracy: k-fold cross-validation over the shared genes",
        description="Split the shared genes into folds; for each fold find the neighbours on "
        "the other shared genes only, impute the fold's genes and score them against their "
        "measured values (CSS, Pearson, Spearman, MSE, RMSE per gene and per cell). Writes "
        "genes.tsv, cells.tsv, summary.tsv, reliability.tsv (predicted accuracy of every "
        "reference gene) and genes_vs_sparsity.png.",
    )
    _add_pair(val, "restrict neighbours to the query cell's cluster (the clustering must not "
              "have used the held-out genes)")
    add_cli_options(val, _VALIDATE)
    _add_common(val)

    tn = sub.add_parser(
        "tune", help="choose the search and averaging settings by held-out validation",
        description="Split the shared genes into folds; for every candidate setting (search "
        "transform, k, weighting and temperature, averaging space) impute each fold's genes "
        "from neighbours found on the others and score them; write every candidate's score "
        "(tuning.tsv), the winner (tuning.json) and a heat map (tuning.png). 'run --tune' "
        "does this and then runs with the winner.",
    )
    _add_pair(tn, "restrict neighbours to the query cell's cluster, as the run will")
    add_cli_options(tn, _TUNE)
    _add_common(tn)

    tr = sub.add_parser(
        "transfer", help="label each query cell of a finished run by its neighbours' vote",
        description="Project reference labels (clusters, cell types) onto the query cells of a "
        "finished run: the label with the largest share of the neighbours' weight wins, and "
        "that share is the confidence. Writes cell, label, confidence as TSV.",
    )
    tr.add_argument("--run", required=True, metavar="DIR", help="output directory of a run")
    tr.add_argument("--labels", required=True, metavar="TSV",
                    help="table with a column named 'id' holding each reference cell's label "
                    "(an identity table works)")
    add_cli_options(tr, ("cell_name_column_idx",))
    tr.add_argument("--out", required=True, metavar="TSV", help="file to write")
    _add_common(tr)

    demo = sub.add_parser(
        "demo", help="simulate a realistic spatial/single-cell pair and impute it",
        description="Simulate cell types, negative-binomial counts and a spatial panel (a subset "
        "of the reference genes), write them as scimpute TSVs and run the whole pipeline; "
        "reports the accuracy on the genes the panel did not measure.",
    )
    demo.add_argument("--out", default="demo_output", metavar="DIR",
                      help="directory for the inputs and the results (default demo_output)")
    for flag, default, what in (("--query-cells", 2000, "spatial cells"),
                                ("--reference-cells", 1500, "reference cells"),
                                ("--genes", 1000, "reference genes"),
                                ("--panel", 100, "genes the spatial panel measures")):
        demo.add_argument(flag, default=str(default), metavar="N",
                          help=f"{what} to simulate (default {default})")
    add_cli_options(demo, ("k", "seed", "scheduler"))
    _add_common(demo)
    return parser


def _report(result) -> None:
    print(result)
    print("scimpute validation score (cosine of imputed vs measured shared genes):")
    for name, value in result.stats.items():
        print(f"  {name}: {value:.4f}")


def _run(args: argparse.Namespace) -> None:
    from scimpute_dask.pipeline import run

    config = RunConfig.from_cli(args, _RUN)
    _report(run(args.query, args.reference, args.identities, args.out, config))


def _validate(args: argparse.Namespace) -> None:
    from scimpute_dask.tools.validate import cross_validate

    config = RunConfig.from_cli(args, _VALIDATE)
    result = cross_validate(
        args.query, args.reference, args.out, identities=args.identities,
        consider_clusters=args.identities is not None,
        **{name: getattr(config, name) for name in _VALIDATE},
    )
    print(result)


def _tune(args: argparse.Namespace) -> None:
    from scimpute_dask.tools.tune import tune_inputs

    config = RunConfig.from_cli(args, _TUNE)
    print(tune_inputs(args.query, args.reference, args.out, identities=args.identities,
                      consider_clusters=args.identities is not None,
                      **{name: getattr(config, name) for name in _TUNE}))
    print(f"  table        {args.out}/tuning.tsv\n  winner       {args.out}/tuning.json")


def _transfer(args: argparse.Namespace) -> None:
    from scimpute_dask.export.outdir import atomic_file
    from scimpute_dask.io.identities import read_identities
    from scimpute_dask.tools.transfer import transfer_labels

    config = RunConfig.from_cli(args, ("cell_name_column_idx",))
    labels = transfer_labels(args.run, read_identities(args.labels,
                                                       config.cell_name_column_idx))
    out = Path(args.out).absolute()
    if not out.parent.is_dir():
        raise InputError(f"{out}: its directory {out.parent} does not exist")
    with atomic_file(out) as fh:
        labels.to_csv(fh, sep="\t", float_format="%.4f")
    share = labels["confidence"]
    print(f"{args.out}: {len(labels)} query cells labelled; median confidence "
          f"{share.median():.3f}, {int((share < 0.5).sum())} cells below 0.5")


def _convert(args: argparse.Namespace) -> None:
    from scimpute_dask.io.convert import convert
    from scimpute_dask.io.storage import check_creatable, is_remote, location

    config = RunConfig.from_cli(args, ("layer", "restart", "memory_limit"))
    target = location(args.output)
    if not is_remote(target) and not target.exists():
        check_creatable(target)
    store = convert(args.input, target, layout=args.layout, sep=args.sep,
                    restart=config.restart, progress=not args.quiet,
                    memory_limit=config.memory_limit, layer=config.layer)
    n_cells, n_genes = store.shape
    print(f"{store.path}: {n_cells} cells × {n_genes} genes, chunks {store.chunks}")


def _demo(args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from scimpute_dask.io.storage import check_creatable
    from scimpute_dask.pipeline import run
    from scimpute_dask.plotting.report import add_section
    from scimpute_dask.synthetic import make_pair, write_scimpute_tsv

    config = RunConfig.from_cli(args, ("k", "seed", "scheduler"))
    count = Interval(int, 1)
    sizes = {flag: count.check(count.parse(getattr(args, flag)),
                               "--" + flag.replace("_", "-"), getattr(args, flag))
             for flag in ("query_cells", "reference_cells", "genes", "panel")}
    if sizes["panel"] >= sizes["genes"]:
        raise InputError(f"--panel ({sizes['panel']}) must be smaller than --genes "
                         f"({sizes['genes']})")
    out = Path(args.out).absolute()
    if not out.exists():
        check_creatable(out)
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    pair = make_pair(sizes["query_cells"], sizes["reference_cells"], sizes["genes"],
                     sizes["panel"], seed=config.seed)
    write_scimpute_tsv(pair.query, inputs / "query.tsv")
    write_scimpute_tsv(pair.reference, inputs / "reference.tsv")
    pair.identities.to_csv(inputs / "identities.tsv", sep="\t", index=False)
    pair.coords.to_csv(inputs / "coords.csv", index=False)
    print(f"simulated {sizes['query_cells']} spatial cells × {sizes['panel']} panel genes and "
          f"{sizes['reference_cells']} reference cells × {sizes['genes']} genes in {inputs}")
    run_config = RunConfig.create(k=config.k, progress=not args.quiet,
                                  scheduler=config.scheduler, coords=inputs / "coords.csv")
    result = run(inputs / "query.tsv", inputs / "reference.tsv", inputs / "identities.tsv",
                 out / "imputation", run_config)
    _report(result)
    imputed = pd.read_csv(result.files["imputation"], sep="\t", index_col=0)
    hidden = imputed.columns.difference(pair.query.columns)
    truth = pair.truth.loc[imputed.index, hidden].to_numpy()
    pred = imputed[hidden].to_numpy()
    # Score the genes whose true expression differs between cell types (> 2-fold):
    # elsewhere the truth is flat and a correlation measures only noise.
    varying = truth.max(axis=0) > 2 * truth.min(axis=0)
    t, p = truth[:, varying], pred[:, varying]
    t, p = t - t.mean(axis=0), p - p.mean(axis=0)
    r = (t * p).sum(axis=0) / np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0))
    summary = (f"accuracy on the {int(varying.sum())} cell-type-dependent genes the panel did "
               f"not measure: median per-gene Pearson r vs. ground truth = {np.median(r):.3f}")
    print(summary)
    if "report" in result.files and len(r):
        add_section(result.files["report"], "Accuracy on the genes the panel did not measure",
                    "The simulation knows every cell's true profile: per-gene Pearson "
                    "correlation of the imputed and the true expression over the query cells, "
                    "for the genes whose true expression differs between cell types (> 2-fold) "
                    "and that the panel did not measure (the search never saw them).",
                    {"genes scored": int(varying.sum()), "median Pearson r": float(np.median(r)),
                     "mean Pearson r": float(np.mean(r)),
                     "lower quartile": float(np.percentile(r, 25)),
                     "upper quartile": float(np.percentile(r, 75))})


_COMMANDS = {"run": _run, "convert": _convert, "demo": _demo, "validate": _validate,
             "tune": _tune, "transfer": _transfer}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scimpute-dask`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(format="%(message)s")
    # only our logger: DEBUG on the root would also turn on every library's debug output
    logging.getLogger("scimpute_dask").setLevel(level)
    try:
        _COMMANDS[args.command](args)
    except InputError as err:
        return _error(err)
    except OSError as err:
        # what the file system refused (permissions, a full disk, a vanished file) is the
        # user's to fix: say which file and why, without a traceback
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        return _error(f"{where}{err.strerror or err}")
    return 0


def _error(message: object) -> int:
    print(f"scimpute-dask: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
