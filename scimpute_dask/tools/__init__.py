"""Analyses built on the engine: held-out validation (``validate``, read back
by a run through ``heldout``), label transfer (``transfer``), self-imputation
(``selfimpute``).
"""
