"""Converting a directory of per-sample files (``.npy`` arrays or images), in named steps: the
index (:func:`_index`: which files, in which order, and the splits), the labels
(:class:`_Labels`), the schema probed from the first readable file (:func:`_probe`), and the
conversion proper (:func:`_write`), which decodes a chunk of files at a time on a thread pool and
applies the skip policy (:func:`_load_chunk`). The file lists are read by :mod:`._listings`, the
files by :mod:`._sample_files`."""

from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import SchemaError, SourceError
from ..writer import DEFAULT_SHARD_SIZE
from . import _listings, _sample_files
from ._options import DEFAULT_CHUNK_BYTES, PathLike, Progress, check_dtypes_cover, choice, dtype_for, natural_key, \
    part_range, source_dtype_name
from ._parallel import run_parallel
from ._report import ConversionReport
from ._sink import Sink

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def from_files(path: PathLike, root: PathLike, *, files: Any = None, splits: Optional[Mapping[str, Any]] = None,
               labels: Any = None, classes: Optional[Sequence[str]] = None, field: Optional[str] = None,
               label_field: str = "label", image_mode: Optional[str] = None, size: Optional[Tuple[int, int]] = None,
               layout: str = "hwc", dtypes: Any = None, on_error: str = "raise", threads: Optional[int] = None,
               part: Optional[Tuple[int, int]] = None, workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE,
               metadata: Optional[Mapping[str, Any]] = None, mode: str = "w", overflow: str = "error",
               progress: Progress = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES, compression: Any = None) -> ConversionReport:
    """Converts a directory holding one file per sample: ``.npy`` arrays, or images (PNG, JPEG, BMP,
    GIF, TIFF, WebP; needs Pillow: ``pip install shardfeed[images]``). Every sample must have the
    same shape (``size=(width, height)`` resizes images).

    The index -- which files, in which order -- is ``files``: a text file with one name per line
    (relative to ``root``; e.g. ``train.txt``), or a list; by default the names in a ``labels``
    listing, else every supported file under ``root`` (sorted naturally). ``splits={"train":
    "train.txt", "val": "val.txt"}`` writes several lists into one dataset, one after the other,
    and records each split's ``[start, stop)`` in ``metadata["splits"]``; converting each list
    with ``files=`` into its own dataset is the other way.

    ``labels``: ``"folders"`` (the first sub-folder of each file names its class; the classes are
    all sub-folders of ``root``, sorted, so every split agrees), a CSV file (``file,label`` rows) or
    JSON file (``{"file": label}``) or a dict. Integer labels are stored as they are; names become
    class indexes (``classes``, default sorted names) stored in ``metadata["classes"]``. The label
    field (``label_field``) is int64.

    Images: ``image_mode`` (a Pillow mode such as ``"RGB"``, ``"RGBA"`` or ``"L"``); by default the
    images' own when they all have the same (palette images as RGB), else the mode that loses no
    colour: RGB when any image has colour (transparency is kept only with ``image_mode="RGBA"``),
    else L; the report counts the images converted, by original mode. ``layout`` ``"hwc"`` (height, width, channels) or ``"chw"``; the field
    (``field``, default ``"image"``, ``"x"`` for ``.npy``) stores the pixels' dtype (uint8). Files
    are decoded on ``threads`` threads (default: up to 8). ``on_error="skip"`` skips files that
    cannot be read, have another shape, or lack a label, and counts them in the report. Other
    options: see :func:`from_npy`."""
    choice("on_error", on_error, ("raise", "skip"))
    choice("layout", layout, ("hwc", "chw"))
    root = os.fspath(root)
    size = _checked_size(size)
    label_map = None if labels in (None, "folders") else _listings.read_labels(labels)
    names, split_ranges = _index(root, files, splits, label_map)
    kind = _kind_of(root, names)
    labelling = _Labels(root, labels, classes, label_map) if labels is not None else None
    threads = threads or min(8, os.cpu_count() or 1)
    if kind == "image" and image_mode is None:  # one mode for the whole index, whatever part is converted
        image_mode = _sample_files.choose_mode(_sample_files.scan_modes([os.path.join(root, n) for n in names],
                                                                        threads))
    if workers != 1:
        return run_parallel(from_files, path, (root,), dict(
            files=names if splits is None else None, splits=splits, labels=labels, classes=classes, field=field,
            label_field=label_field, image_mode=image_mode, size=size, layout=layout, dtypes=dtypes, on_error=on_error,
            threads=threads, shard_size=shard_size, metadata=metadata, mode=mode, overflow=overflow,
            chunk_bytes=chunk_bytes, compression=compression), workers, progress, total=len(names), unit="files")

    loader = _sample_files.FileLoader(kind, image_mode, size, layout)
    probe = _probe(loader, root, names, on_error)
    field = field or ("x" if kind == "npy" else "image")
    if labelling is not None and label_field == field:
        raise SchemaError(f"the label field and the data field are both named {field!r}")
    source_dtype = source_dtype_name(probe.dtype)
    spec: Dict[str, Any] = {field: (dtype_for(field, dtypes, source_dtype), probe.shape)}
    source_dtypes = {field: source_dtype}
    if labelling is not None:
        spec[label_field] = (dtype_for(label_field, dtypes, "int64"), ())
        source_dtypes[label_field] = "int64"
    check_dtypes_cover(dtypes, spec)
    meta = dict(metadata or {})
    if labelling is not None and labelling.class_names is not None:
        meta.setdefault("classes", labelling.class_names)
    if split_ranges:
        meta.setdefault("splits", split_ranges)
    if kind == "image":
        meta.setdefault("image", {"mode": loader.image_mode, "layout": layout})
    rows = part_range(len(names), part)
    sink = dict(path=path, fields=spec, source_dtypes=source_dtypes, shard_size=shard_size, metadata=meta, mode=mode,
                overflow=overflow, progress=progress, compression=compression)
    job = _Job(root, names, loader, probe.shape, max(1, chunk_bytes // max(1, probe.nbytes)), field, label_field,
               labelling, on_error)
    return _write(job, sink, rows, threads)


def _checked_size(size: Any) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    try:
        size = (int(size[0]), int(size[1]))
    except (TypeError, ValueError, IndexError):
        size = None, None
    if None in size or min(size) < 1:
        raise ValueError(f"size must be (width, height), both at least 1, got {size!r}")
    return size


def _index(root: str, files: Any, splits: Optional[Mapping[str, Any]],
           label_map: Optional[Dict[str, Any]]) -> Tuple[List[str], Dict[str, List[int]]]:
    """The names of the files to convert, in order, and each split's [start, stop) among them."""
    if splits is not None:
        if files is not None:
            raise ValueError("pass files= or splits=, not both")
        groups = [(name, _listings.read_listing(listing, f"split {name!r}")) for name, listing in splits.items()]
    elif files is not None:
        groups = [(None, _listings.read_listing(files, "files"))]
    elif label_map is not None:
        groups = [(None, list(label_map))]
    else:
        groups = [(None, _every_sample_file(root))]
    names = [name for _, group in groups for name in group]
    split_ranges = {}
    start = 0
    for split, group in groups:
        if split is not None:
            split_ranges[split] = [start, start + len(group)]
        start += len(group)
    if not names:
        raise SourceError(f"no files to convert under {root!r}")
    return names, split_ranges


def _every_sample_file(root: str) -> List[str]:
    """Every .npy or image file under ``root`` (hidden folders left out), sorted naturally."""
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in names:
            if name.lower().endswith(IMAGE_SUFFIXES + (".npy",)):
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found, key=natural_key)


