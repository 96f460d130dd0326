"""Bad inputs: each is refused with an :class:`InputError` that names the file and the
row, gene, cell or cluster at fault, and no output directory is left behind.

Every case is built from the small synthetic pair (``small_pair``), written as
scimpute TSVs (genes as rows, cells as columns) and then damaged in one place.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scimpute_dask import InputError, expression_imputation, run_imputation
from scimpute_dask.cli import main

K = 5
APIS = ["run_imputation", "expression_imputation"]
ROLES = ["query", "reference"]
#: Where the damage goes: a cell and a gene that are neither first nor last.
CELL_POS, GENE_POS = 10, 5


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def mentions(*parts: object) -> str:
    """A regex that matches a message containing every part literally, in any order."""
    return "(?s)" + "".join(f"(?=.*{re.escape(str(p))})" for p in parts)


def impute(api: str, query, reference, identities, idx, out: Path, *, k: int = K,
           consider_clusters: bool = True, **kwargs):
    if api == "run_imputation":
        return run_imputation(query, reference, identities, idx, out, k=k,
                              consider_clusters=consider_clusters, **kwargs)
    return expression_imputation(query, reference, identities, idx, out, k_neighbors=k,
                                 consider_clusters=consider_clusters, **kwargs)


def refused(api: str, pattern: str, query, reference, identities, out: Path, idx=0,
            **kwargs) -> InputError:
    """Assert that the run fails with an InputError matching ``pattern`` and writes no output."""
    with pytest.raises(InputError, match=pattern) as info:
        impute(api, query, reference, identities, idx, out, **kwargs)
    assert not out.exists(), f"{out} was created by a run that failed"
    return info.value


def cli_refused(capsys, pattern: str, query, reference, identities, out: Path,
                *extra: str) -> str:
    """Assert that ``scimpute-dask run`` exits 2 with an error matching ``pattern``."""
    argv = ["run", "--query", str(query), "--reference", str(reference), "--out", str(out),
            "--k", str(K), "--quiet"]
    if identities is not None:
        argv += ["--identities", str(identities)]
    code = main([*argv, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("scimpute-dask: error: "), err
    assert re.search(pattern, err), err
    assert not out.exists(), f"{out} was created by a run that failed"
    return err


@pytest.fixture
def inputs(small_inputs):
    """The intact inputs as TSVs under ``tmp_path/in`` (2 all-zero query cells)."""
    return small_inputs


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def frame_of(pair, role: str) -> pd.DataFrame:
    return (pair.query if role == "query" else pair.reference).copy()


def write_matrix(frame: pd.DataFrame, path: Path) -> Path:
    """Write a cells × genes frame as a scimpute TSV (with pandas: it may hold bad values)."""
    frame.T.to_csv(path, sep="\t")
    return path


def with_matrix(inputs, role: str, frame: pd.DataFrame) -> tuple[Path, Path, Path]:
    """``(query, reference, matrix path)`` with the ``role`` matrix replaced by ``frame``."""
    path = write_matrix(frame, inputs.query.parent / f"bad_{role}.tsv")
    if role == "query":
        return path, inputs.reference, path
    return inputs.query, path, path


def write_identities(table: pd.DataFrame, path: Path) -> Path:
    table.to_csv(path, sep="\t", index=False)
    return path


# --------------------------------------------------------------------------- #
# 1. Missing files
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("missing", ["query", "reference", "identities"])
def test_missing_file(inputs, out, api, missing):
    paths = {"query": inputs.query, "reference": inputs.reference,
             "identities": inputs.identities}
    paths[missing] = inputs.query.parent / f"no_such_{missing}.tsv"
    refused(api, mentions(paths[missing], "not found"), paths["query"], paths["reference"],
            paths["identities"], out)


@pytest.mark.parametrize("api", APIS)
def test_identity_table_not_given(inputs, out, api):
    refused(api, mentions("identity table"), inputs.query, inputs.reference, None, out)


@pytest.mark.parametrize("missing", ["query", "reference", "identities"])
def test_cli_missing_file(inputs, out, capsys, missing):
    paths = {"query": inputs.query, "reference": inputs.reference,
             "identities": inputs.identities}
    paths[missing] = inputs.query.parent / f"no_such_{missing}.tsv"
    cli_refused(capsys, mentions(paths[missing], "not found"), paths["query"],
                paths["reference"], paths["identities"], out)


# --------------------------------------------------------------------------- #
# 2. No shared genes
# --------------------------------------------------------------------------- #
def _renamed_query(inputs, small_pair) -> Path:
    query = small_pair.query.rename(columns=lambda g: f"other_{g}")
    return write_matrix(query, inputs.query.parent / "renamed_query.tsv")


@pytest.mark.parametrize("api", APIS)
def test_no_shared_genes(inputs, out, small_pair, api):
    query = _renamed_query(inputs, small_pair)
    refused(api, mentions(query, inputs.reference, "no genes are shared"), query,
            inputs.reference, inputs.identities, out)


def test_cli_no_shared_genes(inputs, out, small_pair, capsys):
    query = _renamed_query(inputs, small_pair)
    cli_refused(capsys, mentions(query, inputs.reference, "no genes are shared"), query,
                inputs.reference, inputs.identities, out)


# --------------------------------------------------------------------------- #
# 3. Duplicated names
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("role", ROLES)
def test_duplicated_gene_names(inputs, out, small_pair, api, role):
    frame = frame_of(small_pair, role)
    genes = list(frame.columns)
    dup = genes[GENE_POS]
    genes[GENE_POS + 3] = dup
    frame.columns = genes
    query, reference, path = with_matrix(inputs, role, frame)
    refused(api, mentions(path, "duplicated gene names", f"'{dup}'"), query, reference,
            inputs.identities, out)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("role", ROLES)
def test_duplicated_cell_names_in_matrix(inputs, out, small_pair, api, role):
    frame = frame_of(small_pair, role)
    cells = list(frame.index)
    dup = cells[CELL_POS]
    cells[CELL_POS + 7] = dup
    frame.index = cells
    query, reference, path = with_matrix(inputs, role, frame)
    refused(api, mentions(path, "duplicated cell names", f"'{dup}'"), query, reference,
            inputs.identities, out)


@pytest.mark.parametrize("api", APIS)
def test_duplicated_cell_names_in_identity_table(inputs, out, small_pair, api):
    table = small_pair.identities.copy()
    dup = small_pair.query.index[CELL_POS]
    extra = table[table["cell"] == dup].assign(id=99)
    ids = write_identities(pd.concat([table, extra], ignore_index=True),
                           inputs.query.parent / "dup_ids.tsv")
    refused(api, mentions(ids, "duplicated cell names", f"'{dup}'"), inputs.query,
            inputs.reference, ids, out)


# --------------------------------------------------------------------------- #
# 4. Bad values: non-numeric, NaN (written or empty), negative
# --------------------------------------------------------------------------- #
BAD_VALUES = {
    "non_numeric": ("abc", "'abc'"),
    "nan_written": ("NaN", "NaN"),
    "empty_field": ("", "NaN"),
    "negative": (-1.5, "negative"),
}


def _bad_value_matrix(inputs, small_pair, role: str, value) -> tuple[Path, Path, Path, str, str]:
    frame = frame_of(small_pair, role).astype(object)
    cell, gene = frame.index[CELL_POS], frame.columns[GENE_POS]
    frame.loc[cell, gene] = value
    query, reference, path = with_matrix(inputs, role, frame)
    return query, reference, path, cell, gene


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value(inputs, out, small_pair, api, role, case):
    value, what = BAD_VALUES[case]
    query, reference, path, cell, gene = _bad_value_matrix(inputs, small_pair, role, value)
    assert (str(value) or "\t\t") in path.read_text()
    refused(api, mentions(path, f"gene '{gene}'", f"cell '{cell}'", what), query, reference,
            inputs.identities, out)


@pytest.mark.parametrize("case", ["non_numeric", "empty_field", "negative"])
def test_cli_bad_value(inputs, out, small_pair, capsys, case):
    value, what = BAD_VALUES[case]
    query, reference, path, cell, gene = _bad_value_matrix(inputs, small_pair, "query", value)
    cli_refused(capsys, mentions(path, f"gene '{gene}'", f"cell '{cell}'", what), query,
                reference, inputs.identities, out)


# --------------------------------------------------------------------------- #
# 5. Cells missing from the identity table
# --------------------------------------------------------------------------- #
def _ids_without(inputs, small_pair, role: str) -> tuple[Path, str]:
    cells = frame_of(small_pair, role).index[[CELL_POS, CELL_POS + 1]]
    table = small_pair.identities[~small_pair.identities["cell"].isin(cells)]
    return write_identities(table, inputs.query.parent / "partial_ids.tsv"), cells[0]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("role", ROLES)
def test_cells_missing_from_identity_table(inputs, out, small_pair, api, role):
    ids, cell = _ids_without(inputs, small_pair, role)
    matrix = inputs.query if role == "query" else inputs.reference
    refused(api, mentions(ids, matrix, "missing from the identity table", f"'{cell}'"),
            inputs.query, inputs.reference, ids, out)


def test_cli_query_cells_missing_from_identity_table(inputs, out, small_pair, capsys):
    ids, cell = _ids_without(inputs, small_pair, "query")
    cli_refused(capsys, mentions(ids, inputs.query, "missing from the identity table",
                                 f"'{cell}'"), inputs.query, inputs.reference, ids, out)


# --------------------------------------------------------------------------- #
# 6. Identity table layout and cell_name_column_idx
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("api", APIS)
def test_identity_table_without_id_column(inputs, out, small_pair, api):
    ids = write_identities(small_pair.identities.rename(columns={"id": "cluster"}),
                           inputs.query.parent / "no_id.tsv")
    refused(api, mentions(ids, "no column named 'id'"), inputs.query, inputs.reference, ids,
            out)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("idx", [2, 7, -1])
def test_cell_name_column_idx_out_of_range(inputs, out, api, idx):
    refused(api, mentions(inputs.identities, f"cell_name_column_idx={idx}", "out of range"),
            inputs.query, inputs.reference, inputs.identities, out, idx=idx)


@pytest.mark.parametrize("api", APIS)
def test_cell_name_column_idx_points_at_id(inputs, out, api):
    refused(api, mentions(inputs.identities, "cell_name_column_idx=1", "'id'"), inputs.query,
            inputs.reference, inputs.identities, out, idx=1)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("idx", ["0", 1.5, None])
def test_cell_name_column_idx_not_an_integer(inputs, out, api, idx):
    refused(api, mentions("cell_name_column_idx must be an integer", repr(idx)), inputs.query,
            inputs.reference, inputs.identities, out, idx=idx)


def test_cli_name_column_out_of_range(inputs, out, capsys):
    cli_refused(capsys, mentions(inputs.identities, "cell_name_column_idx=5", "out of range"),
                inputs.query, inputs.reference, inputs.identities, out, "--name-column", "5")


def test_cli_name_column_not_an_integer(inputs, out, capsys):
    """The configuration rejects it before the run starts, quoting it as written."""
    cli_refused(capsys, mentions("--name-column must be an integer, got 'cell'"),
                inputs.query, inputs.reference, inputs.identities, out, "--name-column", "cell")


# --------------------------------------------------------------------------- #
# 7. k larger than the candidate reference cells
# --------------------------------------------------------------------------- #
def _cluster_sizes(small_pair) -> pd.Series:
    ids = small_pair.identities.set_index("cell")["id"]
    return ids.loc[small_pair.reference.index].value_counts()


@pytest.mark.parametrize("api", APIS)
def test_k_larger_than_reference(inputs, out, small_pair, api):
    n = len(small_pair.reference)
    refused(api, mentions(f"k_neighbors={n + 1}", f"({n})"), inputs.query, inputs.reference,
            inputs.identities, out, k=n + 1, consider_clusters=False)


@pytest.mark.parametrize("api", APIS)
def test_k_larger_than_smallest_cluster(inputs, out, small_pair, api):
    sizes = _cluster_sizes(small_pair)
    smallest, n = sizes.idxmin(), int(sizes.min())
    assert (sizes == n).sum() == 1  # exactly one cluster is too small
    err = refused(api, mentions(f"k_neighbors={n + 1}", f"cluster '{smallest}'",
                                f"{n} reference cells"),
                  inputs.query, inputs.reference, inputs.identities, out, k=n + 1)
    for other in sizes.index.drop(smallest):
        assert f"cluster '{other}'" not in str(err)


@pytest.mark.parametrize("api", APIS)
def test_cluster_without_reference_cells(inputs, out, small_pair, api):
    """A query cluster that no reference cell belongs to: k=1 is already too many."""
    table = small_pair.identities.copy()
    lost = _cluster_sizes(small_pair).idxmin()
    in_ref = table["cell"].isin(small_pair.reference.index)
    table.loc[in_ref & (table["id"] == lost), "id"] = 1000
    ids = write_identities(table, inputs.query.parent / "relabelled_ids.tsv")
    refused(api, mentions(f"cluster '{lost}'", "0 reference cells"), inputs.query,
            inputs.reference, ids, out, k=1)


def test_cli_k_larger_than_smallest_cluster(inputs, out, small_pair, capsys):
    sizes = _cluster_sizes(small_pair)
    n = int(sizes.min())
    cli_refused(capsys, mentions(f"k_neighbors={n + 1}", f"cluster '{sizes.idxmin()}'"),
                inputs.query, inputs.reference, inputs.identities, out, "--k", str(n + 1))


# --------------------------------------------------------------------------- #
# 8. Ragged text lines
# --------------------------------------------------------------------------- #
def _ragged(inputs, role: str, row: int, kind: str) -> tuple[Path, Path, Path, int, str]:
    """Drop (``missing``) or add (``extra``) one field on data row ``row`` (0-based)."""
    source = inputs.query if role == "query" else inputs.reference
    lines = source.read_text().splitlines(keepends=True)
    lineno = row + 2  # 1-based, after the header
    body = lines[lineno - 1].rstrip("\n")
    gene = body.split("\t", 1)[0]
    body = body.rsplit("\t", 1)[0] if kind == "missing" else body + "\t1.0"
    lines[lineno - 1] = body + "\n"
    path = source.parent / f"ragged_{role}.tsv"
    path.write_text("".join(lines))
    query, reference = (path, inputs.reference) if role == "query" else (inputs.query, path)
    return query, reference, path, lineno, gene


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("kind", ["missing", "extra"])
@pytest.mark.parametrize("row", [0, GENE_POS])
def test_ragged_line(inputs, out, api, role, kind, row):
    query, reference, path, lineno, gene = _ragged(inputs, role, row, kind)
    refused(api, mentions(path, f"line {lineno} ", f"'{gene}'"), query, reference,
            inputs.identities, out)


def test_cli_ragged_line(inputs, out, capsys):
    query, reference, path, lineno, gene = _ragged(inputs, "query", GENE_POS, "missing")
    cli_refused(capsys, mentions(path, f"line {lineno} ", f"'{gene}'"), query, reference,
                inputs.identities, out)


# --------------------------------------------------------------------------- #
# 9. An output directory that is not ours
# --------------------------------------------------------------------------- #
def _foreign_outdir(out: Path) -> dict[Path, bytes]:
    (out / "sub").mkdir(parents=True)
    files = {out / "notes.txt": b"my notes\n", out / "sub" / "data.tsv": b"a\tb\n1\t2\n"}
    for path, content in files.items():
        path.write_bytes(content)
    return files


def _untouched(out: Path, files: dict[Path, bytes]) -> None:
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(files)
    for path, content in files.items():
        assert path.read_bytes() == content


@pytest.mark.parametrize("api", APIS)
def test_outdir_with_unrelated_files(inputs, out, api):
    files = _foreign_outdir(out)
    with pytest.raises(InputError, match=mentions(out, "not written by scimpute-dask")):
        impute(api, inputs.query, inputs.reference, inputs.identities, 0, out)
    _untouched(out, files)


@pytest.mark.parametrize("api", APIS)
def test_outdir_is_a_file(inputs, out, api):
    out.write_text("not a directory\n")
    with pytest.raises(InputError, match=mentions(out, "not a directory")):
        impute(api, inputs.query, inputs.reference, inputs.identities, 0, out)
    assert out.read_text() == "not a directory\n"


def test_cli_outdir_with_unrelated_files(inputs, out, capsys):
    files = _foreign_outdir(out)
    code = main(["run", "--query", str(inputs.query), "--reference", str(inputs.reference),
                 "--identities", str(inputs.identities), "--out", str(out), "--k", str(K),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("scimpute-dask: error: ")
    assert re.search(mentions(out, "not written by scimpute-dask"), err)
    _untouched(out, files)


@pytest.mark.parametrize("role", ["--out", "--query"])
def test_cli_url_of_an_unknown_file_system(inputs, capsys, role):
    argv = {"--query": str(inputs.query), "--reference": str(inputs.reference),
            "--identities": str(inputs.identities), "--out": str(inputs.query.parent / "o")}
    argv[role] = "nosuchfs://bucket/x"
    code = main(["run", *(x for kv in argv.items() for x in kv), "--k", str(K), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"^scimpute-dask: error: nosuchfs://bucket/x: .*nosuchfs", err), err
    assert not (inputs.query.parent / "o").exists()


# --------------------------------------------------------------------------- #
# 10. metric
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_unknown_metric(inputs, out, metric):
    with pytest.raises(InputError, match=mentions("metric", repr(metric))):
        expression_imputation(inputs.query, inputs.reference, inputs.identities, 0, out,
                              metric=metric, k_neighbors=K)
    assert not out.exists()


# --------------------------------------------------------------------------- #
# 11. DataFrame inputs (cells × genes)
# --------------------------------------------------------------------------- #
def _frames(inputs, role: str, frame: pd.DataFrame):
    if role == "query":
        return frame, inputs.reference
    return inputs.query, frame


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("role", ROLES)
def test_dataframe_with_nan(inputs, out, small_pair, api, role):
    frame = frame_of(small_pair, role)
    cell, gene = frame.index[CELL_POS], frame.columns[GENE_POS]
    frame.loc[cell, gene] = np.nan
    query, reference = _frames(inputs, role, frame)
    refused(api, mentions(role, f"cell '{cell}'", f"gene '{gene}'", "NaN"), query, reference,
            inputs.identities, out)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("role", ROLES)
def test_dataframe_with_non_numeric_column(inputs, out, small_pair, api, role):
    frame = frame_of(small_pair, role)
    cell, gene = frame.index[CELL_POS], frame.columns[GENE_POS]
    frame[gene] = frame[gene].astype(object)
    frame.loc[cell, gene] = "abc"
    query, reference = _frames(inputs, role, frame)
    refused(api, mentions(role, f"gene '{gene}'", f"cell '{cell}'", "not a number"), query,
            reference, inputs.identities, out)


# --------------------------------------------------------------------------- #
# Recovery after a refused input
# --------------------------------------------------------------------------- #
def test_rerun_after_fixing_a_bad_value(inputs, out, small_pair):
    """Once the bad file is fixed, the same command succeeds (no --restart needed)."""
    query, reference, path, _, _ = _bad_value_matrix(inputs, small_pair, "query", "abc")
    refused("run_imputation", mentions(path, "'abc'"), query, reference, inputs.identities,
            out)
    write_matrix(small_pair.query, path)
    result = run_imputation(path, reference, inputs.identities, 0, out, k=K)
    assert result.n_query == len(small_pair.query)
    assert (out / "imputation.tsv").exists()


# --------------------------------------------------------------------------- #
# Not an error: query cells without shared-gene expression
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("api", APIS)
def test_all_zero_query_cells_are_reported_not_refused(inputs, out, api):
    zero = inputs.query_df.index[(inputs.query_df == 0).all(axis=1)]
    assert len(zero) == 2
    result = impute(api, inputs.query, inputs.reference, inputs.identities, 0, out)
    assert sorted(result.unimputable) == sorted(zero)
    assert (out / "unimputable_cells.txt").read_text().split() == list(zero)
    table = pd.read_csv(out / "imputation.tsv", sep="\t", index_col=0)
    assert list(table.index) == list(inputs.query_df.index)
    assert table.loc[zero].isna().all().all()
    assert table.drop(index=zero).notna().all().all()
