""".npy files read in the converters' thread pools: the header (numpy's own parser, one
thread at a time) and whole arrays."""

from __future__ import annotations

import threading
from typing import Any, Tuple

import numpy as np

from ..errors import SourceError

# numpy parses a .npy header with ast.literal_eval, and CPython before 3.11.8 / 3.12.2 can fail
# compiling in two threads at once (SystemError "AST constructor recursion depth mismatch",
# python/cpython#106905): the converters' thread pools read headers one at a time.
_NPY_HEADER_LOCK = threading.Lock()


def read_npy_header(f: Any, name: str) -> Tuple[np.dtype, Tuple[int, ...], bool, int]:
    """The header of the .npy file open as ``f`` (positioned at its start): (dtype, shape,
    Fortran order, offset of the data). Raises :class:`SourceError` naming ``name``."""
    try:
        with _NPY_HEADER_LOCK:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise SourceError(f"{name}: not a .npy array ({exc})") from None
    if dtype.hasobject:
        raise SourceError(f"{name}: holds Python objects (pickled); shardfeed converts numeric arrays only")
    return dtype, tuple(shape), bool(fortran), f.tell() if hasattr(f, "tell") else 0


def load_npy(path: str) -> np.ndarray:
    """The array of a .npy file (``numpy.load(path, allow_pickle=False)``, safe in a thread
    pool: see _NPY_HEADER_LOCK). Raises :class:`SourceError` naming the file when it is not a
    .npy array, holds objects or is shorter than its header says."""
    with open(path, "rb") as f:
        dtype, shape, fortran, _ = read_npy_header(f, path)
        array = np.empty(shape, dtype, order="F" if fortran else "C")
        view = array.reshape(-1, order="A").view(np.uint8) if array.size else np.empty(0, np.uint8)
        got = f.readinto(view)
    if got != view.nbytes:
        raise SourceError(f"{path}: truncated .npy file ({got} of {view.nbytes} data bytes)")
    return array
