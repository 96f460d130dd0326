"""Every Dask graph of the engine, built in one place.

The kernels in :mod:`~scimpute_dask.kernels` work on NumPy blocks; this module tiles them over
Dask arrays. Nothing here computes: each function returns lazy arrays that the
pipeline stores to Zarr. No graph ever holds a dense query × reference matrix:
the similarity exists one ``(query block × reference block)`` tile at a time.
"""

from __future__ import annotations

import warnings
from functools import partial

import dask
import dask.array as da
import numpy as np

from scimpute_dask.kernels import imputation, knn, normalization, scoring, vote


def _single_chunk_columns(x: da.Array) -> da.Array:
    return x if x.numblocks[1] == 1 else x.rechunk({1: -1})


def search_space(query: da.Array, reference: da.Array, normalize: str = "none"
                 ) -> tuple[da.Array, da.Array]:
    """The shared-gene expression the neighbour search sees, after ``normalize``.

    ``"cpm"`` and ``"log1p_cpm"`` are row-local (blockwise); ``"scale"``
    divides each gene by its standard deviation in its own dataset and
    ``"zscore"`` also centres it on its mean. Those per-gene statistics are
    computed here, in one pass over each dataset (``g`` numbers each): left
    lazy, the reduction would be a barrier holding every block of the input
    in memory until it completed. ``"none"`` returns the arrays as they are.
    See :mod:`scimpute_dask.kernels.normalization`.
    """
    if normalize == "none":
        return query, reference
    if normalize in normalization.ROW_TRANSFORMS:
        f = normalization.ROW_TRANSFORMS[normalize]
        return tuple(_single_chunk_columns(x).map_blocks(f, dtype=np.float64)
                     for x in (query, reference))
    arrays = [_single_chunk_columns(x) for x in (query, reference)]
    stats = dask.compute(*[(x.astype(np.float64).mean(axis=0), x.astype(np.float64).std(axis=0))
                           for x in arrays])
    out = []
    for x, (mean, sd) in zip(arrays, stats, strict=True):
        if normalize == "scale":
            out.append(x.map_blocks(normalization.scale_genes, sd[None, :], dtype=np.float64))
        else:
            out.append(x.map_blocks(normalization.zscore_genes, mean[None, :], sd[None, :],
                                    dtype=np.float64))
    return tuple(out)


def _one_block(block):
    """A contracted index's only block, as ``blockwise(concatenate=False)`` passes it.

    The engine's contracted indices (genes in the search, reference rows in
    the imputation) hold one block by construction. ``concatenate=True`` would
    copy even a single block into a new array in every task: the whole
    reference gene block once per query block in the imputation.
    """
    while isinstance(block, list):
        (block,) = block
    return block


def _pair_screen(qn, rn, rows, *clusters, k: int) -> np.ndarray:
    qc, rc = clusters if clusters else (None, None)
    return knn.screen(_one_block(qn), _one_block(rn), rows, k, qc, rc)


# ``axis``/``keepdims`` are the interface da.reduction calls its functions with.
def _merge(packed: np.ndarray, axis=None, keepdims=True, *, k: int) -> np.ndarray:
    return knn.merge_topk(packed, k)


def _keep(packed: np.ndarray, axis=None, keepdims=True) -> np.ndarray:
    return packed


def _pair_exact(q, qnorm, r, rnorm, rows, screened, *clusters, k: int) -> np.ndarray:
    qc, rc = clusters if clusters else (None, None)
    return knn.exact_topk(_one_block(q), qnorm, _one_block(r), rnorm, rows,
                          _one_block(screened), k, qc, rc)


