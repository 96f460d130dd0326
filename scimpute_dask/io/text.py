"""Delimited text matrices (TSV, CSV), plain or compressed, streamed into a store.

scimpute's layout is genes as rows and cells as columns (first row: cell
names, first column: gene names); ``cells_x_genes`` is the transpose. Files
may be gzip, bzip2, xz or zstd compressed (recognised by their first bytes,
whatever their name), as GEO and most labs ship them; they are decompressed
as a stream, never whole, in memory or on disk.

Conversion reads one block of whole lines at a time (memory bounded by the
block, never by the file), writes it as whole Zarr chunks and then records in
the store how many rows are done and the offset of the next line in the
(decompressed) text. A resumed conversion seeks to that offset: at once in a
plain file; in a compressed one by decompressing up to it without parsing,
as compressed streams cannot be entered in the middle.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from scimpute_dask import plan
from scimpute_dask.checks import check_unique_names, check_values
from scimpute_dask.errors import InputError
from scimpute_dask.io import store as stores
from scimpute_dask.io import textcodec
from scimpute_dask.io.registry import Reader, ReadOptions
from scimpute_dask.io.storage import Location, is_location

#: First bytes of each compression this reader streams through.
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
         b"\x28\xb5\x2f\xfd": "zstd"}
#: What the standard library's decompressors raise on a damaged file.
_DAMAGED = (OSError, EOFError, zlib.error, lzma.LZMAError)
#: Bytes looked at to tell text from a binary file.
_SNIFF = 1 << 16


def compression(path: Location) -> str | None:
    """``"gzip"``, ``"bzip2"``, ``"xz"``, ``"zstd"`` or ``None``, from the file's first bytes."""
    with path.open("rb") as fh:
        head = fh.read(6)
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def _decompressed(raw, kind: str | None, label: str) -> tuple[object, tuple[type, ...]]:
    """The decompressing stream over ``raw``, and the errors it raises on a damaged file."""
    if kind is None:
        return raw, _DAMAGED
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), _DAMAGED
    if kind == "bzip2":
        return bz2.BZ2File(raw, mode="rb"), _DAMAGED
    if kind == "xz":
        return lzma.LZMAFile(raw, mode="rb"), _DAMAGED
    try:
        import zstandard
    except ImportError:
        raise InputError(f"{label}: zstd-compressed text needs the zstandard package: "
                         f"pip install 'scimpute-dask[zstd]'") from None
    stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20)
    return stream, (*_DAMAGED, zstandard.ZstdError)


@contextlib.contextmanager
def open_text(path: Location, label: str, offset: int = 0) -> Iterator[io.BufferedIOBase]:
    """The file's text as a binary stream from ``offset``, decompressed on the fly if the
    file is compressed.

    A damaged compressed file is an :class:`InputError` naming the file.
    """
    kind = compression(path)
    with path.open("rb") as raw:
        fh, damaged = _decompressed(raw, kind, label)
        try:
            if offset:
                _skip_to(fh, offset, kind)
            yield fh
        except InputError:
            raise
        except damaged as err:
            raise InputError(f"{label}: damaged {kind or 'text'} file ({err})") from None
        finally:
            if fh is not raw:
                fh.close()


def _check_text(path: Location, label: str) -> None:
    """Refuse a binary file up front: NUL bytes never occur in delimited text."""
    with open_text(path, label) as fh:
        head = fh.read(_SNIFF)
    if b"\x00" in head:
        raise InputError(
            f"{label}: a binary file, not delimited text; the inputs read are TSV/CSV "
            f"(plain or gzip/bzip2/xz/zstd), .h5ad, AnnData-Zarr, 10x directories, 10x HDF5 "
            f"(.h5), Xenium output bundles, SpatialData stores and "
            f"scimpute-dask stores")


def _decode(raw: bytes, label: str, lineno: int) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InputError(f"{label}: line {lineno} is not UTF-8 text") from None


@dataclass(frozen=True)
class TextLayout:
    """What one pass over a delimited text file tells before any value is parsed."""

    columns: np.ndarray  # names along the first row
    rows: np.ndarray  # names along the first column
    header_bytes: int  # offset of the first data line
    text_bytes: int  # size of the (decompressed) text


