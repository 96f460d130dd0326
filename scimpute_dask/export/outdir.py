"""The output directory: atomic files, the hidden work directory, the lock, publishing.

On a local file system every file is written under a temporary name and
renamed into place, and a whole run is assembled in a hidden sibling directory
that replaces the output directory only once everything in it is complete.

Object stores (``s3://`` …) cannot rename a prefix, so there the run is
assembled in the output prefix itself, Hadoop/Spark style: a ``.partial``
marker object goes in first and the old ``run.json`` is deleted, and the new
``run.json`` is written last, after every other object is complete. A prefix
is a finished output exactly when it holds ``run.json`` and no marker. Each
object appears whole or not at all (an upload is committed when it closes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from scimpute_dask.errors import InputError
from scimpute_dask.io.layout import ZARR
from scimpute_dask.io.storage import Location, check_creatable, is_remote, remove_tree

log = logging.getLogger("scimpute_dask")

#: Written last into every output directory; marks it as ours (safe to replace).
MANIFEST = "run.json"
#: In an object-store output prefix while a run writes into it.
PARTIAL_MARKER = ".partial"


# --------------------------------------------------------------------------- #
# Atomic files and directories
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def atomic_file(path: Location, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``path``; rename it to ``path`` only on success.

    On an object store, where an upload is committed whole when it closes, the
    object itself is written, and deleted again if writing fails.
    """
    if is_remote(path):
        try:
            with path.open(mode) as fh:
                yield fh
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.fs.rm_file(path.path)
            raise
        return
    path = Path(path)
    # exclusive create of a unique name: the file gets the user's umask (mkstemp's 0600 would not)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, mode.replace("w", "x")) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def work_dir_for(outdir: Location) -> Location:
    """Where a run into ``outdir`` is assembled (and resumed).

    A hidden sibling on a local file system; the output prefix itself on an
    object store (see the module docstring).
    """
    if is_remote(outdir):
        return outdir
    return outdir.parent / f".{outdir.name}.partial"


