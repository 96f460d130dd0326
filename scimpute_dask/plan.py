"""Block sizes derived from a memory budget and the data shape.

Every stage holds a few blocks per thread; this module turns a budget for the
whole process into block sizes so that the peak resident memory stays under
it whatever the number of query cells. The model counts, per thread, the
largest arrays a task of each stage holds (the kNN's reference block, the
imputation's reference gene block, formatted text), on top of a fixed
allowance for the interpreter and its libraries. ``benchmarks/bench_run.py``
and ``tests/test_memory.py`` check the model against measured peak RSS.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from scimpute_dask.errors import InputError

#: Interpreter, NumPy/pandas/Dask/Zarr/numba and the compiled kernels.
BASE_BYTES = 400 * 2**20
MAX_CELL_CHUNK = 4096
MAX_GENE_CHUNK = 256

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
    reference_chunk: int  # reference cells per kNN tile
    gene_chunk: int  # reference genes per imputation block
    search_chunk: int  # query cells per kNN task


def available_bytes(memory_limit: int) -> int:
    return max(1, memory_limit - BASE_BYTES)


#: The least a conversion is given beside :data:`BASE_BYTES`: with nothing left for
#: its blocks they shrink to single rows, and a million-cell input becomes a million
#: tiny writes.
MIN_CONVERSION_BYTES = 16_000


def check_conversion_budget(memory_limit: int) -> None:
    """Refuse, before any work, a conversion budget with no room beside the allowance."""
    floor = BASE_BYTES + MIN_CONVERSION_BYTES
    if memory_limit < floor:
        raise InputError(f"memory limit {memory_limit / 2**20:.2f} MiB is below the "
                         f"{floor / 2**20:.2f} MiB a conversion needs; give at least "
                         f"--memory-limit {-(-floor // 2**20)}MiB")


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


#: The smallest blocks a run is planned with: below these, tasks are so many and
#: so small that scheduling, not arithmetic, takes the time.
MIN_QUERY_CHUNK = 64
MIN_REFERENCE_CHUNK = 256
#: The most query cells one kNN task searches at once.
MAX_SEARCH_CHUNK = 65536
#: Candidates the kNN keeps per cell beyond k (``kernels.knn.RERANK_MARGIN``).
SEARCH_MARGIN = 16
#: Bytes of one reference tile's float32 rows at most. Every search task reads
#: every tile, and glibc hands allocations over 32 MiB straight from the OS,
#: page-faulting each one in anew: on this machine a 36 MiB tile reads at
#: 0.4–0.8 GB/s, 16 MiB tiles at 2.5 GB/s (reused heap memory).
TILE_BYTES = 16 * 2**20


def _search_bytes(n_shared: int, k: int) -> int:
    """A kNN task's bytes per query cell: its rows as Dask delivers them (float32, then
    the search transform's float64), the float32 copy and normalised rows searched, and
    the candidate lists (``k + margin`` entries of 16 bytes, a few times over)."""
    return 24 * max(1, n_shared) + 128 * (k + SEARCH_MARGIN)


def _tile_bytes(n_shared: int) -> int:
    """A tile's bytes per reference cell: rows as read and the buffer read into, norms."""
    return 8 * max(1, n_shared) + 16


def minimum_memory(n_query: int, n_reference: int, n_shared: int, n_genes: int,
                   threads: int | None = None, k: int = 25) -> int:
    """The smallest budget :func:`plan_run` can keep: the model's needs at the smallest blocks.

    The inverse of the block formulas of :func:`plan_run` at a query block of
    :data:`MIN_QUERY_CHUNK` cells, a kNN tile of
    :data:`MIN_REFERENCE_CHUNK` reference cells and one gene per imputation
    block (each capped by the data), plus the fixed allowance.
    """
    threads = threads or os.cpu_count() or 1
    bq = min(MIN_QUERY_CHUNK, max(1, n_query))
    br = min(MIN_REFERENCE_CHUNK, max(1, n_reference))
    export = 4 * (threads + 1) * 24 * max(1, n_genes) * bq
    knn = threads * max(4 * _tile_bytes(n_shared) * br, 2 * _search_bytes(n_shared, k) * bq)
    impute = 2 * threads * (8 * n_reference + 24 * bq)
    return BASE_BYTES + max(export, knn, impute)


