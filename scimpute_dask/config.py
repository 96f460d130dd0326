"""Every option of the engine, declared once, and the validated run configuration.

Modelled on scikit-learn's parameter validation: each option is declared once
(:data:`OPTIONS`) with its default, its constraint (type and allowed values)
and its help text. From that one declaration come

- :class:`RunConfig`, the frozen, validated settings of a run or a
  validation, and the ``parameters`` that ``run.json`` records;
- the CLI's options (:func:`add_cli_options`), which hand the values over as
  written so that a refusal quotes them;
- the parameter documentation of :func:`~scimpute_dask.run_imputation` and
  :func:`~scimpute_dask.cross_validate` (:func:`documented`), whose defaults
  a test holds equal to these (and those :func:`~scimpute_dask.impute` shares).

Every invalid value is refused before any work with a message that names the
option (as the caller spelled it: ``--k`` on the command line, ``k`` in
Python) and says what is allowed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, make_dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from scimpute_dask.errors import InputError

LAYOUTS: tuple[str, ...] = ("genes_x_cells", "cells_x_genes")
#: Transforms of the shared genes for the neighbour search; ``"none"`` is scimpute's.
NORMALIZATIONS: tuple[str, ...] = ("none", "cpm", "log1p", "log1p_cpm", "scale", "zscore")
#: Spaces the neighbours' profiles are averaged in; ``"mean"`` is scimpute's.
AVERAGES: tuple[str, ...] = ("mean", "log1p")
#: What tuning can maximise: per-gene Pearson on the values as given, on log1p values,
#: or per-gene cosine similarity.
TUNE_METRICS: tuple[str, ...] = ("pearson", "log_pearson", "css")
#: Neighbour weights; ``"cosine+1"`` is scimpute's.
WEIGHTINGS: tuple[str, ...] = ("cosine+1", "cosine", "softmax", "uniform")
#: Default softmax temperature: the best of the held-out sweep on the real
#: Molecular Cartography sections with standardised genes (0.01 and 0.05 were
#: worse, and so were 0.2 to 0.5 in a check; ``benchmarks/accuracy.py``).
DEFAULT_TEMPERATURE = 0.1
#: Default ridge penalty of a blend's linear model (on z-scored features: comparable
#: across panels of any width); the tuner's grid spans 1 to 1,000.
DEFAULT_RIDGE_ALPHA = 100.0

#: The default memory limit is never below this.
DEFAULT_FLOOR = 600 * 2**20

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


# --------------------------------------------------------------------------- #
# Constraints: what a value may be, how a CLI string becomes one, how to say so
# --------------------------------------------------------------------------- #
class Constraint:
    """What values an option takes. ``check`` returns the value normalised or raises."""

    #: Shown in messages: "must be <description>".
    description = "a value"

    def accepts(self, value: object) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def normalise(self, value: Any) -> Any:
        return value

    def parse(self, text: str) -> Any:
        """A value from the command line's text (the text itself for strings)."""
        return text

    def check(self, value: object, name: str, written: object = None) -> Any:
        if not self.accepts(value):
            raise InputError(f"{name} must be {self.description}, got "
                             f"{_quote(written if written is not None else value)}")
        return self.normalise(value)


def _quote(value: object) -> str:
    return repr(value) if not isinstance(value, str) else f"'{value}'"