def _kind_of(root: str, names: List[str]) -> str:
    """"npy" or "image": what every file is (a mix is refused); checks that Pillow is there."""
    kinds = {"npy" if n.lower().endswith(".npy") else "image" if n.lower().endswith(IMAGE_SUFFIXES) else n
             for n in names}
    if len(kinds) > 1 or kinds - {"npy", "image"}:
        odd = sorted(kinds - {"npy", "image"})[:5]
        raise SourceError(f"{root}: files must all be .npy or all images ({', '.join(IMAGE_SUFFIXES)}); "
                          f"got {odd or 'both'}")
    kind = kinds.pop()
    if kind == "image":
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ImportError("converting images needs Pillow: pip install 'shardfeed[images]'") from None
    return kind


def label_codes(values: List[Any], classes: Optional[Sequence[str]],
                where: str) -> Tuple[Dict[Any, int], Optional[List[str]]]:
    """Label values -> int64 codes: integers (or integer strings) as they are, names -> class index
    (``classes`` or the sorted names). Returns the code of each distinct value and the class names."""
    distinct = set(values)
    if classes is None:
        as_ints = {}
        for value in distinct:
            try:
                as_ints[value] = int(value) if not isinstance(value, float) or value.is_integer() else None
            except (TypeError, ValueError):
                as_ints = None
                break
            if as_ints[value] is None or isinstance(value, bool):
                as_ints = None
                break
        if as_ints is not None:
            return as_ints, None
        classes = sorted(str(v) for v in distinct)
    classes = [str(c) for c in classes]
    index = {name: i for i, name in enumerate(classes)}
    codes = {}
    for value in distinct:
        if str(value) not in index:
            raise SourceError(f"{where}: label {value!r} is not one of the classes {classes[:20]}")
        codes[value] = index[str(value)]
    return codes, classes


