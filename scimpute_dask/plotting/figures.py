"""Figures written next to the outputs: spatial maps of genes and per-gene scores.

Every figure has a fixed pixel size (``figsize`` × ``DPI``, no tight bounding
box), is drawn with matplotlib's Agg backend and written atomically. The
validation histogram is :func:`scimpute_dask.export.tables.write_histogram`.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from scimpute_dask.engine import graph
from scimpute_dask.engine.inputs import RunInputs
from scimpute_dask.export.outdir import atomic_file
from scimpute_dask.export.tables import HISTOGRAM
from scimpute_dask.io.layout import RunLayout
from scimpute_dask.io.storage import Location, zarr_store
from scimpute_dask.io.store import ExpressionStore

DPI = 100
PANEL_INCHES = 4.0
#: Cells drawn per spatial panel at most (evenly spaced in query order beyond that).
MAX_POINTS = 200_000
SHARED_PNG = "spatial_measured_vs_imputed.png"
IMPUTED_PNG = "spatial_imputed.png"
SCORE_PNG = "genes_vs_sparsity.png"
TUNING_PNG = "tuning.png"


def _subplots(rows: int, columns: int, figsize: tuple[float, float], **kwargs):
    """A figure and its axes, outside pyplot: no global backend chosen or figure kept, so
    that a notebook drawing inline (or any program with its own backend) is left as it
    was."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, columns, squeeze=False, **kwargs)


def _save(fig, path: Location) -> None:
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=DPI)


def choose_genes(reference: da.Array, genes: np.ndarray, measured: np.ndarray, drawable=None,
                 n: int = 3) -> tuple[list[str], list[str]]:
    """The ``n`` most variable measured and unmeasured genes (variance of log1p in the
    reference), among the ``drawable`` ones (default: all).

    One blockwise pass over the reference; the imputed matrix, which can be far
    larger, is not read.
    """
    variance = graph.log1p_variance(reference).compute()
    order = np.argsort(-variance, kind="stable")
    if drawable is not None:
        order = order[np.asarray(drawable)[order]]
    shared = [str(genes[i]) for i in order if measured[i]][:n]
    others = [str(genes[i]) for i in order if not measured[i]][:n]
    return shared, others


def sample_rows(n_cells: int, max_points: int = MAX_POINTS) -> np.ndarray:
    """Rows drawn in spatial maps: all, or evenly spaced ones beyond ``max_points``."""
    if n_cells <= max_points:
        return np.arange(n_cells)
    return np.unique(np.linspace(0, n_cells - 1, max_points).astype(np.int64))


def _panel(ax, xy: np.ndarray, values: np.ndarray, title: str) -> None:
    ok = np.isfinite(values)
    lo, hi = np.percentile(values[ok], [1, 99]) if ok.any() else (0.0, 1.0)
    size = max(0.2, min(8.0, 2e4 / max(1, len(values))))
    ax.scatter(xy[~ok, 0], xy[~ok, 1], s=size, c="lightgrey", linewidths=0, rasterized=True)
    art = ax.scatter(xy[ok, 0], xy[ok, 1], c=values[ok], s=size, cmap="viridis",
                     vmin=lo, vmax=hi if hi > lo else lo + 1, linewidths=0, rasterized=True)
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    ax.invert_yaxis()  # image coordinates: y grows downwards
    ax.set_xticks([])
    ax.set_yticks([])
    ax.figure.colorbar(art, ax=ax, fraction=0.046, pad=0.02)


def spatial_measured_vs_imputed(path: Location, xy: np.ndarray, genes: list[str],
                                measured: np.ndarray, imputed: np.ndarray) -> None:
    """Shared genes, one row each: measured (left) and imputed (right) on the tissue.

    Parameters
    ----------
    path
        PNG to write; ``2 × PANEL_INCHES`` by ``len(genes) × PANEL_INCHES`` inches.
    xy
        Cell coordinates, cells × 2.
    genes
        Gene names, one per column of ``measured`` and ``imputed`` (cells × genes).
    """
    fig, axes = _subplots(len(genes), 2, (2 * PANEL_INCHES, len(genes) * PANEL_INCHES))
    for i, gene in enumerate(genes):
        _panel(axes[i, 0], xy, measured[:, i], f"{gene} measured")
        _panel(axes[i, 1], xy, imputed[:, i], f"{gene} imputed")
    fig.tight_layout()
    _save(fig, path)


