"""Stores and outputs on an object store (S3, served by moto on loopback).

The local run is the reference: a run whose inputs, stores and outputs all
live under ``s3://`` (on this machine's threads, or on a Dask cluster whose
workers reach the data only through S3) must write the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import distributed
import numpy as np
import pytest
import zarr

from scimpute_dask import run_imputation
from scimpute_dask.errors import InputError
from scimpute_dask.export import outdir as export
from scimpute_dask.io.storage import location, remove_tree, zarr_store
from scimpute_dask.synthetic import make_pair

from .conftest import write_inputs
from .test_tenx import _write_10x

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

CLI = [sys.executable, "-m", "scimpute_dask.cli"]
TEXT_OUTPUTS = ["imputation.tsv", "sim_matrix.tsv", "scores.txt", "stats.txt",
                "unimputable_cells.txt"]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on loopback; credentials and endpoint through the AWS variables."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield env["AWS_ENDPOINT_URL"]
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def bucket(s3_endpoint) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """Inputs on local disk, and the reference run written to local disk."""
    tmp = tmp_path_factory.mktemp("remote")
    pair = make_pair(n_query=700, n_reference=300, n_genes=150, n_panel=30, n_types=3, seed=11)
    inputs = write_inputs(tmp / "in", pair, zero_cells=2)
    args = ["--identities", str(inputs.identities), "--k", "7", "--chunk-size", "90", "-q"]
    subprocess.run([*CLI, "run", "--query", str(inputs.query), "--reference",
                    str(inputs.reference), *args, "--out", str(tmp / "local")], check=True)
    return inputs, args, tmp / "local"


def _fs():
    return s3fs.S3FileSystem(use_listings_cache=False)


def _same_as_local(url: str, local: Path) -> None:
    fs = _fs()
    for name in TEXT_OUTPUTS:
        assert fs.cat_file(f"{url}/{name}") == (local / name).read_bytes(), name
    for store, arrays in [("imputed.zarr", ["X"]), ("neighbors.zarr", ["indices", "weights"])]:
        remote = zarr.open_group(zarr_store(location(f"{url}/zarr/{store}")), mode="r")
        here = zarr.open_group(local / "zarr" / store, mode="r")
        for arr in arrays:
            np.testing.assert_array_equal(remote[arr][:], here[arr][:])


def _finished(url: str) -> None:
    """A finished output: run.json listing exactly what is there, no marker, no lock."""
    fs = _fs()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(url, refresh=True)}
    manifest = json.loads(fs.cat_file(f"{url}/run.json"))
    assert names == {*manifest["outputs"], "run.json"}
    assert export.PARTIAL_MARKER not in names
    parent, name = url.rsplit("/", 1)
    assert not fs.exists(f"{parent}/.{name}.lock")


def test_input_and_output_on_s3_match_the_local_run(bucket, local_run):
    inputs, args, local = local_run
    url = f"{bucket}/runs/a"
    _fs().put_file(str(inputs.query), f"{bucket}/in/query.tsv")  # text read straight from S3
    subprocess.run([*CLI, "run", "--query", f"{bucket}/in/query.tsv", "--reference",
                    str(inputs.reference), *args, "--out", url], check=True)
    _same_as_local(url, local)
    _finished(url)
    assert _fs().cat_file(f"{url}/cosine_similarities.png")[:4] == b"\x89PNG"


def test_a_cluster_without_shared_disk_reads_and_writes_only_s3(bucket, local_run, tmp_path,
                                                                 dask_cluster):
    """Inputs converted to S3 stores, local copies deleted: workers can only use S3."""
    inputs, args, local = local_run
    address, _ = dask_cluster
    ids = tmp_path / "ids.tsv"
    ids.write_bytes(inputs.identities.read_bytes())
    for role, src in (("query", inputs.query), ("reference", inputs.reference)):
        copy = tmp_path / f"{role}.tsv"
        copy.write_bytes(src.read_bytes())
        subprocess.run([*CLI, "convert", str(copy), f"{bucket}/stores/{role}.zarr", "-q"],
                       check=True)
        copy.unlink()
    args = [a if a != str(inputs.identities) else str(ids) for a in args]
    url = f"{bucket}/runs/cluster"
    subprocess.run([*CLI, "run", "--query", f"{bucket}/stores/query.zarr", "--reference",
                    f"{bucket}/stores/reference.zarr", *args, "--out", url,
                    "--scheduler", address], check=True, cwd=tmp_path)
    _same_as_local(url, local)
    _finished(url)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.tsv"]  # nothing written here
    with distributed.Client(address) as client:
        prefixes = client.run_on_scheduler(
            lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert any("write_blocks" in p for p in prefixes), prefixes


def test_rerun_replaces_a_finished_output_and_resumes_an_unfinished_one(bucket, local_run):
    inputs, args, local = local_run
    url = f"{bucket}/runs/again"
    run = [*CLI, "run", "--query", str(inputs.query), "--reference", str(inputs.reference),
           *args, "--out", url]
    subprocess.run([*run, "--save-chunks"], check=True)
    fs = _fs()
    assert fs.ls(f"{url}/imputations")
    # A run that died after its kNN stage: marker in, run.json gone, outputs half-there.
    fs.pipe_file(f"{url}/{export.PARTIAL_MARKER}", b"")
    fs.rm_file(f"{url}/run.json")
    fs.pipe_file(f"{url}/imputation.tsv", b"cell\tgarbage\n")
    knn_chunk = fs.info(f"{url}/zarr/neighbors.zarr/indices/c/0/0")["LastModified"]
    time.sleep(1.1)  # a rewrite would show in the (1 s resolution) modification time
    subprocess.run(run, check=True)
    _same_as_local(url, local)
    _finished(url)
    assert not fs.exists(f"{url}/imputations")  # the old run's extra outputs are gone
    # the finished kNN blocks were kept, not recomputed
    assert fs.info(f"{url}/zarr/neighbors.zarr/indices/c/0/0")["LastModified"] == knn_chunk


def test_foreign_prefix_is_refused_before_any_work(bucket, local_run):
    inputs = local_run[0]
    fs = _fs()
    fs.pipe_file(f"{bucket}/theirs/notes.txt", b"keep me")
    with pytest.raises(InputError, match="not written by scimpute-dask"):
        run_imputation(str(inputs.query), str(inputs.reference), str(inputs.identities),
                       outdir=f"{bucket}/theirs", k=7)
    assert fs.ls(f"{bucket}/theirs", refresh=True) == [f"{bucket[5:]}/theirs/notes.txt"]


def test_object_lock(bucket):
    work = location(f"{bucket}/runs/locked")
    lock = location(f"{bucket}/runs/.locked.lock")
    with export.exclusive(work):
        assert lock.exists()
        with pytest.raises(InputError, match="another scimpute-dask run"), \
                export.exclusive(work):
            pass
    assert not lock.exists()
    # A lock left by a process of this host that has died is taken over...
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead)}))
    with export.exclusive(work):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # ...one from another host is not: the message names the object to delete.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(InputError, match=r"delete s3://.*\.locked\.lock"), \
            export.exclusive(work):
        pass


def test_remove_tree_drops_the_store_metadata_first(bucket, monkeypatch):
    store = location(f"{bucket}/s/x.zarr")
    group = zarr.open_group(zarr_store(store), mode="w")
    group.create_array("X", shape=(4, 4), chunks=(2, 2), dtype="f4")[:] = 1
    group.attrs["complete"] = True
    deleted: list[str] = []
    fs = store.fs
    original = fs.rm_file

    def spy(path, *a, **kw):
        deleted.append(path)
        return original(path, *a, **kw)

    monkeypatch.setattr(fs, "rm_file", spy)  # an instance attribute: fsspec's sync mirror
    remove_tree(store)
    monkeypatch.undo()
    assert deleted[0].endswith("x.zarr/zarr.json")
    assert not fs.exists(store.path)


def test_anndata_outputs_to_s3_and_h5ad_from_s3_refused(bucket, local_run, tmp_path):
    anndata = pytest.importorskip("anndata")
    inputs = local_run[0]
    query = anndata.AnnData(inputs.query_df)
    query.obs["cluster"] = inputs.identities_df.set_index("cell").loc[query.obs_names, "id"]
    query.obsm["spatial"] = np.random.default_rng(0).uniform(size=(query.n_obs, 2))
    query.write_h5ad(tmp_path / "q.h5ad")
    url = f"{bucket}/runs/anndata"
    result = run_imputation(tmp_path / "q.h5ad", inputs.reference, inputs.identities, 0, url,
                            k=7, chunk_size=90, h5ad=True)
    assert {"anndata", "h5ad", "report"} <= set(result.files)
    _finished(url)
    fs = _fs()
    fs.get(f"{url}/adata.zarr", str(tmp_path / "adata.zarr"), recursive=True)
    fs.get(f"{url}/imputed.h5ad", str(tmp_path / "imputed.h5ad"))
    local = zarr.open_group(local_run[2] / "zarr" / "imputed.zarr", mode="r")["X"][:]
    for adata in (anndata.read_zarr(tmp_path / "adata.zarr"),
                  anndata.read_h5ad(tmp_path / "imputed.h5ad")):
        np.testing.assert_array_equal(np.asarray(adata.X), local.astype(np.float32))
        np.testing.assert_array_equal(adata.obsm["spatial"], query.obsm["spatial"])
    fs.put_file(str(tmp_path / "q.h5ad"), f"{bucket}/in/q.h5ad")
    with pytest.raises(InputError, match=r"s3://.*q\.h5ad: only delimited text and "
                       r"scimpute-dask stores are read from URLs"):
        run_imputation(f"{bucket}/in/q.h5ad", inputs.reference, inputs.identities, 0,
                       f"{bucket}/runs/never", k=7)
    assert not fs.exists(f"{bucket}/runs/never")


def test_rerun_with_changed_or_other_inputs_into_a_finished_prefix(bucket, local_run, tmp_path):
    """The finished run's stores are dropped when they were converted from another input."""
    inputs, args, _ = local_run
    url = f"{bucket}/runs/changed"
    run_imputation(str(inputs.query), str(inputs.reference), str(inputs.identities), 0, url,
                   k=7, chunk_size=90)
    changed = tmp_path / "query.tsv"
    text = inputs.query.read_text().splitlines()
    cells = text[1].split("\t")
    text[1] = "\t".join([cells[0], *("7.5" for _ in cells[1:])])  # one gene, every cell
    changed.write_text("\n".join(text) + "\n")
    subprocess.run([*CLI, "run", "--query", str(changed), "--reference",
                    str(inputs.reference), *args, "--out", str(tmp_path / "local")], check=True)
    run_imputation(str(changed), str(inputs.reference), str(inputs.identities), 0, url,
                   k=7, chunk_size=90)
    _same_as_local(url, tmp_path / "local")
    _finished(url)
    # A store given as input: the prefix's own conversion of the earlier file goes.
    subprocess.run([*CLI, "convert", str(changed), f"{bucket}/stores/q.zarr", "-q"], check=True)
    run_imputation(f"{bucket}/stores/q.zarr", str(inputs.reference), str(inputs.identities), 0,
                   url, k=7, chunk_size=90)
    _same_as_local(url, tmp_path / "local")
    _finished(url)
    assert not _fs().exists(f"{url}/zarr/query.zarr")


