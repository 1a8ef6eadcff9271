"""Converting numpy arrays, ``.npy`` files and ``.npz`` archives."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import SourceError
from ..writer import DEFAULT_SHARD_SIZE
from ._columns import ArrayPiece, Column, Member, Piece, convert_columns, npy_piece, npz_pieces
from ._files import from_files
from ._options import DEFAULT_CHUNK_BYTES, PathLike, Progress, common_options, expand
from ._parallel import run_parallel
from ._report import ConversionReport


def from_arrays(path: PathLike, arrays: Any, *, dtypes: Any = None, part: Optional[Tuple[int, int]] = None,
                shard_size: int = DEFAULT_SHARD_SIZE, metadata: Optional[Mapping[str, Any]] = None, mode: str = "w",
                overflow: str = "error", progress: Progress = False,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, compression: Any = None) -> ConversionReport:
    """Writes arrays with a leading sample dimension: ``{"x": x, "y": y}``, a tuple ``(x, y)`` (fields
    ``x`` and ``y``) or one array (field ``x``). Anything with ``dtype``, ``shape`` and slicing works
    (``np.memmap``, h5py, zarr); it is read ``chunk_bytes`` at a time.

    ``dtypes``: the stored dtype per field (``{"x": "float16"}``), or one dtype for every float field;
    by default each field keeps its source dtype. ``overflow``: ``"error"`` (refuse values that do not
    fit) or ``"saturate"``. ``part=(k, n)``: only the k-th of n contiguous slices of the rows.
    ``shard_size``, ``metadata``, ``mode``: as for :class:`shardfeed.Writer`. ``progress``: True for a
    progress bar on a terminal, or a callable receiving byte counts."""
    if isinstance(arrays, Mapping):
        named = dict(arrays)
    elif isinstance(arrays, tuple):
        named = dict(zip(("x", "y") if len(arrays) == 2 else [f"x{i}" for i in range(len(arrays))], arrays))
    else:
        named = {"x": arrays}
    columns = {name: Column(name, [ArrayPiece(a, f"field {name!r}")]) for name, a in named.items()}
    return convert_columns(path, columns, dtypes=dtypes, part=part,
                           **common_options(shard_size, metadata, mode, overflow, progress, chunk_bytes, compression))


def _field_files(sources: Any, default: str) -> Dict[str, List[str]]:
    if isinstance(sources, Mapping):
        return {name: expand(files, (".npy",), ".npy") for name, files in sources.items()}
    return {default: expand(sources, (".npy",), ".npy")}


def from_npy(path: PathLike, sources: Any, *, sample_per_file: bool = False, field: Optional[str] = None,
             dtypes: Any = None, part: Optional[Tuple[int, int]] = None, workers: int = 1,
             shard_size: int = DEFAULT_SHARD_SIZE, metadata: Optional[Mapping[str, Any]] = None, mode: str = "w",
             overflow: str = "error", progress: Progress = False,
             chunk_bytes: int = DEFAULT_CHUNK_BYTES, compression: Any = None) -> ConversionReport:
    """Converts ``.npy`` files, memory-mapped and read in chunks (resident memory stays bounded).

    ``sources``: one file, a list of files or a glob pattern, or ``{"image": "img.npy", "label":
    ["l0.npy", "l1.npy"]}``. Several files are chunks of rows: concatenated along their first
    axis into field ``field`` (default ``x``; a structured array gives one field per member).
    When they are one sample each -- 12,000 files of shape (32, 256) that are 12,000 samples of
    shape (32, 256), not 384,000 rows -- pass ``sample_per_file=True`` (the files are then read
    as :func:`from_files` reads a directory; labels and splits are its options). The report
    notes a concatenation of several files of identical shape, the case where both meanings are
    plausible. Other options: see :func:`from_arrays`; ``workers=n`` converts with n processes
    (see the module documentation)."""
    if sample_per_file:
        if isinstance(sources, Mapping):
            if len(sources) != 1:
                raise ValueError("sample_per_file=True reads one field: pass its files, and field= for its name")
            (field, sources), = sources.items()
        files = [os.path.abspath(f) for f in expand(sources, (".npy",), ".npy")]
        root = os.path.commonpath([os.path.dirname(f) for f in files])
        return from_files(path, root, files=[os.path.relpath(f, root) for f in files], field=field or "x",
                          dtypes=dtypes, part=part, workers=workers, shard_size=shard_size, metadata=metadata,
                          mode=mode, overflow=overflow, progress=progress, chunk_bytes=chunk_bytes, compression=compression)
    if workers != 1:
        return run_parallel(from_npy, path, (sources,), dict(field=field, dtypes=dtypes, shard_size=shard_size,
                            metadata=metadata, mode=mode, overflow=overflow, chunk_bytes=chunk_bytes, compression=compression), workers, progress)
    files = _field_files(sources, field or "x")
    columns: Dict[str, Column] = {}
    notes = []
    try:
        for name, paths in files.items():
            pieces = [npy_piece(p) for p in paths]
            names = pieces[0].dtype.names
            if names and not isinstance(sources, Mapping):
                for member in names:
                    columns[member] = Column(member, [Member(p, member) for p in pieces])
            else:
                columns[name] = Column(name, pieces)
            shapes = {(len(p),) + p.shape for p in pieces}
            if len(pieces) > 1 and len(shapes) == 1 and not names:
                shape, = shapes
                notes.append(f"{len(pieces):,} files of identical shape {shape} were concatenated along their "
                             f"first axis into {len(pieces) * shape[0]:,} samples of {pieces[0].dtype}"
                             f"{list(shape[1:])} in field {name!r}; if each file is one sample, convert them "
                             "with sample_per_file=True")
    except BaseException:
        for c in columns.values():
            c.close()
        raise
    report = convert_columns(path, columns, dtypes=dtypes, part=part,
                             **common_options(shard_size, metadata, mode, overflow, progress, chunk_bytes, compression))
    report.notes += notes
    return report


def from_npz(path: PathLike, sources: Any, *, fields: Any = None, dtypes: Any = None,
             part: Optional[Tuple[int, int]] = None, workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE,
             metadata: Optional[Mapping[str, Any]] = None, mode: str = "w", overflow: str = "error",
             progress: Progress = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES, compression: Any = None) -> ConversionReport:
    """Converts ``.npz`` archives (several are concatenated member by member). Members stored
    uncompressed (``np.savez``) are memory-mapped in place; compressed ones (``np.savez_compressed``)
    are decompressed as a stream. ``fields``: which members (default: all), as a list of member
    names or ``{"field": "member"}``. Other options: see :func:`from_npy`."""
    if workers != 1:
        return run_parallel(from_npz, path, (sources,), dict(fields=fields, dtypes=dtypes, shard_size=shard_size,
                            metadata=metadata, mode=mode, overflow=overflow, chunk_bytes=chunk_bytes, compression=compression), workers, progress)
    archives = expand(sources, (".npz",), ".npz")
    opened: List[Dict[str, Piece]] = []
    try:
        for archive in archives:
            opened.append(npz_pieces(archive))
        members = list(opened[0])
        if fields is None:
            chosen = {m: m for m in members}
        elif isinstance(fields, Mapping):
            chosen = dict(fields)
        else:
            chosen = {m: m for m in ([fields] if isinstance(fields, str) else fields)}
        for archive, pieces in zip(archives, opened):
            missing = [m for m in chosen.values() if m not in pieces]
            if missing:
                raise SourceError(f"{archive}: no member(s) {missing}; it has {sorted(pieces)}")
        columns = {name: Column(name, [pieces[member] for pieces in opened]) for name, member in chosen.items()}
    except BaseException:
        for pieces in opened:
            for piece in pieces.values():
                piece.close()
        raise
    for pieces in opened:  # members not converted
        for member, piece in pieces.items():
            if member not in chosen.values():
                piece.close()
    return convert_columns(path, columns, dtypes=dtypes, part=part,
                           **common_options(shard_size, metadata, mode, overflow, progress, chunk_bytes, compression))
