"""What the GPU check (benchmarks/gpu_check.py) trains on: its settings (:class:`Config`), the
dataset of uint8 images it writes, numpy's reference for a batch of them, and a row of its table.

Imports numpy and shardfeed only (no TensorFlow, torch or Keras), so the command's parent process,
the route processes (benchmarks/gpu_routes.py) and the tests share it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Iterator, Optional

import numpy as np

import shardfeed

# ImageNet statistics, channels last: x_float = (x_uint8 / 255 - mean) / std = x * scale + offset.
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)
NORM_SCALE = (1.0 / (255.0 * _STD)).astype(np.float32)
NORM_OFFSET = (-_MEAN / _STD).astype(np.float32)

# Images are a few random base images XORed with a byte that depends on the index: generated at
# memory speed (a multi-GiB dataset in seconds), and each a pure function of its index, so the
# reference below needs nothing but the index.
BASE_IMAGES = 61
PAGE_CACHE = "page cache"  # the data column of rows read from memory
WRITE_CHUNK_BYTES = 64 << 20


@dataclass
class Config:
    """One run's settings. ``model``: ``"resnet50"`` (``keras.applications.ResNet50(weights=None)``)
    or ``"tiny"`` (one small convolution, for tests on the CPU). ``warmup`` steps run untimed
    before ``steps`` timed ones (the first traces the model); ``check_steps`` of the warm-up
    batches every feed hands out are compared with numpy's reference."""

    model: str = "resnet50"
    image_size: int = 224
    classes: int = 1000
    batch: int = 64
    warmup: int = 10
    steps: int = 50
    check_steps: int = 2
    mixed_precision: bool = False
    reader_seconds: float = 3.0
    seed: int = 20240607

    @property
    def image_shape(self):
        return (self.image_size, self.image_size, 3)

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def samples_per_row(self) -> int:
        """Samples one training row reads: its warm-up and timed steps."""
        return (self.warmup + self.steps) * self.batch

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Config":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


@dataclass
class Row:
    """A line of the table. ``ratio``: images/s over the synthetic-data row of the same route.
    ``per_core``: images per CPU-second the process used (the reader alone). ``note``: why a row
    was skipped or failed; a row with a note has no figures."""

    route: str
    feed: str
    data: str = ""
    images_per_s: Optional[float] = None
    step_ms: Optional[float] = None
    ratio: Optional[float] = None
    per_core: Optional[float] = None
    cores_busy: Optional[float] = None
    device: str = ""
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Row":
        return cls(**json.loads(text))


def _base_images(config: Config) -> np.ndarray:
    rng = np.random.default_rng(config.seed)
    return rng.integers(0, 256, (BASE_IMAGES,) + config.image_shape, dtype=np.uint8)


def images_at(indices: np.ndarray, config: Config, base: Optional[np.ndarray] = None) -> np.ndarray:
    """The stored uint8 images of ``indices``: ``(len, size, size, 3)``."""
    indices = np.asarray(indices, np.int64)
    base = _base_images(config) if base is None else base
    salt = ((indices // BASE_IMAGES) % 256).astype(np.uint8).reshape(-1, 1, 1, 1)
    return base[indices % BASE_IMAGES] ^ salt


def labels_at(indices: np.ndarray, config: Config) -> np.ndarray:
    return np.asarray(indices, np.int64) % config.classes


def reference_images(indices: np.ndarray, config: Config) -> np.ndarray:
    """numpy's normalisation of the images of ``indices``: what every feed must hand the model."""
    x = images_at(indices, config).astype(np.float32)
    x *= NORM_SCALE
    x += NORM_OFFSET
    return x


def check_batch(feed: str, step: int, x, y, indices: np.ndarray, config: Config) -> None:
    """Raises ``RuntimeError`` unless ``x`` and ``y`` (arrays or tensors of any backend, on any
    device) are, bit for bit, numpy's normalised images and the labels of ``indices``."""
    x = np.asarray(x.cpu() if hasattr(x, "cpu") else x)
    y = np.asarray(y.cpu() if hasattr(y, "cpu") else y)
    expected = reference_images(indices, config)
    if x.shape != expected.shape or x.dtype != np.float32 or \
            not np.array_equal(x.view(np.uint32), expected.view(np.uint32)):
        raise RuntimeError(f"{feed}: batch {step} differs from numpy's normalisation of the same images "
                           f"(shape {x.shape} {x.dtype}, expected {expected.shape} float32)")
    if not np.array_equal(y, labels_at(indices, config)):
        raise RuntimeError(f"{feed}: batch {step} has the wrong labels")


def write_images(path: str, count: int, config: Config) -> None:
    """Writes ``count`` images (fields ``"image"``: uint8 ``image_shape``, ``"label"``: int64) in
    chunks of ``WRITE_CHUNK_BYTES``: memory stays bounded whatever ``count`` is."""
    base = _base_images(config)
    chunk = max(1, WRITE_CHUNK_BYTES // config.image_bytes)
    with shardfeed.Writer(path, fields={"image": ("uint8", config.image_shape), "label": ("int64", ())}) as writer:
        for start in range(0, count, chunk):
            ids = np.arange(start, min(count, start + chunk))
            writer.extend({"image": images_at(ids, config, base), "label": labels_at(ids, config)})


def read_options() -> dict:
    """The read options of every feed: images as float32, normalised by the reader's native threads
    (``x * scale + offset`` per channel); labels as stored (int64)."""
    return {"dtype": {"image": "float32", "label": "int64"}, "scale": {"image": NORM_SCALE},
            "offset": {"image": NORM_OFFSET}}


def dataset_files(path: str) -> Iterator[str]:
    for entry in os.scandir(path):
        if entry.is_file():
            yield entry.path