def test_unfinished_prefix_with_a_foreign_object_is_refused(bucket, local_run):
    inputs = local_run[0]
    fs = _fs()
    url = f"{bucket}/runs/mixed"
    fs.pipe_file(f"{url}/{export.PARTIAL_MARKER}", b"")
    fs.pipe_file(f"{url}/scores.txt", b"0.5")
    fs.pipe_file(f"{url}/their_notes.txt", b"keep me")
    with pytest.raises(InputError, match=r"their_notes\.txt"):
        run_imputation(str(inputs.query), str(inputs.reference), str(inputs.identities), 0,
                       url, k=7)
    assert fs.cat_file(f"{url}/their_notes.txt") == b"keep me"


def test_object_lock_is_released_only_while_it_is_ours(bucket):
    work = location(f"{bucket}/runs/raced")
    lock = location(f"{bucket}/runs/.raced.lock")
    with export.exclusive(work):
        # another process took the lock over meanwhile (wrongly judging us dead)
        lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "theirs"}))
    assert json.loads(lock.read_text())["token"] == "theirs"  # not released by us


def test_local_10x_input_with_an_s3_output(bucket, local_run, tmp_path):
    """The 10x buckets are local scratch files, wherever the store goes."""
    inputs, _, local = local_run
    reference = inputs.reference_df
    _write_10x(tmp_path / "10x", reference, list(reference.columns), gz=False)
    url = f"{bucket}/runs/10x"
    run_imputation(inputs.query, tmp_path / "10x", inputs.identities, 0, url, k=7,
                   chunk_size=90, report=False)
    _finished(url)
    got = zarr.open_group(zarr_store(location(f"{url}/zarr/imputed.zarr")), mode="r")["X"][:]
    expected = zarr.open_group(local / "zarr" / "imputed.zarr", mode="r")["X"][:]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert not list(tmp_path.glob(".*buckets*"))


