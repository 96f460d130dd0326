"""The ``scimpute-dask`` command: ``run``, ``validate``, ``transfer``, ``convert``, ``demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .conversion import LAYOUTS, convert
from .imputation import DEFAULT_TEMPERATURE, WEIGHTINGS
from .normalization import NORMALIZATIONS
from .pipeline import RunResult, run_imputation
from .validation import InputError

LAYOUT_HELP = (
    "orientation of a text input: genes_x_cells (scimpute's TSV: first row = cell names, "
    "first column = gene names) or cells_x_genes (the transpose, e.g. a cells × genes CSV)"
)


def _add_common(p: argparse.ArgumentParser) -> None:
    level = p.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bars, only warnings and errors")
    level.add_argument("-v", "--verbose", action="store_true",
                       help="also log block sizes, stage timings and peak memory")


def _add_scheduler(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="Dask scheduler to run on, e.g. tcp://host:8786 (default: "
                   "$DASK_SCHEDULER_ADDRESS, else threads on this machine); workers must reach "
                   "--out: a shared volume at the same path, or an object-store URL")


def _add_search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="none",
                   help="transform of the shared genes for the neighbour search only: none "
                   "(default, scimpute), cpm, log1p_cpm, scale (each gene divided by its "
                   "standard deviation in its dataset) or zscore (also centred on its mean)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="cosine+1",
                   help="neighbour weights: cosine+1 (default, scimpute), cosine, softmax "
                   "(see --temperature) or uniform")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"softmax temperature (default {DEFAULT_TEMPERATURE})")


def _parser() -> argparse.ArgumentParser:
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
                     help="spatial matrix to impute for (.tsv/.csv/.h5ad/AnnData-Zarr/.zarr/"
                     "10x matrix.mtx directory; a path, or an fsspec URL such as "
                     "s3://bucket/query.zarr)")
    run.add_argument("--reference", required=True, metavar="PATH",
                     help="single-cell matrix to impute from (same forms as --query)")
    run.add_argument("--identities", metavar="TSV",
                     help="cell identity table with an 'id' cluster column for the cells of both "
                     "datasets (required unless --no-clusters or --cluster-key)")
    run.add_argument("--cluster-key", metavar="KEY",
                     help="AnnData inputs: take the clusters from obs[KEY] of the query and the "
                     "reference instead of --identities")
    run.add_argument("--layer", metavar="NAME", default=None,
                     help="AnnData inputs: the layer holding the expression (default X)")
    run.add_argument("--reference-layer", metavar="NAME", default=None,
                     help="AnnData reference: its layer, if not the same as --layer")
    run.add_argument("--coords", metavar="FILE",
                     help="spatial coordinates of the query cells: a table of cell name, x, y "
                     "(.csv or tab-separated; default: obsm['spatial'] of an AnnData query)")
    run.add_argument("--name-column", type=int, default=0, metavar="IDX",
                     help="0-based position of the cell-name column of --identities (default 0)")
    run.add_argument("--out", required=True, metavar="DIR",
                     help="output directory: a path, or an fsspec URL (s3://bucket/run) that "
                     "cluster workers write to directly")
    run.add_argument("--k", type=int, default=25, help="neighbours per query cell (default 25)")
    run.add_argument("--no-clusters", action="store_true",
                     help="search all reference cells, not only the query cell's cluster")
    run.add_argument("--memory-limit", default=None, metavar="SIZE",
                     help="peak memory budget of the whole run, e.g. 2GB (default: half the "
                     "available memory); block sizes are derived from it")
    run.add_argument("--chunk-size", type=int, default=None, metavar="N",
                     help="query cells per block (default: derived from --memory-limit)")
    run.add_argument("--tsv-genes", default="all", metavar="GENES",
                     help="genes written to imputation.tsv: 'all' (default), 'none' (Zarr "
                     "only: the scalable output), a comma-separated list, or @FILE with one "
                     "gene per line")
    run.add_argument("--h5ad", action="store_true",
                     help="also write the imputed AnnData as DIR/imputed.h5ad")
    run.add_argument("--anndata", action=argparse.BooleanOptionalAction, default=None,
                     help="write the imputed AnnData as the Zarr store DIR/adata.zarr (default: "
                     "when the query is an AnnData)")
    run.add_argument("--no-report", action="store_true",
                     help="skip report.html and the spatial maps")
    run.add_argument("--plot-genes", metavar="GENES", default=None,
                     help="genes for the spatial maps, comma-separated or @FILE; 'none' for no "
                     "maps (default: the three most variable measured and unmeasured genes)")
    run.add_argument("--validation", metavar="DIR", default=None,
                     help="output directory of 'scimpute-dask validate' for the same query and "
                     "reference: its per-gene reliability joins the AnnData var and "
                     "DIR/reliability.tsv, its held-out score vs. sparsity plot and summary "
                     "join report.html")
    run.add_argument("--save-chunks", action="store_true",
                     help="also keep per-chunk imputation tables in DIR/imputations")
    run.add_argument("--query-layout", choices=LAYOUTS, default="genes_x_cells",
                     help=LAYOUT_HELP)
    run.add_argument("--reference-layout", choices=LAYOUTS, default="genes_x_cells",
                     help=LAYOUT_HELP)
    _add_scheduler(run)
    run.add_argument("--restart", action="store_true",
                     help="discard the conversions of an interrupted run and start over")
    _add_search_options(run)
    _add_common(run)

    conv = sub.add_parser(
        "convert", help="convert an expression matrix to a chunked Zarr store",
        description="Stream a text matrix (or .h5ad) into a cells × genes float32 Zarr store. "
        "An interrupted conversion resumes when rerun; a finished one is reused.",
    )
    conv.add_argument("input", metavar="IN", help="matrix file (.tsv/.txt/.csv/.h5ad), "
                      "AnnData-Zarr store or 10x matrix.mtx directory")
    conv.add_argument("output", metavar="OUT.zarr",
                      help="Zarr store to write: a path or an fsspec URL (s3://bucket/x.zarr)")
    conv.add_argument("--layout", choices=LAYOUTS, default="genes_x_cells", help=LAYOUT_HELP)
    conv.add_argument("--sep", default=None,
                      help="field separator (default: ',' for .csv, tab otherwise)")
    conv.add_argument("--layer", default=None, metavar="NAME",
                      help="AnnData input: the layer to convert (default X)")
    conv.add_argument("--restart", action="store_true", help="convert from scratch")
    conv.add_argument("--memory-limit", default=None, metavar="SIZE",
                      help="memory budget, e.g. 1GB (default: half the available memory)")
    _add_common(conv)

    val = sub.add_parser(
        "validate", help="held-out accuracy: k-fold cross-validation over the shared genes",
        description="Split the shared genes into folds; for each fold find the neighbours on "
        "the other shared genes only, impute the fold's genes and score them against their "
        "measured values (CSS, Pearson, Spearman, MSE, RMSE per gene and per cell). Writes "
        "genes.tsv, cells.tsv, summary.tsv, reliability.tsv (predicted accuracy of every "
        "reference gene) and genes_vs_sparsity.png.",
    )
    val.add_argument("--query", required=True, metavar="PATH",
                     help="spatial matrix (.tsv/.csv/.h5ad/.zarr)")
    val.add_argument("--reference", required=True, metavar="PATH",
                     help="single-cell matrix (.tsv/.csv/.h5ad/.zarr)")
    val.add_argument("--out", required=True, metavar="DIR", help="output directory")
    val.add_argument("--k", type=int, default=25, help="neighbours per query cell (default 25)")
    val.add_argument("--folds", type=int, default=5, help="gene folds (default 5)")
    val.add_argument("--seed", type=int, default=0, help="seed of the gene split (default 0)")
    val.add_argument("--identities", metavar="TSV",
                     help="restrict neighbours to the query cell's cluster (the clustering must "
                     "not have used the held-out genes)")
    val.add_argument("--name-column", type=int, default=0, metavar="IDX",
                     help="0-based position of the cell-name column of --identities")
    val.add_argument("--no-reliability", action="store_true",
                     help="skip rating the reference-only genes (one more kNN and imputation)")
    val.add_argument("--memory-limit", default=None, metavar="SIZE", help="peak memory budget")
    val.add_argument("--chunk-size", type=int, default=None, metavar="N",
                     help="query cells per block")
    val.add_argument("--query-layout", choices=LAYOUTS, default="genes_x_cells",
                     help=LAYOUT_HELP)
    val.add_argument("--reference-layout", choices=LAYOUTS, default="genes_x_cells",
                     help=LAYOUT_HELP)
    _add_scheduler(val)
    _add_search_options(val)
    _add_common(val)

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
    tr.add_argument("--name-column", type=int, default=0, metavar="IDX",
                    help="0-based position of the cell-name column of --labels (default 0)")
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
    demo.add_argument("--query-cells", type=int, default=2000)
    demo.add_argument("--reference-cells", type=int, default=1500)
    demo.add_argument("--genes", type=int, default=1000)
    demo.add_argument("--panel", type=int, default=100)
    demo.add_argument("--k", type=int, default=25)
    demo.add_argument("--seed", type=int, default=0)
    _add_scheduler(demo)
    _add_common(demo)
    return parser


def _report(result: RunResult) -> None:
    print(result)
    print("scimpute validation score (cosine of imputed vs measured shared genes):")
    for name, value in result.stats.items():
        print(f"  {name}: {value:.4f}")


def _gene_list(value: str) -> str | list[str]:
    if value in ("all", "none"):
        return value
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.exists():
            raise InputError(f"{path}: gene list file not found")
        return [g for g in path.read_text().split() if g]
    return [g for g in value.split(",") if g]


def _plot_genes(value: str) -> list[str]:
    """``--plot-genes``: ``none`` draws no maps; ``all`` is refused (one map per gene)."""
    genes = _gene_list(value)
    if genes == "all":
        raise InputError("--plot-genes all: the maps show a few genes; name them, or give "
                         "'none' for no maps")
    return [] if genes == "none" else genes


def _run(args: argparse.Namespace) -> None:
    result = run_imputation(
        args.query, args.reference, args.identities, args.name_column, args.out,
        k=args.k, consider_clusters=not args.no_clusters, chunk_size=args.chunk_size,
        memory_limit=args.memory_limit, tsv_genes=_gene_list(args.tsv_genes), h5ad=args.h5ad,
        save_chunks=args.save_chunks, query_layout=args.query_layout,
        reference_layout=args.reference_layout, restart=args.restart, progress=not args.quiet,
        scheduler=args.scheduler, layer=args.layer, reference_layer=args.reference_layer,
        cluster_key=args.cluster_key, coords=args.coords, anndata=args.anndata,
        report=not args.no_report,
        plot_genes=None if args.plot_genes is None else _plot_genes(args.plot_genes),
        normalize=args.normalize, weighting=args.weighting, temperature=args.temperature,
        validation=args.validation,
    )
    _report(result)


def _validate(args: argparse.Namespace) -> None:
    from .validate import cross_validate

    result = cross_validate(
        args.query, args.reference, args.out, identities=args.identities,
        cell_name_column_idx=args.name_column, consider_clusters=args.identities is not None,
        k=args.k, folds=args.folds, seed=args.seed, normalize=args.normalize,
        weighting=args.weighting, temperature=args.temperature,
        reliability=not args.no_reliability, query_layout=args.query_layout,
        reference_layout=args.reference_layout, memory_limit=args.memory_limit,
        chunk_size=args.chunk_size, progress=not args.quiet, scheduler=args.scheduler,
    )
    print(result)


def _transfer(args: argparse.Namespace) -> None:
    from .export import atomic_file
    from .transfer import transfer_labels
    from .validation import read_identities

    labels = transfer_labels(args.run, read_identities(args.labels, args.name_column))
    with atomic_file(Path(args.out)) as fh:
        labels.to_csv(fh, sep="\t", float_format="%.4f")
    share = labels["confidence"]
    print(f"{args.out}: {len(labels)} query cells labelled; median confidence "
          f"{share.median():.3f}, {int((share < 0.5).sum())} cells below 0.5")


def _convert(args: argparse.Namespace) -> None:
    store = convert(args.input, args.output, layout=args.layout, sep=args.sep,
                    restart=args.restart, progress=not args.quiet,
                    memory_limit=args.memory_limit, layer=args.layer)
    n_cells, n_genes = store.shape
    print(f"{store.path}: {n_cells} cells × {n_genes} genes, chunks {store.chunks}")


def _demo(args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from .synthetic import make_pair, write_scimpute_tsv

    out = Path(args.out)
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    pair = make_pair(args.query_cells, args.reference_cells, args.genes, args.panel, seed=args.seed)
    write_scimpute_tsv(pair.query, inputs / "query.tsv")
    write_scimpute_tsv(pair.reference, inputs / "reference.tsv")
    pair.identities.to_csv(inputs / "identities.tsv", sep="\t", index=False)
    print(f"simulated {args.query_cells} spatial cells × {args.panel} panel genes and "
          f"{args.reference_cells} reference cells × {args.genes} genes in {inputs}")
    result = run_imputation(
        inputs / "query.tsv", inputs / "reference.tsv", inputs / "identities.tsv", 0,
        out / "imputation", k=args.k, progress=not args.quiet, scheduler=args.scheduler,
    )
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
    print(f"accuracy on the {int(varying.sum())} cell-type-dependent genes the panel did not "
          f"measure: median per-gene Pearson r vs. ground truth = {np.median(r):.3f}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scimpute-dask`` console script."""
    args = _parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(format="%(message)s")
    # only our logger: DEBUG on the root would also turn on every library's debug output
    logging.getLogger("scimpute_dask").setLevel(level)
    try:
        {"run": _run, "convert": _convert, "demo": _demo, "validate": _validate,
         "transfer": _transfer}[args.command](args)
    except InputError as err:
        print(f"scimpute-dask: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
