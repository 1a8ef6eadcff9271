"""Converters: data in the shapes people already have -> a shardfeed dataset, in bounded memory.

Every converter reads its source a chunk at a time (``chunk_bytes`` of source data, default 8 MiB),
writes through :class:`shardfeed.Writer` and returns a :class:`ConversionReport`:

* :func:`from_arrays` -- numpy arrays (or anything sliceable with a ``dtype``: ``np.memmap``,
  h5py and zarr arrays);
* :func:`from_npy`, :func:`from_npz` -- ``.npy`` files memory-mapped, ``.npz`` members
  memory-mapped when stored, streamed when compressed; several files are concatenated;
* :func:`from_files` -- a directory of per-sample ``.npy`` files or images (PNG, JPEG, ... with
  Pillow, the ``images`` extra), labels from sub-folder names or a CSV/JSON listing; the list of
  files (one name per line) is the index, so train/val/test lists become separate datasets or
  splits of one;
* :func:`from_csv` -- one or many CSV files, chosen columns -> fields, a dtype per field, bad rows
  refused (naming file and line) or skipped and counted;
* :func:`from_hdf5` -- HDF5 datasets (h5py, the ``hdf5`` extra), chunk by chunk;
* :func:`from_iterable` -- any iterable of samples (dicts or tuples).

Precision: storing floats in a narrower dtype (float64 -> float32 / float16 / bfloat16) is measured:
the report gives the largest absolute and relative error per field. A value that overflows the
stored dtype is refused (``ValueRangeError`` naming the field and the source file and row) unless
``overflow="saturate"``, which stores the largest finite value of the right sign and counts them.

Parallel conversion: the file-based converters take ``part=(k, n)`` (convert only the k-th of n
contiguous slices of the source into a dataset of its own) and ``workers=n`` (n processes each
write a part, then :func:`shardfeed.merge` joins them without copying shard data). A conversion that
fails leaves no dataset behind (``mode="a"``: the dataset as it was).

The package has one module per source kind (``_arrays``: arrays, ``.npy``, ``.npz``; ``_files``:
per-sample files and images; ``_csv``; ``_hdf5``; ``_iterable``), the column sources they share
(``_columns``), the sink every converter writes through (``_sink``, casting with the writer's
overflow policy), the parallel runner (``_parallel``), progress bars and the report; see
docs/design.md.
"""

from ._arrays import from_arrays, from_npy, from_npz
from ._csv import from_csv
from ._files import IMAGE_SUFFIXES, from_files
from ._hdf5 import from_hdf5
from ._iterable import from_iterable
from ._options import DEFAULT_CHUNK_BYTES, PathLike, Progress
from ._report import ConversionReport, FieldReport

__all__ = [
    "ConversionReport", "FieldReport", "from_arrays", "from_csv", "from_files", "from_hdf5", "from_iterable",
    "from_npy", "from_npz",
]
