"""Block sizes derived from a memory budget and the data shape.

Every stage holds a few blocks per thread; this module turns a budget for the
whole process into block sizes so that the peak resident memory stays under
it whatever the number of query cells. The model counts, per thread, the
largest arrays a task of each stage holds (similarity tile, reference gene
block, formatted text), on top of a fixed allowance for the interpreter and
its libraries. ``benchmarks/bench_run.py`` and ``tests/test_memory.py`` check
the model against measured peak RSS.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .validation import InputError

#: Interpreter, NumPy/pandas/Dask/Zarr/numba and the compiled kernels.
BASE_BYTES = 400 * 2**20
MIN_LIMIT = 600 * 2**20
MAX_CELL_CHUNK = 4096
MAX_GENE_CHUNK = 256

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_memory(value: str | int | float | None) -> int:
    """Bytes from ``"2GB"``, ``"1.5GiB"``, ``"800MB"`` or a number; ``None`` = machine default.

    The default is half of the memory available now, as Dask's LocalCluster
    shares memory between its workers.
    """
    if value is None:
        return default_memory_limit()
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"memory limit must look like '2GB' or '512MiB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_memory_limit() -> int:
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
    return max(MIN_LIMIT, available // 2)


def _floor_pow2(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1) if x >= 1 else 1


def _clamp(x: float, lo: int, hi: int) -> int:
    return int(max(lo, min(hi, x)))


@dataclass(frozen=True)
class Plan:
    """Block sizes for one run."""

    memory_limit: int
    threads: int
    query_chunk: int  # query cells per block
    reference_chunk: int  # reference cells per similarity tile
    gene_chunk: int  # reference genes per imputation block


def available_bytes(memory_limit: int) -> int:
    return max(1, memory_limit - BASE_BYTES)


def text_block_bytes(memory_limit: int) -> int:
    """Text held at once while converting: raw text, parsed floats and Zarr buffers."""
    return max(1, available_bytes(memory_limit) // 4)


def store_chunks(n_cells: int, n_genes: int, genes_rows: bool, line_bytes: int,
                 memory_limit: int) -> tuple[int, int]:
    """Zarr chunks ``(cells, genes)`` of a converted store.

    Conversion streams whole rows of the input (a gene across all cells in
    scimpute's layout, a cell across all genes in the transpose) and writes whole
    chunks, so the chunk length along the streamed axis must fit a text block.
    """
    block = text_block_bytes(memory_limit)
    if genes_rows:
        per_row = line_bytes + 12 * n_cells
        return (min(n_cells, MAX_CELL_CHUNK),
                _clamp(_floor_pow2(block / per_row), 1, min(n_genes, MAX_GENE_CHUNK)))
    per_row = line_bytes + 12 * n_genes
    return (_clamp(_floor_pow2(block / per_row), 1, min(n_cells, MAX_CELL_CHUNK)),
            min(n_genes, MAX_GENE_CHUNK))


def plan_run(
    memory_limit: int,
    n_query: int,
    n_reference: int,
    n_shared: int,
    n_genes: int,
    *,
    threads: int | None = None,
    query_chunk: int | None = None,
    reference_chunk: int | None = None,
    gene_chunk: int | None = None,
) -> Plan:
    """Block sizes that keep a run's peak memory under ``memory_limit``.

    Parameters
    ----------
    memory_limit
        Bytes for the whole process.
    n_query, n_reference, n_shared, n_genes
        Data shape: query cells, reference cells, shared genes, reference genes.
    threads
        Tasks running at once (default: CPU count).
    query_chunk, reference_chunk, gene_chunk
        Overrides; the others are derived around them.
    """
    threads = threads or os.cpu_count() or 1
    avail = available_bytes(memory_limit)
    # Export formats whole query blocks (all genes: float64 twice plus text),
    # one per thread and one being written.
    bq = query_chunk or _clamp(avail / 4 / (threads + 1) / (24 * max(1, n_genes)), 64,
                               MAX_CELL_CHUNK)
    bq = min(bq, max(1, n_query))
    # kNN: per thread one float32 tile plus the normalised reference block.
    br = reference_chunk or _clamp(
        avail / 4 / threads / (8 * bq + 16 * max(1, n_shared)), 256, 1 << 20)
    br = min(br, max(1, n_reference))
    # Imputation: per thread one float32 reference gene block (read, then
    # concatenated) and one float64 output tile with its accumulator.
    gb = gene_chunk or _clamp(avail / 2 / threads / (8 * n_reference + 24 * bq), 1, n_genes)
    return Plan(memory_limit, threads, int(bq), int(br), int(min(gb, max(1, n_genes))))
