"""Shared fixtures: small synthetic pairs on disk and an independent brute force."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import distributed
import numpy as np
import pandas as pd
import pytest

from scimpute_dask.synthetic import make_pair, write_scimpute_tsv

SHARED = Path(__file__).resolve().parents[2] / "shared"
MC_CORTEX = SHARED / "data" / "mc_cortex"


@dataclass
class Inputs:
    query: Path
    reference: Path
    identities: Path
    query_df: pd.DataFrame  # as parsed back from the TSV (float32 precision)
    reference_df: pd.DataFrame
    identities_df: pd.DataFrame


def write_inputs(directory: Path, pair, zero_cells: int = 0) -> Inputs:
    """Write a synthetic pair as scimpute TSVs; optionally zero some query cells."""
    directory.mkdir(parents=True, exist_ok=True)
    query = pair.query.copy()
    if zero_cells:
        query.iloc[:zero_cells] = 0.0
    paths = (directory / "query.tsv", directory / "reference.tsv", directory / "ids.tsv")
    write_scimpute_tsv(query, paths[0])
    write_scimpute_tsv(pair.reference, paths[1])
    pair.identities.to_csv(paths[2], sep="\t", index=False)

    def back(p: Path) -> pd.DataFrame:
        return pd.read_csv(p, sep="\t", index_col=0).T.astype(np.float32)

    return Inputs(*paths, back(paths[0]), back(paths[1]), pair.identities)


@pytest.fixture(scope="session")
def small_pair():
    """Several clusters; cell counts that no chunk size used in the tests divides."""
    return make_pair(n_query=257, n_reference=311, n_genes=120, n_panel=30, n_types=4, seed=7)


@pytest.fixture
def small_inputs(tmp_path, small_pair) -> Inputs:
    return write_inputs(tmp_path / "in", small_pair, zero_cells=2)


@dataclass
class BruteForce:
    indices: np.ndarray  # (n_query, k) reference rows; -1 for undefined cells
    similarity: np.ndarray  # (n_query, k) cosine, float64
    imputed: np.ndarray  # (n_query, n_genes) float64, unrounded
    ambiguous: np.ndarray  # rows whose k-th and (k+1)-th similarity are float32-close
    full_similarity: np.ndarray


def brute_force(query: pd.DataFrame, reference: pd.DataFrame, q_ids, r_ids, k: int,
                consider_clusters: bool) -> BruteForce:
    """scimpute's method written plainly: dense cosine, argsort, weighted mean (float64)."""
    shared = [g for g in reference.columns if g in set(query.columns)]
    q = query[shared].to_numpy(np.float64)
    r = reference[shared].to_numpy(np.float64)
    qn = np.linalg.norm(q, axis=1)
    rn = np.linalg.norm(r, axis=1)
    sim = (q / np.where(qn == 0, 1, qn)[:, None]) @ (r / np.where(rn == 0, 1, rn)[:, None]).T
    if consider_clusters:
        sim = np.where(np.asarray(q_ids)[:, None] == np.asarray(r_ids)[None, :], sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    idx = order[:, :k]
    top = np.take_along_axis(sim, order[:, : k + 1], axis=1)
    ambiguous = (top.shape[1] > k) & (np.abs(top[:, k - 1] - top[:, min(k, top.shape[1] - 1)])
                                      < 1e-6)
    s = np.take_along_axis(sim, idx, axis=1)
    w = s + 1
    ref = reference.to_numpy(np.float64)
    imputed = np.einsum("ik,ikg->ig", w, ref[idx]) / w.sum(axis=1, keepdims=True)
    undefined = qn == 0
    idx[undefined] = -1
    s[undefined] = np.nan
    imputed[undefined] = np.nan
    return BruteForce(idx, s, imputed, ambiguous & ~undefined, sim)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dask_cluster():
    """A scheduler and two single-threaded workers, each its own process (no nanny).

    They inherit this process's environment (e.g. object-store credentials).
    """
    address = f"tcp://127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port",
         address.rsplit(":", 1)[1], "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    workers = [subprocess.Popen(
        [sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--no-nanny",
         "--memory-limit", "2GB", "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    procs += workers
    try:
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield address, workers
    finally:
        for p in procs:
            p.kill()
            p.wait()
