"""Self-imputation: dropout recovery inside one single-cell dataset.

The job of DeepImpute and cnnImpute, done the scimpute way: the dataset is
both query and reference, each cell's ``k`` most cosine-similar *other* cells
are found on all genes, and its profile is replaced by their weighted mean.
Evaluated with those tools' protocol (:func:`dropout_recovery`): hide 10 % of
the non-zero entries at random, impute from the masked data, and score the
hidden entries (Pearson, MSE).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd

from scimpute_dask.checks import check_positive_int
from scimpute_dask.config import DEFAULT_TEMPERATURE, RunConfig
from scimpute_dask.engine import graph, search
from scimpute_dask.errors import InputError
from scimpute_dask.kernels.imputation import neighbour_weights


def self_impute_graph(x: da.Array, k: int, normalize: str = "none", weighting: str = "cosine+1",
                      temperature: float = DEFAULT_TEMPERATURE) -> da.Array:
    """Lazy self-imputation of a cells × genes Dask array (row chunks set the blocks).

    Each cell's ``k + 1`` nearest cells are found and the cell itself removed
    (:func:`graph.exclude_self`), so exactly ``k`` other cells are averaged,
    duplicates of the cell included.
    """
    idx, sim = search.knn(*graph.search_space(x, x, normalize), k + 1)
    idx, sim = graph.exclude_self(idx, sim)
    return graph.impute_graph(idx, neighbour_weights(sim, weighting, temperature), x)


def self_impute(expression: pd.DataFrame, k: int = 25, *, normalize: str = "none",
                weighting: str = "cosine+1", temperature: float = DEFAULT_TEMPERATURE,
                chunk_size: int = 2048) -> pd.DataFrame:
    """Replace each cell's profile by the weighted mean of its ``k`` most similar other cells.

    Parameters
    ----------
    expression
        Cells × genes, non-negative.
    k
        Neighbours per cell (other cells only).
    normalize, weighting, temperature
        Search options, as for :func:`~scimpute_dask.run_imputation`.
    chunk_size
        Cells per block.

    Returns
    -------
    pandas.DataFrame
        Same shape and labels; NaN rows for all-zero cells.
    """
    k = check_positive_int(k, "k_neighbors")
    RunConfig.create(["normalize", "weighting", "temperature"], normalize=normalize,
                     weighting=weighting, temperature=temperature)
    if k >= len(expression):
        raise InputError(f"k_neighbors={k} must be below the number of cells "
                         f"({len(expression)}) in self-imputation")
    values = expression.to_numpy(np.float32)
    if not np.isfinite(values).all() or (values < 0).any():
        raise InputError("expression must be finite and non-negative")
    x = da.from_array(values, chunks=(chunk_size, -1))
    out = self_impute_graph(x, k, normalize, weighting, temperature).compute()
    return pd.DataFrame(out, index=expression.index, columns=expression.columns)


def mask_nonzero(values: np.ndarray, fraction: float = 0.1, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Zero a random ``fraction`` of the non-zero entries (seeded).

    Returns the masked copy and the boolean mask of the zeroed entries.
    """
    values = np.asarray(values)
    rows, cols = np.nonzero(values)
    pick = np.random.default_rng(seed).choice(len(rows), round(fraction * len(rows)),
                                              replace=False)
    mask = np.zeros(values.shape, dtype=bool)
    mask[rows[pick], cols[pick]] = True
    return np.where(mask, 0, values), mask


def dropout_recovery(expression: pd.DataFrame, k: int = 25, *, fraction: float = 0.1,
                     seed: int = 0, **options) -> dict[str, float]:
    """DeepImpute/cnnImpute's evaluation: mask non-zero entries, self-impute, score them.

    Parameters
    ----------
    expression
        Cells × genes.
    k
        Neighbours per cell.
    fraction
        Share of the non-zero entries hidden.
    seed
        Seed of the mask.
    **options
        ``normalize``, ``weighting``, ``temperature``, ``chunk_size`` of :func:`self_impute`.

    Returns
    -------
    dict
        ``pearson`` and ``mse`` of the imputed against the true values over the
        masked entries (of cells that could be imputed), ``n_masked``, and the
        same two scores for three baselines, each computed from the masked
        data (the hidden entries count as the zeros they were turned into, or
        are left out where only non-zero values are used):

        * ``cell_mean_*``: the entry's cell's mean over all genes;
        * ``gene_mean_*``: the entry's gene's mean over all cells;
        * ``gene_nonzero_mean_*``: the mean of the gene's non-zero values
          (0 for a gene with none left) — the hidden entries were non-zero,
          so this is the stronger per-gene guess.
    """
    values = expression.to_numpy(np.float64)
    masked, mask = mask_nonzero(values, fraction, seed)
    imputed = self_impute(pd.DataFrame(masked, expression.index, expression.columns), k,
                          **options).to_numpy()
    mask &= np.isfinite(imputed).all(axis=1)[:, None]
    truth = values[mask]
    nonzero = (masked != 0).sum(axis=0)
    nonzero_mean = np.divide(masked.sum(axis=0), nonzero, out=np.zeros(masked.shape[1]),
                             where=nonzero > 0)
    predictions = {
        "": imputed[mask],
        "cell_mean_": np.broadcast_to(masked.mean(axis=1, keepdims=True), masked.shape)[mask],
        "gene_mean_": np.broadcast_to(masked.mean(axis=0), masked.shape)[mask],
        "gene_nonzero_mean_": np.broadcast_to(nonzero_mean, masked.shape)[mask],
    }
    out: dict[str, float] = {"n_masked": int(mask.sum())}
    for prefix, pred in predictions.items():
        out[prefix + "pearson"] = float(np.corrcoef(truth, pred)[0, 1])
        out[prefix + "mse"] = float(np.mean((truth - pred) ** 2))
    return out
