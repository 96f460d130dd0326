"""AnnData in and out: ``.h5ad`` and AnnData-Zarr inputs, read in blocks; the imputed AnnData.

Inputs are read element by element with :mod:`anndata.io` (``read_elem``,
``sparse_dataset``), never loaded whole: the matrix (``X`` or a layer) is
streamed into an :class:`~.conversion.ExpressionStore` one block of rows
(CSR, dense) or of columns (CSC) at a time, so a sparse matrix is only ever
densified one block at a time. ``obs`` columns give the cluster ids
(``cluster_key``) and ``obsm["spatial"]`` the coordinates.

The output is an AnnData whose ``X`` is a Dask array read from the imputed
Zarr store, written by anndata chunk by chunk: the imputed matrix never has
to fit in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse
from upath import UPath

from scimpute_dask import plan
from scimpute_dask.checks import check_unique_names, check_values
from scimpute_dask.errors import InputError
from scimpute_dask.io import store as stores
from scimpute_dask.io.registry import Reader, ReadOptions
from scimpute_dask.io.storage import (
    Location,
    is_location,
    is_remote,
    link_tree,
    location,
    remove_tree,
    zarr_attributes,
    zarr_store,
)

#: Where the run's neighbours and parameters go in the output AnnData.
NEIGHBORS_KEY = "scimpute_neighbors"
WEIGHTS_KEY = "scimpute_weights"
UNS_KEY = "scimpute"

log = logging.getLogger("scimpute_dask")

if TYPE_CHECKING:
    import dask.array as da


def anndata_module():
    """The ``anndata`` package, or an error saying how to install it."""
    try:
        import anndata
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError(
            "reading or writing AnnData needs anndata; install scimpute-dask[h5ad]"
        ) from err
    return anndata


def is_anndata_zarr(path: Location) -> bool:
    """Is ``path`` a Zarr store written by anndata (v2 or v3 Zarr format)?"""
    return zarr_attributes(path).get("encoding-type") == "anndata"


def is_anndata(source: object) -> bool:
    """An in-memory AnnData, an ``.h5ad`` file or an AnnData-Zarr store."""
    if type(source).__name__ == "AnnData":
        return True
    if isinstance(source, str | os.PathLike) or is_location(source):
        path = source if is_location(source) else Path(source)
        return path.suffix == ".h5ad" or (path.is_dir() and is_anndata_zarr(path))
    return False


@contextlib.contextmanager
def _opened(source) -> Iterator:
    """The root group of an AnnData file or store (or the AnnData object itself)."""
    if not isinstance(source, str | os.PathLike):
        yield source
        return
    path = Path(source)
    if path.suffix == ".h5ad":
        anndata_module()
        import h5py

        try:
            fh = h5py.File(path, "r")
        except OSError as err:
            raise InputError(f"{path}: not a readable .h5ad file ({err})") from err
        with fh:
            yield fh
    else:
        import zarr

        yield zarr.open_group(path, mode="r")


def _layer_name(layer: str | None) -> str:
    return "X" if layer in (None, "X") else layer


def _matrix(root, layer: str | None, label: str):
    """The element holding the expression: ``X`` or ``layers/<layer>``."""
    name = _layer_name(layer)
    if type(root).__name__ == "AnnData":
        if name == "X":
            matrix = root.X
        elif name in root.layers:
            matrix = root.layers[name]
        else:
            raise InputError(f"{label}: no layer '{name}'; layers are {list(root.layers)}")
        if matrix is None:
            raise InputError(f"{label}: X is empty")
        return matrix
    if name == "X":
        if "X" not in root:
            raise InputError(f"{label}: X is empty")
        elem = root["X"]
    else:
        layers = list(root["layers"].keys()) if "layers" in root else []
        if name not in layers:
            raise InputError(f"{label}: no layer '{name}'; layers are {layers}")
        elem = root["layers"][name]
    encoding = dict(elem.attrs).get("encoding-type", "array")
    if encoding in ("csr_matrix", "csc_matrix"):
        return anndata_module().io.sparse_dataset(elem)
    if encoding != "array":
        raise InputError(f"{label}: {name} is a '{encoding}', not a matrix")
    return elem


def _axis_names(root, axis: str) -> np.ndarray:
    if type(root).__name__ == "AnnData":
        index = root.obs_names if axis == "obs" else root.var_names
    else:
        index = anndata_module().io.read_elem(root[axis]).index
    return np.asarray(index.astype(str), dtype=object)


def read_names(source, layer: str | None = None, label: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Cell and gene names of an AnnData input, checked; the layer must exist."""
    label = label or str(source)
    with _opened(source) as root:
        cells, genes = _axis_names(root, "obs"), _axis_names(root, "var")
        shape = tuple(_matrix(root, layer, label).shape)
    check_unique_names(cells, label, "cell")
    check_unique_names(genes, label, "gene")
    if shape != (len(cells), len(genes)):
        raise InputError(f"{label}: {_layer_name(layer)} has shape {shape}, but there are "
                         f"{len(cells)} cells and {len(genes)} genes")
    return cells, genes


