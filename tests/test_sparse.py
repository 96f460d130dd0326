"""A sparse reference stays sparse: stored as blocked CSR, read sparse by every stage, and
every output byte-identical to the same values given dense."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import sparse

from scimpute_dask import ExpressionStore, read_run, run_imputation
from scimpute_dask.io import blocked
from scimpute_dask.synthetic import make_pair

OUTPUTS = ("imputation.tsv", "sim_matrix.tsv", "scores.txt")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A query, and one reference written twice: CSR and dense .h5ad of the same values."""
    tmp = tmp_path_factory.mktemp("sparse")
    pair = make_pair(n_query=500, n_reference=1300, n_genes=700, n_panel=60, seed=5)
    rng = np.random.default_rng(5)
    # an atlas-like ~10 % non-zero, a gene beyond float32's 2-decimal text kept
    values = pair.reference.to_numpy(np.float32) * (rng.random(pair.reference.shape) < 0.1)
    values[::7, 3] = 50_000.5
    types = pair.identities.set_index(pair.identities.columns[0]).iloc[:, 0].astype(str)

    def obs(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"type": types.loc[frame.index].to_numpy()},
                            index=frame.index.astype(str))

    var = pd.DataFrame(index=pair.reference.columns.astype(str))
    paths = {}
    for name, X in (("csr", sparse.csr_matrix(values)), ("dense", values)):
        paths[name] = tmp / f"reference_{name}.h5ad"
        anndata.AnnData(X=X, obs=obs(pair.reference), var=var).write_h5ad(paths[name])
    query = anndata.AnnData(X=pair.query.to_numpy(np.float32), obs=obs(pair.query),
                            var=pd.DataFrame(index=pair.query.columns.astype(str)))
    return tmp, query, paths, var.index


@pytest.mark.parametrize("options", [
    {},
    {"average": "log1p", "impute_genes": "some"},
    {"search": "approx", "recall": 0.9},
], ids=["exact", "log1p-some-genes", "approx"])
def test_sparse_reference_gives_the_dense_outputs_byte_for_byte(inputs, tmp_path, options):
    _, query, paths, genes = inputs
    if options.get("impute_genes") == "some":  # shared genes left out: the score's scratch
        options = {**options, "impute_genes": [*query.var_names[:5], *genes[200:260]]}
    outs = {}
    for name, path in paths.items():
        outs[name] = tmp_path / name
        run_imputation(query, path, outdir=outs[name], k=9, chunk_size=128,
                       cluster_key="type", report=False, **options)
    store = ExpressionStore.open(outs["csr"] / "zarr" / "reference.zarr")
    assert store.sparse and 0.05 < store.density < 0.15
    for name in OUTPUTS:
        assert (outs["csr"] / name).read_bytes() == (outs["dense"] / name).read_bytes(), name
    a, b = (zarr.open_group(o / "zarr" / "neighbors.zarr", mode="r") for o in outs.values())
    np.testing.assert_array_equal(a["indices"][:], b["indices"][:])
    a, b = (zarr.open_group(o / "zarr" / "imputed.zarr", mode="r") for o in outs.values())
    assert a.attrs["wide_genes"] == b.attrs["wide_genes"]
    np.testing.assert_array_equal(a["X"][:], b["X"][:])


def test_genes_on_demand_from_a_sparse_reference(inputs, tmp_path):
    _, query, paths, _ = inputs
    out = tmp_path / "lazy"
    run_imputation(query, paths["csr"], outdir=out, k=9, cluster_key="type", report=False)
    stored = zarr.open_group(out / "zarr" / "imputed.zarr", mode="r")["X"][:]
    np.testing.assert_array_equal(read_run(out).X.compute(), stored.astype(np.float32))