def scan_text(path: Location, sep: str, label: str, row_kind: str, col_kind: str) -> TextLayout:
    """Read the names of a delimited matrix and check its shape, in one streaming pass.

    Every data line must hold one name plus one field per column; the names
    along both axes must be unique. Values are not parsed here.
    """
    sep_b = sep.encode()
    rows: list[str] = []
    _check_text(path, label)
    with open_text(path, label) as fh:
        header = fh.readline()
        header_bytes = fh.tell()
        if not header.strip():
            raise InputError(f"{label}: file is empty")
        fields = header.rstrip(b"\r\n").split(sep_b)
        n_fields = len(fields)
        for lineno, line, n in _lines_and_fields(fh, sep_b, first_lineno=2):
            if not rows:
                # pandas convention: a header one field short has no corner label
                if n == n_fields + 1 and fields[0].strip(b'"'):
                    fields = [b"", *fields]
                    n_fields = n
            if n != n_fields:
                raise InputError(
                    f"{label}: line {lineno} ({row_kind} "
                    f"'{line.split(sep_b, 1)[0].decode(errors='replace')}') has {n} fields, "
                    f"the header has {n_fields}"
                )
            rows.append(_decode(line, label, lineno))
        text_bytes = fh.tell()
    if not rows:
        raise InputError(f"{label}: no data rows below the header")
    columns = np.array([_decode(f, label, 1).strip('"') for f in fields[1:]], dtype=object)
    row_names = np.array([r.strip('"') for r in rows], dtype=object)
    if len(columns) == 0:
        raise InputError(f"{label}: no {col_kind} columns")
    check_unique_names(columns, label, col_kind)
    check_unique_names(row_names, label, row_kind)
    return TextLayout(columns=columns, rows=row_names, header_bytes=header_bytes,
                      text_bytes=text_bytes)


#: Bytes of text the scan reads at once.
SCAN_BLOCK = 1 << 24


def _lines_and_fields(fh: io.BufferedIOBase, sep: bytes, first_lineno: int
                      ) -> Iterator[tuple[int, bytes, int]]:
    """``(line number, name, fields)`` of every non-blank line to the end of ``fh``.

    ``name`` is the line up to its first separator (the whole line, ``\\r``
    stripped, when it has none). The lines are searched in place in a
    :class:`_LineBlocks` buffer: iterating a file's lines copies each one
    (seconds per gigabyte when lines are long, as in scimpute's layout).
    """
    text, lineno = _LineBlocks(fh, 0, sep), first_lineno
    while True:
        text.compact()
        buf, pos = text.buf, 0
        while pos < text.end:
            stop = buf.find(b"\n", pos, text.end)
            if stop < 0:
                if not text.eof:
                    break
                stop = text.end  # the last line, without its newline
            n = buf.count(sep, pos, stop)
            if n:
                yield lineno, bytes(buf[pos : buf.find(sep, pos, stop)]), n + 1
            elif not _blank(line := bytes(buf[pos:stop])):
                yield lineno, line.rstrip(b"\r"), 1
            lineno += 1
            pos = stop + 1
        text.start = min(pos, text.end)
        if text.eof:
            return
        text.read_more()


def _blank(line: bytes) -> bool:
    """Blank lines are skipped; the scan and the conversion must agree on which.

    ``isspace`` stops at a line's first non-space byte; ``strip`` would copy
    the line (megabytes in scimpute's layout, one gene across all cells).
    """
    return not line or line.isspace()