def obs_column(source, key: str, label: str | None = None) -> np.ndarray:
    """The values of ``obs[key]`` as strings (e.g. the cluster of every cell)."""
    label = label or str(source)
    with _opened(source) as root:
        if type(root).__name__ == "AnnData":
            obs = root.obs
        else:
            obs = anndata_module().io.read_elem(root["obs"])
    if key not in obs.columns:
        raise InputError(f"{label}: no obs column '{key}' (cluster_key); obs columns are "
                         f"{list(map(str, obs.columns))}")
    values = obs[key]
    missing = obs.index[values.isna().to_numpy()]
    if len(missing):
        shown = ", ".join(f"'{c}'" for c in missing[:5])
        raise InputError(f"{label}: cells without a value in obs['{key}']: {shown}")
    return np.asarray(values.astype(str), dtype=object)


def read_annotations(source, label: str | None = None
                     ) -> tuple[pd.DataFrame, dict[str, np.ndarray | sparse.spmatrix]]:
    """``obs`` and ``obsm`` of an AnnData input (small: one row per cell), ready to write.

    Read before any work, and normalised so that in-memory and file inputs
    give the same output and the output AnnData can always be written:
    ``obs`` column names become strings, ``obsm`` keeps numeric arrays
    (dense or scipy-sparse; a DataFrame gives its values) with one row per
    cell, and drops anything else with a warning.

    Parameters
    ----------
    source
        An in-memory AnnData, or the path of an ``.h5ad`` file or AnnData-Zarr store.
    label
        How to name the input in messages (default: ``str(source)``).

    Returns
    -------
    obs : pandas.DataFrame
        One row per cell.
    obsm : dict
        Per-cell arrays by key.
    """
    label = label or (str(source) if isinstance(source, str | os.PathLike) else "AnnData")
    with _opened(source) as root:
        if type(root).__name__ == "AnnData":
            obs, obsm = root.obs.copy(), dict(root.obsm.items())
        else:
            read_elem = anndata_module().io.read_elem
            obs = read_elem(root["obs"])
            obsm = read_elem(root["obsm"]) if "obsm" in root else {}
    names = obs.columns.map(str)
    if names.has_duplicates:
        raise InputError(f"{label}: obs columns named alike once written as strings: "
                         f"{sorted(set(names[names.duplicated()]))}")
    obs.columns = names
    kept = {}
    for key, value in obsm.items():
        given = type(value).__name__
        if isinstance(value, pd.DataFrame):
            value = value.to_numpy()
        if key == "spatial" and sparse.issparse(value):
            value = value.toarray()  # cells × 2, and plotted as an array
        numeric = (sparse.issparse(value) or isinstance(value, np.ndarray)) \
            and value.dtype.kind in "biuf"
        if numeric and value.ndim == 2 and value.shape[0] == len(obs):
            kept[str(key)] = value
        else:
            log.warning("%s: obsm['%s'] (%s) is not a numeric cells × n array: left out of "
                        "the output", label, key, given)
    return obs, kept


def read_coords(path: str | os.PathLike | UPath, cells: np.ndarray) -> np.ndarray:
    """Spatial coordinates of ``cells`` from a table: cell name, then x and y columns.

    A ``.csv`` is comma-separated, anything else tab-separated; extra columns
    are ignored. Every cell must be present, once. The table may be local or
    at a URL.
    """
    path = location(path)
    if not path.is_file():
        raise InputError(f"{path}: coordinates file not found")
    with path.open("rb") as fh:
        # as text: cell names such as "001" must not become numbers
        # (index_col would infer the names' type whatever dtype says)
        table = pd.read_csv(fh, sep="," if path.suffix.lower() == ".csv" else "\t",
                            dtype=str, keep_default_na=False)
    if table.shape[1] < 3:
        raise InputError(f"{path}: needs a cell-name column and two coordinate columns")
    table = table.set_index(table.columns[0])
    repeated = table.index[table.index.duplicated()].unique()
    if len(repeated):
        shown = ", ".join(f"'{c}'" for c in repeated[:5])
        raise InputError(f"{path}: cells listed more than once: {shown}")
    pos = table.index.get_indexer(pd.Index(cells).astype(str))
    if (pos < 0).any():
        missing = ", ".join(f"'{c}'" for c in np.asarray(cells)[pos < 0][:5])
        raise InputError(f"{path}: {(pos < 0).sum()} query cells have no coordinates: {missing}")
    try:
        # the exact parse of each number (pd.to_numeric may round the last digit)
        xy = table.iloc[pos, :2].to_numpy(str).astype(np.float64)
    except ValueError:
        raise InputError(f"{path}: coordinates must be numbers") from None
    if not np.isfinite(xy).all():
        raise InputError(f"{path}: coordinates must be numbers")
    return xy


