"""scimpute-dask: out-of-core, Dask-parallel gene-expression imputation.

A drop-in re-implementation of scimpute: for each spatial (query) cell, find
the k most cosine-similar single-cell (reference) cells on the shared genes
and average their full profiles, weighted by similarity + 1.

The pipeline, one module per stage::

    conversion  text / DataFrame / AnnData / 10x  ->  chunked Zarr stores
    anndata_io  AnnData in (.h5ad, AnnData-Zarr, layers, obs clusters) and out
    tenx        10x matrix.mtx directories, streamed
    validation  every input check, before any output is written
    knn         exact cosine top-k kernels on blocks
    imputation  weighted-mean kernels on blocks
    scoring     scimpute's per-cell validation score
    normalization  transforms of the shared genes for the neighbour search
    metrics     held-out accuracy metrics (CSS, Pearson, Spearman, MSE)
    validate    k-fold cross-validation over the shared genes, reliability
    transfer    label transfer by the neighbours' weighted vote
    selfimpute  dropout recovery inside one dataset
    graph       the Dask graphs tiling those kernels
    export      scimpute's files, streamed from Zarr; atomic output directory
    plotting    spatial maps and per-gene score figures
    report      report.html
    provenance  versions, checksums and peak memory for run.json
    pipeline    the run, stage by stage
    compat      scimpute's Python API (expression_imputation and the steps)
    api         the scanpy-style API: impute(adata_spatial, adata_ref, ...)
    cli         the ``scimpute-dask`` command
"""

__version__ = "0.1.0"

from .api import impute
from .compat import (
    expression_imputation,
    impute_expression,
    merge_imputation_chunks,
    read_inputs,
    similarity_matrix,
    validate_results,
)
from .conversion import ExpressionStore, convert
from .pipeline import RunResult, run_imputation
from .validate import ValidationResult, cross_validate
from .validation import InputError

__all__ = [
    "ExpressionStore",
    "InputError",
    "RunResult",
    "ValidationResult",
    "convert",
    "cross_validate",
    "expression_imputation",
    "impute",
    "impute_expression",
    "merge_imputation_chunks",
    "read_inputs",
    "run_imputation",
    "similarity_matrix",
    "validate_results",
]