class _LineBlocks:
    """Non-blank lines of a binary stream, taken many at a time into one reused buffer.

    ``readline`` copies each line as it grows it (seconds per gigabyte when a
    line holds a gene across a million cells); here the stream is read into a
    buffer in :data:`SCAN_BLOCK` pieces and the lines are handed out as a view
    of it, valid until the next :meth:`take`. ``offset`` tracks the text
    consumed, for resuming, as the stream's own position runs ahead of it.
    """

    def __init__(self, fh: io.BufferedIOBase, offset: int, sep: bytes) -> None:
        self.fh, self.offset, self.sep = fh, offset, sep
        self.buf = bytearray(SCAN_BLOCK)
        self.start = self.end = 0
        self.eof = False

    def compact(self) -> None:
        """Move the text not yet consumed to the front of the buffer."""
        tail = self.end - self.start
        self.buf[:tail] = self.buf[self.start : self.end]
        self.start, self.end = 0, tail

    def read_more(self) -> None:
        """Append up to :data:`SCAN_BLOCK` more bytes of text (none: ``eof``)."""
        if len(self.buf) - self.end < SCAN_BLOCK:
            # a new buffer, not a resize: the caller may still hold a view of the old one
            grown = bytearray(max(2 * len(self.buf), self.end + SCAN_BLOCK))
            grown[: self.end] = self.buf[: self.end]
            self.buf = grown
        got = self.fh.readinto(memoryview(self.buf)[self.end : self.end + SCAN_BLOCK])
        self.eof = not got
        self.end += got or 0

    def take(self, n: int) -> tuple[memoryview | bytes, int]:
        """Up to ``n`` non-blank lines (fewer only at the end of the text) and their count."""
        self.compact()
        buf, pos, count, blank = self.buf, 0, 0, []
        while count < n:
            stop = buf.find(b"\n", pos, self.end)
            if stop < 0:
                if not self.eof:
                    self.read_more()
                    buf = self.buf
                    continue
                if pos == self.end:
                    break
                stop = self.end - 1  # the last line, without its newline
            # a line with a separator is not blank: no need to copy it to look
            if buf.find(self.sep, pos, stop) < 0 and _blank(buf[pos : stop + 1]):
                blank.append((pos, stop + 1))
            else:
                count += 1
            pos = stop + 1
        self.start, self.offset = pos, self.offset + pos
        if blank:  # rare: copy the lines around them
            keep = [0, *(x for pair in blank for x in pair), pos]
            return b"".join(buf[a:b] for a, b in zip(keep[::2], keep[1::2], strict=True)), count
        return memoryview(buf)[:pos], count


def _skip_to(fh: io.BufferedIOBase, offset: int, kind: str | None) -> None:
    """Move to ``offset`` of the text: a seek, or a decompressing read up to it.

    gzip, bzip2 and xz streams emulate a forward seek by decompressing; the zstd
    reader is read forward here in bounded pieces.
    """
    if kind != "zstd":
        fh.seek(offset)
        return
    while (gap := offset - fh.tell()) > 0:
        if not fh.read(min(gap, 1 << 22)):
            break


def _field(text: bytes | memoryview, sep: str, r: int, c: int) -> str:
    return bytes(text).splitlines()[r].split(sep.encode())[c + 1].decode(errors="replace").strip()


def _parse_block(
    text: bytes,
    sep: str,
    row_names: np.ndarray,
    col_names: np.ndarray,
    label: str,
    row_kind: str,
    col_kind: str,
) -> np.ndarray:
    """Parse a block of data lines into a float32 matrix, naming any bad field."""
    values, (code, r, c) = textcodec.parse_rows(text, sep, len(row_names), len(col_names),
                                                threads=os.cpu_count() or 1)
    if code == textcodec.BAD_FIELD:
        raise InputError(
            f"{label}: {row_kind} '{row_names[r]}', {col_kind} '{col_names[c]}': "
            f"value {_field(text, sep, r, c)!r} is not a number"
        )
    if code != textcodec.OK:
        raise InputError(f"{label}: {row_kind} '{row_names[r]}' has the wrong number of fields")
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        written = _field(text, sep, r, c)
        try:
            finite = np.isfinite(float(written))
        except ValueError:
            finite = False
        why = (f"is larger than float32 can hold (at most {np.finfo(np.float32).max:.4g})"
               if finite else "is NaN or infinite")
        raise InputError(
            f"{label}: {row_kind} '{row_names[r]}', {col_kind} '{col_names[c]}': "
            f"value {written!r} {why}; expression must be finite and non-negative"
        )
    check_values(values, row_names, col_names, label, row_kind, col_kind)
    return values