def query_annotations(query, q_cells: np.ndarray, coords
                      ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The query's ``obs`` and ``obsm`` for the outputs; ``obsm["spatial"]`` from ``coords``."""
    obs, obsm = pd.DataFrame(index=pd.Index(q_cells.astype(str))), {}
    if is_anndata(query):
        obs, obsm = read_annotations(query)
        obs.index = pd.Index(q_cells.astype(str))
    if coords is not None:
        obsm["spatial"] = read_coords(coords, q_cells)
    spatial = obsm.get("spatial")
    if spatial is not None and (spatial.ndim != 2 or spatial.shape[1] < 2):
        raise InputError(f"query: obsm['spatial'] must be cells × 2 coordinates, "
                         f"got shape {spatial.shape}")
    return obs, obsm


def fingerprint(src: Path, layer: str | None) -> dict:
    """What identifies a conversion of an ``.h5ad`` file or AnnData-Zarr store."""
    options = {} if _layer_name(layer) == "X" else {"layer": layer}
    if src.is_dir():
        # the element's metadata is rewritten (a new inode) when the store is rewritten
        name = "X" if _layer_name(layer) == "X" else f"layers/{layer}"
        meta = next((m for m in (src / name / "zarr.json", src / name / ".zattrs",
                                 src / name / ".zarray") if m.exists()), src)
        return {**stores.file_fingerprint(meta, **options), "source": str(src.resolve())}
    return stores.file_fingerprint(src, **options)


def _blocks(matrix, start: int, step: int, by_columns: bool, keep_sparse: bool
            ) -> Iterator[tuple[int, np.ndarray | sparse.csr_matrix]]:
    """Blocks of rows (or columns), starting at ``start``, in the matrix's dtype: dense,
    or canonical CSR (duplicates summed, as densifying would) with ``keep_sparse``."""
    n = matrix.shape[1 if by_columns else 0]
    for lo in range(start, n, step):
        block = matrix[:, lo : lo + step] if by_columns else matrix[lo : lo + step]
        if keep_sparse:
            block = sparse.csr_matrix(block)
            block.sum_duplicates()
            yield lo, block
        else:
            yield lo, block.toarray() if hasattr(block, "toarray") else np.asarray(block)


def _is_csc(matrix) -> bool:
    fmt = getattr(matrix, "format", None)
    return fmt == "csc" or type(matrix).__name__ == "_CSCDataset"


def _is_csr(matrix) -> bool:
    fmt = getattr(matrix, "format", None)
    return fmt == "csr" or type(matrix).__name__ == "_CSRDataset"


def convert_anndata(source, store: Location, *, layer: str | None, restart: bool, progress: bool,
                    memory_limit: int, name: str | None = None):
    """Stream an AnnData's ``X`` (or a layer) into an ExpressionStore, resumably.

    CSR and dense matrices are read one block of rows at a time, CSC one block
    of genes at a time; neither is ever densified whole. CSR stays sparse in the
    store (:mod:`.blocked`).
    """
    in_memory = not isinstance(source, str | os.PathLike)
    label = name or ("AnnData" if in_memory else str(source))
    cells, genes = read_names(source, layer, label)
    if in_memory:
        if store.exists():
            remove_tree(store)
        fp = {"source": label, "id": uuid.uuid4().hex}  # never reused
    else:
        fp = fingerprint(Path(source), layer)
        if stores.is_complete_conversion(store, fp):
            return stores.ExpressionStore(store)
    with _opened(source) as root:
        matrix = _matrix(root, layer, label)
        by_columns, keep_sparse = _is_csc(matrix), _is_csr(matrix)

        def shape() -> stores.Shape:
            return cells, genes, plan.store_chunks(len(cells), len(genes), by_columns, 0,
                                                   memory_limit)

        def blocks(done: int, offset: int, chunks: tuple[int, int]
                   ) -> Iterator[stores.Block]:
            for lo, block in _blocks(matrix, done, chunks[1] if by_columns else chunks[0],
                                     by_columns, keep_sparse):
                hi = lo + block.shape[1 if by_columns else 0]
                if by_columns:
                    check_values(block.T, genes[lo:hi], cells, label, "gene", "cell")
                else:
                    check_values(block, cells[lo:hi], genes, label, "cell", "gene")
                yield stores.Block(lo, hi, block.astype(np.float32, copy=False))

        return stores.write_store(
            store, fp, label, shape=shape, blocks=blocks, by_columns=by_columns,
            sparse=keep_sparse, restart=restart, progress=progress,
            desc=f"convert {label if in_memory else Path(source).name}")


def _names(source, options: ReadOptions) -> tuple[np.ndarray, np.ndarray]:
    return read_names(source, options.layer, options.label)


def _fingerprint(source, options: ReadOptions) -> dict | None:
    return fingerprint(source, options.layer) if is_location(source) else None


def _convert(source, store: Location, options: ReadOptions) -> stores.ExpressionStore:
    return convert_anndata(source, store, layer=options.layer, restart=options.restart,
                           progress=options.progress, memory_limit=options.memory_limit,
                           name=options.label)


READER = Reader("AnnData (.h5ad, AnnData-Zarr, in memory)", is_anndata, _names, _fingerprint,
                _convert)


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #
def imputed_anndata(imputed, obs: pd.DataFrame, obsm: dict,
                    var: pd.DataFrame, neighbors: da.Array, weights: da.Array,
                    uns: dict):
    """The imputed AnnData, ``X`` a lazy float32 Dask array over the imputed Zarr array.

    Parameters
    ----------
    imputed
        The imputed matrix (``zarr.Array``, query cells × imputed genes; an empty
        NumPy array when no gene was imputed; None: no ``X``, one to be linked in
        by :func:`write`).
    obs, obsm
        The query's annotations, in query order.
    var
        One row per reference gene (``measured`` and any per-gene columns).
    neighbors, weights
        Lazy Dask arrays (query cells × k) of the reference rows (−1 = none)
        and the weights (cosine + 1), written chunk by chunk with the rest.
    uns
        Stored as ``uns["scimpute"]``.
    """
    anndata = anndata_module()
    import dask.array as da

    X = None if imputed is None else (
        da.from_zarr(imputed) if not isinstance(imputed, np.ndarray)
        else da.from_array(imputed)).astype(np.float32)
    obsm = {**obsm, NEIGHBORS_KEY: neighbors, WEIGHTS_KEY: weights}
    return anndata.AnnData(X=X, obs=obs, var=var, obsm=obsm, uns={UNS_KEY: uns})


def write(adata, path: Location, linked_X: Path | None = None) -> None:
    """Write an AnnData to ``path`` (``.h5ad`` file, else a Zarr store), atomically.

    To an object store, through a local temporary copy uploaded whole (HDF5
    writes local files, and the upload is what commits it).

    ``linked_X``: a local Zarr array (float32) that is the AnnData-Zarr's ``X``
    (``adata`` has none): its chunk files are hard-linked into the store
    (copied across file systems), not decoded and encoded again — an atlas
    run's imputed matrix is tens of gigabytes.
    """
    if is_remote(path):
        with tempfile.TemporaryDirectory() as tmp:
            write(adata, Path(tmp) / path.name, linked_X)
            path.fs.put(str(Path(tmp) / path.name), path.path, recursive=True)
        return
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        if path.suffix == ".h5ad":
            adata.write_h5ad(tmp)
        else:
            with anndata_module().settings.override(zarr_write_format=3), warnings.catch_warnings():
                # anndata's notices about its future Zarr defaults, not about this store
                warnings.filterwarnings("ignore", "zarr v3 autosharding", UserWarning)
                warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
                # LZ4, as the engine's own stores: an imputed matrix of float32 values
                # written 2× and read 5× faster than with Zstandard, ~1.6× larger
                anndata_module().io.write_zarr(tmp, adata, compressor=stores.COMPRESSORS[0])
            if linked_X is not None:
                _link_X(linked_X, tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_tree(tmp)
        raise


def _link_X(array: Path, store: Path) -> None:
    """The Zarr array ``array`` as the ``X`` of the AnnData-Zarr ``store``, by hard links."""
    import zarr

    link_tree(array, store / "X")
    metadata = store / "X" / "zarr.json"
    document = json.loads(metadata.read_text())
    document["attributes"] = {"encoding-type": "array", "encoding-version": "0.2.0"}
    metadata.unlink()  # a link to the source's: replaced, never written through
    metadata.write_text(json.dumps(document))
    with warnings.catch_warnings():  # as anndata's own writer consolidates them
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        zarr.consolidate_metadata(zarr_store(store))


def read_lazy(path: Location):
    """An AnnData-Zarr store, local or remote, with ``X`` as a lazy Dask array.

    Everything but ``X`` is read into memory.
    """
    anndata = anndata_module()
    import dask.array as da
    import zarr

    root = zarr.open_group(zarr_store(path, read_only=True), mode="r")
    read_elem = anndata.io.read_elem
    return anndata.AnnData(
        X=da.from_zarr(root["X"]), obs=read_elem(root["obs"]), var=read_elem(root["var"]),
        obsm=read_elem(root["obsm"]), uns=read_elem(root["uns"]),
    )
