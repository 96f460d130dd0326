"""Provenance for ``run.json``: library versions, input checksums, peak memory."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import resource
import threading
from concurrent.futures import Future
from pathlib import Path

from .storage import is_remote, location

#: Distributions whose versions decide the numbers a run produces.
LIBRARIES = ("numpy", "pandas", "scipy", "scikit-learn", "dask", "distributed", "zarr",
             "numba", "anndata", "h5py", "matplotlib")
_READ = 1 << 22


def versions() -> dict[str, str]:
    """Python, the platform and the installed versions of :data:`LIBRARIES`."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(_READ):
                digest.update(block)
    return digest.hexdigest()


def _identity(src: str | os.PathLike) -> dict:
    path = location(src)
    if is_remote(path):
        # hashing would download the input a second time: the backend's version key
        # (S3: the ETag) identifies it instead
        return {"path": str(path), "key": path.fs.ukey(path.path)}
    return {"path": str(path), "sha256": sha256(path)}


def checksums(sources: dict[str, object]) -> Future:
    """Start hashing the input files in a background thread (hashlib releases the GIL).

    Returns a future of ``{role: {"path", "sha256"}}``; in-memory inputs are
    skipped. The thread is a daemon: a run that fails does not wait for it.
    """
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result({role: _identity(src) for role, src in sources.items()
                               if isinstance(src, str | os.PathLike)})
        except BaseException as err:  # handed to whoever asks for the result
            future.set_exception(err)

    threading.Thread(target=run, name="scimpute-checksums", daemon=True).start()
    return future


def peak_memory_mib() -> dict[str, float]:
    """Peak resident memory of this process and of its waited-for children, in MiB.

    On a Dask cluster the workers' memory is not included (see the dashboard).
    """
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB else
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return {"process": round(own / 2**20, 1), "children": round(children / 2**20, 1)}