def spatial_imputed(path: Location, xy: np.ndarray, genes: list[str], imputed: np.ndarray,
                    columns: int = 3) -> None:
    """Genes the query did not measure: their imputed expression on the tissue, a grid."""
    rows = -(-len(genes) // columns)
    fig, axes = _subplots(rows, columns, (columns * PANEL_INCHES, rows * PANEL_INCHES))
    for ax in axes.flat[len(genes):]:
        ax.axis("off")
    for i, gene in enumerate(genes):
        _panel(axes.flat[i], xy, imputed[:, i], f"{gene} imputed")
    fig.tight_layout()
    _save(fig, path)


def score_vs_sparsity(path: Location, sparsity: np.ndarray, scores: dict[str, np.ndarray]
                      ) -> None:
    """Per-gene held-out scores against the gene's sparsity, one panel per score (Tangram's plot).

    Parameters
    ----------
    path
        PNG to write; ``1.5 × PANEL_INCHES`` wide per panel, ``PANEL_INCHES`` high.
    sparsity
        Per gene: the fraction of query cells in which it was measured as zero.
    scores
        Panel label -> one score per gene (e.g. the Pearson r of imputed and
        measured values of a gene hidden from the kNN search); NaN is not drawn.
    """
    fig, axes = _subplots(1, len(scores), (1.5 * PANEL_INCHES * len(scores), PANEL_INCHES))
    for ax, (label, score) in zip(axes[0], scores.items(), strict=True):
        ok = np.isfinite(score) & np.isfinite(sparsity)
        ax.scatter(sparsity[ok], score[ok], s=12, alpha=0.7)
        ax.set_xlabel("sparsity (fraction of query cells with zero)")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    _save(fig, path)


def heldout_sparsity_plot(path: Location, genes: pd.DataFrame) -> None:
    """Held-out CSS and Pearson of each gene of a ``genes.tsv`` table vs. its sparsity."""
    score_vs_sparsity(path, genes["sparsity"].to_numpy(), {
        "held-out cosine similarity per gene": genes["css"].to_numpy(),
        "held-out Pearson r per gene": genes["pearson"].to_numpy()})


def run_figures(work: Location, files: dict[str, Location], xy: np.ndarray | None,
                q_store: ExpressionStore, r_store: ExpressionStore, inputs: RunInputs,
                plot_genes: list[str] | None, heldout_genes: pd.DataFrame | None
                ) -> list[tuple[str, str]]:
    """Draw a run's figures into ``work``; return the report's list of (file, caption).

    The score histogram (already written), a validation's held-out score plot
    (``heldout_genes``: its ``genes.tsv``), and spatial maps of chosen genes
    (with coordinates ``xy``). Drawn files are added to ``files``.
    """
    figures = [(HISTOGRAM, "Validation score of each query cell (scimpute's histogram)")]
    if heldout_genes is not None:
        files["sparsity_plot"] = work / SCORE_PNG
        heldout_sparsity_plot(files["sparsity_plot"], heldout_genes)
        figures.append((SCORE_PNG, "Held-out score of each shared gene (imputed "
                        "with the gene hidden from the neighbour search) vs. its sparsity "
                        "in the query"))
    if xy is None or not len(inputs.imputed):
        return figures
    measured = inputs.measured
    genes = pd.Index(inputs.r_genes)
    # the store's column of each reference gene (only imputed genes are drawn)
    column = np.full(len(genes), -1)
    column[inputs.imputed] = np.arange(len(inputs.imputed))
    if plot_genes is None:
        drawable = np.zeros(len(genes), dtype=bool)
        drawable[inputs.imputed] = True
        shared, others = choose_genes(r_store.in_chunks(), inputs.r_genes, measured,
                                      drawable)
    else:
        pos = genes.get_indexer(list(plot_genes))
        shared = [g for g, p in zip(plot_genes, pos, strict=True) if measured[p]]
        others = [g for g, p in zip(plot_genes, pos, strict=True) if not measured[p]]
    rows = sample_rows(len(inputs.q_cells))
    imputed = zarr.open_group(zarr_store(RunLayout(work).imputed, True), mode="r")["X"]
    if shared:
        r_pos = genes.get_indexer(shared)
        q_of = dict(zip(inputs.r_cols.tolist(), inputs.q_cols.tolist(), strict=True))
        q_pos = np.array([q_of[p] for p in r_pos])
        files["measured_map"] = work / SHARED_PNG
        spatial_measured_vs_imputed(
            files["measured_map"], xy[rows], shared,
            q_store.select(rows, q_pos),
            imputed.get_orthogonal_selection((rows, column[r_pos])))
        figures.append((SHARED_PNG, "Genes the query measured: measured (left) and "
                        "imputed (right) expression on the tissue"))
    if others:
        files["imputed_map"] = work / IMPUTED_PNG
        spatial_imputed(files["imputed_map"], xy[rows], others,
                                 imputed.get_orthogonal_selection(
                                     (rows, column[genes.get_indexer(others)])))
        figures.append((IMPUTED_PNG, "Genes the query did not measure: imputed "
                        "expression on the tissue"))
    return figures


def tuning_heatmap(path: Location, table: pd.DataFrame, metric: str, best: dict) -> None:
    """Inner-validation score of every candidate: one heat map (k × weighting) per search
    transform and averaging space and, when blends were scored, one of the blend's share
    × ridge alpha at the best neighbour setting (its row 1: the neighbours alone); the
    winner outlined."""
    from matplotlib.patches import Rectangle

    blend = "blend" in table and bool((table["blend"] < 1).any())
    knn = table[~(table["blend"] < 1)] if "blend" in table else table
    transforms = list(dict.fromkeys(knn["normalize"]))
    averages = list(dict.fromkeys(knn["average"]))
    label = knn["weighting"].where(knn["weighting"] != "softmax",
                                   "softmax T=" + knn["temperature"].map("{:g}".format))
    knn = knn.assign(label=label)
    rows = list(dict.fromkeys(knn["label"]))
    ks = sorted(knn["k"].unique())
    lo, hi = np.nanmin(table[metric]), np.nanmax(table[metric])
    columns = len(transforms) + blend
    fig, axes = _subplots(len(averages), columns,
                          (2.6 * columns + 1.2, 2.4 * len(averages) + 0.6))
    # the neighbour setting the winner uses (blended or not)
    chosen = {c: best[c] for c in ("normalize", "k", "weighting", "temperature", "average")}
    for a, average in enumerate(averages):
        for t, transform in enumerate(transforms):
            ax = axes[a, t]
            part = knn[(knn["normalize"] == transform) & (knn["average"] == average)]
            grid = part.pivot(index="label", columns="k", values=metric).reindex(
                index=rows, columns=ks)
            image = ax.imshow(grid.to_numpy(), vmin=lo, vmax=hi, cmap="viridis",
                              aspect="auto")
            if transform == chosen["normalize"] and average == chosen["average"]:
                b = part[(part["k"] == chosen["k"]) & (part["weighting"] == chosen["weighting"])
                         & (part["temperature"] == chosen["temperature"])]["label"].iloc[0]
                ax.add_patch(Rectangle((ks.index(chosen["k"]) - 0.5, rows.index(b) - 0.5),
                                       1, 1, fill=False, edgecolor="red", linewidth=2))
            ax.set_title(f"{transform}, average {average}", fontsize=8)
            ax.set_xticks(range(len(ks)), [str(k) for k in ks], fontsize=6)
            ax.set_yticks(range(len(rows)), rows if t == 0 else [], fontsize=6)
            if a == len(averages) - 1:
                ax.set_xlabel("k", fontsize=7)
    if blend:
        _blend_panel(axes[0, -1], table, metric, best, lo, hi)
        for a in range(1, len(averages)):
            axes[a, -1].axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"inner-validation {metric}")
    _save(fig, path)


