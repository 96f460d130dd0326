"""A SpatialData Zarr store as the query: its table read as AnnData-Zarr, its centroids mapped."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import sparse

from scimpute_dask import InputError, convert
from scimpute_dask.cli import main
from scimpute_dask.io import spatialdata_io

anndata = pytest.importorskip("anndata")
# anndata's notice about its future default, about the tables written here
pytestmark = pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")


def write_spatialdata(path, section: pd.DataFrame, xy: np.ndarray, tables=("table",)) -> None:
    """The layout ``SpatialData.write`` gives a Xenium section read by spatialdata-io: a
    root group marked ``spatialdata_attrs``, the cells' circles under ``shapes/``, and
    each table an AnnData-Zarr group under ``tables/`` annotating those shapes (``region``,
    ``cell_id``; counts as CSR; centroids in ``obsm["spatial"]``)."""
    root = zarr.open_group(path, mode="w")
    root.attrs["spatialdata_attrs"] = {"version": "0.2", "spatialdata_software_version": "0.4"}
    root.create_group("shapes").create_group("cell_circles").attrs.update(
        {"encoding-type": "ngff:shapes", "spatialdata_attrs": {"version": "0.2"}})
    root.create_group("tables")
    for name in tables:
        obs = pd.DataFrame({"cell_id": section.index.to_numpy(),
                            "region": pd.Categorical(["cell_circles"] * len(section))},
                           index=pd.Index([str(i) for i in range(len(section))]))
        table = anndata.AnnData(sparse.csr_matrix(section.to_numpy(np.float32)), obs=obs,
                                var=pd.DataFrame(index=section.columns),
                                obsm={"spatial": xy},
                                uns={"spatialdata_attrs": {"region": "cell_circles",
                                                           "region_key": "region",
                                                           "instance_key": "cell_id"}})
        table.write_zarr(path / "tables" / name)


@pytest.fixture
def section(small_pair):
    query = small_pair.query.round(0).clip(lower=0)
    return query, np.random.default_rng(4).uniform(0, 3000, (len(query), 2))


def test_spatialdata_query_to_imputed_anndata_with_its_centroids(tmp_path, section,
                                                                  small_inputs):
    query, xy = section
    write_spatialdata(tmp_path / "section.zarr", query, xy)
    store = convert(tmp_path / "section.zarr", tmp_path / "q.zarr")
    np.testing.assert_array_equal(store.read(), query.to_numpy(np.float32))
    out = tmp_path / "out"
    assert main(["run", "--query", str(tmp_path / "section.zarr"), "--reference",
                 str(small_inputs.reference), "--out", str(out), "--k", "10",
                 "--no-clusters", "--no-report", "-q"]) == 0
    adata = anndata.read_zarr(out / "adata.zarr")
    np.testing.assert_array_equal(adata.obsm["spatial"], xy)
    assert list(adata.obs["cell_id"]) == list(query.index)  # the table's obs carried over


def test_spatialdata_stores_without_one_table_are_one_line_errors(tmp_path, section, capsys,
                                                                  small_inputs):
    query, xy = section
    write_spatialdata(tmp_path / "two.zarr", query, xy, tables=("cells", "nuclei"))
    write_spatialdata(tmp_path / "none.zarr", query, xy, tables=())
    for name, message in [("two.zarr", r"2 tables \(cells, nuclei\); name one with --table NAME"),
                          ("none.zarr", r"no table")]:
        with pytest.raises(InputError, match=message):
            convert(tmp_path / name, tmp_path / "q.zarr")
        out = tmp_path / "out"
        assert main(["run", "--query", str(tmp_path / name), "--reference",
                     str(small_inputs.reference), "--out", str(out), "--no-clusters",
                     "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("scimpute-dask: error:") and "\n" not in err
        assert not out.exists()
    # one table named: by --table, or by its path (an AnnData-Zarr input like any other)
    out = tmp_path / "out"
    assert main(["run", "--query", str(tmp_path / "two.zarr"), "--table", "nuclei",
                 "--reference", str(small_inputs.reference), "--out", str(out), "--k", "5",
                 "--no-clusters", "--no-report", "--tsv-genes", "none", "-q"]) == 0
    for source, message in [(tmp_path / "two.zarr", r"no table 'cytoplasm' \(tables: cells"),
                            (small_inputs.query, r"--table cytoplasm: the query is not a "
                                                 r"SpatialData store")]:
        assert main(["run", "--query", str(source), "--table", "cytoplasm", "--reference",
                     str(small_inputs.reference), "--out", str(tmp_path / "o2"),
                     "--no-clusters", "-q"]) == 2
        assert re.search(message, capsys.readouterr().err)
    store = convert(tmp_path / "two.zarr" / "tables" / "nuclei", tmp_path / "q.zarr")
    assert store.shape == query.shape
    assert spatialdata_io.is_spatialdata(tmp_path / "two.zarr")
    assert not spatialdata_io.is_spatialdata(tmp_path / "two.zarr" / "tables" / "nuclei")


def _sdata_section(section: pd.DataFrame, xy: np.ndarray, tables=("table",)):
    """A Xenium-like section as spatialdata itself builds it: the cells' circles and
    tables annotating them (counts, ``region``, ``cell_id``, centroids)."""
    spatialdata = pytest.importorskip("spatialdata")
    from spatialdata.models import ShapesModel, TableModel

    circles = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), 6.0),
                                index=np.arange(len(xy)))
    made = {}
    for name in tables:
        obs = pd.DataFrame({"region": pd.Categorical(["cell_circles"] * len(section)),
                            "cell_id": np.arange(len(section))},
                           index=section.index.astype(str))
        made[name] = TableModel.parse(
            anndata.AnnData(sparse.csr_matrix(section.to_numpy(np.float32)), obs=obs,
                            var=pd.DataFrame(index=section.columns), obsm={"spatial": xy}),
            region="cell_circles", region_key="region", instance_key="cell_id")
    return spatialdata.SpatialData(shapes={"cell_circles": circles}, tables=made)


def test_impute_adds_a_table_over_the_same_shapes(tmp_path, section, small_pair):
    """Three lines from a SpatialData store to an imputed table annotating its cells,
    written into the store: what napari-spatialdata shows over the image."""
    spatialdata = pytest.importorskip("spatialdata")
    import scimpute_dask

    query, xy = section
    _sdata_section(query, xy).write(tmp_path / "section.zarr")
    reference = anndata.AnnData(small_pair.reference.to_numpy(np.float32),
                                var=pd.DataFrame(index=small_pair.reference.columns))
    reference.obs_names = [f"r{i}" for i in range(reference.n_obs)]

    # the store as spatialdata wrote it is a query of the command line too
    reference.write_h5ad(tmp_path / "reference.h5ad")
    assert main(["run", "--query", str(tmp_path / "section.zarr"), "--reference",
                 str(tmp_path / "reference.h5ad"), "--out", str(tmp_path / "cli"), "--k", "10",
                 "--no-clusters", "--no-report", "-q"]) == 0
    np.testing.assert_array_equal(anndata.read_zarr(tmp_path / "cli" / "adata.zarr")
                                  .obsm["spatial"], xy)

    sdata = spatialdata.read_zarr(tmp_path / "section.zarr")
    scimpute_dask.impute(sdata, reference, k=10)
    assert "scimpute" in sdata.tables

    stored = spatialdata.read_zarr(tmp_path / "section.zarr")  # written into the store
    table = stored.tables["scimpute"]
    assert table.uns["spatialdata_attrs"] == {"region": "cell_circles", "region_key": "region",
                                              "instance_key": "cell_id"}
    np.testing.assert_array_equal(table.obs["cell_id"], np.arange(len(query)))
    # the same values as the table imputed on its own
    alone = scimpute_dask.impute(stored.tables["table"], reference, k=10, copy=True)
    np.testing.assert_array_equal(np.asarray(table.X), np.asarray(alone.X))
    # a gene the panel lacks, looked up for the shapes as a viewer does
    gene = next(g for g in table.var_names if not table.var.loc[g, "measured"])
    values = spatialdata.get_values(gene, sdata=stored, element_name="cell_circles",
                                    table_name="scimpute")
    np.testing.assert_array_equal(values[gene].to_numpy(), np.asarray(alone[:, gene].X).ravel())


def test_impute_of_a_spatialdata_object_with_several_tables_asks_for_one(section, small_pair):
    pytest.importorskip("spatialdata")
    import scimpute_dask

    query, xy = section
    sdata = _sdata_section(query, xy, tables=("cells", "nuclei"))
    reference = anndata.AnnData(small_pair.reference.to_numpy(np.float32),
                                var=pd.DataFrame(index=small_pair.reference.columns))
    with pytest.raises(InputError, match=r"2 tables \(cells, nuclei\); name one"):
        scimpute_dask.impute(sdata, reference, k=10)
    added = scimpute_dask.impute(sdata, reference, k=10, table="nuclei", key_added="imputed")
    assert sdata.tables["imputed"] is added and added.n_obs == len(query)
