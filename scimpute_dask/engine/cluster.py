"""Cluster setup: where the Dask graphs run.

The engine has no distribution code of its own; Dask is the engine. A run
uses, in this order:

1. a ``distributed.Client`` passed in from Python;
2. a scheduler address (``--scheduler tcp://host:8786`` or the
   ``DASK_SCHEDULER_ADDRESS`` environment variable, Dask's own convention),
   connected to for the run and closed after it;
3. a client already active in the process (e.g. one the user created);
4. otherwise Dask's threaded scheduler in this process.

Threads are the local default rather than a ``LocalCluster``: the kernels
release the GIL (BLAS, numba ``nogil``), so threads use every core without
copying the reference blocks into each worker process or serialising tiles
between processes, and the memory budget is one process's resident memory,
which is what ``--memory-limit`` bounds.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Iterator

import dask
import dask.threaded
from threadpoolctl import threadpool_limits

log = logging.getLogger("scimpute_dask")

#: The cluster client whose computations show distributed's progress bar.
_progress_client: contextvars.ContextVar = contextvars.ContextVar("progress_client",
                                                                  default=None)


def scheduler_address(scheduler: str | None) -> str | None:
    """The scheduler to connect to: the argument, else ``DASK_SCHEDULER_ADDRESS``."""
    return scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def _active_client():
    # A client exists only if distributed was imported: don't pay its import to learn there is none.
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


#: The local threaded scheduler, given as the function itself: named ("threads"),
#: Dask imports distributed on every compute to look for a client (0.1 s a run).
_THREADS = dask.threaded.get


@contextlib.contextmanager
def compute_on(
    client=None,
    scheduler: str | None = None,
    threads: int = 1,
    progress: bool = False,
) -> Iterator[object | None]:
    """Run the Dask computations inside this block on the chosen scheduler.

    Parameters
    ----------
    client
        A ``distributed.Client`` to use.
    scheduler
        Address of a running Dask scheduler (default: ``DASK_SCHEDULER_ADDRESS``).
    threads
        Threads of the local scheduler.
    progress
        Show a progress bar: Dask's local one on this machine's threads,
        distributed's for the stages :func:`compute` runs on a cluster (whose
        dashboard shows the rest).

    Yields
    ------
    distributed.Client or None
        The client in use, or None on the local threaded scheduler.
    """
    address = scheduler_address(scheduler)
    with contextlib.ExitStack() as stack:
        if client is None and address is not None:
            from distributed import Client

            client = stack.enter_context(Client(address, set_as_default=False))
        client = client or _active_client()
        if client is not None:
            stack.enter_context(client.as_current())
            link = getattr(client, "dashboard_link", None)
            log.info("computing on the Dask cluster at %s%s", client.scheduler.address,
                     f" (dashboard: {link})" if link else "")
            if progress:
                token = _progress_client.set(client)
                stack.callback(_progress_client.reset, token)
        else:
            stack.enter_context(dask.config.set(scheduler=_THREADS, num_workers=threads))
            # Dask already runs one tile per core; BLAS threads on top would
            # oversubscribe the cores (distributed's Nanny prevents the same).
            stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
            if progress:
                from dask.diagnostics import ProgressBar

                stack.enter_context(ProgressBar(minimum=1.0))
        yield client


def compute(*collections) -> tuple:
    """``dask.compute``; on a cluster under ``compute_on(progress=True)``, with a progress bar.

    On this machine's threads, the memory the tasks freed goes back to the
    system afterwards (:func:`release_memory`).
    """
    client = _progress_client.get()
    if client is None:
        try:
            return dask.compute(*collections)
        finally:
            release_memory()
    from distributed import progress

    futures = client.compute(list(collections))
    progress(futures, notebook=False)
    return tuple(client.gather(futures))


def threads() -> int:
    """How many tasks the current scheduler runs at once: the cluster's worker threads,
    or this process's."""
    client = _active_client()
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_memory() -> None:
    """Return the memory freed by finished tasks to the system (glibc's ``malloc_trim``).

    glibc keeps what threads free in per-thread arenas for their next
    allocations: after one stage's tasks, the next stage's would start above
    the last one's high-water mark, and the peak would grow stage by stage
    (measured: a kNN's preparation left 375 MiB resident, 174 MiB after a
    trim, and the search then peaked at 566 MiB instead of 477). Distributed's
    workers do the same through ``MALLOC_TRIM_THRESHOLD_``.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def local_threads(threads: int, progress: bool = False) -> Iterator[None]:
    """Compute on this process's threads, whatever the cluster: for work that cannot travel
    (an open h5py file) or is small (the figures)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set(scheduler=_THREADS, num_workers=threads))
        if progress:
            from dask.diagnostics import ProgressBar

            stack.enter_context(ProgressBar(minimum=1.0))
        yield
