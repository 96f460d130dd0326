"""Inputs in, chunked Zarr stores out; AnnData out.

``registry`` (one Reader per format, one dispatcher) -> ``store`` (the Zarr
working format every reader writes) -> the readers (``text``, ``frame``,
``anndata_io``, ``tenx``) -> ``convert`` (lists the readers, dispatches).
``storage`` says where data lives (paths, fsspec URLs); ``identities`` reads
scimpute's cell identity table; ``textcodec`` holds the compiled text kernels.
"""
