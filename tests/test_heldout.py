"""run --validation: a validate output's reliability in var, its plot and summary in the report."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from scimpute_dask import InputError, cross_validate, impute, run_imputation
from scimpute_dask.cli import main
from scimpute_dask.plotting import figures as plotting

from .conftest import MC_CORTEX
from .test_report import _not_blank

anndata = pytest.importorskip("anndata")


@pytest.mark.skipif(not MC_CORTEX.exists(), reason="../shared data not present")
def test_run_with_validation_on_the_real_data(tmp_path):
    """A2 with 60 of its 100 genes as query, A1 as reference: validate, then run with it."""
    a2 = pd.read_csv(MC_CORTEX / "A2" / "matrix.csv", index_col=0)
    visible = a2.columns[::5].append(a2.columns[1::5]).append(a2.columns[2::5])
    a2[visible].to_csv(tmp_path / "A2_panel.csv")
    inputs = ["--query", str(tmp_path / "A2_panel.csv"), "--reference",
              str(MC_CORTEX / "A1" / "matrix.csv"), "--query-layout", "cells_x_genes",
              "--reference-layout", "cells_x_genes", "--k", "10", "--quiet"]
    cv, out = tmp_path / "cv", tmp_path / "out"
    assert main(["validate", *inputs, "--out", str(cv)]) == 0
    assert main(["run", *inputs, "--no-clusters", "--anndata", "--validation", str(cv),
                 "--out", str(out)]) == 0

    rel = pd.read_csv(cv / "reliability.tsv", sep="\t")
    var = anndata.read_zarr(out / "adata.zarr").var
    assert list(var.columns) == ["measured", "agreement", "predicted_pearson",
                                 "heldout_pearson"]
    assert list(var.index) == list(rel["gene"])
    for column in ("agreement", "predicted_pearson", "heldout_pearson"):
        np.testing.assert_array_equal(var[column].to_numpy(), rel[column].to_numpy())
    # measured is the run's own flag, as without a validation
    assert set(var.index[var["measured"].to_numpy()]) == set(visible)
    assert var["measured"].to_numpy().tolist() == rel["shared"].tolist()
    assert var.loc[var["measured"], "heldout_pearson"].notna().all()
    assert var.loc[~var["measured"], "heldout_pearson"].isna().all()
    assert (out / "reliability.tsv").read_bytes() == (cv / "reliability.tsv").read_bytes()

    _not_blank(out / plotting.SCORE_PNG, (400, 1200))
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # histogram, held-out vs sparsity
    assert f"href='{plotting.SCORE_PNG}'" in page and "Held-out validation" in page
    summary = pd.read_csv(cv / "summary.tsv", sep="\t")
    median = summary.query("level == 'gene' and metric == 'pearson'")["median"].iloc[0]
    assert f"{median:.4g}" in page
    record = json.loads((out / "run.json").read_text())
    assert record["parameters"]["validation"] == str(cv)
    assert {"reliability.tsv", plotting.SCORE_PNG} <= set(record["outputs"])


@pytest.fixture
def validated(tmp_path, small_inputs):
    cv = tmp_path / "cv"
    cross_validate(small_inputs.query, small_inputs.reference, cv, k=5, folds=3)
    return cv


def _refused(tmp_path, match: str, query, reference, validation, **kwargs) -> None:
    before = set(tmp_path.iterdir())
    with pytest.raises(InputError, match=match):
        run_imputation(query, reference, outdir=tmp_path / "out", k=5,
                       consider_clusters=False, validation=validation, **kwargs)
    assert set(tmp_path.iterdir()) == before  # nothing written, not even the work directory


def test_validation_of_other_inputs_is_refused(tmp_path, small_inputs, small_pair, validated):
    other = small_pair.query.copy()
    other.iloc[5, 3] += 1.0  # same names, another file
    from scimpute_dask.synthetic import write_scimpute_tsv

    write_scimpute_tsv(other, tmp_path / "other.tsv")
    _refused(tmp_path, f"{validated}: a validation of .*query.tsv as the query, not of this "
             "run's query .*other.tsv", tmp_path / "other.tsv", small_inputs.reference,
             validated)
    # in memory: identified by the names it shares with the validation
    _refused(tmp_path, "cells.tsv: scores other cells than the query cells",
             small_inputs.query_df.iloc[1:], small_inputs.reference_df, validated)
    _refused(tmp_path, "reliability.tsv: rates other genes than the reference genes",
             small_inputs.query_df, small_inputs.reference_df.iloc[:, 1:], validated)
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, "empty: no validate.json", small_inputs.query,
             small_inputs.reference, tmp_path / "empty")
    cross_validate(small_inputs.query, small_inputs.reference, tmp_path / "plain", k=5,
                   folds=3, reliability=False, plot=False)
    _refused(tmp_path, r"plain: no reliability.tsv \(validate ran with --no-reliability\)",
             small_inputs.query, small_inputs.reference, tmp_path / "plain")


def test_in_memory_run_with_validation_warns_of_other_parameters(tmp_path, small_inputs,
                                                                 validated, caplog):
    with caplog.at_level(logging.WARNING, logger="scimpute_dask"):
        result = run_imputation(small_inputs.query_df, small_inputs.reference_df,
                                outdir=tmp_path / "out", k=7, consider_clusters=False,
                                validation=validated, report=False)
    assert "k 5 vs 7" in caplog.text
    assert result.files["reliability"].read_bytes() == \
        (validated / "reliability.tsv").read_bytes()
    assert not (tmp_path / "out" / plotting.SCORE_PNG).exists()  # no report, no figures
    # the scanpy-style API passes it on
    imputed = impute(anndata.AnnData(small_inputs.query_df),
                     anndata.AnnData(small_inputs.reference_df), k=5, validation=validated)
    rel = pd.read_csv(validated / "reliability.tsv", sep="\t")
    np.testing.assert_array_equal(imputed.var["predicted_pearson"], rel["predicted_pearson"])