def _merge_tree(lists: da.Array, k: int, split_every: int) -> da.Array:
    """Merge the per-reference-block lists of each query cell into one, as a tree."""
    return da.reduction(
        lists,
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


def knn_graph(
    query: da.Array,
    reference: da.Array,
    k: int,
    query_clusters: da.Array | None = None,
    reference_clusters: da.Array | None = None,
    split_every: int = 8,
) -> tuple[da.Array, da.Array]:
    """Exact cosine kNN of every query row among the reference rows.

    Two passes over the (query block × reference block) tiles, neither holding
    more than one tile (:mod:`scimpute_dask.kernels.knn`): a float32 screen
    keeps ``k + RERANK_MARGIN`` candidates per tile, merged by a tree
    reduction into one candidate list per query cell; then each candidate's
    cosine is computed in float64 in the reference block that holds it
    (cells whose candidates the screen cannot vouch for are searched
    exhaustively there), and the best k are merged again. The exact pass
    costs ``n·(k + margin)·g`` once per cell, not once per tile.

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
        Fan-in of the tree reduction that merges per-tile candidate lists.

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
    m = k + knn.RERANK_MARGIN
    rows = da.arange(reference.shape[0], chunks=(reference.chunks[0],), dtype=np.int64)
    codes = [] if query_clusters is None else [
        query_clusters.rechunk((query.chunks[0],)), "i",
        reference_clusters.rechunk((reference.chunks[0],)), "j"]
    # Normalised rows and float64 norms once per block, not once per tile.
    normalized = [x.map_blocks(knn.normalize_rows, dtype=np.float32) for x in (query, reference)]
    norms = [x.map_blocks(knn.row_norms, drop_axis=1, dtype=np.float64)
             for x in (query, reference)]
    with warnings.catch_warnings():
        # one (m, 2) list per tile is the point of the tiling, not a chunking accident
        warnings.simplefilter("ignore", da.PerformanceWarning)
        screened = _merge_tree(da.blockwise(
            partial(_pair_screen, k=k), "ijp",
            normalized[0], "ig", normalized[1], "jg", rows, "j", *codes,
            new_axes={"p": 2}, adjust_chunks={"j": m}, concatenate=False,
            dtype=np.float64, meta=np.empty((0, 0, 0), dtype=np.float64),
        ), m, split_every)
        best = _merge_tree(da.blockwise(
            partial(_pair_exact, k=k), "ijp",
            query, "ig", norms[0], "i", reference, "jg", norms[1], "j", rows, "j",
            screened, "icp", *codes,
            adjust_chunks={"j": k}, concatenate=False,
            dtype=np.float64, meta=np.empty((0, 0, 0), dtype=np.float64),
        ), k, split_every)
    undefined = query.map_blocks(knn.zero_rows, drop_axis=1, dtype=bool)[:, None]
    indices = da.where(undefined, knn.EMPTY, best[..., 1]).astype(np.int32)
    similarity = da.where(undefined, np.nan, best[..., 0]).astype(np.float32)
    return indices, similarity


def _drop_self(indices, similarity, rows) -> np.ndarray:
    idx, sim = knn.drop_self(indices, similarity, rows)
    return np.stack([idx.astype(np.float64), sim.astype(np.float64)], axis=-1)


def exclude_self(indices: da.Array, similarity: da.Array) -> tuple[da.Array, da.Array]:
    """Self-imputation: remove each cell from its own ``k + 1`` neighbours (k remain).

    ``indices``/``similarity`` come from :func:`knn_graph` with the same matrix
    as query and reference and ``k + 1`` neighbours; see :func:`knn.drop_self`.
    """
    rows = da.arange(indices.shape[0], chunks=(indices.chunks[0],), dtype=np.int64)
    packed = da.map_blocks(_drop_self, indices.rechunk({1: -1}), similarity.rechunk({1: -1}),
                           rows[:, None], new_axis=2,
                           chunks=(indices.chunks[0], (indices.shape[1] - 1,), (2,)),
                           dtype=np.float64)
    return packed[..., 0].astype(np.int32), packed[..., 1].astype(np.float32)


def _impute_block(indices, weights, reference, wide, dtype, average) -> np.ndarray:
    values = imputation.weighted_mean(_one_block(indices), _one_block(weights),
                                      _one_block(reference), average=average)
    if dtype != np.float32:
        return values.astype(dtype, copy=False)
    return imputation.float32_keeping_text(values, exempt=wide)


def impute_graph(
    indices: da.Array,
    weights: da.Array,
    reference: da.Array,
    dtype: type = np.float64,
    average: str = "mean",
    wide: np.ndarray | None = None,
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
        Output dtype. The mean is accumulated in float64 either way; float32
        values are rounded so that they keep the float64 values' 2-decimal text
        (:func:`~scimpute_dask.kernels.imputation.float32_keeping_text`), which
        requires every value below ``FLOAT32_TEXT_LIMIT`` in magnitude.
    wide
        With ``dtype=np.float32``: the genes (columns) exempt from that, which
        get the nearest float32 (the caller keeps their float64 values).
    average
        ``"mean"`` (scimpute) or ``"log1p"`` (the mean taken in log1p space);
        see :func:`scimpute_dask.kernels.imputation.weighted_mean`.

    Returns
    -------
    dask.array.Array
        ``(n_query, n_genes)`` chunked ``(query chunk, reference gene chunk)``.
    """
    reference = reference.rechunk({0: -1})
    is_wide = np.zeros(reference.shape[1], dtype=bool)
    if wide is not None:
        is_wide[np.asarray(wide, dtype=np.int64)] = True
    return da.blockwise(
        partial(_impute_block, dtype=dtype, average=average), "ig",
        indices.rechunk({1: -1}), "ik",
        weights.rechunk({1: -1}), "ik",
        reference, "cg",
        da.from_array(is_wide, chunks=(reference.chunks[1],)), "g",
        concatenate=False,
        dtype=dtype,
    )


def _score_block(indices, weights, reference, measured, average) -> np.ndarray:
    return scoring.imputed_cosine(_one_block(indices), _one_block(weights),
                                  _one_block(reference), _one_block(measured), average)


def scores_graph(
    indices: da.Array,
    weights: da.Array,
    reference_shared: da.Array,
    query_shared: da.Array,
    average: str = "mean",
) -> da.Array:
    """scimpute's per-cell validation score, computed without reading the full imputation.

    The shared genes are imputed again in float64 (a small ``k × n_shared`` job
    per cell), rounded to 2 decimals as scimpute's table is, and compared with
    the measured values by cosine similarity, in one compiled pass per query
    block (:func:`~scimpute_dask.kernels.scoring.imputed_cosine`).
    """
    return da.blockwise(
        partial(_score_block, average=average), "i",
        indices.rechunk({1: -1}), "ik",
        weights.rechunk({1: -1}), "ik",
        reference_shared.rechunk({0: -1, 1: -1}), "cg",
        query_shared.rechunk((indices.chunks[0], -1)), "ig",
        concatenate=False,
        dtype=np.float64,
    )


def neighbour_moments(
    indices: da.Array, weights: da.Array, reference: da.Array
) -> tuple[da.Array, da.Array, da.Array, da.Array]:
    """Per-gene sums of the neighbours' weighted mean and variance, for the reliability.

    For each query cell and gene, ``m`` is the imputed value (weighted mean of
    the neighbours) and ``v = Σw·x²/Σw − m²`` the neighbours' weighted variance,
    both from the same tiles as :func:`impute_graph`; the per-gene sums over
    cells are reduced by Dask, never holding a whole column.

    Returns
    -------
    tuple of dask.array.Array
        ``Σm``, ``Σm²``, ``Σv`` over the cells with neighbours, and their
        number, each ``(n_genes,)``.
    """
    ref = reference.astype(np.float64)
    m = impute_graph(indices, weights, ref)
    v = da.maximum(impute_graph(indices, weights, ref * ref) - m * m, 0.0)
    defined = da.isfinite(m)
    m0, v0 = da.where(defined, m, 0.0), da.where(defined, v, 0.0)
    return m0.sum(axis=0), (m0 * m0).sum(axis=0), v0.sum(axis=0), defined.sum(axis=0)


def _vote_block(indices, weights, codes, n_labels) -> np.ndarray:
    return np.column_stack(vote.vote(indices, weights, codes, n_labels))


def label_graph(indices: da.Array, weights: da.Array, codes: np.ndarray, n_labels: int
                ) -> tuple[da.Array, da.Array]:
    """Weighted vote of each query cell's neighbours over the reference labels, blockwise.

    Returns
    -------
    label : dask.array.Array
        ``(n_query,)`` winning label code; ``-1`` for cells without neighbours.
    share : dask.array.Array
        ``(n_query,)`` the winner's share of the neighbours' weight (NaN without neighbours).
    """
    packed = da.map_blocks(
        partial(_vote_block, codes=codes, n_labels=n_labels),
        indices.rechunk({1: -1}), weights.rechunk({1: -1}),
        chunks=(indices.chunks[0], (2,)), dtype=np.float64,
    )
    return packed[:, 0].astype(np.int64), packed[:, 1]
