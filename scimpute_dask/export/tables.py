"""scimpute's output files, streamed from Zarr block by block and written atomically.

``imputation.tsv`` (and scimpute's per-chunk tables), ``sim_matrix.tsv``,
``scores.txt``, ``stats.txt``, the score histogram, ``unimputable_cells.txt``
and ``run.json``. Blocks are read, rounded and formatted on a thread pool
(the text kernels release the GIL) while the previous block is written.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import zarr

from scimpute_dask.engine.inputs import RunInputs
from scimpute_dask.engine.stages import Patch, imputed_reader
from scimpute_dask.errors import InputError
from scimpute_dask.export.outdir import atomic_file
from scimpute_dask.io import textcodec
from scimpute_dask.io.layout import RunLayout
from scimpute_dask.io.storage import Location, zarr_store
from scimpute_dask.kernels.scoring import STAT_NAMES

T = TypeVar("T")

HISTOGRAM = "cosine_similarities.png"


# --------------------------------------------------------------------------- #
# Text outputs
# --------------------------------------------------------------------------- #
def ordered(tasks: Iterable[Callable[[], T]], workers: int) -> Iterator[T]:
    """Run tasks on a thread pool and yield their results in order.

    At most ``workers + 1`` tasks are in flight, so memory stays bounded
    however long the stream. The text kernels release the GIL, so the blocks
    of one file are read, rounded and formatted in parallel while the previous
    one is written.
    """
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(task))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


#: A block of the table: row names, values, the patch of the wide genes (or None).
Block = tuple[np.ndarray, np.ndarray, Patch | None]


def _render_matrix(load: Callable[[], Block]) -> tuple[int, memoryview]:
    names, values, patch = load()
    return len(names), textcodec.format_matrix(names, values, decimals=2, patch=patch)


def write_matrix_tsv(
    path: Path | None,
    blocks: Iterable[Callable[[], Block]],
    columns: np.ndarray,
    *,
    chunk_dir: Path | None = None,
    n_chunks: int = 0,
    index_label: str = "cell",
    workers: int = 1,
) -> None:
    """Stream blocks of rows into one TSV (unless ``path`` is None), atomically.

    Each block is a function returning ``(row names, values, patch)``, loaded
    and formatted on ``workers`` threads; ``patch`` (or None) replaces some
    columns (:func:`~scimpute_dask.io.textcodec.format_matrix`). Values are
    written ``%.2f`` after NumPy's rounding to 2 decimals, as scimpute's
    table is (:func:`~scimpute_dask.kernels.scoring.round_like_scimpute`). With
    ``chunk_dir``, each block is also written as one of scimpute's chunk tables
    (``CPM_imputation_<i>_<start>_<stop>.tsv``), from the same formatted text.
    The counter is zero-padded to the width ``n_chunks`` needs, so the files
    also sort by name past scimpute's 1,000-chunk limit.
    """
    header = ("\t".join([index_label, *map(str, columns)]) + "\n").encode()
    width = max(3, len(str(max(0, n_chunks - 1))))
    if chunk_dir is not None:
        chunk_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    with atomic_file(path, "wb") if path is not None else contextlib.nullcontext() as fh:
        if fh:
            fh.write(header)
        rendered = ordered((partial(_render_matrix, b) for b in blocks), workers)
        for i, (n, text) in enumerate(rendered):
            if fh:
                fh.write(text)
            if chunk_dir is not None:
                name = f"{CHUNK_PREFIX}{i:0{width}d}_{start}_{start + n}.tsv"
                with atomic_file(chunk_dir / name, "wb") as part:
                    part.write(header)
                    part.write(text)
            start += n


def write_neighbours_tsv(
    path: Path,
    clusters: np.ndarray,
    query_cells: np.ndarray,
    reference_cells: np.ndarray,
    blocks: Iterable[Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]],
    workers: int = 1,
) -> None:
    """Stream scimpute's ``sim_matrix.tsv`` (``cluster, x, y, distance``), atomically.

    Parameters
    ----------
    path
        File to write.
    clusters, query_cells, reference_cells
        The names the blocks refer to by position.
    blocks
        Functions returning ``(cluster codes, query rows, reference rows,
        distances)``, one entry per query cell and neighbour; distances are
        written with 7 decimals, the float32 precision of a cosine.
    workers
        Threads loading and formatting blocks.
    """
    lists = (clusters, query_cells, reference_cells)
    table = textcodec.string_table(np.concatenate([np.asarray(x, dtype=object) for x in lists]))
    shift = np.cumsum([0, *map(len, lists[:-1])])

    def render(load) -> memoryview:
        cluster, q, r, dist = load()
        codes = np.stack([cluster, q, r], axis=1) + shift
        return textcodec.format_columns(table, codes, dist, 7)

    with atomic_file(path, "wb") as fh:
        fh.write(b"cluster\tx\ty\tdistance\n")
        for text in ordered((partial(render, b) for b in blocks), workers):
            fh.write(text)


def write_scores(path: Path, scores: np.ndarray) -> None:
    """``scores.txt``: the per-cell scores, space-separated, on one line."""
    with atomic_file(path) as fh:
        fh.write(" ".join(map(str, np.asarray(scores, dtype=np.float64).tolist())))


def write_stats(path: Path, stats: dict[str, float]) -> None:
    """``stats.txt``: ``Name: value`` per line, in scimpute's order."""
    with atomic_file(path) as fh:
        fh.write("\n".join(f"{name}: {stats[name]}" for name in STAT_NAMES))