# --------------------------------------------------------------------------- #
# The reader
# --------------------------------------------------------------------------- #
def sep_for(src: Location, sep: str | None) -> str:
    """The field separator: as given, else ``,`` for ``.csv`` (``.csv.gz`` …) and tab otherwise."""
    if sep is not None:
        return sep
    suffixes = [s.lower() for s in src.suffixes]
    return "," if ".csv" in suffixes[-2:] else "\t"


def _kinds(layout: str) -> tuple[str, str]:
    return ("gene", "cell") if layout == "genes_x_cells" else ("cell", "gene")


def _claims(source: object) -> bool:
    return is_location(source) and not source.is_dir()


@lru_cache(maxsize=2)
def _scan_once(fingerprint: str, src: Location, sep: str, label: str, layout: str
               ) -> TextLayout:
    return scan_text(src, sep, label, *_kinds(layout))


def _scan(src: Location, options: ReadOptions) -> TextLayout:
    """:func:`scan_text`, once per version of a file: a run checks the names before it
    converts, and the scan reads the whole text (seconds per gigabyte). The key
    is the file's identity (size, times, inode or object version), as for resuming."""
    return _scan_once(json.dumps(_fingerprint(src, options), sort_keys=True), src,
                      sep_for(src, options.sep), options.label, options.layout)


def _names(src: Location, options: ReadOptions) -> tuple[np.ndarray, np.ndarray]:
    scanned = _scan(src, options)
    if options.layout == "genes_x_cells":
        return scanned.columns, scanned.rows
    return scanned.rows, scanned.columns


def _fingerprint(src: Location, options: ReadOptions) -> dict:
    return stores.file_fingerprint(src, layout=options.layout, sep=sep_for(src, options.sep))


def _convert(src: Location, store: Location, options: ReadOptions) -> stores.ExpressionStore:
    label, sep = options.label, sep_for(src, options.sep)
    genes_rows = options.layout == "genes_x_cells"
    row_kind, col_kind = _kinds(options.layout)

    def line_bytes(scanned: TextLayout) -> int:
        return max(1, scanned.text_bytes // max(1, len(scanned.rows)))

    def shape() -> stores.Shape:
        scanned = _scan(src, options)
        cols, rows = scanned.columns, scanned.rows
        cells, genes = (cols, rows) if genes_rows else (rows, cols)
        return cells, genes, plan.store_chunks(len(cells), len(genes), genes_rows,
                                               line_bytes(scanned), options.memory_limit)

    def blocks(done: int, offset: int, chunks: tuple[int, int]) -> Iterator[stores.Block]:
        scanned = _scan(src, options)
        cols, rows = scanned.columns, scanned.rows
        # A block is a whole number of Zarr chunks along the streamed axis, so each
        # write replaces complete chunks and a resumed run never mixes two writes.
        row_chunk = chunks[1] if genes_rows else chunks[0]
        per_row = line_bytes(scanned) + 12 * len(cols)
        block_rows = max(row_chunk, plan.text_block_bytes(options.memory_limit) // per_row
                         // row_chunk * row_chunk)
        offset = offset or scanned.header_bytes
        with open_text(src, label, offset) as fh:
            lines = _LineBlocks(fh, offset, sep.encode())
            while done < len(rows):
                text, n = lines.take(block_rows)
                if n == 0:
                    raise InputError(f"{label}: the file changed during conversion (it ended "
                                     f"after {done} of {len(rows)} rows); convert it again")
                block = _parse_block(text, sep, rows[done : done + n], cols, label, row_kind,
                                     col_kind)
                yield stores.Block(done, done + n, block.T if genes_rows else block,
                                   lines.offset)
                done += n

    return stores.write_store(store, _fingerprint(src, options), label, shape=shape,
                              blocks=blocks, by_columns=genes_rows, restart=options.restart,
                              progress=options.progress, desc=f"convert {src.name}")


READER = Reader("delimited text (TSV/CSV, plain or gzip/bzip2/xz/zstd)", _claims, _names,
                _fingerprint, _convert, remote=True)
