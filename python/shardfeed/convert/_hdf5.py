"""Converting HDF5 datasets (h5py, the ``hdf5`` extra), a chunk of rows at a time."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

from ..errors import SourceError
from ..writer import DEFAULT_SHARD_SIZE
from ._columns import ArrayPiece, Column, convert_columns
from ._options import DEFAULT_CHUNK_BYTES, PathLike, Progress, common_options, expand
from ._parallel import run_parallel
from ._report import ConversionReport


def from_hdf5(path: PathLike, sources: Any, *, datasets: Any = None, dtypes: Any = None,
              part: Optional[Tuple[int, int]] = None, workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE,
              metadata: Optional[Mapping[str, Any]] = None, mode: str = "w", overflow: str = "error",
              progress: Progress = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES, compression: Any = None) -> ConversionReport:
    """Converts HDF5 datasets (needs h5py: ``pip install shardfeed[hdf5]``), reading a chunk of rows
    at a time (aligned to the datasets' HDF5 chunks). ``sources``: one or several files (their
    datasets are concatenated). ``datasets``: default every dataset at the top of the file; a list
    of dataset paths (fields named after their last component) or ``{"field": "/group/dataset"}``.
    Other options: see :func:`from_npy`."""
    if workers != 1:
        return run_parallel(from_hdf5, path, (sources,), dict(datasets=datasets, dtypes=dtypes, shard_size=shard_size,
                            metadata=metadata, mode=mode, overflow=overflow, chunk_bytes=chunk_bytes, compression=compression), workers, progress)
    try:
        import h5py
    except ImportError:
        raise ImportError("converting HDF5 files needs h5py: pip install 'shardfeed[hdf5]'") from None
    files = expand(sources, (".h5", ".hdf5", ".he5", ".hdf"), "HDF5")
    handles = []
    try:
        for name in files:
            try:
                handles.append(h5py.File(name, "r"))
            except OSError as exc:
                raise SourceError(f"{name}: cannot open as HDF5 ({exc})") from None
        if datasets is None:
            chosen = {key: key for key, item in handles[0].items() if isinstance(item, h5py.Dataset) and item.ndim}
            if not chosen:
                raise SourceError(f"{files[0]}: no datasets at the top of the file; name them with datasets=")
        elif isinstance(datasets, Mapping):
            chosen = dict(datasets)
        else:
            chosen = {d.rstrip("/").rsplit("/", 1)[-1]: d for d in ([datasets] if isinstance(datasets, str) else datasets)}
        columns = {}
        align = 1
        for field_name, key in chosen.items():
            pieces = []
            for name, handle in zip(files, handles):
                item = handle.get(key)
                if not isinstance(item, h5py.Dataset):
                    raise SourceError(f"{name}: no dataset {key!r}")
                pieces.append(ArrayPiece(item, f"{name}[{key}]"))
                if item.chunks:
                    align = max(align, item.chunks[0])
            columns[field_name] = Column(field_name, pieces)
        return convert_columns(path, columns, dtypes=dtypes, part=part, align=align,
                               **common_options(shard_size, metadata, mode, overflow, progress, chunk_bytes, compression))
    finally:
        for handle in handles:
            handle.close()
