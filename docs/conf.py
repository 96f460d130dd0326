"""Sphinx configuration of the scimpute-dask documentation.

Sphinx with MyST-NB and the book theme, as the scverse tools (scanpy, squidpy,
anndata, spatialdata) build theirs: pages in Markdown, tutorials as MyST
notebooks executed at build time, the API reference from the numpy-style
docstrings and the CLI reference from the one argparse parser.

Build: ``sphinx-build -W -b html docs docs/_build/html``.
"""

from __future__ import annotations

import os

import scimpute_dask

project = "scimpute-dask"
author = "the scimpute-dask developers"
copyright = "2026, the scimpute-dask developers"
release = version = scimpute_dask.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
]

exclude_patterns = ["_build", "**/.ipynb_checkpoints", "README.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}  # autosummary writes .rst

# Markdown: headings get anchors that other pages link to
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# The API reference: numpy docstrings, pages generated per public name
autosummary_generate = True
autodoc_typehints = "none"  # the Parameters sections say it, as scanpy's pages do
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# Tutorials run at every build (a failing cell fails the build); a cache
# directory given in the environment lets a rebuild skip unchanged notebooks
nb_execution_mode = "cache" if os.environ.get("SCIMPUTE_DOCS_CACHE") else "force"
nb_execution_cache_path = os.environ.get("SCIMPUTE_DOCS_CACHE", "")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = "scimpute-dask"
html_theme_options = {
    "repository_url": "https://github.com/scimpute-dask/scimpute-dask",
    "use_repository_button": False,
    "show_toc_level": 2,
}
