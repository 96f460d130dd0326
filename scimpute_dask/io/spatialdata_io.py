"""SpatialData Zarr stores (``spatialdata``, ``spatialdata-io``) as the query: their table.

A SpatialData store is a Zarr group (its attributes hold ``spatialdata_attrs``)
whose ``tables/`` are AnnData-Zarr groups annotating its shapes or labels: the
cells' counts in ``X`` (or a layer) and their centroids in
``obsm["spatial"]``. The store's one table is read as an AnnData-Zarr input
(:mod:`.anndata_io`); a store with several is asked to name one (``--table
NAME``, or passed as ``STORE/tables/NAME``, itself an AnnData-Zarr input). Reading needs no
``spatialdata`` package: the format is Zarr and AnnData all the way down.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from scimpute_dask.errors import InputError
from scimpute_dask.io import anndata_io
from scimpute_dask.io import store as stores
from scimpute_dask.io.registry import Reader, ReadOptions
from scimpute_dask.io.storage import Location, is_location, is_remote, location, zarr_attributes

#: The attribute that marks a SpatialData store's root group.
MARK = "spatialdata_attrs"


def is_spatialdata(path: object) -> bool:
    """Is ``path`` a local SpatialData Zarr store?"""
    return (is_location(path) and not is_remote(path) and path.is_dir()
            and MARK in zarr_attributes(path))


def table_path(store: Path, label: str | None = None, table: str | None = None) -> Path:
    """The store's table ``table`` (default: its only one), an AnnData-Zarr group; a clear
    error for none, several and no ``table``, or an unknown ``table``."""
    label = label or str(store)
    folder = store / "tables"
    tables = sorted(p.name for p in folder.iterdir()
                    if p.is_dir() and anndata_io.is_anndata_zarr(p)) if folder.is_dir() else []
    return folder / _chosen(tables, table, label, f" or as {label}/tables/NAME")


def _chosen(tables: list[str], table: str | None, label: str, other: str = "") -> str:
    """``table`` among ``tables``, or the only one; a one-line error otherwise."""
    if not tables:
        raise InputError(f"{label}: a SpatialData store with no table (tables/ holds no "
                         f"AnnData): nothing to impute")
    if table is not None:
        if table not in tables:
            raise InputError(f"{label}: no table {table!r} (tables: {', '.join(tables)})")
        return table
    if len(tables) > 1:
        raise InputError(f"{label}: a SpatialData store with {len(tables)} tables "
                         f"({', '.join(tables)}); name one with --table NAME (Python: "
                         f"table=){other}")
    return tables[0]


def is_spatialdata_object(obj: object) -> bool:
    """Is ``obj`` a :class:`spatialdata.SpatialData` (without importing spatialdata)?"""
    return any(cls.__name__ == "SpatialData" and cls.__module__.startswith("spatialdata")
               for cls in type(obj).__mro__)


def table_of(sdata, table: str | None = None) -> tuple[str, object]:
    """The name and AnnData of a SpatialData object's table ``table`` (default: its only
    one), with the errors of :func:`table_path`."""
    label = f"SpatialData{'' if sdata.path is None else f' {sdata.path}'}"
    name = _chosen(sorted(sdata.tables), table, label)
    return name, sdata.tables[name]


def add_table(sdata, source: str, imputed, key_added: str):
    """``imputed`` (the query cells of table ``source``, in its order) as the table
    ``key_added`` of ``sdata``, annotating the region ``source`` annotates (same region,
    region and instance columns), so that viewers such as napari-spatialdata draw its
    genes on the same shapes or labels; written into the object's store when it is
    backed by one. Returns the table as stored."""
    try:
        from spatialdata.models import TableModel
    except ImportError as err:
        raise InputError("writing the imputed table into a SpatialData object needs the "
                         "spatialdata package: pip install 'scimpute-dask[spatialdata]'"
                         ) from err
    attrs = dict(sdata.tables[source].uns.get(TableModel.ATTRS_KEY) or {})
    if attrs.get("region") is None:
        raise InputError(f"table {source!r} annotates no region (uns[{TableModel.ATTRS_KEY!r}]"
                         f" has none): nothing to place the imputed genes on")
    region = attrs["region"]
    table = TableModel.parse(imputed, region=region if isinstance(region, str) else
                             list(region), region_key=attrs["region_key"],
                             instance_key=attrs["instance_key"])
    sdata.tables[key_added] = table
    if sdata.path is not None:
        sdata.write_element(key_added, overwrite=True)
    return table


def resolve(source: object, table: str | None = None) -> object:
    """A SpatialData store's table path in place of the store (``table``, or its only
    one); any other input as it is (so that the run reads the table's AnnData
    annotations: ``obsm["spatial"]``, ``obs``)."""
    if isinstance(source, str | os.PathLike) or is_location(source):
        path = location(source)
        if is_spatialdata(path):
            return table_path(path, str(source), table)
    if table is not None:
        raise InputError(f"--table {table}: the query is not a SpatialData store")
    return source


def _claims(source: object) -> bool:
    return is_spatialdata(source)


def _names(source: Path, options: ReadOptions) -> tuple[np.ndarray, np.ndarray]:
    return anndata_io.READER.names(table_path(source, options.label), options)


def _fingerprint(source: Path, options: ReadOptions) -> dict:
    return anndata_io.READER.fingerprint(table_path(source, options.label), options)


def _convert(source: Path, store: Location, options: ReadOptions) -> stores.ExpressionStore:
    return anndata_io.READER.convert(table_path(source, options.label), store, options)


READER = Reader("a SpatialData store (its table)", _claims, _names, _fingerprint, _convert)
