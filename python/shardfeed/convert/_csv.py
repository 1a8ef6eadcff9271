"""Converting CSV files: the header and the columns of each field (:class:`CsvLayout`), files read
by byte ranges of whole lines (:class:`CsvChunks`), and :func:`from_csv`. The lines are parsed in
:mod:`._csv_parse`; cells holding lists of numbers in :mod:`._csv_lists`."""

from __future__ import annotations

import csv
import importlib
import os
from typing import Any, Callable, List, Mapping, Optional, Tuple

from ..errors import SourceError
from ..writer import DEFAULT_SHARD_SIZE
from ._csv_parse import CsvLayout, CsvParser, parse_kind
from ._options import DEFAULT_CHUNK_BYTES, PathLike, Progress, choice, expand, part_range
from ._parallel import run_parallel
from ._report import ConversionReport
from ._sink import Sink

_CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".csv.bz2", ".csv.xz")
_OPENERS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # imported when used (bz2, lzma are optional in CPython)


def compressed(name: str) -> Optional[Callable[..., Any]]:
    module = _OPENERS.get(os.path.splitext(name)[1].lower())
    return importlib.import_module(module).open if module else None


def _csv_header(name: str, delimiter: str, header: bool) -> Tuple[Optional[List[str]], int]:
    """The column names (or None for an empty file) and the byte offset where the data starts."""
    opener = compressed(name)
    with (opener(name, "rb") if opener else open(name, "rb")) as f:
        first = f.readline()
        while first and not first.strip():
            first = f.readline()
        if not first:
            return None, 0
        offset = f.tell() if opener is None else 0
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{name}: the first line is not UTF-8 ({exc})") from None
    row = next(csv.reader([text], delimiter=delimiter))
    if header:
        return [c.strip() for c in row], offset
    return [str(i) for i in range(len(row))], 0


def _count_lines(name: str, stop: int) -> int:
    count = 0
    with open(name, "rb") as f:
        left = stop
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


class _CsvChunks:
    """Reads the lines of one file's byte range [start, stop): lines starting in it belong to it."""

    def __init__(self, name: str, start: int, stop: Optional[int], data_start: int, header_lines: int):
        self.name, self.stop = name, stop
        opener = compressed(name)
        self.file = opener(name, "rb") if opener else open(name, "rb")
        self.position = 0
        self.line = 1
        if opener is not None or start <= data_start:
            if header_lines:
                skipped = 0
                while skipped < header_lines:  # the header line (blank lines before it too)
                    raw = self.file.readline()
                    if not raw:
                        break
                    self.line += 1
                    self.position += len(raw)
                    skipped += bool(raw.strip())
        else:
            self.file.seek(start - 1)
            self.position = start - 1
            if self.file.read(1) != b"\n":
                self.position += 1 + len(self.file.readline())  # the rest of a line that began before
            else:
                self.position += 1
            self.line = 1 + _count_lines(name, self.position)
            self.file.seek(self.position)

    def next(self, hint: int) -> Tuple[List[bytes], int]:
        """The next lines (about ``hint`` bytes) and the line number of the first."""
        if self.stop is not None and self.position >= self.stop:
            return [], self.line
        lines = self.file.readlines(hint)
        if self.stop is not None:
            end = self.position + sum(map(len, lines))
            if end > self.stop:
                kept, at = 0, self.position
                for raw in lines:
                    if at >= self.stop:
                        break
                    at += len(raw)
                    kept += 1
                lines = lines[:kept]
        first = self.line
        self.line += len(lines)
        self.position += sum(map(len, lines))
        return lines, first

    def close(self) -> None:
        self.file.close()


