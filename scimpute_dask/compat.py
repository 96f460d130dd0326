"""scimpute's Python API, kept working: a scimpute user changes only the import.

``expression_imputation`` runs the out-of-core pipeline. The step-wise
functions keep scimpute's signatures and return values; like scimpute's they
work on in-memory DataFrames (cells × genes), but compute with the same
blockwise kernels and graphs as the pipeline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd

from scimpute_dask.checks import check_k, check_positive_int, shared_genes
from scimpute_dask.config import RunConfig
from scimpute_dask.engine import cluster, graph, search
from scimpute_dask.errors import InputError
from scimpute_dask.export import tables
from scimpute_dask.io.convert import convert
from scimpute_dask.io.frame import check_frame
from scimpute_dask.io.identities import clusters_of, read_identities
from scimpute_dask.kernels.imputation import similarity_to_weight
from scimpute_dask.kernels.scoring import (
    STAT_NAMES,
    round_like_scimpute,
    rowwise_cosine,
    summary_stats,
)
from scimpute_dask.pipeline import RunResult, run

PathOrFrame = str | os.PathLike | pd.DataFrame
#: How scimpute's API spells the options it shares with the engine, for messages.
SCIMPUTE_NAMES = {"k": "k_neighbors"}
_BLOCK = 1000


def _check_metric(metric: str) -> None:
    if metric != "cosine_similarity":
        raise InputError(f"metric must be 'cosine_similarity' (the only one scimpute has), "
                         f"got {metric!r}")


def _frame(source: PathOrFrame, label: str) -> pd.DataFrame:
    """A validated cells × genes DataFrame from a DataFrame or a scimpute TSV path."""
    if isinstance(source, pd.DataFrame):
        check_frame(source, label)
        return source
    with tempfile.TemporaryDirectory() as tmp:
        store = convert(source, Path(tmp) / "m.zarr")
        return pd.DataFrame(
            store.read(),
            index=pd.Index(store.cell_names, name=None),
            columns=pd.Index(store.gene_names),
        )


def _print_stats(stats: dict[str, float]) -> None:
    for name in STAT_NAMES:
        print(f"{name}:", stats[name])


def expression_imputation(
    matrix_to_impute_for: PathOrFrame,
    matrix_to_impute_from: PathOrFrame,
    cell_identities: PathOrFrame,
    cell_name_column_idx: int,
    outdir: str | os.PathLike = "imputation_output",
    metric: str = "cosine_similarity",
    k_neighbors: int = 25,
    consider_clusters: bool = True,
    save_chunks: bool = True,
    chunk_size: int = 1000,
) -> RunResult:
    """Impute the genes of a spatial dataset from a single-cell reference (scimpute's API).

    Parameters
    ----------
    matrix_to_impute_for
        Query (spatial) matrix: a scimpute TSV (genes as rows, cells as columns)
        or a DataFrame with cells as rows.
    matrix_to_impute_from
        Reference (single-cell) matrix, same forms.
    cell_identities
        Tab-separated table (or DataFrame) with an ``id`` cluster column for the
        cells of both datasets.
    cell_name_column_idx
        0-based position of the cell-name column in ``cell_identities``.
    outdir
        Output directory.
    metric
        Only ``"cosine_similarity"``.
    k_neighbors
        Neighbours per query cell.
    consider_clusters
        Only consider reference cells of the query cell's cluster.
    save_chunks
        Keep the per-chunk imputation tables in ``outdir/imputations``.
    chunk_size
        Query cells per chunk.

    Returns
    -------
    RunResult
        Paths of the outputs and summary figures (scimpute returns ``None``).
    """
    _check_metric(metric)
    config = RunConfig.create(
        spelled=SCIMPUTE_NAMES, k=k_neighbors, consider_clusters=consider_clusters,
        chunk_size=chunk_size, save_chunks=save_chunks,
        cell_name_column_idx=cell_name_column_idx)
    result = run(matrix_to_impute_for, matrix_to_impute_from, cell_identities, outdir, config)
    _print_stats(result.stats)
    return result


def read_inputs(
    matrix_to_impute_for: PathOrFrame,
    matrix_to_impute_from: PathOrFrame,
    cell_identities: PathOrFrame,
    cell_name_column_idx: int,
    outdir: str | os.PathLike,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Path]:
    """Read and validate the three inputs; create ``outdir``.

    Returns
    -------
    tuple
        ``(x, y, clusters, save_location)``: query and reference as cells × genes
        DataFrames, the identity table indexed by cell name with an ``id`` column,
        and the absolute output directory.
    """
    x = _frame(matrix_to_impute_for, "query")
    y = _frame(matrix_to_impute_from, "reference")
    clusters = read_identities(cell_identities, cell_name_column_idx).to_frame()
    save_location = Path(outdir).absolute()
    save_location.mkdir(parents=True, exist_ok=True)
    return x, y, clusters, save_location


def similarity_matrix(
    x: PathOrFrame,
    y: PathOrFrame,
    clusters: PathOrFrame,
    cell_name_column_idx: int,
    outdir: str | os.PathLike,
    metric: str = "cosine_similarity",
    k_neighbors: int = 25,
    consider_clusters: bool = True,
) -> pd.DataFrame:
    """The k most similar reference cells of every query cell; writes ``sim_matrix.tsv``.

    Returns
    -------
    pandas.DataFrame
        Columns ``cluster, x, y, distance`` (distance = cosine + 1), k rows per
        query cell in query order, most similar first, each neighbour once.
        Query cells without shared-gene expression have no rows.
    """
    _check_metric(metric)
    x, y = _frame(x, "query"), _frame(y, "reference")
    table = read_identities(clusters, cell_name_column_idx)
    q_cols, r_cols = shared_genes(np.asarray(x.columns), np.asarray(y.columns), "query",
                                  "reference")
    q_ids = clusters_of(np.asarray(x.index), table, "query", "identity table")
    r_ids = clusters_of(np.asarray(y.index), table, "reference", "identity table")
    check_k(k_neighbors, q_ids if consider_clusters else None,
            r_ids if consider_clusters else None, len(y))
    q = da.from_array(x.to_numpy(np.float32)[:, q_cols], chunks=(_BLOCK, -1))
    r = da.from_array(y.to_numpy(np.float32)[:, r_cols], chunks=(4 * _BLOCK, -1))
    codes = (None, None)
    if consider_clusters:
        c, _ = pd.factorize(np.concatenate([q_ids, r_ids]))
        codes = (da.from_array(c[: len(x)], chunks=_BLOCK),
                 da.from_array(c[len(x):], chunks=4 * _BLOCK))
    with cluster.local_threads(os.cpu_count() or 1):
        indices, sim = dask.compute(*search.knn(q, r, k_neighbors, *codes))
    rows, slot = np.nonzero(indices >= 0)
    result = pd.DataFrame({
        "cluster": q_ids[rows],
        "x": np.asarray(x.index)[rows],
        "y": np.asarray(y.index)[indices[rows, slot]],
        "distance": similarity_to_weight(sim[rows, slot]).astype(np.float64),
    })
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    codes, labels = pd.factorize(result["cluster"])
    tables.write_neighbours_tsv(
        outdir / "sim_matrix.tsv", np.asarray(labels), np.asarray(x.index),
        np.asarray(y.index), [lambda: (codes, rows, indices[rows, slot], sim[rows, slot] + 1)],
    )
    return result


def _neighbour_arrays(
    sim: pd.DataFrame, query_cells: pd.Index, reference_cells: pd.Index
) -> tuple[np.ndarray, np.ndarray]:
    """``(n_query, k)`` neighbour rows and weights from a ``sim_matrix`` table."""
    q = query_cells.get_indexer(sim["x"].astype(str))
    r = reference_cells.get_indexer(sim["y"].astype(str))
    for name, pos, col in (("query", q, "x"), ("reference", r, "y")):
        if (pos < 0).any():
            raise InputError(f"similarity_matrix: cell '{sim[col].to_numpy()[pos < 0][0]}' "
                             f"is not a {name} cell")
    order = np.argsort(q, kind="stable")
    q, r, w = q[order], r[order], sim["distance"].to_numpy(np.float64)[order]
    counts = np.bincount(q, minlength=len(query_cells))
    slot = np.arange(len(q)) - np.repeat(np.cumsum(counts) - counts, counts)
    indices = np.full((len(query_cells), max(1, counts.max(initial=0))), -1, dtype=np.int64)
    weights = np.zeros(indices.shape, dtype=np.float64)
    indices[q, slot], weights[q, slot] = r, w
    return indices, weights


def impute_expression(
    x: PathOrFrame,
    y: PathOrFrame,
    similarity_matrix: PathOrFrame,
    outdir: str | os.PathLike,
    chunk_size: int = 1000,
) -> pd.DataFrame:
    """Weighted-mean imputation from a similarity table; writes ``outdir/imputations/``.

    Returns
    -------
    pandas.DataFrame
        Column ``cell`` then every reference gene, values rounded to 2 decimals,
        for all query cells (scimpute returns only its last chunk).
    """
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    x, y = _frame(x, "query"), _frame(y, "reference")
    sim = similarity_matrix
    if not isinstance(sim, pd.DataFrame):
        if not Path(sim).exists():
            raise InputError(f"{sim}: file not found")
        sim = pd.read_csv(sim, sep="\t", dtype={"x": str, "y": str, "cluster": str})
    indices, weights = _neighbour_arrays(sim, x.index.astype(str), y.index.astype(str))
    imputed = graph.impute_graph(
        da.from_array(indices, chunks=(chunk_size, -1)),
        da.from_array(weights, chunks=(chunk_size, -1)),
        da.from_array(y.to_numpy(np.float32), chunks=(-1, 4 * _BLOCK)),
    )
    with cluster.local_threads(os.cpu_count() or 1):
        values = round_like_scimpute(imputed.compute())
    cells = np.asarray(x.index)
    starts = range(0, len(cells), chunk_size)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    # scimpute writes only the chunk tables here; merge_imputation_chunks joins them.
    tables.write_matrix_tsv(
        None,
        (partial(lambda lo: (cells[lo : lo + chunk_size], values[lo : lo + chunk_size], None),
                 lo)
         for lo in starts),
        np.asarray(y.columns), chunk_dir=outdir / "imputations", n_chunks=len(starts),
    )
    table = pd.DataFrame(values, columns=y.columns)
    table.insert(0, "cell", cells)
    return table


def merge_imputation_chunks(
    imputations_dir: str | os.PathLike,
    outdir: str | os.PathLike,
    save_chunks: bool = False,
) -> pd.DataFrame:
    """Merge the chunk tables into ``outdir/imputation.tsv`` in row order.

    Chunks are ordered by their start row, not by name, so more than 1,000
    chunks stay in order (scimpute's 3-digit counter does not).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    chunkdir = Path(imputations_dir)
    if chunkdir.resolve() == outdir.resolve():
        chunkdir = outdir / "imputations"
    tables.merge_chunk_tables(chunkdir, outdir / "imputation.tsv")
    if not save_chunks:
        shutil.rmtree(chunkdir)
    return pd.read_csv(outdir / "imputation.tsv", sep="\t", index_col=0, dtype={0: str})


def validate_results(
    x: PathOrFrame,
    imputed_mtx: PathOrFrame,
    outdir: str | os.PathLike,
) -> np.ndarray:
    """scimpute's validation: cosine of imputed vs measured shared genes per cell.

    Writes ``scores.txt``, ``stats.txt`` and ``cosine_similarities.png`` into
    ``outdir`` and prints the statistics.

    Returns
    -------
    numpy.ndarray
        The per-cell scores in the order of ``imputed_mtx`` (NaN for cells that
        could not be imputed).
    """
    x = _frame(x, "query")
    imputed = imputed_mtx
    if not isinstance(imputed, pd.DataFrame):
        if not Path(imputed).exists():
            raise InputError(f"{imputed}: file not found")
        imputed = pd.read_csv(imputed, sep="\t", index_col=0, dtype={0: str})
    if "cell" in imputed.columns:
        imputed = imputed.set_index("cell")
    missing = imputed.index.difference(x.index.astype(str))
    if len(missing):
        raise InputError(f"imputed_mtx: cell '{missing[0]}' is not in the query matrix")
    genes = imputed.columns.intersection(x.columns)
    if len(genes) == 0:
        raise InputError("imputed_mtx and the query matrix share no genes")
    measured = x.set_axis(x.index.astype(str)).loc[imputed.index, genes]
    scores = rowwise_cosine(round_like_scimpute(imputed[genes].to_numpy()), measured.to_numpy())
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    stats = summary_stats(scores)
    tables.write_histogram(outdir / tables.HISTOGRAM, scores)
    tables.write_stats(outdir / "stats.txt", stats)
    tables.write_scores(outdir / "scores.txt", scores)
    _print_stats(stats)
    return scores
