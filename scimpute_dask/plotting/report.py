"""``report.html``: one static page with the run's figures, statistics, parameters and timings.

No server, no scripts, no external resources: the figures are embedded as
base64 PNGs (and linked to their files beside the report), so the page can be
mailed or archived on its own and opens in any browser.
"""

from __future__ import annotations

import base64
import html
import json

import pandas as pd

from scimpute_dask.export.outdir import atomic_file
from scimpute_dask.io.storage import Location

REPORT = "report.html"

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #222; line-height: 1.4; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { font-size: 1.2rem; margin-top: 2rem;
  border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; }
td, th { padding: 0.2rem 0.8rem; border-bottom: 1px solid #eee; text-align: left;
         vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; } .muted { color: #777; }
.cards { display: flex; gap: 1rem; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6rem 1rem; min-width: 9rem; }
.card b { display: block; font-size: 1.4rem; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) if len(value) <= 20 else f"{len(value)} items"
    return str(value)


def _table(rows: dict, header: tuple[str, str] | None = None) -> str:
    head = f"<tr><th>{_esc(header[0])}</th><th>{_esc(header[1])}</th></tr>" if header else ""
    body = "".join(
        f"<tr><td>{_esc(k)}</td><td class='num'>{_esc(_fmt(v))}</td></tr>"
        for k, v in rows.items() if v is not None
    )
    return f"<table>{head}{body}</table>"


def _figure(directory: Location, name: str, caption: str) -> str:
    data = base64.b64encode((directory / name).read_bytes()).decode()
    return (f"<figure><a href='{_esc(name)}'><img alt='{_esc(caption)}' "
            f"src='data:image/png;base64,{data}'></a>"
            f"<figcaption>{_esc(caption)} (<a href='{_esc(name)}'>{_esc(name)}</a>)"
            f"</figcaption></figure>")


def _heldout(summary: pd.DataFrame, directory: str) -> str:
    """The held-out validation's ``summary.tsv``: one row per level and metric."""
    columns = [c for c in ("n", "median", "q25", "q75", "mean") if c in summary]
    head = "".join(f"<th>{_esc(c)}</th>" for c in ("level", "metric", *columns))
    body = "".join(
        f"<tr><td>{_esc(row['level'])}</td><td>{_esc(row['metric'])}</td>"
        + "".join(f"<td class='num'>{_esc(_fmt(row[c]))}</td>" for c in columns) + "</tr>"
        for _, row in summary.iterrows())
    return ("<h2>Held-out validation</h2><p>Scores of the shared genes, each imputed with "
            "its fold hidden from the neighbour search (<code>scimpute-dask validate</code>, "
            f"{_esc(directory)}); per gene and per query cell. Each gene's reliability: "
            "<code>reliability.tsv</code>, and <code>var</code> of the AnnData outputs.</p>"
            f"<table><tr>{head}</tr>{body}</table>")


def _search(search: dict | None) -> str:
    """An approximate search's index and the recall it measured (nothing for an exact one)."""
    if not search or search.get("mode") != "approx":
        return ""
    low, high = search["recall_ci95"]
    rows = {"coarse lists": search["lists"], "lists probed per cell": search["probes"],
            "recall@k vs exact (sample)": f"{search['recall_at_k']:.4f} "
                                          f"(95 % CI {low:.4f}–{high:.4f})",
            "sampled query cells": search["sample_cells"], "target": search["target"],
            "measuring it took (s)": search["seconds"]}
    return ("<h2>Approximate search</h2><p>Each query cell screened the reference cells of "
            "its nearest coarse lists (k-means of the reference); every candidate was then "
            "ranked by the exact cosine. The recall was measured against the exact search "
            "on a seeded sample of query cells.</p>" + _table(rows))


def _tuning(tuning: dict | None) -> str:
    if not tuning:
        return ""
    rows = {**tuning["best"], f"expected held-out {tuning['metric']}":
            tuning["expected_score"], "query cells used": tuning["cells"],
            "shared genes scored": tuning["genes"], "gene folds": tuning["folds"]}
    return ("<h2>Tuning</h2><p>The setting this run used, chosen by held-out validation on "
            "the shared genes: each candidate imputed every shared gene while that gene was "
            "hidden from the neighbour search, and the best mean per-gene score won. That "
            "score is the accuracy to expect on the genes the query did not measure "
            "(<code>tuning.tsv</code> lists every candidate).</p>" + _table(rows))


def write_report(path: Location, record: dict, figures: list[tuple[str, str]],
                 heldout: pd.DataFrame | None = None) -> None:
    """Write ``report.html`` for a run.

    Parameters
    ----------
    path
        The HTML file; the figures are read from its directory.
    record
        What ``run.json`` records (parameters, shape, stats, timings, ...).
    figures
        ``(file name, caption)`` of each PNG beside ``path``, in page order.
    heldout
        ``summary.tsv`` of the validation the run was given, if any.
    """
    shape = record.get("shape", {})
    stats = record.get("stats", {})
    cards = "".join(
        f"<div class='card'><b>{_esc(_fmt(v))}</b>{_esc(k)}</div>"
        for k, v in (("query cells", shape.get("query_cells")),
                     ("reference cells", shape.get("reference_cells")),
                     ("genes imputed", shape.get("reference_genes")),
                     ("shared genes", shape.get("shared_genes")),
                     ("median score", stats.get("Median")),
                     ("unimputable cells", record.get("unimputable_cells")))
        if v is not None
    )
    inputs = {"query": record.get("query"), "reference": record.get("reference"),
              "identity table": record.get("identities")}
    for role, item in record.get("input_checksums", {}).items():
        # one of these, by the kind of input (see provenance._identity)
        kind = next(k for k in ("sha256", "key", "fingerprint", "error") if k in item)
        inputs[f"{role} {kind}"] = json.dumps(item[kind], sort_keys=True) \
            if kind == "fingerprint" else item[kind]
    timings = dict(record.get("timings_s", {}))
    timings["total"] = round(sum(timings.values()), 3)
    memory = record.get("peak_memory_mib", {})
    sections = [
        f"<h1>scimpute-dask imputation report</h1><p class='muted'>scimpute-dask "
        f"{_esc(record.get('scimpute_dask', ''))}, finished {_esc(record.get('finished', ''))}"
        f"</p><div class='cards'>{cards}</div>",
        "<h2>Figures</h2>" + ("".join(_figure(path.parent, n, c) for n, c in figures)
                              or "<p>No figures.</p>"),
        "<h2>Validation score</h2><p>Per query cell: cosine similarity of the imputed and the "
        "measured expression of the shared genes (scimpute's score; optimistic, since these "
        "genes chose the neighbours).</p>" + _table(stats),
        "" if heldout is None else _heldout(heldout, record["parameters"]["validation"]),
        _search(record.get("search")),
        _tuning(record.get("tuning")),
        "<h2>Inputs</h2>" + _table(inputs),
        "<h2>Parameters</h2>" + _table(record.get("parameters", {})),
        "<h2>Timings (s)</h2>" + _table(timings, ("stage", "seconds")),
        "<h2>Peak memory (MiB)</h2>" + _table(memory),
        "<h2>Software</h2>" + _table(record.get("versions", {})),
        "<h2>Outputs</h2><ul>" + "".join(
            f"<li><a href='{_esc(n)}'>{_esc(n)}</a></li>" for n in record.get("outputs", [])
        ) + "</ul>",
    ]
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<title>scimpute-dask report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
    with atomic_file(path) as fh:
        fh.write(page)


def add_section(path: Location, title: str, text: str, rows: dict) -> None:
    """Add a section (a paragraph and a table) to a written report, before its inputs.

    For what is known only after the run, such as the demo's accuracy against
    the simulation's ground truth. The page is rewritten atomically.
    """
    page = path.read_text()
    section = f"<h2>{_esc(title)}</h2><p>{_esc(text)}</p>" + _table(rows)
    with atomic_file(path) as fh:
        fh.write(page.replace("<h2>Inputs</h2>", section + "<h2>Inputs</h2>", 1))