def from_csv(path: PathLike, sources: Any, *, fields: Optional[Mapping[str, Any]] = None, label: Any = None,
             label_field: str = "label", classes: Any = None, dtypes: Any = None, lists: Any = None,
             delimiter: Optional[str] = None,
             header: bool = True, on_error: str = "raise", part: Optional[Tuple[int, int]] = None, workers: int = 1,
             shard_size: int = DEFAULT_SHARD_SIZE, metadata: Optional[Mapping[str, Any]] = None, mode: str = "w",
             overflow: str = "error", progress: Progress = False,
             chunk_bytes: int = DEFAULT_CHUNK_BYTES, compression: Any = None) -> ConversionReport:
    """Converts one or many CSV files (``data/*.csv``, a directory, a list; ``.gz``/``.bz2``/``.xz``
    are decompressed), parsing about ``chunk_bytes`` of text at a time with numpy's C parser.

    Every file starts with the same header row (``header=False``: none, columns are then numbered
    from 0). ``fields`` maps each field to its columns: a column name (a scalar field), a list of
    names or a glob pattern such as ``"pixel*"`` (a vector field, columns in file order). By default
    every column but the label goes into one vector field ``x``. ``label``: a column stored as the
    int64 field ``label_field``; its values must be integers unless ``classes`` is given -- a list of
    class names (a name's index is stored) or ``"auto"`` (the sorted names found in a first pass
    over the files); the names go to ``metadata["classes"]``. ``dtypes``: stored dtype per field
    (default float32 for features, int64 for the label), or one dtype for every float field.
    ``delimiter``: default tab for ``.tsv`` files, else comma.

    ``lists``: fields whose cells each hold a list of numbers (``"607 2214 9"``), stored as
    variable-length fields (shape ``(None,)``): a list of field names (items separated by
    whitespace) or ``{"history": ";"}`` (the separator of each). A list field takes the column
    ``fields`` gives it, by default the column of its name, and the dtype ``dtypes`` gives it
    (``{"history": "int32"}``; default float32). An empty cell is an empty list.

    A row with a value that does not parse as its field's type, or with another number of columns
    than the header, raises :class:`SourceError` naming the file and line; ``on_error="skip"``
    skips such rows and counts them in the report. Blank lines are ignored. Other options: see
    :func:`from_npy`; ``part`` and ``workers`` split the files' bytes into contiguous line ranges."""
    choice("on_error", on_error, ("raise", "skip"))
    files = expand(sources, _CSV_SUFFIXES, "CSV")
    if delimiter is None:
        delimiter = "\t" if files[0].lower().endswith((".tsv", ".tsv.gz")) else ","
    if len(delimiter) != 1 or delimiter in "\"\r\n":
        raise ValueError(f"delimiter must be one character (not a quote or newline), got {delimiter!r}")
    headers, columns = _headers(files, delimiter, header, fields, label)
    string_labels = label is not None and classes is not None
    layout = CsvLayout(columns, fields, label, label_field, dtypes, string_labels, lists)
    if isinstance(classes, str):
        if classes != "auto":
            raise ValueError(f"classes must be a list of names or 'auto', got {classes!r}")
        classes = _scan_labels(files, layout.string_label, delimiter, header, headers)
    class_index = {str(c): i for i, c in enumerate(classes)} if string_labels else None
    meta = dict(metadata or {})
    if string_labels:
        meta.setdefault("classes", [str(c) for c in classes])

    sizes = [os.path.getsize(name) for name in files]
    if workers != 1:
        return run_parallel(from_csv, path, (files,), dict(
            fields=fields, label=label, label_field=label_field, classes=classes, dtypes=dtypes, lists=lists, delimiter=delimiter,
            header=header, on_error=on_error, shard_size=shard_size, metadata=metadata, mode=mode, overflow=overflow,
            chunk_bytes=chunk_bytes, compression=compression), workers, progress, total=sum(sizes))

    pieces = _part_pieces(files, headers, sizes, part)
    data_starts = {name: (offset if found is not None else 0) for name, (found, offset) in zip(files, headers)}

    parser = CsvParser(layout, delimiter, class_index, on_error)
    with Sink(path, layout.spec(), {n: ("str" if string_labels and n == layout.label_field else
                                        {"f8": "float64", "i8": "int64", "u8": "uint64"}[parse_kind(layout.dtypes[n])])
                                    for n in list(layout.fields) + list(layout.lists)},
              shard_size=shard_size, metadata=meta, mode=mode, overflow=overflow, progress=progress,
              total=sum((b if b is not None else os.path.getsize(n)) - a for n, a, b in pieces), compression=compression) as sink:
        for name, start, stop in pieces:
            found = headers[files.index(name)][0]
            reader = _CsvChunks(name, start, stop, data_starts[name], 1 if header and found is not None else 0)
            try:
                _convert_piece(name, reader, parser, sink, chunk_bytes)
            finally:
                reader.close()
    return sink.report


