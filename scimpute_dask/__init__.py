"""scimpute-dask: out-of-core, Dask-parallel gene-expression imputation.

A drop-in re-implementation of scimpute: for each spatial (query) cell, find
the k most cosine-similar single-cell (reference) cells on the shared genes
and average their full profiles, weighted by similarity + 1.

The package, in the order data flows through it::

    errors, checks, config, plan   the foundation: errors, checks, options, block sizes
    io/          inputs in (a reader registry: text, compressed text, DataFrame,
                 AnnData, 10x, stores) -> chunked Zarr stores; AnnData out
    kernels/     pure NumPy/numba block kernels: kNN, weighted mean, scores, metrics
    engine/      the Dask side: graphs, resumable stages, where they run, checked inputs
    export/      scimpute's files, the atomic output directory, run.json provenance
    plotting/    figures and report.html
    tools/       held-out validation, tuning, label transfer, self-imputation, a
                 finished run's genes imputed on demand
    pipeline     the run: check -> convert -> kNN -> impute -> score -> export
    compat, api  scimpute's Python API; the scanpy-style impute()
    cli          the ``scimpute-dask`` command

The public names below are imported on first use, so that ``import
scimpute_dask`` and ``scimpute-dask --help`` do not pay for Dask, Zarr and
numba up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_PUBLIC = {
    "ExpressionStore": "scimpute_dask.io.store",
    "InputError": "scimpute_dask.errors",
    "RunConfig": "scimpute_dask.config",
    "RunResult": "scimpute_dask.pipeline",
    "ValidationResult": "scimpute_dask.tools.validate",
    "convert": "scimpute_dask.io.convert",
    "cross_validate": "scimpute_dask.tools.validate",
    "expression_imputation": "scimpute_dask.compat",
    "impute": "scimpute_dask.api",
    "impute_expression": "scimpute_dask.compat",
    "merge_imputation_chunks": "scimpute_dask.compat",
    "read_inputs": "scimpute_dask.compat",
    "read_run": "scimpute_dask.tools.lazy",
    "run_imputation": "scimpute_dask.pipeline",
    "similarity_matrix": "scimpute_dask.compat",
    "validate_results": "scimpute_dask.compat",
}

__all__ = [
    "ExpressionStore",
    "InputError",
    "RunConfig",
    "RunResult",
    "ValidationResult",
    "convert",
    "cross_validate",
    "expression_imputation",
    "impute",
    "impute_expression",
    "merge_imputation_chunks",
    "read_inputs",
    "read_run",
    "run_imputation",
    "similarity_matrix",
    "validate_results",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from scimpute_dask.api import impute
    from scimpute_dask.compat import (
        expression_imputation,
        impute_expression,
        merge_imputation_chunks,
        read_inputs,
        similarity_matrix,
        validate_results,
    )
    from scimpute_dask.config import RunConfig
    from scimpute_dask.errors import InputError
    from scimpute_dask.io.convert import convert
    from scimpute_dask.io.store import ExpressionStore
    from scimpute_dask.pipeline import RunResult, run_imputation
    from scimpute_dask.tools.validate import ValidationResult, cross_validate


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'scimpute_dask' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
