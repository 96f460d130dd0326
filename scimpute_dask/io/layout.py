"""The layout of a run's directory: every store a run keeps, named in one place.

A run is assembled in a work directory and published as its output
directory; both have this layout, so the same :class:`RunLayout` finds the
stores of a run in progress (the stages, the export) and of a finished one
(:func:`scimpute_dask.read_run`, label transfer, the figures)::

    DIR/zarr/query.zarr          the converted query (when it was not a store)
    DIR/zarr/reference.zarr      the converted reference (idem)
    DIR/zarr/clusters.zarr       cluster codes of both, for a clustered search
    DIR/zarr/search.zarr         the reference prepared for the search (until the kNN is stored);
                                 an approximate search's query in list order (``query``)
                                 and its neighbours in that order (``found``) within it
    DIR/zarr/neighbors.zarr      each query cell's neighbours and weights
    DIR/zarr/ridge.zarr          a blend's linear model: coefficients, intercepts, ranges
    DIR/zarr/imputed.zarr        the imputed genes (float32 keeping scimpute's text)
    DIR/zarr/imputed_wide.zarr   float64 values of the genes too large for that
    DIR/zarr/imputed_shared*.zarr  the shared genes' imputation, for the score, when
                                   --impute-genes leaves some out (removed after it)
    DIR/adata.zarr               the imputed AnnData (when written)
"""

from __future__ import annotations

from dataclasses import dataclass

from scimpute_dask.io.storage import Location

ZARR = "zarr"
CLUSTERS = "clusters.zarr"
SEARCH = "search.zarr"
NEIGHBOURS = "neighbors.zarr"
IMPUTED = "imputed.zarr"
#: A blend's linear model (``--blend`` below 1).
RIDGE = "ridge.zarr"
WIDE = "imputed_wide.zarr"
#: The shared genes' imputation, for the score, when they are not among the imputed genes.
SHARED = "imputed_shared.zarr"
SHARED_WIDE = "imputed_shared_wide.zarr"
#: The imputed AnnData beside the scimpute files.
ANNDATA = "adata.zarr"
#: The converted inputs, by role.
INPUTS = {"query": "query.zarr", "reference": "reference.zarr"}
#: Stores a rerun resumes rather than rebuilds.
RESUMABLE = (*INPUTS.values(), SEARCH, NEIGHBOURS, RIDGE, IMPUTED, WIDE, SHARED, SHARED_WIDE)


@dataclass(frozen=True)
class RunLayout:
    """Where the run rooted at ``root`` (a work or output directory) keeps its stores."""

    root: Location

    @property
    def zarr(self) -> Location:
        return self.root / ZARR

    def input(self, role: str) -> Location:
        """The converted ``"query"`` or ``"reference"``."""
        return self.zarr / INPUTS[role]

    @property
    def clusters(self) -> Location:
        return self.zarr / CLUSTERS

    @property
    def search(self) -> Location:
        return self.zarr / SEARCH

    @property
    def neighbours(self) -> Location:
        return self.zarr / NEIGHBOURS

    @property
    def ridge(self) -> Location:
        return self.zarr / RIDGE

    @property
    def imputed(self) -> Location:
        return self.zarr / IMPUTED

    @property
    def wide(self) -> Location:
        return self.zarr / WIDE

    @property
    def shared(self) -> tuple[Location, Location]:
        """The shared genes' imputation and its wide genes (see :data:`SHARED`)."""
        return self.zarr / SHARED, self.zarr / SHARED_WIDE

    @property
    def anndata(self) -> Location:
        return self.root / ANNDATA