def _headers(files: List[str], delimiter: str, header: bool, fields: Optional[Mapping[str, Any]],
             label: Any) -> Tuple[List[Tuple[Optional[List[str]], int]], List[str]]:
    """Each file's (header or None when empty, offset of its data) and the columns they agree on
    (every file empty: the columns ``fields`` and ``label`` name)."""
    headers = []
    columns: Optional[List[str]] = None
    first_file = None
    for name in files:
        found, offset = _csv_header(name, delimiter, header)
        headers.append((found, offset))
        if found is not None:
            if columns is None:
                columns, first_file = found, name
            elif header and found != columns:
                raise SourceError(f"{name}: header {found[:20]} differs from the header of {first_file} {columns[:20]}")
            elif not header and len(found) != len(columns):
                raise SourceError(f"{name}, line 1: {len(found)} columns, {first_file} has {len(columns)}")
    if columns is None:
        if fields is None or any(isinstance(s, str) and any(c in s for c in "*?[") for s in fields.values()):
            raise SourceError("every CSV file is empty: name the fields' columns (a list per field) to write an "
                              "empty dataset")
        columns = sorted({str(c) for s in fields.values() for c in (s if isinstance(s, (list, tuple)) else [s])}
                         | ({str(label)} if label is not None else set()))
    return headers, columns


def _part_pieces(files: List[str], headers: List[Tuple[Optional[List[str]], int]], sizes: List[int],
                 part: Optional[Tuple[int, int]]) -> List[Tuple[str, int, Optional[int]]]:
    """The byte ranges (file, start, stop or None: to its end) of this part: the files' data
    regions laid end to end and cut into n; a compressed file goes whole to the part where it starts."""
    regions = [(name, (offset if found is not None else size), size) for name, (found, offset), size
               in zip(files, headers, sizes)]
    total = sum(size - start for _, start, size in regions)
    lo, hi = part_range(total, part) if part is not None else (0, total)
    pieces: List[Tuple[str, int, Optional[int]]] = []
    at = 0
    for name, start, size in regions:
        length = size - start
        if compressed(name):
            if lo <= at < hi or (part is None and length):
                pieces.append((name, start, None))
        else:
            a, b = max(lo, at), min(hi, at + length)
            if a < b:
                pieces.append((name, start + a - at, start + b - at))
        at += length
    return pieces


def _convert_piece(name: str, reader: "_CsvChunks", parser: CsvParser, sink: Sink, chunk_bytes: int) -> None:
    """Parses and writes one byte range of a file, about ``chunk_bytes`` of lines at a time."""
    while True:
        raw, first_line = reader.next(chunk_bytes)
        if not raw:
            return
        nbytes = sum(map(len, raw))
        batch, lines = parser.parse(name, raw, first_line, sink)
        if batch is not None:
            sink.put(batch, nbytes, locate=lambda row, lines=lines: f"{name}, line {lines[row]}")
        else:
            sink.bar.update(nbytes)
            sink.report.source_bytes += nbytes


def _scan_labels(files: List[str], index: int, delimiter: str, header: bool, headers: List[Any]) -> List[str]:
    names = set()
    for name, (found, _) in zip(files, headers):
        if found is None:
            continue
        opener = compressed(name)
        with (opener(name, "rt", encoding="utf-8-sig", newline="") if opener else
              open(name, encoding="utf-8-sig", newline="")) as f:
            rows = csv.reader(f, delimiter=delimiter)
            if header:
                next(rows, None)
            for row in rows:
                if len(row) > index:
                    names.add(row[index].strip())
    names.discard("")
    return sorted(names)
