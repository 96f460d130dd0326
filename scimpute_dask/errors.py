"""The one error a user can cause, and how its messages list names.

Every check that can fail on an input, a parameter or an output location
raises :class:`InputError` before any work is done; the CLI turns it into
``scimpute-dask: error: …`` and exit code 2.
"""

from __future__ import annotations

#: How many offending names an error message lists before it abbreviates.
SHOW = 5


class InputError(ValueError):
    """An input file, table, parameter or output location is unusable; the message says where."""


def some(names, n: int = SHOW) -> str:
    """``'a', 'b', 'c' and 4 more``: the first few of ``names``, quoted, for a message."""
    names = [str(x) for x in names]
    shown = ", ".join(f"'{x}'" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
