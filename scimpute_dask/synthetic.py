"""A realistic synthetic spatial/single-cell pair with a known answer.

Cell types are gene-expression programmes (log-normal baseline plus
type-specific marker genes); counts are negative-binomial (gamma-Poisson) with
varying library sizes; the spatial panel is a subset of the reference genes
enriched for markers, measured with lower capture; both sides are CPM, as
scimpute expects. The query's noise-free whole-transcriptome profile (its
type's expected CPM) is kept as ground truth.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
import pandas as pd
from scipy import sparse

from scimpute_dask.io import textcodec


@dataclass
class SyntheticPair:
    """Query (panel), reference, identity table and the query's true full profile."""

    query: pd.DataFrame  # cells × panel genes, CPM
    reference: pd.DataFrame  # cells × all genes, CPM
    identities: pd.DataFrame  # columns: cell, id
    truth: pd.DataFrame | None  # query cells × all genes: expected CPM of each cell's type
    coords: pd.DataFrame | None = None  # query cells: cell, x, y (µm) of a layered tissue


def layered_tissue(types: np.ndarray, n_types: int, seed: int, width: float = 2000.0,
                   depth: float = 1200.0) -> np.ndarray:
    """Positions of cells in a layered tissue (cortex-like): each type keeps to its own
    depth band, with some spill into the neighbouring layers; ``(n, 2)`` in µm.

    Drawn from its own generator, so adding positions changes no expression value.
    """
    rng = np.random.default_rng([seed, 2])
    band = (np.asarray(types) + 0.5) / n_types
    y = np.clip(rng.normal(band, 0.35 / n_types), 0.0, 1.0) * depth
    x = rng.uniform(0.0, width, len(types))
    return np.column_stack([x, y])