def test_impute_outdir_and_coordinates_on_s3(bucket, local_run, tmp_path, monkeypatch):
    anndata = pytest.importorskip("anndata")
    from scimpute_dask import impute
    from scimpute_dask.io import anndata_io

    inputs, _, local = local_run
    query, reference = anndata.AnnData(inputs.query_df), anndata.AnnData(inputs.reference_df)
    ids = inputs.identities_df.set_index("cell")["id"].astype(str)
    for adata in (query, reference):
        adata.obs["cluster"] = ids.loc[adata.obs_names].to_numpy()
    monkeypatch.chdir(tmp_path)  # where a URL taken for a local path would land
    url = f"{bucket}/api/run"
    table = tmp_path / "xy.tsv"
    xy = np.random.default_rng(1).uniform(size=(query.n_obs, 2))
    table.write_text("cell\tx\ty\n" + "".join(
        f"{c}\t{x}\t{y}\n" for c, (x, y) in zip(query.obs_names, xy, strict=True)))
    _fs().put_file(str(table), f"{bucket}/in/xy.tsv")
    np.testing.assert_array_equal(
        anndata_io.read_coords(f"{bucket}/in/xy.tsv", query.obs_names.to_numpy()), xy)

    result = impute(query, reference, k=7, cluster_key="cluster", outdir=url, copy=True)
    assert not (tmp_path / "s3:").exists()
    _finished(url)
    assert type(result.X).__name__ == "Array"  # lazy, over s3
    expected = zarr.open_group(local / "zarr" / "imputed.zarr", mode="r")["X"][:]
    np.testing.assert_array_equal(result.X.compute(), expected.astype(np.float32))


def test_remote_inputs_are_identified_without_reading_them(bucket, local_run):
    from scimpute_dask import ExpressionStore, convert
    from scimpute_dask.export import provenance

    inputs = local_run[0]
    convert(inputs.query, f"{bucket}/in/q.zarr")
    _fs().put_file(str(inputs.query), f"{bucket}/in/q.tsv")
    store, text = location(f"{bucket}/in/q.zarr"), location(f"{bucket}/in/q.tsv")
    found = provenance.checksums({"store": store, "text": text}).result()  # UPath objects
    # a directory has no key of its own: the store's record of its source identifies it
    assert found["store"] == {"path": str(store),
                              "fingerprint": ExpressionStore.open(store).fingerprint}
    assert found["text"] == {"path": str(text), "key": text.fs.ukey(text.path)}
