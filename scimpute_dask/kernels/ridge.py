"""A ridge regression from the shared genes to every reference gene, in log1p space.

kNN averaging can only return mixtures of reference cells that exist; a linear
model follows the gene–gene covariation a measured profile implies even where
no reference cell matches it well (the common case across technologies). It
errs differently, so a blend of the two in log space beats either alone:
``expm1(a·log1p(kNN) + (1 − a)·ridge)``.

The model is scikit-learn's ``Ridge(alpha)`` (with intercept) fitted on the
reference: features ``z = (log1p(x) − μ) / σ``, the shared genes z-scored
per gene over the reference cells (population standard deviation, 0 → 1, as
``StandardScaler``), targets ``log1p`` of every reference gene. Everything
the fit needs is a handful of sums over reference cells, accumulated block by
block and never holding the reference whole (:class:`Gram` over the shared
genes, :func:`cross_block` per block of target genes): with ``C = Σxx' −
nμμ'`` and ``D = diag(σ)``, the coefficients solve ``(D⁻¹CD⁻¹ + αI) B =
D⁻¹(Σxy' − μΣy')`` and the intercept is the targets' mean. The same sums over
the shared genes alone give every inner fold of the tuner its model (the
sub-blocks of one fold's training genes and held-out genes), with no further
pass over the reference.

A query is z-scored over its own cells (per dataset: each technology's
gene-specific capture cancels, as with the search's ``zscore``), and a
prediction is clipped to the gene's range in the reference, ``[0,
log1p(max)]``, where a neighbour average always lies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy import sparse


def log1p_dense(block) -> np.ndarray:
    """``log1p`` of a dense or CSR block, as a dense float64 array."""
    if sparse.issparse(block):
        block = block.toarray()
    return np.log1p(np.asarray(block, dtype=np.float64))


def log1p_block(block):
    """``log1p`` of a dense or CSR block in float64, a CSR block kept sparse (log1p 0 = 0)."""
    if sparse.issparse(block):
        block = sparse.csr_matrix(block, dtype=np.float64, copy=True)
        block.data = np.log1p(block.data)
        return block
    return np.log1p(np.asarray(block, dtype=np.float64))


def _products(x, y) -> np.ndarray:
    """``x'y`` as a dense float64 array, of dense or CSR operands (a CSR one's entries
    only)."""
    if sparse.issparse(x) and sparse.issparse(y):
        return (x.T @ y).toarray()
    if sparse.issparse(y):
        return np.asarray((y.T @ x).T)
    return np.asarray(x.T @ y)


def gram_block(block) -> np.ndarray:
    """``[Σz, Σzz']`` of one block's rows ``z = log1p(x)``: ``(g + 1, g)`` float64, the first
    row the column sums (of a CSR block, from its entries). Summed over row blocks they
    give :class:`Gram`."""
    x = log1p_block(block)
    return np.vstack([np.asarray(x.sum(axis=0)).reshape(1, -1), _products(x, x)])


def cross_block(features, targets) -> np.ndarray:
    """``[Σy; Σxy']`` of one row block: ``(s + 1, g)`` float64, the first row the targets'
    column sums, then the cross products of the log1p features ``(rows, s)`` and the log1p
    targets ``(rows, g)`` (each dense or CSR: a CSR block's entries only)."""
    y = log1p_block(targets)
    return np.vstack([np.asarray(y.sum(axis=0)).reshape(1, -1),
                      _products(log1p_block(features), y)])


@dataclass(frozen=True)
class Gram:
    """The sums over ``n`` reference cells of their log1p shared genes."""

    n: int
    sum: np.ndarray  # (s,) Σx
    outer: np.ndarray  # (s, s) Σxx'

    @classmethod
    def from_packed(cls, n: int, packed: np.ndarray) -> Gram:
        """From the sum of :func:`gram_block` over row blocks."""
        return cls(int(n), np.asarray(packed[0], np.float64), np.asarray(packed[1:], np.float64))

    @classmethod
    def of(cls, x) -> Gram:
        """Of a whole matrix in memory (reference cells × shared genes)."""
        x = np.asarray(x)
        return cls.from_packed(len(x), gram_block(x))

    def subset(self, genes: np.ndarray) -> Gram:
        genes = np.asarray(genes, dtype=np.int64)
        return Gram(self.n, self.sum[genes], self.outer[np.ix_(genes, genes)])

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(1, self.n)

    @property
    def sd(self) -> np.ndarray:
        """Population standard deviation; 1 where a gene is constant (as StandardScaler)."""
        return standard_deviation(self.n, self.sum, np.diag(self.outer))

    @property
    def constant(self) -> np.ndarray:
        """Genes with one value in every cell (their z-scores are all 0)."""
        return is_constant(self.n, self.sum, np.diag(self.outer))


def is_constant(n: int, total: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """Genes whose variance is zero but for rounding (a few ulps of their mean square)."""
    n = max(1, n)
    mean = total / n
    return squares / n - mean * mean <= 1e-12 * np.maximum(squares / n, 1e-300)


def standard_deviation(n: int, total: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """Per-gene population sd from ``Σx`` and ``Σx²``; constant genes get 1."""
    n = max(1, n)
    mean = total / n
    constant = is_constant(n, total, squares)
    return np.where(constant, 1.0, np.sqrt(np.where(constant, 1.0, squares / n - mean * mean)))


@dataclass(frozen=True)
class Factor:
    """One α's factorised normal equations of a :class:`Gram`."""

    alpha: float
    mean: np.ndarray  # μ, (s,)
    sd: np.ndarray  # σ, (s,)
    constant: np.ndarray  # (s,) bool: genes without variance
    cholesky: tuple  # scipy.linalg.cho_factor of D⁻¹CD⁻¹ + αI


def factor(gram: Gram, alpha: float) -> Factor:
    """Factorise ``D⁻¹(Σxx' − nμμ')D⁻¹ + αI`` (the z-scored features' Gram matrix)."""
    mean, sd, constant = gram.mean, gram.sd, gram.constant
    centred = gram.outer - gram.n * np.outer(mean, mean)
    # a constant gene's z-scores are exactly 0: no rounding residue may give it weight
    centred[constant] = 0.0
    centred[:, constant] = 0.0
    a = centred / np.outer(sd, sd)
    a[np.diag_indices_from(a)] += alpha
    return Factor(float(alpha), mean, sd, constant, scipy.linalg.cho_factor(a, lower=True))


def coefficients(f: Factor, target_sum: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """``B`` (s × g) on the z-scored features, from the targets' ``Σy`` (g,) and ``Σxy'``
    (s × g) over the same cells as the factor's Gram matrix."""
    rhs = (np.asarray(cross, np.float64) - np.outer(f.mean, target_sum)) / f.sd[:, None]
    rhs[f.constant] = 0.0
    return scipy.linalg.cho_solve(f.cholesky, rhs)


def coefficients_block(packed: np.ndarray, f: Factor) -> np.ndarray:
    """:func:`coefficients` from a summed :func:`cross_block`."""
    return coefficients(f, packed[0], packed[1:])


def zscore_log1p(x, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """The model's features: ``(log1p(x) − mean) / sd``, float64."""
    return (log1p_dense(x) - mean) / sd


def predict(z: np.ndarray, coef: np.ndarray, intercept: np.ndarray, upper: np.ndarray
            ) -> np.ndarray:
    """log1p expression predicted from features ``z`` (n × s), clipped to ``[0, upper]``
    per gene (the reference's largest log1p value)."""
    return np.clip(z @ coef + intercept, 0.0, upper)


def blend(knn: np.ndarray, predicted: np.ndarray, a: float) -> np.ndarray:
    """``expm1(a·log1p(knn) + (1 − a)·predicted)``: the neighbours' average and the linear
    model's log1p prediction, mixed in log space. NaN (no neighbours) stays NaN."""
    return np.expm1(a * np.log1p(np.asarray(knn, np.float64)) + (1.0 - a) * predicted)