class _Labels:
    """Each file's label code: from its first sub-folder (``labels="folders"``) or a label list,
    with the same codes and classes whatever part of the index is converted."""

    def __init__(self, root: str, labels: Any, classes: Optional[Sequence[str]], label_map: Optional[Dict[str, Any]]):
        self.root, self.folders, self.label_map = root, labels == "folders", label_map
        self.source = labels if not isinstance(labels, Mapping) else "labels"
        if self.folders:
            if classes is None:
                classes = sorted(entry.name for entry in os.scandir(root)
                                 if entry.is_dir() and not entry.name.startswith("."))
            self.class_names: Optional[List[str]] = [str(c) for c in classes]
            self.codes = {name: i for i, name in enumerate(self.class_names)}
        else:
            where = os.fspath(labels) if not isinstance(labels, Mapping) else "labels"
            self.codes, self.class_names = label_codes(list(label_map.values()), classes, where)

    def of(self, name: str) -> int:
        """The label code of file ``name`` (relative to the root); SourceError when it has none."""
        if self.folders:
            parts = name.replace("\\", "/").split("/")
            if len(parts) < 2:
                raise SourceError(f"{os.path.join(self.root, name)}: not inside a class sub-folder of {self.root}")
            if parts[0] not in self.codes:
                raise SourceError(f"{os.path.join(self.root, name)}: folder {parts[0]!r} is not one of the classes "
                                  f"{self.class_names[:20]}")
            return self.codes[parts[0]]
        if name not in self.label_map:
            raise SourceError(f"{os.path.join(self.root, name)}: no label for it in {self.source}")
        return self.codes[self.label_map[name]]


def _probe(loader: Any, root: str, names: List[str], on_error: str) -> np.ndarray:
    """The first readable file of the whole index (so that every part agrees on the schema)."""
    probe = None
    for name in names:
        probe = loader(os.path.join(root, name))
        if not isinstance(probe, Exception):
            return probe[0]
        if on_error == "raise":
            raise SourceError(f"{os.path.join(root, name)}: cannot read ({probe})") from probe
    raise SourceError(f"none of the {len(names)} files under {root!r} could be read")


@dataclass
class _Job:
    """What every chunk of a files conversion needs."""

    root: str
    names: List[str]
    loader: Any  # _sample_files.FileLoader
    shape: Tuple[int, ...]  # every sample's, the probe's
    per_chunk: int  # files decoded at a time: about chunk_bytes of samples
    field: str
    label_field: str
    labelling: Optional[_Labels]
    on_error: str


def _write(job: _Job, sink_options: Dict[str, Any], rows: Tuple[int, int], threads: int) -> ConversionReport:
    """Converts files [lo, hi) of the index into a :class:`Sink` made of ``sink_options``, a chunk
    at a time, decoded on ``threads`` threads."""
    lo, hi = rows
    converted: "collections.Counter[str]" = collections.Counter()
    with ThreadPoolExecutor(threads, thread_name_prefix="shardfeed-decode") as pool, \
            Sink(**sink_options, total=hi - lo, unit="files") as sink:
        for a in range(lo, hi, job.per_chunk):
            chunk = job.names[a:min(hi, a + job.per_chunk)]
            batch, kept, nbytes = _load_chunk(sink, job, chunk, pool, converted)
            if batch is not None:
                sink.put(batch, nbytes, locate=lambda row, kept=kept: kept[row], advance=len(chunk))
            else:
                sink.bar.update(len(chunk))
        if job.loader.kind == "image":
            sink.report.image_mode, sink.report.images_converted = job.loader.image_mode, dict(converted)
    return sink.report


def _load_chunk(sink: Sink, job: _Job, chunk: List[str], pool: ThreadPoolExecutor,
                converted: "collections.Counter[str]") -> Tuple[Optional[Dict[str, np.ndarray]], List[str], int]:
    """Decodes a chunk of files: (the batch or None, the files kept, their bytes). A file that
    cannot be read, has another shape or no label raises, or with ``on_error="skip"`` is counted."""
    arrays, kept, label_values, nbytes = [], [], [], 0
    fulls = [os.path.join(job.root, n) for n in chunk]
    for name, full, loaded in zip(chunk, fulls, pool.map(job.loader, fulls)):
        problem = None
        array, original = (None, None) if isinstance(loaded, Exception) else loaded
        if isinstance(loaded, Exception):
            problem = f"{full}: cannot read ({loaded})"
        elif array.shape != job.shape:
            hint = "; pass size=(width, height) to resize" if job.loader.kind == "image" else ""
            problem = f"{full}: has shape {array.shape}, the first sample {job.shape}{hint}"
        label = None
        if problem is None and job.labelling is not None:
            try:
                label = job.labelling.of(name)
            except SourceError as exc:
                if job.on_error == "raise":
                    raise
                problem = str(exc)
        if problem is not None:
            if job.on_error == "raise":
                raise SourceError(problem)
            sink.skip(problem)
            continue
        arrays.append(array)
        kept.append(full)
        label_values.append(label)
        nbytes += os.path.getsize(full)
        if original is not None and original != job.loader.image_mode:
            converted[original] += 1
    if not arrays:
        return None, kept, nbytes
    batch = {job.field: np.stack(arrays)}
    if job.labelling is not None:
        batch[job.label_field] = np.array(label_values, dtype=np.int64)
    return batch, kept, nbytes
