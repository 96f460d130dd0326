"""Every Dask graph of the engine, built in one place.

The kernels in :mod:`~scimpute_dask.kernels` work on NumPy blocks; this module tiles them over
Dask arrays. Nothing here computes: each function returns lazy arrays that the
pipeline stores to Zarr. No graph ever holds a dense query × reference matrix:
the similarity exists one ``(query block × reference block)`` tile at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import dask
import dask.array as da
import numpy as np
from scipy import sparse

from scimpute_dask.kernels import imputation, knn, normalization, ridge, scoring, vote


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


def _norms_column(x: np.ndarray) -> np.ndarray:
    return knn.row_norms(x)[:, None]


def prepared_reference(reference: da.Array, tile: int, codes: da.Array | None = None
                       ) -> dict[str, da.Array]:
    """The arrays a search reads its reference tiles from, in row chunks of ``tile``.

    ``values`` (float32 rows as searched), ``unit`` (their L2-normalised
    float32 copy, for the screen), ``norms`` (float64, ``(n, 1)``) and, with
    ``codes``, the cluster codes (``(n, 1)`` int32); see
    :mod:`scimpute_dask.engine.search`.
    """
    values = _single_chunk_columns(reference).astype(np.float32).rechunk((tile, -1))
    arrays = {
        "values": values,
        "unit": values.map_blocks(knn.normalize_rows, dtype=np.float32),
        "norms": values.map_blocks(_norms_column, chunks=(values.chunks[0], (1,)),
                                   dtype=np.float64),
    }
    if codes is not None:
        arrays["codes"] = codes.astype(np.int32).rechunk(tile)[:, None]
    return arrays


def _lists_of(values: np.ndarray, *, centroids: np.ndarray) -> np.ndarray:
    return knn.nearest_lists(knn.normalize_rows(values), centroids)[:, 0]


def list_ids(reference: da.Array, centroids: np.ndarray) -> da.Array:
    """Each reference row's nearest coarse list (an approximate search's index)."""
    return _single_chunk_columns(reference).map_blocks(
        partial(_lists_of, centroids=centroids), drop_axis=1, dtype=np.int32)


def _search_block(query, *codes, tiles, k: int, probing) -> np.ndarray:
    query = _one_block(query)
    probes = None
    if probing is not None:
        centroids, n = probing
        probes = knn.nearest_lists(knn.normalize_rows(query), centroids, n)
    return knn.search_block(query, tiles, k, codes[0] if codes else None, probes)


def search_graph(query: da.Array, tiles: knn.Tiles, token: str, k: int,
                 query_codes: da.Array | None = None, probing=None
                 ) -> tuple[da.Array, da.Array]:
    """Exact cosine kNN of every query row in a prepared reference, one task per query block.

    Each task screens its block against every reference tile in float32,
    keeping ``k + RERANK_MARGIN`` candidates per cell, then ranks them by
    float64 cosine in the tiles that hold them (cells whose candidates the
    screen cannot vouch for are searched exhaustively there):
    :func:`scimpute_dask.kernels.knn.search_block`. The tiles are read inside
    the task (``tiles``, :class:`scimpute_dask.kernels.knn.Tiles`), so a task
    holds its query block and one reference tile, and nothing of the
    reference outlives the task whatever its size.

    Parameters
    ----------
    query
        ``(n_query, g)`` rows in the reference's search space and gene order;
        its row chunks are the tasks.
    tiles
        The prepared reference (:func:`scimpute_dask.engine.search.prepare`).
    token
        Identifies ``tiles`` in the task names.
    k
        Neighbours per query cell.
    query_codes
        Integer cluster codes of the query rows, for a search restricted to
        each cell's cluster (the reference's are prepared with it).
    probing
        ``(centroids, n)``: an approximate search, each cell screening only the
        rows of its ``n`` nearest coarse lists (a reference prepared in list
        order); None: exact.

    Returns
    -------
    indices : dask.array.Array
        ``(n_query, k)`` int32 reference rows, most similar first; ``-1`` for
        query cells whose shared-gene expression is all zero (undefined cosine).
    similarity : dask.array.Array
        ``(n_query, k)`` float32 cosine similarities; NaN where ``indices`` is -1.
    """
    query = _single_chunk_columns(query)
    codes = [] if query_codes is None else [query_codes.rechunk((query.chunks[0],)), "i"]
    packed = da.blockwise(
        partial(_search_block, tiles=tiles, k=k, probing=probing), "ikp", query, "ig", *codes,
        new_axes={"k": k, "p": 2}, concatenate=False, dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
        name="search-" + dask.base.tokenize(query.name, token, k,
                                            None if query_codes is None else codes[0].name,
                                            None if probing is None else probing[1]),
    )
    return packed[..., 1].astype(np.int32), packed[..., 0].astype(np.float32)


def _merge_parts(query: np.ndarray, k: int, *parts: np.ndarray) -> np.ndarray:
    best = knn.merge_topk(np.concatenate(parts, axis=1), k)
    undefined = knn.zero_rows(np.asarray(query, dtype=np.float32))
    best[undefined, :, 0], best[undefined, :, 1] = np.nan, knn.EMPTY
    return best


def search_in_parts(query: np.ndarray, parts: list, k: int,
                    query_codes: np.ndarray | None = None):
    """Exact cosine kNN of a few query rows (in memory), one task per part of the
    reference (:meth:`scimpute_dask.engine.search.PreparedTiles.parts`), merged.

    For a sample of cells searched against a large reference: split by cells,
    every task would read the whole reference; split by reference rows, each
    reads its part once. The same lists as :func:`search_graph` (its order of
    candidates is total, whatever the tiling).

    Returns
    -------
    dask.delayed.Delayed
        Of the packed ``(n_query, k, 2)``: cosine (NaN) and reference row (``-1``)
        per slot.
    """
    found = [dask.delayed(knn.search_block)(query, part, k, query_codes) for part in parts]
    return dask.delayed(_merge_parts)(query, k, *found)


def _drop_self(indices, similarity, rows) -> np.ndarray:
    idx, sim = knn.drop_self(indices, similarity, rows)
    return np.stack([idx.astype(np.float64), sim.astype(np.float64)], axis=-1)


def exclude_self(indices: da.Array, similarity: da.Array) -> tuple[da.Array, da.Array]:
    """Self-imputation: remove each cell from its own ``k + 1`` neighbours (k remain).

    ``indices``/``similarity`` come from a search with the same matrix
    as query and reference and ``k + 1`` neighbours; see :func:`knn.drop_self`.
    """
    rows = da.arange(indices.shape[0], chunks=(indices.chunks[0],), dtype=np.int64)
    packed = da.map_blocks(_drop_self, indices.rechunk({1: -1}), similarity.rechunk({1: -1}),
                           rows[:, None], new_axis=2,
                           chunks=(indices.chunks[0], (indices.shape[1] - 1,), (2,)),
                           dtype=np.float64)
    return packed[..., 0].astype(np.int32), packed[..., 1].astype(np.float32)


@dataclass(frozen=True)
class Blend:
    """The linear model of a blended imputation, lazily (:mod:`~scimpute_dask.kernels.ridge`).

    ``expm1(weight·log1p(kNN) + (1 − weight)·clip(features @ coef + intercept, 0, upper))``.
    """

    weight: float  # the neighbours' share, 0 < weight < 1
    features: da.Array  # (n_query, s): the query's z-scored log1p shared genes
    coef: da.Array  # (s, n_genes)
    intercept: da.Array  # (n_genes,)
    upper: da.Array  # (n_genes,): the reference's largest log1p value of each gene
    key: dict | None = None  # what the model was fitted from (a stored stage's key)

    def genes(self, positions: np.ndarray) -> Blend:
        """The model of the genes at ``positions`` (of its ``n_genes``)."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == self.coef.shape[1] and \
                np.array_equal(positions, np.arange(len(positions))):
            return self
        return Blend(self.weight, self.features, self.coef[:, positions],
                     self.intercept[positions], self.upper[positions], self.key)


