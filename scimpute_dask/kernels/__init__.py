"""Pure kernels on NumPy blocks: no Dask, no I/O.

``knn`` (exact cosine top-k), ``imputation`` (neighbour weights, weighted
mean), ``scoring`` (scimpute's per-cell score), ``normalization`` (search-space
transforms), ``metrics`` (held-out accuracy), ``vote`` (label transfer).
"""
