"""Compiled kernels between delimited text and numbers.

Text is the slow edge of the pipeline: a 1M-cell query is gigabytes of TSV
in, and ``imputation.tsv`` can be far larger out. Python's per-value
``float()``/``'%.2f' %`` runs at a few million values a second, and pandas'
CSV parser is column-oriented (a scimpute line holds one gene across *all*
cells, i.e. a million columns). These numba kernels walk the bytes once.

Parsing accepts what scimpute's ``pandas.read_csv`` accepts for numbers:
optional sign, digits, decimal point, exponent, surrounding spaces or
quotes; ``nan``/``na``/empty and ``inf`` are read as such so the validation
can name them. Formatting writes fixed-point decimals exactly as
``'%.{d}f' % x`` does for values already rounded to ``d`` decimals.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

_POW10 = np.array([10.0**i for i in range(23)])
_NAN = np.float32(np.nan)

# status codes of parse_rows
OK, BAD_FIELD, SHORT_ROW, LONG_ROW = 0, 1, 2, 3


@numba.njit(nogil=True, cache=True)
def _lower(c):  # pragma: no cover - compiled
    return c + 32 if 65 <= c <= 90 else c


_INFINITY = np.frombuffer(b"infinity", dtype=np.uint8)


@numba.njit(nogil=True, cache=True)
def _matches(buf, start, n, word):  # pragma: no cover - compiled
    """Case-insensitive: do the ``n`` bytes at ``start`` equal the start of ``word``?"""
    for j in range(n):
        if _lower(buf[start + j]) != word[j]:
            return False
    return True


@numba.njit(nogil=True, cache=True)
def _parse_field(buf, start, end, pow10):  # pragma: no cover - compiled
    """Parse ``buf[start:end]`` as a number; returns ``(value, ok)``."""
    while start < end and (buf[start] == 32 or buf[start] == 34):  # spaces, quotes
        start += 1
    while end > start and (buf[end - 1] == 32 or buf[end - 1] == 34 or buf[end - 1] == 13):
        end -= 1
    if start == end:
        return np.nan, True
    neg = False
    if buf[start] == 45 or buf[start] == 43:  # - +
        neg = buf[start] == 45
        start += 1
    n = end - start
    if n == 3 and _lower(buf[start]) == 110 and _lower(buf[start + 1]) == 97 \
            and _lower(buf[start + 2]) == 110:  # nan
        return np.nan, True
    if n == 2 and _lower(buf[start]) == 110 and _lower(buf[start + 1]) == 97:  # na
        return np.nan, True
    if (n == 3 or n == 8) and _matches(buf, start, n, _INFINITY):  # inf, infinity
        return (-np.inf if neg else np.inf), True
    mant = np.int64(0)
    digits = 0  # significant digits kept in mant (18 fit in an int64)
    exp10 = 0
    seen_digit = False
    seen_dot = False
    i = start
    while i < end:
        c = buf[i]
        if 48 <= c <= 57:
            seen_digit = True
            if digits < 18:
                mant = mant * 10 + (c - 48)
                if mant > 0:
                    digits += 1
                if seen_dot:
                    exp10 -= 1
            elif not seen_dot:
                exp10 += 1  # an integer digit beyond what mant holds
        elif c == 46 and not seen_dot:  # .
            seen_dot = True
        else:
            break
        i += 1
    if not seen_digit:
        return np.nan, False
    if i < end and (buf[i] == 101 or buf[i] == 69):  # e E
        i += 1
        eneg = False
        if i < end and (buf[i] == 45 or buf[i] == 43):
            eneg = buf[i] == 45
            i += 1
        if i == end:
            return np.nan, False
        e = 0
        while i < end and 48 <= buf[i] <= 57:
            if e < 10000:
                e = e * 10 + (buf[i] - 48)
            i += 1
        exp10 += -e if eneg else e
    if i != end:
        return np.nan, False
    if mant == 0:
        return (-0.0 if neg else 0.0), True  # 0e400 is 0, not 0 * inf
    value = float(mant)
    if exp10 == 0:
        pass
    elif 0 < exp10 <= 22:
        value *= pow10[exp10]
    elif -22 <= exp10 < 0:
        # one rounding when the mantissa is exact (< 2**53, up to 15 digits)
        value /= pow10[-exp10]
    else:
        value *= 10.0**exp10
    return (-value if neg else value), True


@numba.njit(nogil=True, cache=True)
def _parse_rows(buf, sep, n_rows, n_cols, out, status, pow10):  # pragma: no cover - compiled
    n = buf.shape[0]
    pos = 0
    for r in range(n_rows):
        while pos < n and buf[pos] != sep and buf[pos] != 10:  # skip the row name
            pos += 1
        for c in range(n_cols):
            if pos >= n or buf[pos] == 10:
                status[0], status[1], status[2] = SHORT_ROW, r, c
                return
            pos += 1
            start = pos
            while pos < n and buf[pos] != sep and buf[pos] != 10:
                pos += 1
            value, ok = _parse_field(buf, start, pos, pow10)
            if not ok:
                status[0], status[1], status[2] = BAD_FIELD, r, c
                return
            out[r, c] = value
        if pos < n and buf[pos] == sep:
            status[0], status[1], status[2] = LONG_ROW, r, n_cols
            return
        pos += 1
    status[0] = OK


def _line_after(buf: np.ndarray, at: int) -> int:
    """Where the line holding byte ``at`` ends (just past its newline), or -1."""
    window = 1 << 16
    while at < len(buf):
        hit = np.flatnonzero(buf[at : at + window] == 10)
        if len(hit):
            return at + int(hit[0]) + 1
        at += window
    return -1


def parse_rows(text: bytes | memoryview, sep: str, n_rows: int, n_cols: int,
               threads: int = 1) -> tuple[np.ndarray, tuple]:
    """Parse ``n_rows`` lines of ``name<sep>v1<sep>...<sep>v{n_cols}``.

    ``threads`` parse consecutive runs of lines at once (the kernel releases
    the GIL), each into its own rows of the result.

    Returns
    -------
    values : numpy.ndarray
        ``(n_rows, n_cols)`` float32.
    status : tuple
        ``(code, row, col)``: ``OK``, or where the first bad field or ragged row is.
    """
    out = np.empty((n_rows, n_cols), dtype=np.float32)
    buf = np.frombuffer(text, dtype=np.uint8)
    # runs of whole lines: cut after the newline nearest each even share of the bytes
    cuts, rows = [0], [0]
    for t in range(1, max(1, min(threads, n_rows))):
        at = _line_after(buf, max(cuts[-1], len(buf) * t // threads))
        if at < 0 or at >= len(buf):
            break
        cuts.append(at)
        rows.append(rows[-1] + int(np.count_nonzero(buf[cuts[-2] : at] == 10)))
    cuts.append(len(buf))
    rows.append(n_rows)
    status = np.zeros((len(cuts) - 1, 3), dtype=np.int64)

    def part(i: int) -> None:
        _parse_rows(buf[cuts[i] : cuts[i + 1]], ord(sep), rows[i + 1] - rows[i],
                    n_cols, out[rows[i] : rows[i + 1]], status[i], _POW10)

    if len(status) == 1:
        part(0)
    else:
        with ThreadPoolExecutor(len(status)) as pool:
            list(pool.map(part, range(len(status))))
    for i, (code, row, col) in enumerate(status):
        if code != OK:
            return out, (int(code), int(row) + rows[i], int(col))
    return out, (OK, 0, 0)


# --------------------------------------------------------------------------- #
# Formatting
# --------------------------------------------------------------------------- #
#: Where ``rint(x · 10**d)`` stops giving ``'%.{d}f' % np.round(x, d)``: below 2**45 the
#: double nearest N / 10**d lies within 10**-d / 200 of it, so its text shows N.
_EXACT_SCALED = 2.0**45
_POW10_INT = np.array([10**i for i in range(19)], dtype=np.uint64)


@numba.njit(nogil=True, cache=True, inline="always")
def _write_scaled(buf, pos, x, decimals, scale, pow10):  # pragma: no cover - compiled
    """Write ``'%.{decimals}f' % np.round(x, decimals)``; ``|x| · scale`` below 2**45.

    NumPy rounds ``x`` as ``rint(x · 10**d) / 10**d``; the integer
    ``rint(x · 10**d)`` is written with the decimal point placed by hand.
    """
    if x != x:
        buf[pos], buf[pos + 1], buf[pos + 2] = 110, 97, 110
        return pos + 3
    r = np.rint(x * scale)
    if r < 0.0 or (r == 0.0 and np.copysign(1.0, r) < 0.0):  # NumPy keeps -0.0
        buf[pos] = 45
        pos += 1
        r = -r
    if r == np.inf:
        buf[pos], buf[pos + 1], buf[pos + 2] = 105, 110, 102
        return pos + 3
    # unsigned: numba's signed // and % carry Python's floor semantics (a third slower)
    n = np.uint64(r)
    ten = np.uint64(10)
    digits = decimals + 1
    while digits < 19 and n >= pow10[digits]:
        digits += 1
    end = pos + digits + (1 if decimals else 0)
    at = end - 1
    for _ in range(decimals):
        buf[at] = np.uint8(48) + np.uint8(n % ten)
        n //= ten
        at -= 1
    if decimals:
        buf[at] = 46
        at -= 1
    while at >= pos:
        buf[at] = np.uint8(48) + np.uint8(n % ten)
        n //= ten
        at -= 1
    return end


@numba.njit(nogil=True, cache=True)
def _format_rows(names, name_off, values, patch_at, patch, decimals, sep, pow10
                 ):  # pragma: no cover - compiled
    """One pass into a buffer sized for the widest value; ``None`` beyond ``_EXACT_SCALED``.

    Column ``j`` is read from ``patch[:, patch_at[j]]`` where ``patch_at[j] >= 0``.
    Sizing the buffer exactly would take a second pass over every value, and
    the digits are the cost: the bound (the largest magnitude's digits for
    every value) costs only memory, trimmed on return.
    """
    n, g = values.shape
    scale = 10.0**decimals
    big = 0.0
    for i in range(n):
        for j in range(g):
            x = abs(values[i, j])
            if x > big and x != np.inf:  # NaN compares false
                big = x
    for i in range(patch.shape[0]):
        for j in range(patch.shape[1]):
            x = abs(patch[i, j])
            if x > big and x != np.inf:
                big = x
    if big * scale >= _EXACT_SCALED:
        return None
    width = decimals + 1
    while width < 19 and big * scale >= np.float64(pow10[width]):
        width += 1
    width = max(width + 3, 5)  # separator, sign, point; "\t-inf"
    buf = np.empty(name_off[n] + n + n * g * width, dtype=np.uint8)
    pos = 0
    for i in range(n):
        for b in range(name_off[i], name_off[i + 1]):
            buf[pos] = names[b]
            pos += 1
        for j in range(g):
            buf[pos] = sep
            at = patch_at[j]
            x = np.float64(values[i, j]) if at < 0 else patch[i, at]
            pos = _write_scaled(buf, pos + 1, x, decimals, scale, pow10)
        buf[pos] = 10
        pos += 1
    return buf[:pos]


def string_table(strings) -> tuple[np.ndarray, np.ndarray]:
    encoded = [str(s).encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def format_matrix(names, values: np.ndarray, decimals: int = 2, sep: str = "\t",
                  patch: tuple[np.ndarray, np.ndarray] | None = None) -> memoryview:
    """Lines ``name<sep>v1<sep>...\\n``, values written ``'%.{d}f' % np.round(v, d)``.

    ``values`` may be float32 (widened exactly) or float64. ``patch``, a pair
    ``(columns, block)``, takes those columns' values from the float64 ``block``
    instead (the imputation's genes kept in float64). The text is returned as a
    memoryview of the buffer it was written to (a copy would cost a tenth of
    the formatting); ``bytes()`` it where bytes are needed.
    """
    table, offsets = string_table(names)
    values = np.ascontiguousarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    patch_at = np.full(values.shape[1], -1, dtype=np.int64)
    block = np.zeros((0, 0))
    if patch is not None and len(patch[0]):
        patch_at[np.asarray(patch[0], dtype=np.int64)] = np.arange(len(patch[0]))
        block = np.ascontiguousarray(patch[1], dtype=np.float64)
    text = _format_rows(table, offsets, values, patch_at, block, decimals, ord(sep), _POW10_INT)
    if text is not None:
        return memoryview(text)
    # beyond the compiled path's exact range: Python's own formatting, value by value
    full = values.astype(np.float64)
    if len(block):
        full[:, patch_at >= 0] = block[:, patch_at[patch_at >= 0]]
    rounded = np.round(full, decimals)
    return memoryview("".join(
        f"{name}{sep}{sep.join(f'{v:.{decimals}f}' for v in row)}\n"
        for name, row in zip(map(str, names), rounded.tolist(), strict=True)
    ).encode())


@numba.njit(nogil=True, cache=True)
def _format_columns(table, offsets, codes, values, decimals, sep, pow10):  # pragma: no cover
    n, m = codes.shape
    scale = 10.0**decimals
    size = 0
    for i in range(n):
        for c in range(m):
            k = codes[i, c]
            size += offsets[k + 1] - offsets[k] + 1
    buf = np.empty(size + n * (decimals + 22), dtype=np.uint8)
    pos = 0
    for i in range(n):
        for c in range(m):
            k = codes[i, c]
            for b in range(offsets[k], offsets[k + 1]):
                buf[pos] = table[b]
                pos += 1
            buf[pos] = sep
            pos += 1
        pos = _write_scaled(buf, pos, values[i], decimals, scale, pow10)
        buf[pos] = 10
        pos += 1
    return buf[:pos]


def format_columns(
    table: tuple[np.ndarray, np.ndarray],
    codes: np.ndarray,
    values: np.ndarray,
    decimals: int,
    sep: str = "\t",
) -> memoryview:
    """Lines of names looked up in a table, then one value ``'%.{decimals}f'``.

    ``table`` is a :func:`string_table`; ``codes[i, c]`` is the entry written
    in column ``c`` of line ``i`` (columns drawn from different lists of names
    share one table, each list's codes shifted past the ones before it).
    ``values`` are rounded as ``np.round(values, decimals)`` and must stay
    within the compiled path's exact range (``|v| · 10**decimals < 2**45``).
    """
    values = np.ascontiguousarray(values, np.float64)
    finite = values[np.isfinite(values)]
    if finite.size and np.abs(finite).max() * 10.0**decimals >= _EXACT_SCALED:
        raise ValueError("value too large for fixed-point output")
    return _format_columns(
        table[0], table[1], np.ascontiguousarray(codes, dtype=np.int64), values, decimals,
        ord(sep), _POW10_INT,
    ).data
