"""Outputs: the atomic output directory (``outdir``), scimpute's files
(``tables``), the imputed AnnData (``adata``) and ``run.json``'s provenance.
"""