def check_budget(memory_limit: int, n_query: int, n_reference: int, n_shared: int,
                 n_genes: int, threads: int | None = None, k: int = 25) -> None:
    """Refuse, before any work, a budget below :func:`minimum_memory` for this data."""
    floor = minimum_memory(n_query, n_reference, n_shared, n_genes, threads, k)
    if memory_limit < floor:
        raise InputError(
            f"memory limit {_mib(memory_limit)} is below the {_mib(floor)} this data needs "
            f"at its smallest blocks ({n_query} query × {n_reference} reference cells, "
            f"{n_genes} genes, {threads or os.cpu_count() or 1} threads); give at least "
            f"--memory-limit {-(-floor // 2**20)}MiB")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


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
    k: int = 25,
    density: float = 1.0,
    linear: int = 0,
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
    k
        Neighbours per query cell (the kNN's lists grow with it).
    density
        The reference store's fraction of stored values: below 1 it is sparse
        (:mod:`scimpute_dask.io.blocked`), and a gene block holds 8 bytes per
        stored value (value and gene) instead of the dense block's float32 read
        and its concatenation.
    linear
        The shared genes of a blend's linear model (0: no blend): an imputation
        task also holds the query block's features, a float64 coefficient column
        per gene and the prediction.
    """
    threads = threads or os.cpu_count() or 1
    avail = available_bytes(memory_limit)
    # Export formats whole query blocks (all genes: float64 twice plus text),
    # one per thread and one being written.
    bq = query_chunk or _clamp(avail / 4 / (threads + 1) / (24 * max(1, n_genes)),
                               MIN_QUERY_CHUNK, MAX_CELL_CHUNK)
    bq = min(bq, max(1, n_query))
    # kNN: a task holds its query block and one reference tile at a time, read
    # from the prepared store (engine/search.py). Every task reads the whole
    # reference, so the query block takes half of the thread's share (fewer
    # blocks, fewer reads) and the tile at most a quarter, and no more than
    # TILE_BYTES: the screen streams a tile's products through one cache-sized
    # sub-tile, so a larger tile saves only merges of short candidate lists.
    share = avail / threads
    br = reference_chunk or _clamp(
        min(share / 4 / _tile_bytes(n_shared), TILE_BYTES / (4 * max(1, n_shared))),
        MIN_REFERENCE_CHUNK, 1 << 20)
    br = min(br, max(1, n_reference))
    # ... and every thread gets a block of its own
    bs = _clamp(share / 2 / _search_bytes(n_shared, k), MIN_QUERY_CHUNK, MAX_SEARCH_CHUNK)
    bs = max(1, min(bs, -(-max(1, n_query) // threads)))
    # Imputation: per thread one float32 reference gene block (read, then
    # concatenated) and one float64 output tile with its accumulator.
    per_gene = 8 * n_reference * min(1.0, density) + 8 * linear
    per_cell = 24 + (16 if linear else 0)
    gb = gene_chunk or _clamp((avail / 2 / threads - 8 * bq * linear) / (per_gene + per_cell * bq),
                              1, n_genes)
    return Plan(memory_limit, threads, int(bq), int(br), int(min(gb, max(1, n_genes))),
                int(bs))


def ridge_gene_chunk(blocks: Plan, n_shared: int, rows: int, n_genes: int) -> int:
    """Genes per task of a blend's linear-model fit: a task holds a row block of those
    genes (float32 as read, float64 log1p) and its ``(n_shared + 1) × genes`` float64
    partial sums, a few of which meet in each step of the reduction over row blocks."""
    share = available_bytes(blocks.memory_limit) / max(1, blocks.threads)
    return _clamp(share / 2 / (12 * rows + 40 * (n_shared + 1)), 1, max(1, n_genes))


def preparation_rows(blocks: Plan, store_rows: int, n_shared: int) -> int:
    """Reference rows per block read to prepare the search: the store's whole chunks when
    a thread's share holds four of them as the search sees them (float64, then the
    float32 copy and its unit rows: 16 bytes a value), else the kNN tile (which divides
    a chunk: each chunk is then decoded once per tile it holds)."""
    share = available_bytes(blocks.memory_limit) / max(1, blocks.threads)
    if 4 * store_rows * 16 * max(1, n_shared) <= share:
        return max(blocks.reference_chunk, store_rows)
    return blocks.reference_chunk


def aligned(block: int, chunk: int) -> int:
    """A block that covers whole store chunks, or divides one: no chunk is read twice, and
    no Dask rechunk has to split a chunk between two blocks (holding the pieces)."""
    if block >= chunk:
        return block // chunk * chunk
    return max(d for d in range(1, block + 1) if chunk % d == 0)


def align_to_store(blocks: Plan, store_chunks: tuple[int, int]) -> Plan:
    """``blocks`` with the kNN tile and the imputation gene block aligned to the reference
    store's chunks (cells, genes)."""
    return dataclasses.replace(
        blocks, reference_chunk=aligned(blocks.reference_chunk, store_chunks[0]),
        gene_chunk=aligned(blocks.gene_chunk, store_chunks[1]))