def check_output_dir(outdir: Location, may_write: frozenset[str] = frozenset()) -> None:
    """Refuse to replace a directory holding anything a previous run did not write.

    ``may_write`` are the names a run can write: an object-store prefix left by
    an interrupted run (no ``run.json`` yet, only the ``.partial`` marker) may
    hold any of them, and nothing else.
    """
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: output path exists and is not a directory")
    if not outdir.is_dir():
        if not is_remote(outdir):
            check_creatable(outdir)
        return
    if not is_remote(outdir) and os.path.ismount(outdir):
        raise InputError(
            f"{outdir}: is a mount point, which cannot be replaced atomically; write to a "
            f"directory inside it (e.g. --out {outdir / 'imputation'})"
        )
    entries = {entry.name for entry in outdir.iterdir()}
    if not entries:
        return
    try:
        if PARTIAL_MARKER in entries and is_remote(outdir):
            ours = set(may_write) | {PARTIAL_MARKER, MANIFEST}
        else:
            ours = set(json.loads((outdir / MANIFEST).read_text())["outputs"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(
            f"{outdir}: output directory exists and was not written by scimpute-dask; "
            f"refusing to replace it. Choose another output directory or empty this one"
        ) from None
    foreign = sorted(entries - ours)
    if foreign:
        raise InputError(
            f"{outdir}: holds files a previous run did not write ({', '.join(foreign[:5])}); "
            f"refusing to replace it. Move them away or choose another output directory"
        )


@contextlib.contextmanager
def exclusive(work: Location) -> Iterator[None]:
    """Hold an exclusive lock for a run into ``work``'s output, for the length of the run.

    The lock file sits beside the work directory, not in it, so that it
    survives the rename that publishes the run.
    """
    if is_remote(work):
        with _object_lock(work.parent / f".{work.name}.lock", work):
            yield
        return
    work.mkdir(parents=True, exist_ok=True)
    lock = work.parent / f"{work.name}.lock"
    with open(lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another scimpute-dask run is writing to {work.parent}; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _object_lock(lock: Location, work: Location) -> Iterator[None]:
    """An object-store lock: an object created only if absent (a conditional write).

    Unlike ``flock`` it outlives a killed run, so a lock left by a dead
    process on this same host is taken over; one from another host must be
    deleted by hand, and the message says which object. Every holder writes a
    token of its own and reads it back, so of two processes taking over the
    same dead lock only one goes on; the lock is released only while it still
    holds our token.
    """
    fs, key = lock.fs, lock.path
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
             "token": uuid.uuid4().hex}
    for attempt in range(2):
        try:
            with fs.open(key, "xb") as fh:
                fh.write(json.dumps(owner).encode())
        except FileExistsError:
            holder = _lock_holder(lock)
            if attempt == 0 and _dead_here(holder):
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(key)
                continue
            raise _locked(holder, lock, work) from None
        except (ValueError, NotImplementedError):
            # this backend cannot create exclusively: a best-effort lock
            log.warning("%s cannot be created exclusively on this file system; concurrent "
                        "runs into %s are not excluded", lock, work)
            if lock.exists() and not _dead_here(_lock_holder(lock)):
                raise _locked(_lock_holder(lock), lock, work) from None
            lock.write_text(json.dumps(owner))
        if _lock_holder(lock).get("token") != owner["token"]:
            raise _locked(_lock_holder(lock), lock, work)
        break
    try:
        yield
    finally:
        if _lock_holder(lock).get("token") == owner["token"]:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(key)


def _locked(holder: dict, lock: Location, work: Location) -> InputError:
    who = {k: v for k, v in holder.items() if k != "token"} or "unknown"
    return InputError(
        f"another scimpute-dask run ({who}) is writing to {work}; wait for it to finish, or "
        f"delete {lock} if that run is no longer alive"
    )


def _lock_holder(lock: Location) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _dead_here(holder: dict) -> bool:
    """Is the lock's holder a process of this host that no longer runs?"""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clear_work_dir(work: Location, keep: set[str]) -> None:
    """Remove what an interrupted run left in ``work`` except the resumable stores.

    On an object store ``work`` is the output prefix: it is first marked as
    unfinished and its ``run.json`` deleted, so that from now on nobody takes it
    for a finished output.
    """
    if is_remote(work):
        (work / PARTIAL_MARKER).write_bytes(b"")
        with contextlib.suppress(FileNotFoundError):
            work.fs.rm_file((work / MANIFEST).path)
    for entry in work.iterdir():
        if entry.name == PARTIAL_MARKER and is_remote(work):
            continue
        if entry.name == ZARR and entry.is_dir():
            for store in entry.iterdir():
                if store.name not in keep:
                    remove_tree(store)
        else:
            remove_tree(entry)


def is_finished(outdir: Location) -> bool:
    """Does ``outdir`` hold a finished run (its ``run.json``, and no ``.partial`` marker)?"""
    return (outdir / MANIFEST).exists() and not (outdir / PARTIAL_MARKER).exists()


def outputs(work: Location) -> list[str]:
    """The names a run wrote into ``work``, for ``run.json``."""
    return sorted(p.name for p in work.iterdir() if p.name != PARTIAL_MARKER)


def publish(work: Location, outdir: Location) -> None:
    """Move a finished work directory to ``outdir``, replacing a previous output.

    Both renames are atomic; between them the previous output is kept aside
    under a hidden name, so ``outdir`` is either the old or the new run, never a
    mixture. On an object store the run is already in place, ``run.json``
    written last; removing the marker finishes it.
    """
    if is_remote(outdir):
        outdir.fs.rm_file((outdir / PARTIAL_MARKER).path)
        return
    old = None
    if outdir.exists():
        old = outdir.parent / f".{outdir.name}.old-{os.getpid()}"
        os.replace(outdir, old)
    os.replace(work, outdir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
