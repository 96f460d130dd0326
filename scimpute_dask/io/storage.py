"""Where data lives: local paths, or fsspec URLs (``s3://``, ``gs://``, ``abfs://``, …).

Local paths stay :class:`pathlib.Path` and keep POSIX guarantees (atomic
rename, ``flock``, hard links). A URL becomes a
:class:`upath.UPath`, the pathlib API over fsspec, so the stages join, list
and open paths the same way for both; only where object stores lack a POSIX
guarantee (rename, locks) does the code branch on :func:`is_remote`.
Credentials and endpoints come from the usual places of the backend (for
S3: ``AWS_*`` variables, ``~/.aws``), on the client and on every worker.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePath
from typing import TypeAlias

from upath import UPath

from scimpute_dask.errors import InputError

#: A local path or a remote URL path.
Location: TypeAlias = Path | UPath

_METADATA = "zarr.json"


def location(path: str | os.PathLike | UPath) -> Location:
    """A local path (absolute) or, for a URL with a remote protocol, a :class:`UPath`."""
    if isinstance(path, UPath) and is_remote(path):
        return path
    text = path if isinstance(path, str) else os.fspath(path)
    if "://" in text:
        # No listings cache: the stages list prefixes that Zarr (through its own
        # file-system instance) and Dask workers write to, so a cached listing
        # would be stale.
        try:
            url = UPath(text, use_listings_cache=False)
            if url.protocol in ("file", "local"):
                return Path(url.path).absolute()
            url.fs  # noqa: B018 - fails now, not mid-run, if the backend is not installed
        except (ImportError, ValueError) as err:
            raise InputError(f"{text}: {err}") from None
        return url
    return Path(text).absolute()


def is_location(obj: object) -> bool:
    """Is ``obj`` a :data:`Location` (a path or URL path), rather than an in-memory object?"""
    return isinstance(obj, Path | UPath)


def is_remote(path: Location) -> bool:
    """Is ``path`` on a remote file system (no atomic rename, no ``flock``)?"""
    return isinstance(path, UPath) and not isinstance(path, PurePath)


def zarr_store(path: Location, read_only: bool = False):
    """What to hand ``zarr.open_*`` for ``path``: the path itself, or an fsspec store.

    The store pickles with its file system's options, so a Zarr array opened
    on it can be shipped to Dask workers, which then read and write the
    object store themselves.
    """
    if not is_remote(path):
        return path
    import zarr

    return zarr.storage.FsspecStore.from_url(
        str(path), storage_options=dict(path.storage_options), read_only=read_only
    )


def zarr_attributes(path: Location) -> dict:
    """The attributes of the Zarr group at ``path`` (v3 ``zarr.json`` or v2 ``.zattrs``),
    read as JSON without opening it; ``{}`` where there are none."""
    for meta in (path / "zarr.json", path / ".zattrs"):
        if meta.is_file():
            try:
                attrs = json.loads(meta.read_text())
            except (OSError, ValueError):
                return {}
            attrs = attrs.get("attributes", {}) if meta.name == "zarr.json" else attrs
            return attrs if isinstance(attrs, dict) else {}
    return {}


def remove_tree(path: Location) -> None:
    """Delete a directory (or file) so that no half-deleted store is ever trusted.

    ``rmtree`` deletes in no particular order: killed half-way, it could leave a
    Zarr store whose metadata still says "complete" over missing chunks, which
    read back as zeros. Locally, renaming first makes the removal
    all-or-nothing for every reader of ``path``; on an object store, which
    cannot rename a prefix, the Zarr metadata objects go first, outermost
    first, so what is left is no longer a store.
    """
    if is_remote(path):
        fs, root = path.fs, path.path
        if not fs.exists(root):
            return
        if not fs.isdir(root):
            fs.rm_file(root)
            return
        for meta in sorted((f for f in fs.find(root) if f.rsplit("/", 1)[-1] == _METADATA),
                           key=len):
            fs.rm_file(meta)
        fs.rm(root, recursive=True)
        return
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex}")
        path.rename(trash)
        shutil.rmtree(trash)
    else:
        path.unlink()


def link_tree(src: Path, dst: Path) -> None:
    """Copy a directory tree by hard links (no data copied), falling back to copies."""
    def _link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=_link)


def check_creatable(path: Path) -> None:
    """Refuse, before any work, a local output that cannot be created where it is asked.

    The nearest existing ancestor must be a directory in which a directory can
    be made (tried with a temporary one, removed at once): nothing is left behind.
    """
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{path}: cannot be created: {ancestor} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=ancestor))
    except OSError as err:
        raise InputError(f"{path}: cannot be created in {ancestor} "
                         f"({err.strerror or err})") from None