def _impute_block(indices, weights, reference, wide, *model, dtype, average, blend
                  ) -> np.ndarray:
    values = imputation.weighted_mean(_one_block(indices), _one_block(weights),
                                      _one_block(reference), average=average)
    if model:
        z, coef, intercept, upper = (_one_block(m) for m in model)
        values = ridge.blend(values, ridge.predict(z, coef, intercept, upper), blend)
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
    blend: Blend | None = None,
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
    blend
        The linear model of the same genes to blend the average with, in the
        same task (a query block of its features times a gene block of its
        coefficients); None: the neighbours' average alone.

    Returns
    -------
    dask.array.Array
        ``(n_query, n_genes)`` chunked ``(query chunk, reference gene chunk)``.
    """
    reference = reference.rechunk({0: -1})
    is_wide = np.zeros(reference.shape[1], dtype=bool)
    if wide is not None:
        is_wide[np.asarray(wide, dtype=np.int64)] = True
    model = []
    if blend is not None:
        genes = reference.chunks[1]
        model = [blend.features.rechunk((indices.chunks[0], -1)), "is",
                 blend.coef.rechunk((-1, genes)), "sg",
                 blend.intercept.rechunk((genes,)), "g", blend.upper.rechunk((genes,)), "g"]
    return da.blockwise(
        partial(_impute_block, dtype=dtype, average=average,
                blend=None if blend is None else blend.weight), "ig",
        indices.rechunk({1: -1}), "ik",
        weights.rechunk({1: -1}), "ik",
        reference, "cg",
        da.from_array(is_wide, chunks=(reference.chunks[1],)), "g",
        *model,
        concatenate=False,
        dtype=dtype,
    )


# --------------------------------------------------------------------------- #
# The linear model of a blend: sums over reference row blocks, solved per gene block
# --------------------------------------------------------------------------- #
def _gram_block(block) -> np.ndarray:
    return ridge.gram_block(block)[None]


def ridge_gram(features: da.Array) -> da.Array:
    """``[Σx; Σxx']`` of the reference's log1p shared genes, summed over its row blocks
    (:func:`scimpute_dask.kernels.ridge.gram_block`): ``(s + 1, s)``, lazy."""
    features = _single_chunk_columns(features)
    s = features.shape[1]
    return features.map_blocks(
        _gram_block, new_axis=1,
        chunks=((1,) * features.numblocks[0], (s + 1,), (s,)), dtype=np.float64,
        meta=np.empty((0, 0, 0))).sum(axis=0, split_every=4)


def _cross_block(features, targets) -> np.ndarray:
    return ridge.cross_block(_one_block(features), targets)[None]


def ridge_cross(features: da.Array, targets: da.Array) -> da.Array:
    """``[Σy; Σxy']`` of the log1p targets and features over the reference's row blocks:
    ``(s + 1, n_genes)`` chunked like the targets' genes, lazy.

    ``features`` ``(n_reference, s)`` and ``targets`` ``(n_reference, n_genes)``
    (dense or CSR blocks) must have the same row chunks: each task holds one
    row block of both and its ``(s + 1) × gene block`` partial sums.
    """
    features = _single_chunk_columns(features)
    s = features.shape[1]
    return da.blockwise(
        _cross_block, "rpg", features, "rs", targets, "rg", new_axes={"p": s + 1},
        adjust_chunks={"r": 1}, concatenate=False, dtype=np.float64,
        meta=np.empty((0, 0, 0))).sum(axis=0, split_every=4)


def ridge_coefficients(cross: da.Array, factor: ridge.Factor) -> da.Array:
    """The coefficients ``(s, n_genes)`` of each gene block, from :func:`ridge_cross`.

    The factorisation is one task of the graph (a dependency of every block), not a
    constant copied into each.
    """
    s = cross.shape[0] - 1
    return cross.map_blocks(ridge.coefficients_block, dask.delayed(factor),
                            chunks=((s,), cross.chunks[1]), dtype=np.float64)


def ridge_features(query: da.Array, mean: np.ndarray, sd: np.ndarray) -> da.Array:
    """The query's z-scored log1p shared genes (its own mean and sd), blockwise."""
    return _single_chunk_columns(query).map_blocks(ridge.zscore_log1p, mean, sd,
                                                   dtype=np.float64)


def log1p_sums(x: da.Array) -> tuple[da.Array, da.Array]:
    """``Σ log1p`` and ``Σ log1p²`` of every column (dense or CSR blocks), lazy."""
    sums = x.map_blocks(_log1p_moments_block, new_axis=1,
                        chunks=((1,) * x.numblocks[0], (2,), x.chunks[1]),
                        dtype=np.float64, meta=np.empty((0, 0, 0))).sum(axis=0)
    return sums[0], sums[1]


def column_max(x: da.Array) -> da.Array:
    """The largest magnitude of every column (NaN skipped), of dense or CSR blocks."""
    return x.map_blocks(imputation.column_max, chunks=((1,) * x.numblocks[0], x.chunks[1]),
                        dtype=np.float64, meta=np.empty((0, 0))).max(axis=0)


def _log1p_moments_block(block) -> np.ndarray:
    if sparse.issparse(block):
        block = sparse.csr_matrix(block)
        x = np.log1p(block.data.astype(np.float64))
        return np.stack([np.bincount(block.indices, x, block.shape[1]),
                         np.bincount(block.indices, x * x, block.shape[1])])[None]
    x = np.log1p(block.astype(np.float64))
    return np.stack([x.sum(axis=0), (x * x).sum(axis=0)])[None]


def log1p_variance(x: da.Array) -> da.Array:
    """The variance of ``log1p`` of every column, of dense or CSR blocks (from a CSR
    block's entries: the zeros it leaves out add nothing to either sum)."""
    if not sparse.issparse(x._meta):
        return da.log1p(x.astype(np.float64)).var(axis=0)
    total, squares = log1p_sums(x)
    n = max(1, x.shape[0])
    mean = total / n
    return squares / n - mean * mean


def _score_block(imputed, measured, *patch, at) -> np.ndarray:
    values = _one_block(imputed)
    if patch:
        values = values.astype(np.float64)
        values[:, at] = _one_block(patch[0])
    return scoring.rounded_cosine(values, _one_block(measured))


def scores_graph(imputed_shared: da.Array, query_shared: da.Array,
                 patch: tuple[np.ndarray, da.Array] | None = None) -> da.Array:
    """scimpute's per-cell validation score, from the stored imputation of the shared genes.

    Parameters
    ----------
    imputed_shared
        ``(n_query, n_shared)`` imputed values of the shared genes, as stored:
        each rounds to 2 decimals as its float64 weighted mean does.
    query_shared
        ``(n_query, n_shared)`` measured values, same genes in the same order and
        the same row chunks.
    patch
        ``(columns, values)``: float64 values of the columns that are wide
        genes (stored as the nearest float32), to use in their place.
    """
    args = [] if patch is None else [patch[1].rechunk((imputed_shared.chunks[0], -1)), "ih"]
    return da.blockwise(
        partial(_score_block, at=None if patch is None else patch[0]), "i",
        imputed_shared.rechunk({1: -1}), "ig",
        query_shared.rechunk((imputed_shared.chunks[0], -1)), "ig",
        *args,
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
