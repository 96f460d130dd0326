"""Every Dask graph of the engine, built in one place.

The kernels in :mod:`~scimpute_dask.knn`, :mod:`~scimpute_dask.imputation` and
:mod:`~scimpute_dask.scoring` work on NumPy blocks; this module tiles them over
Dask arrays. Nothing here computes: each function returns lazy arrays that the
pipeline stores to Zarr. No graph ever holds a dense query × reference matrix:
the similarity exists one ``(query block × reference block)`` tile at a time.
"""

from __future__ import annotations

import warnings
from functools import partial

import dask.array as da
import numpy as np

from . import imputation, knn, scoring


def _single_chunk_columns(x: da.Array) -> da.Array:
    return x if x.numblocks[1] == 1 else x.rechunk({1: -1})


def _pair_topk(q, qn, qnorm, r, rn, rnorm, rows, *clusters, k: int) -> np.ndarray:
    qc, rc = clusters if clusters else (None, None)
    return knn.block_topk(knn.Block(q, qn, qnorm), knn.Block(r, rn, rnorm), rows, k, qc, rc)


# ``axis``/``keepdims`` are the interface da.reduction calls its functions with.
def _merge(packed: np.ndarray, axis=None, keepdims=True, *, k: int) -> np.ndarray:
    return knn.merge_topk(packed, k)


def _keep(packed: np.ndarray, axis=None, keepdims=True) -> np.ndarray:
    return packed


def knn_graph(
    query: da.Array,
    reference: da.Array,
    k: int,
    query_clusters: da.Array | None = None,
    reference_clusters: da.Array | None = None,
    split_every: int = 8,
) -> tuple[da.Array, da.Array]:
    """Exact cosine kNN of every query row among the reference rows.

    Parameters
    ----------
    query, reference
        ``(n_query, g)`` and ``(n_reference, g)`` expression on the shared genes,
        in the same gene order. Row chunks set the tile size.
    k
        Neighbours per query cell.
    query_clusters, reference_clusters
        Integer cluster codes (chunked like the rows). When given, candidates are
        restricted to the query cell's cluster.
    split_every
        Fan-in of the tree reduction that merges per-tile top-k lists.

    Returns
    -------
    indices : dask.array.Array
        ``(n_query, k)`` int32 reference rows, most similar first; ``-1`` for
        query cells whose shared-gene expression is all zero (undefined cosine).
    similarity : dask.array.Array
        ``(n_query, k)`` float32 cosine similarities; NaN where ``indices`` is -1.
    """
    query = _single_chunk_columns(query).astype(np.float32)
    reference = _single_chunk_columns(reference).astype(np.float32)
    rows = da.arange(reference.shape[0], chunks=(reference.chunks[0],), dtype=np.int64)
    args: list = []
    # Normalised rows and float64 norms once per block, not once per tile.
    for x, i in ((query, "i"), (reference, "j")):
        args += [x, f"{i}g",
                 x.map_blocks(knn.normalize_rows, dtype=np.float32), f"{i}g",
                 x.map_blocks(knn.row_norms, drop_axis=1, dtype=np.float64), i]
    args += [rows, "j"]
    if query_clusters is not None:
        args += [query_clusters.rechunk((query.chunks[0],)), "i",
                 reference_clusters.rechunk((reference.chunks[0],)), "j"]
    with warnings.catch_warnings():
        # one (k, 2) list per tile is the point of the tiling, not a chunking accident
        warnings.simplefilter("ignore", da.PerformanceWarning)
        tiles = da.blockwise(
            partial(_pair_topk, k=k), "ijp", *args,
            new_axes={"p": 2},
            adjust_chunks={"j": k},
            concatenate=True,
            dtype=np.float64,
            meta=np.empty((0, 0, 0), dtype=np.float64),
        )
    merged = da.reduction(
        tiles,
        chunk=_keep,
        combine=partial(_merge, k=k),
        aggregate=partial(_merge, k=k),
        axis=1,
        keepdims=True,
        output_size=k,
        dtype=np.float64,
        split_every=split_every,
        concatenate=True,
        meta=np.empty((0, 0, 0), dtype=np.float64),
    )
    undefined = query.map_blocks(knn.zero_rows, drop_axis=1, dtype=bool)[:, None]
    indices = da.where(undefined, knn.EMPTY, merged[..., 1]).astype(np.int32)
    similarity = da.where(undefined, np.nan, merged[..., 0]).astype(np.float32)
    return indices, similarity


def _impute_block(indices, weights, reference, dtype) -> np.ndarray:
    return imputation.weighted_mean(indices, weights, reference, dtype=dtype)


def impute_graph(
    indices: da.Array,
    weights: da.Array,
    reference: da.Array,
    dtype: type = np.float64,
) -> da.Array:
    """Weighted mean of the neighbours' reference rows, tiled (query block × gene block).

    Each task receives one whole gene block of the reference (all reference
    cells), so the chunking of ``reference`` along genes sets the memory per
    task and each gene block is read once for all query blocks.

    Parameters
    ----------
    indices, weights
        ``(n_query, k)`` neighbour rows and weights; row chunks set the query tiles.
    reference
        ``(n_reference, n_genes)`` expression to average.
    dtype
        Output dtype; float64 by default because scimpute's 2-decimal values
        need more than float32's 7 significant digits once CPM passes 10^4.

    Returns
    -------
    dask.array.Array
        ``(n_query, n_genes)`` chunked ``(query chunk, reference gene chunk)``.
    """
    reference = reference.rechunk({0: -1})
    return da.blockwise(
        partial(_impute_block, dtype=dtype), "ig",
        indices.rechunk({1: -1}), "ik",
        weights.rechunk({1: -1}), "ik",
        reference, "cg",
        concatenate=True,
        dtype=dtype,
    )


#: Shared genes per block of the score stage: fixed, so that the per-cell sums
#: (and so ``scores.txt``) are the same whatever the memory budget.
SCORE_GENE_BLOCK = 512


def scores_graph(
    indices: da.Array,
    weights: da.Array,
    reference_shared: da.Array,
    query_shared: da.Array,
) -> da.Array:
    """scimpute's per-cell validation score, computed without reading the full imputation.

    The shared genes are imputed again in float64 (a small ``k × n_shared`` job
    per cell), in blocks of :data:`SCORE_GENE_BLOCK` genes, rounded to 2
    decimals as scimpute's table is, and compared with the measured values by
    cosine similarity accumulated across the gene blocks.
    """
    imputed = impute_graph(indices, weights, reference_shared.rechunk((-1, SCORE_GENE_BLOCK)))
    imputed = imputed.map_blocks(scoring.round_like_scimpute, dtype=np.float64)
    measured = query_shared.rechunk((indices.chunks[0], SCORE_GENE_BLOCK)).astype(np.float64)
    return da.map_blocks(
        scoring.cosine_from_sums,
        (imputed * measured).sum(axis=1), (imputed * imputed).sum(axis=1),
        (measured * measured).sum(axis=1),
        dtype=np.float64,
    )
