"""Dask arrays stored to Zarr block by block, resumably: the mechanism of every stage.

Each task writes one block of every array of a stage and then marks the
block done; a rerun with the same key computes only the blocks not marked, a
different key starts the stage over. Workers write the Zarr chunks
themselves, so only the task results the caller computes travel back.
"""

from __future__ import annotations

import hashlib

import dask
import dask.array as da
import numpy as np
import zarr

from scimpute_dask.engine import cluster
from scimpute_dask.io.storage import Location, remove_tree, zarr_store
from scimpute_dask.io.store import COMPRESSORS, for_writing


def digest(values: np.ndarray) -> str:
    """A short content hash, for the keys that decide whether a stage can be resumed."""
    return hashlib.sha1(np.ascontiguousarray(values).tobytes()).hexdigest()


def names_array(group: zarr.Group, name: str, names: np.ndarray) -> None:
    """Cell or gene names beside a stage's arrays, as the expression stores keep them."""
    arr = group.create_array(name, shape=(len(names),), dtype=str,
                             chunks=(max(1, len(names)),), overwrite=True)
    arr[:] = np.asarray(names, dtype=str)


def _write_blocks(targets: list[zarr.Array], done: zarr.Array, index: tuple[int, ...],
                  regions: list[tuple[slice, ...]], *blocks: np.ndarray) -> None:
    """Write one block of every stage array, then mark it done (after, never before)."""
    for target, region, block in zip(targets, regions, blocks, strict=True):
        target[region] = block
    done[index] = True


def _region(chunks: tuple[tuple[int, ...], ...], index: tuple[int, int]) -> tuple[slice, ...]:
    offsets = [np.cumsum((0, *c)) for c in chunks]
    return tuple(slice(int(offsets[d][i]), int(offsets[d][i + 1])) for d, i in enumerate(index))


def is_complete(path: Location, key: dict) -> bool:
    """Has a stage been stored at ``path`` completely, with this ``key`` (or, for a stage
    that stored more in its key than it was asked, with this ``request``)?"""
    if not (path / "zarr.json").exists():
        return False
    attrs = dict(zarr.open_group(zarr_store(path, True), mode="r").attrs)
    return attrs.get("request", attrs.get("key")) == key and bool(attrs.get("complete"))


def store_stage(
    path: Location,
    arrays: dict[str, tuple[da.Array, object]],
    key: dict,
    attrs: dict,
    compressors: tuple | None = COMPRESSORS,
) -> zarr.Group:
    """Store a stage's Dask arrays to a Zarr group, block by block, resumably.

    Each task writes one block of every array (Zarr chunks equal the Dask
    chunks, so no two tasks touch the same chunk) and then marks that block in
    a ``done`` array. A rerun with the same ``key`` (inputs and parameters)
    computes only the blocks not marked; a different key starts the stage over.

    Parameters
    ----------
    path
        The stage's Zarr group.
    arrays
        ``name -> (array, fill value)``: 2-D, all with the same numbers of row
        and column blocks (and the same row blocks).
    key
        What the stage's result depends on.
    attrs
        Extra attributes for the group.
    compressors
        Of every array (None: stored raw).
    """
    first = next(iter(arrays.values()))[0]
    group = zarr.open_group(zarr_store(path), mode="a") if (path / "zarr.json").exists() \
        else None
    if group is None or dict(group.attrs).get("key") != key:
        # metadata first: a removal cut short must not leave the old key marked complete
        remove_tree(path)
        group = zarr.open_group(zarr_store(path), mode="w")
        for name, (arr, fill) in arrays.items():
            group.create_array(name, shape=arr.shape, dtype=arr.dtype,
                               chunks=tuple(c[0] for c in arr.chunks), fill_value=fill,
                               compressors=compressors)
        group.create_array("done", shape=first.numblocks, dtype=bool, chunks=(1, 1),
                           fill_value=False)
        group.attrs.update({**attrs, "key": key, "complete": False})
    if group.attrs.get("complete"):
        return group
    done = group["done"]
    marked = done[:]
    targets = [for_writing(group[name]) for name in arrays]
    # unoptimised, so that arrays computed from a shared graph share its keys
    delayed = [arr.to_delayed(optimize_graph=False) for arr, _ in arrays.values()]
    # One column of blocks at a time: an input shared along the column (the
    # imputation's reference gene block) is read once and released before the
    # next, instead of every column being held at once.
    for column in range(marked.shape[1]):
        tasks = []
        for row in np.flatnonzero(~marked[:, column]):
            index = (int(row), column)
            regions = [_region(arr.chunks, index) for arr, _ in arrays.values()]
            blocks = [d[index] for d in delayed]
            tasks.append(dask.delayed(_write_blocks)(targets, done, index, regions, *blocks))
        cluster.compute(*tasks)
    group.attrs["complete"] = True
    return group