def write_names(path: Path, names: np.ndarray) -> None:
    """One name per line."""
    with atomic_file(path) as fh:
        fh.writelines(f"{n}\n" for n in names)


def write_histogram(path: Path, scores: np.ndarray) -> None:
    """scimpute's histogram: 40 bins over 0..1, "cosine similarity" vs "frequency".

    Drawn on a bare Agg ``Figure``: pyplot's global state is neither needed
    nor thread-safe, and this runs beside the table writers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = np.asarray(scores, dtype=np.float64)
    fig = Figure(figsize=(8, 6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.hist(s[np.isfinite(s)], bins=40, range=(0, 1))
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("frequency")
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", bbox_inches="tight")


def write_manifest(path: Path, record: dict) -> None:
    """``run.json``: what the run was (parameters, shapes, timings) and what it wrote."""
    with atomic_file(path) as fh:
        json.dump(record, fh, indent=2, default=str)


def write_run_tables(work: Location, inputs: RunInputs, chunk_size: int, save_chunks: bool,
            scores: np.ndarray, stats: dict[str, float], threads: int) -> dict[str, Location]:
    """Write scimpute's files into the work directory, streaming from the stores.

    The per-cell files and the histogram are written on a thread of their own
    meanwhile: the table writer mostly waits on its formatting threads, which
    release the GIL, and Python's float text (``scores.txt``, 7 s at a million
    cells) or matplotlib's import and rendering (as long as the tables on a
    small run) would otherwise come after them.
    """
    with ThreadPoolExecutor(1) as pool:
        small = pool.submit(_write_cell_files, work, inputs.q_cells, scores, stats)
        tables = _write_tables(work, inputs, chunk_size, save_chunks, threads)
        cell_files = small.result()
    # scimpute's order, for the listing a run prints
    return {n: tables[n] for n in tables if n != "zarr"} | cell_files | {"zarr": tables["zarr"]}


def _write_cell_files(work: Location, q_cells: np.ndarray, scores: np.ndarray,
                      stats: dict[str, float]) -> dict[str, Location]:
    files = {"scores": work / "scores.txt", "stats": work / "stats.txt",
             "histogram": work / HISTOGRAM, "unimputable": work / "unimputable_cells.txt"}
    write_scores(files["scores"], scores)
    write_stats(files["stats"], stats)
    write_histogram(files["histogram"], scores)
    write_names(files["unimputable"], q_cells[np.isnan(scores)])
    return files


def _write_tables(work: Location, inputs: RunInputs, chunk_size: int, save_chunks: bool,
                  threads: int) -> dict[str, Location]:
    layout = RunLayout(work)
    imputed_rows = imputed_reader(layout) if inputs.tsv_cols is not None else None
    nbrs = zarr.open_group(zarr_store(layout.neighbours, True), mode="r")
    q_cells = inputs.q_cells
    starts = range(0, len(q_cells), chunk_size)
    files: dict[str, Location] = {}

    if inputs.tsv_cols is not None:
        # the written genes' columns in the store, which holds the imputed genes
        cols = np.searchsorted(inputs.imputed, np.asarray(inputs.tsv_cols, dtype=np.int64))
        every = len(cols) == len(inputs.imputed) and bool((cols == np.arange(len(cols))).all())

        def imputed_block(lo: int) -> Block:
            values, patch = imputed_rows(lo, lo + chunk_size)
            if not every:
                values = values[:, cols]
                if patch is not None:
                    # the wide genes among the columns written, by their position there
                    wide, exact = patch
                    kept = np.flatnonzero(np.isin(cols, wide))
                    patch = kept, exact[:, np.searchsorted(wide, cols[kept])]
            return q_cells[lo : lo + chunk_size], values, patch

        files["imputation"] = work / "imputation.tsv"
        if save_chunks:
            files["chunks"] = work / "imputations"
        write_matrix_tsv(files["imputation"],
                                (partial(imputed_block, lo) for lo in starts),
                                inputs.r_genes[inputs.imputed[cols]],
                                chunk_dir=files.get("chunks"),
                                n_chunks=len(starts), workers=threads)

    if inputs.q_ids is None:
        labels, q_codes = np.array(["NA"]), np.zeros(len(q_cells), dtype=np.int64)
    else:
        q_codes, labels = pd.factorize(inputs.q_ids)

    def neighbour_block(lo: int):
        idx = nbrs["indices"][lo : lo + chunk_size]
        w = nbrs["weights"][lo : lo + chunk_size]
        rows, slot = np.nonzero(idx >= 0)
        cells = lo + rows
        return q_codes[cells], cells, idx[rows, slot], w[rows, slot]

    files["sim_matrix"] = work / "sim_matrix.tsv"
    write_neighbours_tsv(files["sim_matrix"], np.asarray(labels), q_cells,
                                inputs.r_cells, (partial(neighbour_block, lo) for lo in starts),
                                workers=threads)
    files["zarr"] = layout.zarr
    return files


# --------------------------------------------------------------------------- #
# Merging per-chunk tables (scimpute's save_chunks)
# --------------------------------------------------------------------------- #
CHUNK_PREFIX = "CPM_imputation_"
_CHUNK_NAME = re.compile(rf"^{CHUNK_PREFIX}\d+_(\d+)_(\d+)\.tsv$")


def chunk_tables(directory: Path) -> list[Path]:
    """The chunk tables of a directory in row order (by their start row, not by name)."""
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir()
             if (m := _CHUNK_NAME.match(p.name))]
    if not found:
        raise InputError(f"{directory}: no {CHUNK_PREFIX}*.tsv chunk tables found")
    return [p for _, p in sorted(found)]


def merge_chunk_tables(directory: Path, path: Path) -> None:
    """Concatenate chunk tables into one TSV without parsing them (constant memory).

    Tables written by scimpute itself carry an extra unnamed index column
    (header ``\\tcell\\t...``); it is dropped.
    """
    with atomic_file(path) as out:
        for n, part in enumerate(chunk_tables(directory)):
            with open(part) as fh:
                header = fh.readline()
                scimpute_style = header.startswith("\tcell\t")
                if n == 0:
                    out.write(header.split("\t", 1)[1] if scimpute_style else header)
                if scimpute_style:
                    out.writelines(line.split("\t", 1)[1] for line in fh)
                else:
                    shutil.copyfileobj(fh, out)