class Interval(Constraint):
    """A number of ``kind`` (``int`` or ``float``) in ``[low, high]``, finite."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None,
                 *, open_low: bool = False) -> None:
        self.kind, self.low, self.high, self.open_low = kind, low, high, open_low
        noun = "integer" if kind is int else "finite number"
        if low is not None and high is not None:
            self.description = (f"{'an' if kind is int else 'a'} {noun} in "
                                f"{'(' if open_low else '['}{low}, {high}]")
        elif low == 0:
            self.description = f"a {'positive' if open_low else 'non-negative'} {noun}"
        elif low == 1 and kind is int:
            self.description = "a positive integer"
        elif low is not None:
            self.description = f"an {noun} {'>' if open_low else '≥'} {low}"
        else:
            self.description = f"an {noun}" if kind is int else f"a {noun}"

    def accepts(self, value: object) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int and not isinstance(value, Integral):
            return False
        if not isinstance(value, Real) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def normalise(self, value: Any) -> Any:
        return self.kind(value)

    def parse(self, text: str) -> Any:
        try:
            return int(text) if self.kind is int else float(text)
        except ValueError:
            return text  # refused by check, quoted as written


class Choice(Constraint):
    def __init__(self, values: Sequence[str]) -> None:
        self.values = tuple(values)
        self.description = "one of " + ", ".join(map(repr, self.values))

    def accepts(self, value: object) -> bool:
        return isinstance(value, str) and value in self.values


class Boolean(Constraint):
    description = "True or False"

    def accepts(self, value: object) -> bool:
        return isinstance(value, bool)


class Text(Constraint):
    description = "a non-empty string"

    def accepts(self, value: object) -> bool:
        return isinstance(value, str) and value != ""


class PathLike(Constraint):
    description = "a path or URL"

    def accepts(self, value: object) -> bool:
        return isinstance(value, str | os.PathLike) or hasattr(value, "protocol")


class MemorySize(Constraint):
    """Bytes, or a size such as ``"2GB"``, ``"1.5GiB"``, ``"800MB"``."""

    description = "a size such as '2GB' or '512MiB' (or a number of bytes), at least 1 byte"

    def accepts(self, value: object) -> bool:
        try:
            return parse_memory(value) >= 1
        except InputError:
            return False

    def normalise(self, value: Any) -> int:
        return parse_memory(value)


class GeneList(Constraint):
    """``"all"``, ``"none"``, or gene names (a list, ``"A,B"`` or ``"@file"`` on the CLI)."""

    description = "'all', 'none' or a list of gene names"

    def __init__(self, keywords: tuple[str, ...] = ("all", "none"),
                 refused: dict[str, str] | None = None) -> None:
        self.keywords, self.refused = keywords, refused or {}
        self.description = " or ".join(f"'{k}'" for k in keywords) + " or a list of gene names"

    def check(self, value: object, name: str, written: object = None) -> Any:
        if isinstance(value, str) and value in self.refused:
            raise InputError(f"{name} {value}: {self.refused[value]}")
        return super().check(value, name, written)

    def accepts(self, value: object) -> bool:
        if isinstance(value, str):
            return value != ""
        return isinstance(value, list | tuple) and all(isinstance(g, str) for g in value)

    def normalise(self, value: Any) -> Any:
        if isinstance(value, str) and value not in self.keywords:
            return [value]
        return value if isinstance(value, str) else list(value)

    def parse(self, text: str) -> Any:
        if text in self.keywords or text in self.refused:
            return text
        if text.startswith("@"):
            path = Path(text[1:])
            if not path.is_file():
                raise InputError(f"{path}: gene list file not found")
            return [g for g in path.read_text().split() if g]
        return [g for g in text.split(",") if g]


class Optional(Constraint):
    """``None`` or a value of ``inner``."""

    def __init__(self, inner: Constraint) -> None:
        self.inner = inner
        self.description = f"{inner.description} (or None)"

    def accepts(self, value: object) -> bool:
        return value is None or self.inner.accepts(value)

    def check(self, value: object, name: str, written: object = None) -> Any:
        return None if value is None else self.inner.check(value, name, written)

    def parse(self, text: str) -> Any:
        return self.inner.parse(text)


def parse_memory(value: str | int | float | None) -> int:
    """Bytes from ``"2GB"``, ``"1.5GiB"``, ``"800MB"`` or a number; ``None`` = machine default.

    The default is half of the memory available now, as Dask's LocalCluster
    shares memory between its workers.
    """
    if value is None:
        return default_memory_limit()
    if isinstance(value, bool):
        raise InputError(f"memory limit must be a size such as '2GB'; got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value > 2**62:
            raise InputError(f"memory limit {value!r} is not a usable number of bytes")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"memory limit must look like '2GB' or '512MiB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_memory_limit() -> int:
    """Half the memory available now (at least 600 MiB)."""
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(DEFAULT_FLOOR, available // 2)


# --------------------------------------------------------------------------- #
# The options
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Option:
    """One option: its name, default, constraint, help, and how the CLI spells it.

    ``flag`` is the CLI option (``None``: Python only); ``cli_default``, if
    set, is the CLI's default when it differs in kind (a boolean switched off
    by ``--no-…`` has ``negated=True``).
    """

    name: str
    default: Any
    constraint: Constraint
    help: str
    flag: str | None = None
    metavar: str | None = None
    negated: bool = False  # the flag (``--no-clusters``) sets the option to False
    python_name: str | None = None  # the spelling of scimpute's API, where it differs


def _options(*options: Option) -> dict[str, Option]:
    return {o.name: o for o in options}


OPTIONS: dict[str, Option] = _options(
    # the search
    Option("k", 25, Interval(int, 1), "neighbours per query cell", "--k", "K"),
    Option("consider_clusters", True, Boolean(),
           "restrict each query cell's neighbours to reference cells of its cluster (needs an "
           "identity table or cluster_key); the CLI's --no-clusters searches all reference "
           "cells", "--no-clusters", negated=True),
    # its range depends on the table, checked where the table is read (naming the file)
    Option("cell_name_column_idx", 0, Interval(int),
           "0-based position of the cell-name column of the identity table", "--name-column",
           "IDX"),
    Option("cluster_key", None, Optional(Text()),
           "AnnData inputs: take the clusters from this obs column of the query and the "
           "reference instead of an identity table", "--cluster-key", "KEY"),
    Option("search", "exact", Choice(("exact", "approx")),
           "neighbour search: exact (every reference cell, scimpute's result) or approx "
           "(each query cell screens the reference cells of its nearest coarse lists, "
           "k-means of the reference; every candidate then ranked by the exact cosine; the "
           "number of lists probed is chosen to reach --recall on a sample)",
           "--search", "MODE"),
    Option("recall", 0.95, Interval(float, 0, 1, open_low=True),
           "search approx: the recall@k to reach against the exact search, measured on a "
           "seeded sample of 1,000 query cells (recorded in run.json with its confidence "
           "interval)", "--recall", "R"),
    Option("normalize", "none", Choice(NORMALIZATIONS),
           "transform of the shared genes for the neighbour search only: none (scimpute), "
           "cpm, log1p, log1p_cpm, scale (each gene divided by its standard deviation in its "
           "dataset) or zscore (also centred on its mean; prefer softmax or cosine+1 weights "
           "then). The imputed values stay weighted means of the raw reference",
           "--normalize"),
    Option("weighting", "cosine+1", Choice(WEIGHTINGS),
           "neighbour weights: cosine+1 (scimpute), cosine, softmax (see temperature) or "
           "uniform", "--weighting"),
    Option("temperature", DEFAULT_TEMPERATURE, Interval(float, 0, open_low=True),
           "softmax temperature (weighting softmax only)", "--temperature", "T"),
    Option("average", "mean", Choice(AVERAGES),
           "space the neighbours' profiles are averaged in: mean (scimpute: the weighted mean "
           "of the values) or log1p (expm1 of the weighted mean of log1p values, which fills "
           "in fewer zeros)", "--average"),
    Option("blend", 1.0, Interval(float, 0, 1, open_low=True),
           "the neighbours' share A of a blend with a linear model, "
           "expm1(A·log1p(kNN) + (1 − A)·ridge): a ridge regression of every reference "
           "gene's log1p on the shared genes' log1p (z-scored per gene and dataset), fitted "
           "on the reference; 1 = the neighbours alone (scimpute's output, byte for byte)",
           "--blend", "A"),
    Option("ridge_alpha", DEFAULT_RIDGE_ALPHA, Interval(float, 0, open_low=True),
           "the linear model's ridge penalty (with blend below 1)", "--ridge-alpha", "ALPHA"),
    # the inputs
    Option("query_layout", "genes_x_cells", Choice(LAYOUTS),
           "orientation of a text query: genes_x_cells (scimpute's TSV: first row = cell "
           "names, first column = gene names) or cells_x_genes (the transpose, e.g. a cells × "
           "genes CSV)", "--query-layout"),
    Option("reference_layout", "genes_x_cells", Choice(LAYOUTS),
           "orientation of a text reference (as query_layout)", "--reference-layout"),
    Option("layer", None, Optional(Text()),
           "AnnData inputs: the layer holding the expression (default X)", "--layer", "NAME"),
    Option("table", None, Optional(Text()),
           "SpatialData query: the table holding the cells (default: its only one)",
           "--table", "NAME"),
    Option("reference_layer", None, Optional(Text()),
           "AnnData reference: its layer, if not the same as layer", "--reference-layer",
           "NAME"),
    Option("coords", None, Optional(PathLike()),
           "spatial coordinates of the query cells: a table of cell name, x, y (.csv or "
           "tab-separated; default: obsm['spatial'] of an AnnData query, the cell "
           "centroids of a Xenium bundle)", "--coords",
           "FILE"),
    # resources
    Option("memory_limit", None, Optional(MemorySize()),
           "peak memory budget of the whole run, e.g. 2GB (default: half the available "
           "memory); block sizes are derived from it, and a budget below what the data's "
           "smallest blocks need is refused", "--memory-limit", "SIZE"),
    Option("chunk_size", None, Optional(Interval(int, 1)),
           "query cells per block (default: derived from the memory limit)", "--chunk-size",
           "N"),
    Option("reference_chunk_size", None, Optional(Interval(int, 1)),
           "reference cells per similarity tile (default: derived from the memory limit)"),
    Option("gene_chunk_size", None, Optional(Interval(int, 1)),
           "reference genes per imputation block (default: derived from the memory limit)"),
    Option("scheduler", None, Optional(Text()),
           "Dask scheduler to run on, e.g. tcp://host:8786 (default: $DASK_SCHEDULER_ADDRESS, "
           "else threads on this machine); workers must reach the output: a shared volume at "
           "the same path, or an object-store URL", "--scheduler", "ADDRESS"),
    Option("restart", False, Boolean(),
           "discard what an interrupted run left (conversions, finished kNN and imputation "
           "blocks) and start over", "--restart"),
    Option("progress", False, Boolean(), "show progress bars (the CLI's --quiet hides them)"),
    # the outputs
    Option("impute_genes", "all", GeneList(("all", "none", "unmeasured")),
           "reference genes imputed and stored (imputed.zarr, adata.zarr): 'all', "
           "'unmeasured' (those the query did not measure), 'none' (only the neighbours "
           "and weights are stored; read_run() imputes any gene on demand), a list "
           "(comma-separated or @FILE with one gene per line on the CLI)",
           "--impute-genes", "GENES"),
    Option("tsv_genes", "all", Optional(GeneList()),
           "genes written to imputation.tsv: 'all' (scimpute's table), 'none' (Zarr only: "
           "the scalable output), a list (comma-separated or @FILE with one gene per line on "
           "the CLI); only imputed genes ('all': every imputed gene)", "--tsv-genes", "GENES"),
    Option("save_chunks", False, Boolean(),
           "also keep per-chunk imputation tables in imputations/", "--save-chunks"),
    Option("h5ad", False, Boolean(), "also write the imputed AnnData as imputed.h5ad",
           "--h5ad"),
    Option("anndata", None, Optional(Boolean()),
           "write the imputed AnnData as the Zarr store adata.zarr (default: when the query "
           "is an AnnData)", "--anndata"),
    Option("report", True, Boolean(), "write report.html and the figures", "--no-report",
           negated=True),
    Option("plot_genes", None, Optional(GeneList(("none",), refused={
        "all": "the maps show a few genes; name them, or give 'none' for no maps"})),
           "genes for the spatial maps, comma-separated or @FILE on the CLI; 'none' for no "
           "maps (default: the three most variable measured and unmeasured genes)",
           "--plot-genes", "GENES"),
    Option("validation", None, Optional(PathLike()),
           "output directory of a validation (scimpute-dask validate) of the same query and "
           "reference: its per-gene reliability joins the AnnData var and reliability.tsv, "
           "its held-out score vs. sparsity plot and summary join report.html",
           "--validation", "DIR"),
    # self-tuning
    Option("tune", False, Boolean(),
           "choose normalize, k, weighting, temperature and average by held-out validation on "
           "the shared genes (each scored while hidden from the neighbour search), then run "
           "with the winner", "--tune"),
    Option("tune_metric", "pearson", Choice(TUNE_METRICS),
           "what tuning maximises: per-gene Pearson of imputed and measured values as given "
           "(pearson), of their log1p (log_pearson), or per-gene cosine (css)",
           "--tune-metric"),
    Option("tune_cells", 10_000, Interval(int, 100),
           "query cells tuning uses at most (a seeded subsample beyond)", "--tune-cells", "N"),
    # held-out validation
    Option("folds", 5, Interval(int, 2), "gene folds of the cross-validation", "--folds"),
    Option("seed", 0, Interval(int, 0),
           "seed of the gene folds (validation, tuning) and of tuning's cell subsample",
           "--seed"),
    Option("reliability", True, Boolean(),
           "also rate every reference-only gene (one more kNN and pass over the reference)",
           "--no-reliability", negated=True),
    Option("plot", True, Boolean(), "write the per-gene score vs. sparsity plot"),
)

TUNE_OPTIONS = ("consider_clusters", "cell_name_column_idx", "tune_metric", "tune_cells",
                "folds", "seed", "query_layout", "reference_layout", "memory_limit",
                "progress", "scheduler")
#: The options of each entry point, in the order their help lists them.
RUN_OPTIONS = ("k", "consider_clusters", "cell_name_column_idx", "cluster_key", "search",
               "recall", "normalize",
               "weighting", "temperature", "average", "blend", "ridge_alpha", "tune", "tune_metric",
               "tune_cells", "seed",
               "query_layout", "reference_layout", "layer",
               "reference_layer", "table", "coords", "memory_limit", "chunk_size",
               "reference_chunk_size", "gene_chunk_size", "scheduler", "restart", "progress",
               "impute_genes", "tsv_genes", "save_chunks", "h5ad", "anndata", "report",
               "plot_genes", "validation")
VALIDATE_OPTIONS = ("k", "consider_clusters", "cell_name_column_idx", "folds", "seed",
                    "normalize", "weighting", "temperature", "average", "blend", "ridge_alpha",
                    "tune", "tune_metric",
                    "tune_cells", "reliability",
                    "query_layout", "reference_layout", "memory_limit", "chunk_size", "plot",
                    "progress", "scheduler")


class _Settings:
    """Methods of :class:`RunConfig`, whose fields are generated from :data:`OPTIONS`."""

    @classmethod
    def create(cls, names: Sequence[str] = RUN_OPTIONS, *, spelled: dict[str, str] | None = None,
               written: dict[str, str] | None = None, **given: Any) -> RunConfig:
        """Validate ``given`` (option name → value) for an entry point taking options ``names``.

        ``spelled`` maps an option to how the caller calls it in messages
        (``--k``, ``k_neighbors``); ``written`` holds CLI values as typed, for
        quoting. Options not given keep their declared default.
        """
        spelled, written = spelled or {}, written or {}
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(unknown)}")
        values = {}
        for name, value in given.items():
            values[name] = OPTIONS[name].constraint.check(value, spelled.get(name, name),
                                                          written.get(name))
        return cls(**values)

    @classmethod
    def from_cli(cls, args, names: Sequence[str]) -> RunConfig:
        """From parsed CLI arguments (:func:`add_cli_options`): strings become values here."""
        given, written, spelled = {}, {}, {}
        for name in names:
            option = OPTIONS[name]
            if option.flag is None:
                continue
            raw = getattr(args, name)
            spelled[name] = option.flag
            if isinstance(raw, str):
                written[name] = raw
                raw = option.constraint.parse(raw)
            given[name] = raw
        if "progress" in names:
            given["progress"] = not getattr(args, "quiet", False)
        return cls.create(names, spelled=spelled, written=written, **given)

    def record(self, names: Sequence[str] = RUN_OPTIONS) -> dict[str, Any]:
        """Options ``names`` as ``run.json`` records them (JSON-ready)."""
        out = {}
        for name in names:
            value = getattr(self, name)
            if isinstance(value, os.PathLike) or hasattr(value, "protocol"):
                value = str(value)
            out[name] = value
        return out

    def model_settings(self) -> dict[str, Any]:
        """How the imputed values are formed beyond the neighbours: the blend and, with
        one, its ridge penalty (None without: it then changes nothing)."""
        return {"blend": self.blend, "ridge_alpha": self.ridge_alpha if self.blend < 1 else None}

    def search_settings(self) -> dict[str, Any]:
        """The neighbour-search options, as stage keys and validation records hold them."""
        return {"normalize": self.normalize, "weighting": self.weighting,
                "temperature": self.temperature}


#: The validated settings of a run or a validation: one frozen field per option of
#: :data:`OPTIONS`, built by ``RunConfig.create(**options)`` or ``RunConfig.from_cli(args,
#: names)``, which refuse any invalid value with a message naming the option.
RunConfig = make_dataclass(
    "RunConfig", [(o.name, Any, field(default=o.default)) for o in OPTIONS.values()],
    bases=(_Settings,), frozen=True)
RunConfig.__module__ = __name__


# --------------------------------------------------------------------------- #
# The CLI and the docs, from the same declarations
# --------------------------------------------------------------------------- #
def add_cli_options(parser, names: Sequence[str],
                    defaults: dict[str, Any] | None = None) -> None:
    """Add the CLI flags of options ``names`` to an argparse parser.

    Values arrive as the strings typed, checked later by
    :meth:`RunConfig.from_cli`, so that a refusal quotes them as written and
    the help shows each option's declared default.
    """
    import argparse

    defaults = defaults or {}
    for name in names:
        option = OPTIONS[name]
        if option.flag is None:
            continue
        default = defaults.get(name, option.default)
        help_text = option.help
        if option.negated:
            parser.add_argument(option.flag, dest=name, action="store_false", default=True,
                                help=help_text)
            continue
        if isinstance(option.constraint, Boolean):
            parser.add_argument(option.flag, dest=name, action="store_true", default=False,
                                help=help_text)
            continue
        if isinstance(option.constraint, Optional) and isinstance(option.constraint.inner,
                                                                  Boolean):
            parser.add_argument(option.flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": default, "metavar": option.metavar}
        if isinstance(option.constraint, Choice):
            kwargs["choices"] = option.constraint.values
            kwargs.pop("metavar")
        if default is not None:
            help_text += f" (default {default})"
        parser.add_argument(option.flag, help=help_text, **kwargs)


def doc_options(*names: str) -> str:
    """numpydoc ``Parameters`` entries of options ``names``, from their declarations."""
    lines = []
    for name in names:
        option = OPTIONS[name]
        help_text = option.help[0].upper() + option.help[1:]
        lines.append(f"{name}\n    {help_text}. Default: {option.default!r}.")
    return "\n".join(lines)


def documented(*names: str) -> Callable:
    """Fill ``{options}`` in a docstring with :func:`doc_options` (scanpy's ``_doc_params``).

    The entries are indented to the docstring's own indentation.
    """
    def decorate(func: Callable) -> Callable:
        indent = " " * 4
        text = doc_options(*names).replace("\n", "\n" + indent)
        func.__doc__ = func.__doc__.replace("{options}", text)
        return func

    return decorate
