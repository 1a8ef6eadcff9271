"""Reading one sample per file for :func:`shardfeed.convert.from_files`: ``.npy`` arrays and
images, and the choice of one image mode for a folder of images in several modes.

Every image of a dataset is stored in one Pillow mode. When the images do not all have the same
mode, the default is the one that loses nothing a plain image holds: RGB as soon as one image has
colour (grayscale images are then repeated into three equal channels), else L. Transparency is
kept only when asked for (``image_mode="RGBA"``). The conversion counts the images it converted,
by their original mode, so the report can say what happened.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._npy import load_npy

# Modes stored as another: palette and bilevel images, and colour spaces numpy users do not expect.
_STORED_AS = {"P": "RGB", "PA": "RGBA", "1": "L", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
_COLOUR = {"RGB", "RGBA", "RGBX", "RGBa"}
_WIDE_GRAY = ("F", "I", "I;16")  # 32-bit float, 32-bit and 16-bit integer gray: wider than L


def stored_mode(mode: str) -> str:
    """The mode an image of this mode is stored in when all images share it."""
    return _STORED_AS.get(mode, mode)


def choose_mode(modes: "collections.Counter[str]") -> str:
    """The mode to store images whose original modes are counted in ``modes``: theirs when they
    agree, else RGB if any has colour (transparency dropped: ask for RGBA to keep it), else the
    widest gray."""
    stored = {stored_mode(m) for m in modes}
    if len(stored) == 1:
        return stored.pop()
    if stored & _COLOUR or any(m in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV") for m in modes):
        return "RGB"
    for wide in _WIDE_GRAY:
        if wide in stored:
            return "I" if wide == "I;16" else wide
    return "L"


def scan_modes(paths: List[str], threads: int) -> "collections.Counter[str]":
    """The original modes of these images (headers only; files that do not open are left to the
    conversion, which reports them)."""
    from PIL import Image

    def mode_of(path: str) -> Optional[str]:
        try:
            with Image.open(path) as image:
                return image.mode
        except Exception:  # any decoder error: the conversion names the file
            return None

    with ThreadPoolExecutor(threads, thread_name_prefix="shardfeed-scan") as pool:
        return collections.Counter(m for m in pool.map(mode_of, paths) if m is not None)


class FileLoader:
    """Loads one sample file: ``(array, original image mode or None)``, or the exception that
    loading raised (returned, not raised, so that a thread pool's map goes on)."""

    def __init__(self, kind: str, image_mode: Optional[str], size: Optional[Tuple[int, int]], layout: str):
        self.kind, self.image_mode, self.size, self.layout = kind, image_mode, size, layout

    def __call__(self, full: str) -> Any:
        try:
            if self.kind == "npy":
                return load_npy(full), None
            from PIL import Image
            with Image.open(full) as image:
                original = image.mode
                if self.image_mode is None:
                    self.image_mode = stored_mode(original)
                if image.mode != self.image_mode:
                    image = image.convert(self.image_mode)
                if self.size is not None and image.size != self.size:
                    image = image.resize(self.size, Image.BILINEAR)
                array = np.asarray(image)
            if array.ndim == 2:
                array = array[:, :, None]
            array = np.ascontiguousarray(np.moveaxis(array, -1, 0)) if self.layout == "chw" else array
            return array, original
        except Exception as exc:  # any decoder error is a bad file, reported with its name
            return exc


def describe_conversions(converted: Dict[str, int], mode: str, total: int) -> str:
    """The report's line on images stored in another mode than their own."""
    count = sum(converted.values())
    origins = ", ".join(f"{n:,} {m}" for m, n in sorted(converted.items(), key=lambda item: -item[1]))
    text = f"{count:,} of {total:,} images converted to {mode} (from {origins})"
    if "A" not in mode and any(m in ("RGBA", "RGBa", "LA", "La", "PA") for m in converted):
        text += "; their transparency was dropped: image_mode='RGBA' keeps it"
    elif mode == "RGB" and any(m in ("L", "LA", "1") for m in converted):
        text += "; image_mode='L' stores one channel instead"
    return text
