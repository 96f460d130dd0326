"""Provenance for ``run.json``: library versions, input identities, peak memory.

An input is identified by what is cheap and still unambiguous: a local file
by its SHA-256, a remote file by its backend's version key (S3: the ETag), a
scimpute-dask store by the fingerprint of what it was converted from (hashing
its chunks would read it all again; an object-store directory has no key).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import resource
import threading
from concurrent.futures import Future
from pathlib import Path

from upath import UPath

from scimpute_dask.io.storage import is_remote, location

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


def _identity(src: str | os.PathLike | UPath) -> dict:
    """``{"path"}`` and one of ``sha256``, ``key``, ``fingerprint`` or ``error``."""
    from scimpute_dask.io.store import ExpressionStore, is_store

    try:
        path = location(src)
        if is_store(path):
            return {"path": str(path), "fingerprint": ExpressionStore.open(path).fingerprint}
        if is_remote(path):
            # hashing would download the input a second time
            return {"path": str(path), "key": path.fs.ukey(path.path)}
        return {"path": str(path), "sha256": sha256(path)}
    except Exception as err:  # a record of the inputs must not fail a finished run
        return {"path": str(src), "error": f"{type(err).__name__}: {err}"}


def checksums(sources: dict[str, object]) -> Future:
    """Start identifying the input files in a background thread (hashlib releases the GIL).

    Returns a future of ``{role: {"path", and "sha256", "key", "fingerprint"
    or "error"}}`` (see :func:`_identity`); in-memory inputs are skipped. An
    input that cannot be identified (e.g. moved during the run) is recorded
    with the error rather than failing the run. The thread is a daemon: a run
    that fails does not wait for it.
    """
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result({role: _identity(src) for role, src in sources.items()
                               if isinstance(src, str | os.PathLike | UPath)})
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
