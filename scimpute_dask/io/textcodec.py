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


def parse_rows(text: bytes, sep: str, n_rows: int, n_cols: int) -> tuple[np.ndarray, tuple]:
    """Parse ``n_rows`` lines of ``name<sep>v1<sep>...<sep>v{n_cols}``.

    Returns
    -------
    values : numpy.ndarray
        ``(n_rows, n_cols)`` float32.
    status : tuple
        ``(code, row, col)``: ``OK``, or where the first bad field or ragged row is.
    """
    out = np.empty((n_rows, n_cols), dtype=np.float32)
    status = np.zeros(3, dtype=np.int64)
    _parse_rows(np.frombuffer(text, dtype=np.uint8), ord(sep), n_rows, n_cols, out, status,
                _POW10)
    return out, (int(status[0]), int(status[1]), int(status[2]))


# --------------------------------------------------------------------------- #
# Formatting
# --------------------------------------------------------------------------- #
@numba.njit(nogil=True, cache=True)
def _fixed_len(x, decimals):  # pragma: no cover - compiled
    if np.isnan(x):
        return 3
    if np.isinf(x):
        return 3 + (1 if x < 0 else 0)
    ip = np.int64(np.floor(abs(x)))
    n = 1
    while ip >= 10:
        ip //= 10
        n += 1
    return n + (1 + decimals if decimals else 0) + (1 if x < 0 else 0)


@numba.njit(nogil=True, cache=True)
def _write_fixed(buf, pos, x, decimals, scale):  # pragma: no cover - compiled
    """Write ``x`` as ``'%.{decimals}f'`` would (for x already rounded to decimals)."""
    if np.isnan(x):
        buf[pos], buf[pos + 1], buf[pos + 2] = 110, 97, 110
        return pos + 3
    if x < 0:
        buf[pos] = 45
        pos += 1
        x = -x
    if np.isinf(x):
        buf[pos], buf[pos + 1], buf[pos + 2] = 105, 110, 102
        return pos + 3
    ip = np.floor(x)
    frac = np.int64(np.rint((x - ip) * scale))
    whole = np.int64(ip)
    if frac >= scale:
        whole += 1
        frac -= np.int64(scale)
    n = 1
    t = whole
    while t >= 10:
        t //= 10
        n += 1
    for j in range(n - 1, -1, -1):
        buf[pos + j] = 48 + whole % 10
        whole //= 10
    pos += n
    if decimals:
        buf[pos] = 46
        for j in range(decimals, 0, -1):
            buf[pos + j] = 48 + frac % 10
            frac //= 10
        pos += decimals + 1
    return pos


@numba.njit(nogil=True, cache=True)
def _format_matrix(names, name_off, values, decimals, sep):  # pragma: no cover - compiled
    """One pass into a buffer sized for the widest value; ``None`` if a value is >= 2**63.

    Sizing the buffer exactly would take a second pass over every value, and
    the digits are the cost: the bound (the largest magnitude's digits for
    every value) costs only memory, trimmed on return.
    """
    n, g = values.shape
    big = 0.0
    for i in range(n):
        for j in range(g):
            x = abs(values[i, j])
            if x > big and not np.isinf(x):  # NaN compares false
                big = x
    if big >= 2.0**63:
        return None
    width = _fixed_len(big, decimals) + 2  # sign, separator
    width = max(width, 5)  # "\t-inf"
    buf = np.empty(name_off[n] + n + n * g * width, dtype=np.uint8)
    scale = 10.0**decimals
    pos = 0
    for i in range(n):
        for b in range(name_off[i], name_off[i + 1]):
            buf[pos] = names[b]
            pos += 1
        for j in range(g):
            buf[pos] = sep
            pos = _write_fixed(buf, pos + 1, values[i, j], decimals, scale)
        buf[pos] = 10
        pos += 1
    return buf[:pos]


def string_table(strings) -> tuple[np.ndarray, np.ndarray]:
    encoded = [str(s).encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def format_matrix(names, values: np.ndarray, decimals: int = 2, sep: str = "\t") -> bytes:
    """Lines ``name<sep>v1<sep>...\\n`` with fixed-point values (``'%.{decimals}f'``)."""
    table, offsets = string_table(names)
    values = np.ascontiguousarray(values, dtype=np.float64)
    text = _format_matrix(table, offsets, values, decimals, ord(sep))
    if text is None:
        raise ValueError("value too large for fixed-point output")
    return text.tobytes()


@numba.njit(nogil=True, cache=True)
def _format_columns(tables, offsets, codes, values, decimals, sep):  # pragma: no cover
    n = values.shape[0]
    m = codes.shape[1]
    size = 0
    for i in range(n):
        for c in range(m):
            k = codes[i, c]
            size += offsets[c][k + 1] - offsets[c][k] + 1
        size += _fixed_len(values[i], decimals) + 1
    buf = np.empty(size, dtype=np.uint8)
    scale = 10.0**decimals
    pos = 0
    for i in range(n):
        for c in range(m):
            k = codes[i, c]
            for b in range(offsets[c][k], offsets[c][k + 1]):
                buf[pos] = tables[c][b]
                pos += 1
            buf[pos] = sep
            pos += 1
        pos = _write_fixed(buf, pos, values[i], decimals, scale)
        buf[pos] = 10
        pos += 1
    return buf


def format_columns(
    tables: list[tuple[np.ndarray, np.ndarray]],
    codes: np.ndarray,
    values: np.ndarray,
    decimals: int,
    sep: str = "\t",
) -> bytes:
    """Lines of string columns looked up in tables, then one fixed-point value.

    ``tables`` are ``(bytes, offsets)`` pairs from :func:`string_table`;
    ``codes[i, c]`` picks row ``i``'s entry of table ``c``.
    """
    return _format_columns(
        numba.typed.List([t for t, _ in tables]), numba.typed.List([o for _, o in tables]),
        np.ascontiguousarray(codes, dtype=np.int64), np.ascontiguousarray(values, np.float64),
        decimals, ord(sep),
    ).tobytes()


