"""Self-imputation's dropout benchmark: the baselines against a NumPy computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scimpute_dask.tools.selfimpute import dropout_recovery, mask_nonzero, self_impute


def _scores(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    return float(np.corrcoef(truth, pred)[0, 1]), float(np.mean((truth - pred) ** 2))


@pytest.mark.parametrize("seed", [0, 3])
def test_dropout_baselines_match_numpy(seed):
    rng = np.random.default_rng(seed)
    values = rng.poisson(2.0, (12, 6)).astype(float) * rng.uniform(0.5, 3.0, 6)
    values[:, 5] = 0.0
    values[4, 5] = 7.0  # a gene with one non-zero value: if it is hidden, none is left
    frame = pd.DataFrame(values, [f"c{i}" for i in range(12)], [f"g{j}" for j in range(6)])
    got = dropout_recovery(frame, k=3, fraction=0.25, seed=seed)

    masked, mask = mask_nonzero(values, 0.25, seed)
    imputed = self_impute(pd.DataFrame(masked, frame.index, frame.columns), k=3).to_numpy()
    mask &= np.isfinite(imputed).all(axis=1)[:, None]
    rows, cols = np.nonzero(mask)
    truth = values[rows, cols]
    cell_mean, gene_mean, nonzero_mean = [], [], []
    for i, j in zip(rows, cols, strict=True):
        cell_mean.append(sum(masked[i, :]) / masked.shape[1])
        gene_mean.append(sum(masked[:, j]) / masked.shape[0])
        kept = [v for v in masked[:, j] if v != 0]  # the hidden entries are zeros now
        nonzero_mean.append(sum(kept) / len(kept) if kept else 0.0)
    assert got["n_masked"] == len(truth) > 5
    # the baselines use what is left after masking, not the hidden values
    assert got["gene_mean_mse"] != pytest.approx(_scores(truth, values.mean(axis=0)[cols])[1])
    for prefix, pred in (("", imputed[rows, cols]), ("cell_mean_", cell_mean),
                         ("gene_mean_", gene_mean), ("gene_nonzero_mean_", nonzero_mean)):
        pearson, mse = _scores(truth, np.asarray(pred))
        assert got[prefix + "pearson"] == pytest.approx(pearson, rel=1e-9, abs=1e-12)
        assert got[prefix + "mse"] == pytest.approx(mse, rel=1e-9)

