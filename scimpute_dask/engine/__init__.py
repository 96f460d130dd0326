"""The Dask side: the checked inputs, the graphs, the resumable stages, where they run.

``inputs`` (name-level checks, input stores) -> ``graph`` (every Dask graph,
built in one place) -> ``stages`` (graphs stored to Zarr block by block,
resumably) on ``cluster`` (local threads or a Dask cluster).
"""
