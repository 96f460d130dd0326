"""Weighted vote of a query cell's neighbours over reference labels (label transfer)."""

from __future__ import annotations

import numpy as np


def vote(indices: np.ndarray, weights: np.ndarray, codes: np.ndarray, n_labels: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted vote per query cell over the labels of its neighbours.

    Parameters
    ----------
    indices, weights
        ``(n, k)`` reference rows (``-1`` = none) and weights.
    codes
        ``(n_reference,)`` integer label code of every reference row, ``0..n_labels-1``.
    n_labels
        Number of labels.

    Returns
    -------
    label : numpy.ndarray
        ``(n,)`` winning code; ties go to the lower code; ``-1`` without neighbours.
    share : numpy.ndarray
        ``(n,)`` winner's weight over the total weight; NaN without neighbours.
    """
    indices = np.asarray(indices, dtype=np.int64)
    w = np.where(indices >= 0,
                 np.maximum(np.nan_to_num(np.asarray(weights, dtype=np.float64)), 0.0), 0.0)
    n = indices.shape[0]
    votes = np.zeros((n, n_labels))
    rows = np.broadcast_to(np.arange(n)[:, None], indices.shape)
    np.add.at(votes, (rows, np.asarray(codes)[np.maximum(indices, 0)]), w)
    total = votes.sum(axis=1)
    label = votes.argmax(axis=1)
    has = total > 0
    share = np.full(n, np.nan)
    share[has] = votes[has, label[has]] / total[has]
    return np.where(has, label, -1), share