def test_blocked_reads_match_the_matrix(tmp_path):
    """Every way a stage reads a blocked-CSR store, against the matrix itself, across cell
    and gene block boundaries."""
    from scimpute_dask.io import store as stores

    rng = np.random.default_rng(0)
    n, g = 2100, 2500
    M = sparse.random(n, g, density=0.03, format="csr", random_state=1, dtype=np.float32)
    M.data = rng.integers(1, 50, M.nnz).astype(np.float32)
    cells = np.array([f"c{i}" for i in range(n)], dtype=object)
    genes = np.array([f"g{i}" for i in range(g)], dtype=object)

    def blocks(done, offset, chunks):
        for lo in range(done, n, chunks[0]):
            yield stores.Block(lo, min(n, lo + chunks[0]), M[lo : lo + chunks[0]])

    store = stores.write_store(tmp_path / "s.zarr", {"test": 1}, "test",
                               shape=lambda: (cells, genes, (512, 256)), blocks=blocks,
                               sparse=True)
    D = M.toarray()
    assert store.sparse and store.chunks == (512, blocked.GENE_BLOCK)
    assert store.density == pytest.approx(M.nnz / (n * g))
    np.testing.assert_array_equal(store.to_dask((700, 300)).compute(), D)
    cols = np.array([2400, 5, 1500, 7, 1023, 1024])
    np.testing.assert_array_equal(store.columns(cols, (333, -1)).compute(), D[:, cols])
    subset = np.arange(0, g, 3)
    part = store.gene_blocks(256, subset)
    assert sparse.issparse(part.blocks[0, 2].compute())
    np.testing.assert_array_equal(part.blocks[0, 2].compute().toarray(), D[:, subset[512:768]])
    rows = np.array([3, 2099, 511, 512, 17])
    np.testing.assert_array_equal(store.select(rows, cols), D[np.ix_(rows, cols)])
    np.testing.assert_array_equal(store.read(), D)


def test_unmeasured_genes_only(inputs, tmp_path):
    """``impute_genes="unmeasured"``: every reference gene the query did not measure."""
    _, query, paths, genes = inputs
    out = tmp_path / "unmeasured"
    run_imputation(query, paths["csr"], outdir=out, k=9, cluster_key="type", report=False,
                   impute_genes="unmeasured", tsv_genes="none")
    stored = zarr.open_group(out / "zarr" / "imputed.zarr", mode="r")
    expected = [g for g in genes if g not in set(query.var_names)]
    assert list(stored["var_names"][:]) == expected
    assert (out / "scores.txt").exists() and not (out / "zarr" / "imputed_shared.zarr").exists()


def test_an_interrupted_sparse_conversion_resumes(tmp_path):
    """Killed after two blocks of cells, the conversion resumes at the third: the store
    equals one converted whole, its entries counted once."""
    from scimpute_dask.io import store as stores

    n, g = 1000, 300
    M = sparse.random(n, g, density=0.1, format="csr", random_state=2, dtype=np.float32)
    cells = np.array([f"c{i}" for i in range(n)], dtype=object)
    names = np.array([f"g{i}" for i in range(g)], dtype=object)
    seen = []

    def blocks(done, offset, chunks, fail_after=None):
        for lo in range(done, n, chunks[0]):
            if fail_after is not None and len(seen) == fail_after:
                raise KeyboardInterrupt
            seen.append(lo)
            yield stores.Block(lo, min(n, lo + chunks[0]), M[lo : lo + chunks[0]])

    def convert(**kw):
        return stores.write_store(tmp_path / "s.zarr", {"t": 1}, "t",
                                  shape=lambda: (cells, names, (256, 300)), sparse=True,
                                  blocks=lambda d, o, c: blocks(d, o, c, **kw))

    with pytest.raises(KeyboardInterrupt):
        convert(fail_after=2)
    assert not zarr.open_group(tmp_path / "s.zarr", mode="r").attrs["complete"]
    store = convert()
    assert seen == [0, 256, 512, 768]  # the first two blocks were not converted again
    np.testing.assert_array_equal(store.read(), M.toarray())
    assert store.density == pytest.approx(M.nnz / (n * g))
    # every block's gene maxima recorded once, the resumed ones too
    np.testing.assert_array_equal(store.column_max(), np.abs(M.toarray()).max(axis=0))
    assert "column_max_blocks" not in store.group