def _cpm(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    return counts / np.where(totals == 0, 1, totals) * 1e6


def _nb_counts(rng: np.random.Generator, means: np.ndarray, dispersion: float) -> np.ndarray:
    """Negative-binomial counts as a gamma-Poisson mixture (``var = μ + μ²/θ``)."""
    return rng.poisson(rng.gamma(dispersion, means / dispersion)).astype(np.float64)


def make_pair(
    n_query: int = 2000,
    n_reference: int = 1500,
    n_genes: int = 1000,
    n_panel: int = 100,
    n_types: int = 6,
    seed: int = 0,
    truth: bool = True,
) -> SyntheticPair:
    """Simulate a spatial query and a single-cell reference of the same tissue.

    Parameters
    ----------
    n_query, n_reference
        Cells in the spatial query and in the single-cell reference.
    n_genes
        Genes of the reference (whole transcriptome).
    n_panel
        Genes of the spatial panel, a subset of the reference genes.
    n_types
        Cell types; each is one cluster of the identity table.
    seed
        Random seed.
    truth
        Also return the query's whole-transcriptome ground truth. Without it
        the query is simulated on the panel genes only, block by block, so that
        a million-cell query fits in memory (the counts follow the same law:
        binomial thinning of a gamma-Poisson count is a gamma-Poisson count).
    """
    if not 0 < n_panel <= n_genes:
        raise ValueError(f"n_panel must be in 1..n_genes ({n_genes}), got {n_panel}")
    rng = np.random.default_rng(seed)
    genes = np.array([f"gene{i:05d}" for i in range(n_genes)])
    programmes, markers = _programmes(rng, n_genes, n_types)

    def cells(n: int, library: float, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        types = rng.integers(0, n_types, n)
        libs = rng.lognormal(np.log(library), 0.35, n)[:, None]
        counts = _nb_counts(rng, programmes[types] * libs, dispersion=4.0)
        names = np.array([f"{prefix}{i:06d}" for i in range(n)])
        return names, types, counts

    def choose_panel() -> np.ndarray:
        panel_markers = np.unique(markers[:, : max(1, n_panel // (2 * n_types))])[:n_panel]
        rest = np.setdiff1d(np.arange(n_genes), panel_markers)
        return np.sort(np.concatenate(
            [panel_markers, rng.choice(rest, n_panel - len(panel_markers), replace=False)]
        ))

    r_names, r_types, r_counts = cells(n_reference, 8000.0, "sc_")
    if truth:
        q_names, q_types, q_counts = cells(n_query, 8000.0, "sp_")
        panel = choose_panel()
        # Imaging detects a fraction of the molecules of the panel genes only.
        measured = rng.binomial(q_counts[:, panel].astype(np.int64), 0.3).astype(np.float64)
    else:
        panel = choose_panel()
        q_names = np.array([f"sp_{i:07d}" for i in range(n_query)])
        q_types = rng.integers(0, n_types, n_query)
        measured = np.empty((n_query, n_panel), dtype=np.float32)
        for lo in range(0, n_query, 100_000):
            t = q_types[lo : lo + 100_000]
            libs = rng.lognormal(np.log(8000.0 * 0.3), 0.35, len(t))[:, None]
            measured[lo : lo + len(t)] = _nb_counts(rng, programmes[t][:, panel] * libs, 4.0)

    identities = pd.DataFrame({
        "cell": np.concatenate([q_names, r_names]),
        "id": np.concatenate([q_types, r_types]),
    })
    xy = layered_tissue(q_types, n_types, seed)
    return SyntheticPair(
        query=pd.DataFrame(_cpm(measured), index=q_names, columns=genes[panel]),
        reference=pd.DataFrame(_cpm(r_counts), index=r_names, columns=genes),
        identities=identities,
        truth=pd.DataFrame(programmes[q_types] * 1e6, index=q_names, columns=genes)
        if truth else None,
        coords=pd.DataFrame({"cell": q_names, "x": xy[:, 0], "y": xy[:, 1]}),
    )


def make_cross_technology_pair(
    n_query: int = 3000,
    n_reference: int = 2000,
    n_genes: int = 1000,
    n_panel: int = 60,
    n_types: int = 8,
    seed: int = 0,
) -> SyntheticPair:
    """A single-cell reference and an in-situ panel of the same tissue, by two technologies.

    The reference is :func:`make_pair`'s (negative-binomial counts, CPM). The
    query measures the same cell types' molecules through what makes an
    imaging panel differ from sequencing gene by gene:

    - **capture efficiency**: each gene's probes detect a different fraction of
      its molecules (log-normal, a 10-fold spread);
    - **saturation**: dense transcripts crowd optically, so detection flattens
      at high expression (``x → x / (1 + x / s_g)``, ``s_g`` per gene);
    - **ambient background**: mis-assigned and off-target spots add a gene's
      tissue-wide mean, a few percent of it, to every cell.

    The query keeps its raw detected counts per cell (as imaging tools export
    them); the ground truth is each query cell's type profile in the
    reference's CPM, as in :func:`make_pair`.
    """
    if not 0 < n_panel <= n_genes:
        raise ValueError(f"n_panel must be in 1..n_genes ({n_genes}), got {n_panel}")
    rng = np.random.default_rng(seed)
    genes = np.array([f"gene{i:05d}" for i in range(n_genes)])
    programmes, markers = _programmes(rng, n_genes, n_types)
    r_types = rng.integers(0, n_types, n_reference)
    libs = rng.lognormal(np.log(8000.0), 0.35, n_reference)[:, None]
    r_counts = _nb_counts(rng, programmes[r_types] * libs, dispersion=4.0)
    panel_markers = np.unique(markers[:, : max(1, n_panel // (2 * n_types))])[:n_panel]
    rest = np.setdiff1d(np.arange(n_genes), panel_markers)
    panel = np.sort(np.concatenate(
        [panel_markers, rng.choice(rest, n_panel - len(panel_markers), replace=False)]))

    q_types = rng.integers(0, n_types, n_query)
    volume = rng.lognormal(0.0, 0.3, n_query)[:, None]  # cell size: molecules scale with it
    molecules = programmes[q_types][:, panel] * 2.0e4 * volume
    efficiency = np.exp(rng.normal(0.0, 0.6, n_panel))  # ~10-fold spread (2 sd)
    saturation = rng.lognormal(np.log(40.0), 0.5, n_panel)
    detected = efficiency * molecules
    detected = detected / (1.0 + detected / saturation)
    ambient = 0.05 * detected.mean(axis=0) + 0.02
    counts = _nb_counts(rng, detected + ambient, dispersion=10.0)
    q_names = np.array([f"sp_{i:06d}" for i in range(n_query)])
    r_names = np.array([f"sc_{i:06d}" for i in range(n_reference)])
    return SyntheticPair(
        query=pd.DataFrame(counts, index=q_names, columns=genes[panel]),
        reference=pd.DataFrame(_cpm(r_counts), index=r_names, columns=genes),
        identities=pd.DataFrame({"cell": np.concatenate([q_names, r_names]),
                                 "id": np.concatenate([q_types, r_types])}),
        truth=pd.DataFrame(programmes[q_types] * 1e6, index=q_names, columns=genes),
    )


def _programmes(rng: np.random.Generator, n_genes: int, n_types: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each cell type's expected expression share of every gene, and its marker genes."""
    base = rng.lognormal(0.0, 1.5, n_genes)
    programmes = np.tile(base, (n_types, 1))
    markers_per_type = max(1, n_genes // (n_types * 10))
    markers = rng.choice(n_genes, size=(n_types, markers_per_type), replace=False)
    for t in range(n_types):
        programmes[t, markers[t]] *= rng.lognormal(2.0, 0.5, markers_per_type)
    programmes /= programmes.sum(axis=1, keepdims=True)
    return programmes, markers


def write_scimpute_tsv(frame: pd.DataFrame, path, decimals: int = 4) -> None:
    """Write a cells × genes DataFrame in scimpute's layout (genes as rows), 4 decimals."""
    values = np.round(frame.to_numpy(np.float64).T, decimals)
    with open(path, "wb") as fh:
        fh.write(("\t" + "\t".join(map(str, frame.index)) + "\n").encode())
        step = max(1, 2**22 // max(1, values.shape[1]))
        for lo in range(0, values.shape[0], step):
            fh.write(textcodec.format_matrix(frame.columns[lo : lo + step], values[lo : lo + step],
                                          decimals=decimals))


def write_counts_store(path, n_cells: int, genes: np.ndarray, n_types: int = 24,
                       n_genes: int | None = None, seed: int = 0, prefix: str = "cell",
                       block: int = 4096, gene_chunk: int = 256):
    """Clustered counts of ``n_cells`` written straight into the Zarr working format.

    For data larger than memory (the budget's tests and benchmarks): generated
    and written one block of cells at a time. Every cell type has a low
    baseline over ``n_genes`` genes (default ``max(genes) + 1``) and 10 % marker
    genes 10–40× above it; a count is the floor of an exponential draw around
    its type's mean times a log-normal library size, so most silent genes stay
    at zero (about 7 % of the values are non-zero). The same ``seed`` and
    ``n_types`` give the same programmes for any ``genes``, so a query and a
    reference written with them share their cell types.

    Parameters
    ----------
    path
        The store to create.
    n_cells
        Cells to write.
    genes
        Gene numbers (columns) to write, named ``gene<number>``.
    block, gene_chunk
        The store's chunks (cells, genes); cells are generated one block at a time.

    Returns
    -------
    scimpute_dask.io.store.ExpressionStore
    """
    from scimpute_dask.io import store as stores
    from scimpute_dask.io.storage import location

    genes = np.asarray(genes, dtype=np.int64)
    n_genes = n_genes or int(genes.max()) + 1
    rng = np.random.default_rng([seed, 0])
    programme = rng.lognormal(-2.5, 1.0, (n_types, n_genes)).astype(np.float32)
    for t in range(n_types):
        markers = rng.choice(n_genes, max(1, n_genes // 10), replace=False)
        programme[t, markers] *= rng.uniform(10.0, 40.0, len(markers)).astype(np.float32)
    programme = programme[:, genes]
    path = location(path)
    cells = np.array([f"{prefix}{i}" for i in range(n_cells)])
    group = stores.create(path, {"source": f"synthetic {prefix} {n_cells} {seed}"}, cells,
                          np.array([f"gene{g}" for g in genes]),
                          (block, min(len(genes), gene_chunk)))
    x = stores.for_writing(group["X"])
    cell_rng = np.random.default_rng([seed, 1, n_cells])
    for lo in range(0, n_cells, block):
        hi = min(n_cells, lo + block)
        types = cell_rng.integers(0, n_types, hi - lo)
        library = cell_rng.lognormal(0.0, 0.3, (hi - lo, 1)).astype(np.float32)
        draws = cell_rng.standard_exponential((hi - lo, len(genes)), dtype=np.float32)
        x[lo:hi] = np.floor(draws * programme[types] * library)
        stores.record_progress(group, hi)
    return stores.finish(group, path)


# --------------------------------------------------------------------------- #
# An atlas and a section at atlas scale, sparse, written block by block
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class AtlasModel:
    """The generative model of :func:`atlas_cells`: gene programmes and cell types.

    Attributes
    ----------
    profiles
        ``(types, genes)``: each cell type's expression share of every gene.
    programmes
        ``(programmes, genes)``: activity programmes every type can run
        (cycling, stress, …), each a share over its own genes.
    type_names
        ``class.subclass.type`` of every type.
    """

    profiles: np.ndarray
    programmes: np.ndarray
    type_names: np.ndarray


def atlas_model(n_genes: int, seed: int = 0, classes: int = 8, subclasses: int = 8,
                types: int = 4, programmes: int = 6) -> AtlasModel:
    """A hierarchy of cell types as an atlas has them: classes, their subclasses, their types.

    Every type starts from one housekeeping baseline (log-normal shares); its
    class raises 4 % of the genes 4–16×, its subclass another 1 %, the type itself
    0.3 %, so related types share most of their markers. Activity programmes
    (2 % of the genes each) are shared by all types.
    """
    rng = np.random.default_rng([seed, 10])
    base = rng.lognormal(0.0, 1.6, n_genes)

    def markers(fraction: float) -> tuple[np.ndarray, np.ndarray]:
        chosen = rng.choice(n_genes, max(1, int(fraction * n_genes)), replace=False)
        return chosen, rng.uniform(4.0, 16.0, len(chosen))

    profiles, names = [], []
    for c in range(classes):
        c_genes, c_up = markers(0.04)
        for s in range(subclasses):
            s_genes, s_up = markers(0.01)
            for t in range(types):
                t_genes, t_up = markers(0.003)
                profile = base.copy()
                for genes, up in ((c_genes, c_up), (s_genes, s_up), (t_genes, t_up)):
                    profile[genes] *= up
                profiles.append(profile / profile.sum())
                names.append(f"class{c}.sub{s}.type{t}")
    active = np.zeros((programmes, n_genes))
    for p in range(programmes):
        genes = rng.choice(n_genes, max(1, n_genes // 50), replace=False)
        active[p, genes] = rng.lognormal(0.0, 1.0, len(genes))
    active /= active.sum(axis=1, keepdims=True)
    return AtlasModel(np.array(profiles), active, np.array(names))


@numba.njit(cache=True)
def _alias_table(p):  # pragma: no cover - compiled
    """Walker's alias table of the distribution ``p``: O(1) draws."""
    n = p.shape[0]
    prob = p * n
    alias = np.zeros(n, np.int32)
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = nl = 0
    for i in range(n):
        if prob[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns and nl:
        ns -= 1
        s = small[ns]
        nl -= 1
        g = large[nl]
        alias[s] = g
        prob[g] = prob[g] + prob[s] - 1.0
        if prob[g] < 1.0:
            small[ns] = g
            ns += 1
        else:
            large[nl] = g
            nl += 1
    for i in range(nl):
        prob[large[i]] = 1.0
    for i in range(ns):
        prob[small[i]] = 1.0
    return prob, alias


@numba.njit(nogil=True, cache=True)
def _draw_counts(components, weights, library, prob, alias, seed):  # pragma: no cover
    """Each cell's ``library`` molecules drawn from its mixture of components (rows of
    ``prob``/``alias``, chosen by ``components``, mixed by ``weights``): a CSR block."""
    np.random.seed(seed)  # noqa: NPY002 - numba: this thread's own generator
    n, m = components.shape
    g = prob.shape[1]
    counts = np.zeros(g, np.int32)
    touched = np.empty(g, np.int64)
    indptr = np.zeros(n + 1, np.int64)
    cap = int(library.sum()) + 1
    indices = np.empty(cap, np.int32)
    data = np.empty(cap, np.float32)
    q = 0
    for i in range(n):
        used = 0
        for _ in range(library[i]):
            u = np.random.random()  # noqa: NPY002
            c = m - 1
            acc = 0.0
            for j in range(m):
                acc += weights[i, j]
                if u < acc:
                    c = j
                    break
            comp = components[i, c]
            x = np.random.random() * g  # noqa: NPY002
            gene = int(x)
            if x - gene >= prob[comp, gene]:
                gene = alias[comp, gene]
            if counts[gene] == 0:
                touched[used] = gene
                used += 1
            counts[gene] += 1
        order = np.sort(touched[:used])
        for gene in order:
            indices[q] = gene
            data[q] = counts[gene]
            counts[gene] = 0
            q += 1
        indptr[i + 1] = q
    return indptr, indices[:q].copy(), data[:q].copy()


def atlas_cells(model: AtlasModel, n_cells: int, seed: int, library: float = 4000.0,
                block: int = 8192):
    """Counts of ``n_cells`` cells of the model, one CSR block at a time.

    A cell draws a type (types are unevenly common, as in an atlas), weights
    over its type and the activity programmes (Dirichlet: the type about 85 %),
    and a log-normal library size; its molecules are a multinomial draw from
    that mixture. Cell-to-cell variation of the weights and the library makes
    the counts overdispersed as negative-binomial counts are.

    Yields
    ------
    types : numpy.ndarray
        The cells' type numbers.
    counts : scipy.sparse.csr_matrix
        Cells × genes, float32.
    """
    from scipy import sparse

    n_types, n_genes = model.profiles.shape
    tables = [_alias_table(p.astype(np.float64)) for p in
              (*model.profiles, *model.programmes)]
    prob = np.stack([t[0] for t in tables])
    alias = np.stack([t[1] for t in tables])
    rng = np.random.default_rng([seed, 11])
    frequency = rng.dirichlet(np.full(n_types, 0.7))
    n_prog = len(model.programmes)

    def plan(lo: int):
        n = min(block, n_cells - lo)
        types = rng.choice(n_types, n, p=frequency)
        weights = rng.dirichlet([12.0, *([0.35] * n_prog)], n)
        components = np.column_stack([types, np.tile(n_types + np.arange(n_prog), (n, 1))])
        sizes = np.maximum(1, rng.lognormal(np.log(library), 0.45, n)).astype(np.int64)
        return types, weights, components.astype(np.int64), sizes, int(rng.integers(2**31))

    def draw(types, weights, components, sizes, block_seed):
        # type by type (each type's table stays in cache), stored in drawing order
        order = np.argsort(types, kind="stable")
        indptr, indices, data = _draw_counts(components[order], weights[order], sizes[order],
                                             prob, alias, block_seed)
        counts = sparse.csr_matrix((data, indices, indptr), shape=(len(types), n_genes))
        return types, counts[np.argsort(order)]

    # the blocks are planned in order (the same cells whatever the threads) and drawn
    # two at a time (the kernel releases the GIL), never more held than that
    with ThreadPoolExecutor(2) as pool:
        pending = deque()
        for lo in range(0, n_cells, block):
            pending.append(pool.submit(draw, *plan(lo)))
            if len(pending) > 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_sparse_h5ad(path, cells: np.ndarray, genes: np.ndarray, obs: dict[str, np.ndarray],
                      blocks, *, obs_after=None) -> None:
    """A CSR ``.h5ad`` written one block of rows at a time (never whole in memory), in
    anndata's on-disk schema.

    Parameters
    ----------
    obs
        ``obs`` columns.
    blocks
        CSR blocks of consecutive rows, together ``len(cells)`` × ``len(genes)``.
    obs_after
        A function giving more ``obs`` columns, called once the blocks are written.
    """
    import anndata
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": (len(cells), len(genes))})
        data = X.create_dataset("data", (0,), maxshape=(None,), dtype="float32",
                                chunks=(1 << 18,))
        indices = X.create_dataset("indices", (0,), maxshape=(None,), dtype="int32",
                                   chunks=(1 << 18,))
        indptr = X.create_dataset("indptr", (len(cells) + 1,), dtype="int64")
        row = nnz = 0
        for block in blocks:
            end = nnz + block.nnz
            for dataset, values in ((data, block.data), (indices, block.indices)):
                dataset.resize((end,))
                dataset[nnz:end] = values
            indptr[row + 1 : row + 1 + block.shape[0]] = block.indptr[1:] + nnz
            row, nnz = row + block.shape[0], end
        if row != len(cells):
            raise ValueError(f"blocks gave {row} rows for {len(cells)} cells")
        write = anndata.io.write_elem
        obs = {**obs, **(obs_after() if obs_after else {})}
        write(f, "obs", pd.DataFrame(obs, index=pd.Index(cells.astype(str))))
        write(f, "var", pd.DataFrame(index=pd.Index(genes.astype(str))))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write(f, key, {})


def write_atlas_pair(directory, n_reference: int, n_query: int, n_genes: int = 20_000,
                     n_panel: int = 5_000, n_truth: int = 2_000, seed: int = 0,
                     library: float = 1_400.0, capture: float = 0.5) -> dict:
    """An atlas and a spatial section of it, sparse ``.h5ad`` written block by block.

    ``reference.h5ad``: ``n_reference`` cells × ``n_genes`` counts of
    :func:`atlas_cells` (~5 % non-zero at the default library size), ``obs``
    with each cell's type. ``query.h5ad``: ``n_query`` other cells of the
    same types, measured on a panel of ``n_panel`` genes (half the genes whose
    expression varies most between types, as panels are designed; half at
    random) by binomial capture of each molecule (``capture``).
    ``truth.npz``: for ``n_truth`` seeded query cells (``truth_cells.npy``),
    their full-transcriptome counts, the answer on the genes the panel left
    out; ``query_truth.h5ad`` holds those cells' panel counts alone.

    Returns
    -------
    dict
        The paths (``reference``, ``query``, ``query_truth``, ``truth``,
        ``truth_cells``) and the panel's gene positions (``panel``).
    """
    from pathlib import Path

    from scipy import sparse

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = atlas_model(n_genes, seed)
    genes = np.array([f"gene{i:05d}" for i in range(n_genes)])
    rng = np.random.default_rng([seed, 12])
    spread = np.log(model.profiles).var(axis=0)
    top = np.argsort(-spread, kind="stable")[: n_panel // 2]
    rest = rng.choice(np.setdiff1d(np.arange(n_genes), top), n_panel - len(top), replace=False)
    panel = np.sort(np.concatenate([top, rest]))
    paths = {name: directory / file for name, file in (
        ("reference", "reference.h5ad"), ("query", "query.h5ad"),
        ("query_truth", "query_truth.h5ad"), ("truth", "truth.npz"),
        ("truth_cells", "truth_cells.npy"))}

    types: list[np.ndarray] = []

    def reference_blocks():
        for t, counts in atlas_cells(model, n_reference, seed=seed + 1, library=library):
            types.append(t)
            yield counts

    r_cells = np.array([f"ref{i:07d}" for i in range(n_reference)])
    # obs is written after X: the types are known once the blocks are drawn
    write_sparse_h5ad(paths["reference"], r_cells, genes, {}, reference_blocks(),
                      obs_after=lambda: {"type": model.type_names[np.concatenate(types)]})
    truth_cells = np.sort(rng.choice(n_query, min(n_truth, n_query), replace=False))
    q_types: list[np.ndarray] = []
    truth, truth_panel = [], []

    def query_blocks():
        lo = 0
        for t, counts in atlas_cells(model, n_query, seed=seed + 2, library=library):
            q_types.append(t)
            hi = lo + counts.shape[0]
            here = truth_cells[(truth_cells >= lo) & (truth_cells < hi)] - lo
            measured = counts[:, panel].tocsr()
            measured.data = rng.binomial(measured.data.astype(np.int64),
                                         capture).astype(np.float32)
            measured.eliminate_zeros()
            truth.append(counts[here])
            truth_panel.append(measured[here])
            lo = hi
            yield measured

    q_cells = np.array([f"spot{i:07d}" for i in range(n_query)])
    write_sparse_h5ad(paths["query"], q_cells, genes[panel], {}, query_blocks(),
                      obs_after=lambda: {"type": model.type_names[np.concatenate(q_types)]})
    write_sparse_h5ad(paths["query_truth"], q_cells[truth_cells], genes[panel], {},
                      iter([sparse.vstack(truth_panel).tocsr()]),
                      obs_after=lambda: {"type": model.type_names[
                          np.concatenate(q_types)[truth_cells]]})
    sparse.save_npz(paths["truth"], sparse.vstack(truth).tocsr())
    np.save(paths["truth_cells"], truth_cells)
    return {**paths, "panel": panel}


def write_10x_matrix_h5(path, counts, barcodes, names, types, genome: str,
                        compression: str | None = "gzip") -> None:
    """A cells × features count matrix (dense, or sparse without densifying it) in the
    HDF5 schema Cell Ranger (v3+) and Xenium Onboard Analysis write: features ×
    barcodes CSC, byte strings, gzip-compressed datasets by default (needs ``h5py``)."""
    import h5py

    csc = sparse.csr_matrix(counts).T.tocsc() if sparse.issparse(counts) else \
        sparse.csc_matrix(np.asarray(counts).T)
    with h5py.File(path, "w") as fh:
        m = fh.create_group("matrix")
        for name, values in (("data", csc.data.astype(np.int32)),
                             ("indices", csc.indices.astype(np.int64)),
                             ("indptr", csc.indptr.astype(np.int64))):
            m.create_dataset(name, data=values, chunks=(max(1, min(len(values), 1 << 16)),),
                             compression=compression)
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        f = m.create_group("features")
        f.create_dataset("id", data=np.array([f"ENSMUSG{i:05d}" for i in range(len(names))],
                                             dtype="S"))
        f.create_dataset("name", data=np.array(names, dtype="S"))
        f.create_dataset("feature_type", data=np.array(types, dtype="S"))
        f.create_dataset("genome", data=np.array([genome] * len(names), dtype="S"))
        f.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def write_10x_h5(path, frame: pd.DataFrame, symbols, controls: int = 0, seed: int = 0
                 ) -> None:
    """Cell Ranger's ``filtered_feature_bc_matrix.h5`` of the counts ``frame`` (cells ×
    genes, the genes named ``symbols``); ``controls`` antibody-capture features after
    the genes (as a CITE-seq run has), with counts of their own."""
    extra = np.random.default_rng(seed).poisson(3.0, (len(frame), controls))
    write_10x_matrix_h5(path, np.hstack([frame.to_numpy(np.int64), extra]), frame.index,
                        [*symbols, *(f"CD{i}" for i in range(controls))],
                        ["Gene Expression"] * frame.shape[1] + ["Antibody Capture"] * controls,
                        "mm10")


#: The control features a Xenium panel's matrix holds after its genes, and how many.
XENIUM_CONTROLS = {"Negative Control Probe": 3, "Negative Control Codeword": 2,
                   "Unassigned Codeword": 2}


def write_xenium_bundle(bundle, section: pd.DataFrame, xy: np.ndarray, seed: int = 0,
                        cells_table: str | None = "cells.parquet", matrix: str = "h5"
                        ) -> None:
    """A Xenium Onboard Analysis output bundle of the counts ``section`` (cells × panel
    genes) at the centroids ``xy`` (µm), in the files and schema it writes.

    ``cell_feature_matrix.h5`` (``matrix="h5"``) or its MatrixMarket folder
    (``"mtx"``), with control probes and codewords after the panel's genes;
    ``cells.parquet`` or ``cells.csv.gz`` (``cells_table``; None: none) with
    ``cell_id``, ``x_centroid``, ``y_centroid``, transcript counts and areas;
    ``experiment.xenium``. Needs ``h5py`` and ``pyarrow``.
    """
    import json
    from pathlib import Path

    from scipy import io as spio

    bundle = Path(bundle)
    bundle.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n_extra = sum(XENIUM_CONTROLS.values())
    counts = np.hstack([section.to_numpy(np.int64), rng.poisson(0.2, (len(section), n_extra))])
    names = [*section.columns, *(f"{kind.split()[-1]}_{i:04d}"
                                 for kind, n in XENIUM_CONTROLS.items() for i in range(n))]
    types = ["Gene Expression"] * section.shape[1] + [
        kind for kind, n in XENIUM_CONTROLS.items() for _ in range(n)]
    ids = [f"ENSMUSG{i:05d}" for i in range(len(names))]
    if matrix == "h5":
        write_10x_matrix_h5(bundle / "cell_feature_matrix.h5", counts, section.index, names,
                            types, "Unknown")
    else:
        folder = bundle / "cell_feature_matrix"
        folder.mkdir()
        spio.mmwrite(folder / "matrix.mtx", sparse.coo_matrix(counts.T.astype(np.float64)),
                     field="integer")
        pd.DataFrame({"id": ids, "name": names, "type": types}).to_csv(
            folder / "features.tsv", sep="\t", header=False, index=False)
        pd.Series(section.index).to_csv(folder / "barcodes.tsv", header=False, index=False)
    if cells_table:
        cells = pd.DataFrame({"cell_id": section.index, "x_centroid": xy[:, 0],
                              "y_centroid": xy[:, 1],
                              "transcript_counts": counts[:, : section.shape[1]].sum(axis=1),
                              "cell_area": rng.uniform(40, 120, len(section))})
        if cells_table.endswith(".parquet"):
            cells.to_parquet(bundle / cells_table, index=False)
        else:
            cells.to_csv(bundle / cells_table, index=False)
    (bundle / "experiment.xenium").write_text(json.dumps(
        {"major_version": 5, "run_name": "synthetic", "panel_name": "synthetic"}))