def _blend_panel(ax, table: pd.DataFrame, metric: str, best: dict, lo: float, hi: float
                 ) -> None:
    """The blend's share × ridge alpha at the best neighbour setting; row 1 the
    neighbours alone (the same score at every alpha)."""
    from matplotlib.patches import Rectangle

    blended = table[table["blend"] < 1]
    setting = blended.iloc[0]
    alone = table[~(table["blend"] < 1)]
    for c in ("normalize", "k", "weighting", "temperature", "average"):
        alone = alone[alone[c] == setting[c]]
    shares = [1.0, *sorted(blended["blend"].unique(), reverse=True)]
    alphas = sorted(blended["ridge_alpha"].unique())
    grid = blended.pivot(index="blend", columns="ridge_alpha", values=metric).reindex(
        index=shares, columns=alphas).to_numpy()
    grid[0] = alone[metric].iloc[0] if len(alone) else np.nan
    ax.imshow(grid, vmin=lo, vmax=hi, cmap="viridis", aspect="auto")
    row = shares.index(best["blend"]) if best["blend"] in shares else 0
    col = alphas.index(best["ridge_alpha"]) if best["blend"] < 1 else None
    ax.add_patch(Rectangle(((-0.5 if col is None else col - 0.5), row - 0.5),
                           len(alphas) if col is None else 1, 1, fill=False,
                           edgecolor="red", linewidth=2))
    ax.set_title(f"blend at k {setting['k']}, {setting['normalize']}\n"
                 f"rows: the neighbours' share", fontsize=8)
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=6)
    ax.set_yticks(range(len(shares)), [f"{s:g}" for s in shares], fontsize=6)
    ax.set_xlabel("ridge alpha", fontsize=7)
