"""A finished ``validate`` output, reused by a run (``run --validation DIR``).

:mod:`.validate` writes its tables into a directory; a run of the same query
and reference can carry them along: the per-gene reliability joins the
imputed AnnData's ``var``, the held-out score vs. sparsity plot and the
summary join ``report.html``. Everything here is checked before the run does
any work: the directory must be a validation of the run's own inputs (the
identities :mod:`.validate` records, compared with the run's inputs' cheap
fingerprints) and rate every reference gene.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from upath import UPath

from scimpute_dask.errors import InputError
from scimpute_dask.io.convert import source_fingerprint
from scimpute_dask.io.storage import location
from scimpute_dask.io.store import ExpressionStore, is_store

log = logging.getLogger("scimpute_dask")

MANIFEST = "validate.json"
GENES = "genes.tsv"
CELLS = "cells.tsv"
SUMMARY = "summary.tsv"
RELIABILITY = "reliability.tsv"
#: Columns of ``reliability.tsv`` that join the run's ``var`` (``shared`` is ``measured``).
VAR_COLUMNS = ("agreement", "predicted_pearson", "heldout_pearson")
#: Search parameters that change what the held-out scores describe.
_SEARCH = ("k", "normalize", "weighting", "temperature", "average", "blend", "ridge_alpha")


@dataclass(frozen=True)
class HeldOut:
    """The tables of a validation directory that a run uses."""

    directory: Path
    parameters: dict  # of the validation, from validate.json
    reliability: pd.DataFrame  # VAR_COLUMNS, one row per reference gene, in reference order
    genes: pd.DataFrame  # genes.tsv: per shared gene, sparsity and held-out scores
    summary: pd.DataFrame  # summary.tsv: level × metric statistics


def _fingerprint(source, layout: str, layer: str | None) -> dict | None:
    """What a conversion of ``source`` records, from its metadata only; None in memory.

    In-memory inputs are identified by a hash of their values, which only
    their conversion computes; their names are still checked.
    """
    if not isinstance(source, str | os.PathLike | UPath):
        return None
    src = location(source)
    return ExpressionStore.open(src).fingerprint if is_store(src) \
        else source_fingerprint(src, layout, layer=layer)


def _table(directory: Path, name: str, hint: str = "", **kwargs) -> pd.DataFrame:
    path = directory / name
    if not path.is_file():
        raise InputError(f"{directory}: no {name}{hint}; give the output directory of "
                         f"'scimpute-dask validate'")
    try:
        return pd.read_csv(path, sep="\t", **kwargs)
    except (ValueError, KeyError) as err:
        raise InputError(f"{path}: not a table written by 'scimpute-dask validate' ({err})"
                         ) from None


def load(directory: str | os.PathLike, sources: dict[str, tuple], labels: dict[str, str],
         q_cells: np.ndarray, r_genes: np.ndarray, measured: np.ndarray,
         parameters: dict) -> HeldOut:
    """Read a ``validate`` output directory for a run, refusing one of other inputs.

    Parameters
    ----------
    directory
        The ``--out`` of ``scimpute-dask validate``.
    sources
        ``"query"`` and ``"reference"`` -> ``(source, layout, layer)`` of the run.
    labels
        The run's labels of its inputs, for the messages.
    q_cells, r_genes, measured
        The run's query cells, reference genes and which of those the query measured.
    parameters
        The run's search parameters: a difference from the validation's is logged.

    Raises
    ------
    InputError
        Naming ``directory``: not a validation, without ``reliability.tsv``, or
        of other inputs (recorded identity, query cells, reference or shared genes).
    """
    directory = Path(directory).absolute()
    manifest = directory / MANIFEST
    try:
        record = json.loads(manifest.read_text())
        recorded, params = record["inputs"], record["parameters"]
    except FileNotFoundError:
        raise InputError(f"{directory}: no {MANIFEST}; give the output directory of "
                         f"'scimpute-dask validate'") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{manifest}: does not record the validated inputs ({err!r}); run "
                         f"'scimpute-dask validate' again") from None
    for role, (source, layout, layer) in sources.items():
        found = _fingerprint(source, layout, layer)
        if found is not None and found != recorded.get(role):
            raise InputError(f"{directory}: a validation of {record.get(role)} as the {role}, "
                             f"not of this run's {role} {labels[role]} (or it changed since)")
    rel = _table(directory, RELIABILITY, " (validate ran with --no-reliability)",
                 keep_default_na=False, na_values=["nan"], dtype={"gene": str})
    missing = {"gene", "shared", *VAR_COLUMNS}.difference(rel.columns)
    if missing:
        raise InputError(f"{directory / RELIABILITY}: no column {', '.join(sorted(missing))}; "
                         f"not written by 'scimpute-dask validate'")
    if list(rel["gene"]) != [str(g) for g in r_genes]:
        raise InputError(f"{directory / RELIABILITY}: rates other genes than the reference "
                         f"genes of {labels['reference']}")
    if not np.array_equal(rel["shared"].to_numpy(bool), measured):
        raise InputError(f"{directory / RELIABILITY}: its shared genes are not those of "
                         f"{labels['query']} and {labels['reference']}")
    cells = _table(directory, CELLS, usecols=[0], keep_default_na=False, dtype=str).iloc[:, 0]
    if list(cells) != [str(c) for c in q_cells]:
        raise InputError(f"{directory / CELLS}: scores other cells than the query cells of "
                         f"{labels['query']}")
    # validations before --average and --blend averaged so, without a linear model
    recorded = {"average": "mean", "blend": 1.0, "ridge_alpha": None, **params}
    differ = {p: (recorded.get(p), parameters[p]) for p in _SEARCH
              if recorded.get(p) != parameters[p]}
    if differ:
        log.warning("%s was validated with other search parameters than this run (%s): its "
                    "held-out scores describe those", directory, ", ".join(
                        f"{p} {a} vs {b}" for p, (a, b) in differ.items()))
    return HeldOut(directory, params, rel[list(VAR_COLUMNS)],
                   _table(directory, GENES, na_values=["nan"], dtype={"gene": str}),
                   _table(directory, SUMMARY, na_values=["nan"]))
