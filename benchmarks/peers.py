"""The peers a user would pick instead of shardfeed for random-order epochs: h5py, tf.data, and a
torch DataLoader over a memory map (see readers.py for the interface).

Each peer reads its own copy of the records where its users keep one (an HDF5 file, TFRecord
shards), written in ``__init__`` into ``data.peer_dir`` and never timed; the torch reader reads
the shardfeed shard itself, through ``np.memmap``. The peer libraries are imported lazily, so this
module imports with numpy alone and ``unavailable()`` says which library is missing.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional

import numpy as np

from readers import Batches, Reader

COPY_BYTES = 32 << 20  # records copied per step when writing a peer's files


def _missing(module: str, install: str) -> Optional[str]:
    import importlib
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{module} cannot be imported ({install}): {e}"
    return None


def _steps(count: int, record_bytes: int):
    step = max(1, COPY_BYTES // record_bytes)
    for start in range(0, count, step):
        yield start, min(count, start + step)


class H5pyReader(Reader):
    """h5py fancy indexing on one contiguous (unchunked) dataset ``"x"`` of the stored dtype.

    HDF5 wants increasing, distinct indices, so each batch reads ``np.unique(ids)`` and puts the
    rows back in the batch's order, then casts (and normalises) with numpy. HDF5's defaults stay:
    contiguous storage is read through its 64 KiB sieve buffer, as a user's file would be."""

    name = "h5py"

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return _missing("h5py", "pip install h5py")

    def __init__(self, data):
        super().__init__(data)
        import h5py
        self.path = os.path.join(data.peer_dir, f"{self.profile.name}.h5")
        self.file = None
        source = data.open_memmap()
        start = time.perf_counter()
        with h5py.File(self.path, "w") as f:
            dset = f.create_dataset("x", shape=source.shape, dtype=source.dtype)  # contiguous
            for lo, hi in _steps(data.count, self.profile.record_bytes):
                dset[lo:hi] = source[lo:hi]
        self.write_seconds = time.perf_counter() - start
        del source

    def files(self) -> List[str]:
        return [self.path]

    def open(self) -> None:
        import h5py
        self.file = h5py.File(self.path, "r")
        self.dset = self.file["x"]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = self.dset = None

    def read_pass(self, order: np.ndarray) -> Batches:
        for ids in self.batches(order):
            unique, inverse = np.unique(ids, return_inverse=True)
            rows = self.dset[unique]
            yield ids, self.data.normalise(rows[inverse.reshape(-1)].astype(np.float32))


# ---- tf.data ----------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def example_layout(id_bytes: int, record_bytes: int):
    """The serialized ``tf.train.Example`` of features ``"id"`` (int64) and ``"x"`` (bytes of one
    stored record), for ids whose varint takes ``id_bytes`` bytes: ``(template, id_at, x_at)``,
    the bytes with zeros for the id and the record, and where the id's varint and the record start.

    Every length in it depends only on ``id_bytes`` and ``record_bytes``, so a run of samples with
    equally long ids is serialized by filling two column ranges of a 2-D byte array."""
    int64_list = _field(1, b"\0" * id_bytes)                              # Int64List.value, packed
    id_entry = _field(1, b"id") + _field(2, _field(3, int64_list))       # map entry: key, Feature.int64_list
    x_entry = _field(1, _field(1, b"x") + _field(2, _field(1, _field(1, b"\0" * record_bytes))))
    template = _field(1, _field(1, id_entry) + x_entry)                  # Example.features.feature
    # The id's varint ends the "id" entry, which the "x" entry follows; the record ends it all.
    return template, len(template) - len(x_entry) - id_bytes, len(template) - record_bytes


def _id_bytes(value: int) -> int:
    return max(1, (int(value).bit_length() + 6) // 7)


def serialize_examples(ids: np.ndarray, records: np.ndarray) -> np.ndarray:
    """Serialized Examples of ``ids`` (all with varints of one length) and their ``records``: a
    ``(len(ids), length)`` uint8 array, one Example a row."""
    k = _id_bytes(ids[0])
    records = records.reshape(len(ids), -1).view(np.uint8)
    template, id_at, x_at = example_layout(k, records.shape[1])
    rows = np.empty((len(ids), len(template)), np.uint8)
    rows[:, :x_at] = np.frombuffer(template, np.uint8)[:x_at]
    ids = ids.astype(np.uint64)
    for j in range(k):
        rows[:, id_at + j] = ((ids >> np.uint64(7 * j)) & np.uint64(0x7F)) | (0x80 if j < k - 1 else 0)
    rows[:, x_at:] = records
    return rows


class TFDataReader(Reader):
    """A tf.data input pipeline as its guide writes one for shuffled training, over TFRecord files.

    The records are written as ``SHARDS`` TFRecord files (contiguous parts of the dataset in
    storage order; each record a ``tf.train.Example`` with ``"id"`` int64 and ``"x"`` the stored
    record's bytes). A pass::

        files.shuffle(len(files)).interleave(TFRecordDataset, cycle_length=4, AUTOTUNE,
                                              deterministic=False)
             .shuffle(buffer).take(len(order)).batch(batch)
             .map(parse_example + decode_raw + cast (+ x * scale + offset)).prefetch(AUTOTUNE)

    tf.data cannot read a given order: ``order`` sets only how many samples a pass reads
    (``len(order)``, every one distinct), and the order is a *windowed* shuffle, not a uniform
    permutation: a sample leaves the shuffle buffer at most ``buffer`` reads after it entered, and
    the files are read front to back, ``cycle_length`` at a time. The buffer is 10,000 samples,
    capped at ``SHUFFLE_BUFFER_BYTES`` of records (64 MiB: 8,192 samples of 8 KiB, 445 images of
    147 KiB), because the out-of-core regime charges the buffer to a cgroup of a few hundred MiB.
    """

    name = "tf.data"
    follows_order = False
    shuffle = "sequential files, windowed"  # with the window's size once built (__init__)
    exact = True       # Mul then Add in float32, as numpy does (checked by tests/test_bench_peers.py)
    tolerance = 1e-6   # rtol if a TensorFlow build ever fuses them
    SHARDS = 8
    CYCLE_LENGTH = 4
    SHUFFLE_BUFFER = 10_000
    SHUFFLE_BUFFER_BYTES = 64 << 20
    SEED = 20240607

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return _missing("tensorflow", "pip install tensorflow-cpu")

    def __init__(self, data):
        super().__init__(data)
        import tensorflow as tf
        profile, count = self.profile, data.count
        shards = max(1, min(self.SHARDS, count))
        bounds = [count * k // shards for k in range(shards + 1)]
        self.paths = [os.path.join(data.peer_dir, f"{profile.name}-{k:02d}-of-{shards:02d}.tfrecord")
                      for k in range(shards)]
        self.buffer = int(min(self.SHUFFLE_BUFFER,
                              max(profile.batch, self.SHUFFLE_BUFFER_BYTES // profile.record_bytes)))
        self.shuffle = f"sequential files, window of {self.buffer:,}"
        self.passes = 0
        source = data.open_memmap()
        start = time.perf_counter()
        for path, lo, hi in zip(self.paths, bounds, bounds[1:]):
            with tf.io.TFRecordWriter(path) as writer:
                write = writer.write
                for a, b in _steps(hi - lo, profile.record_bytes):
                    a, b = lo + a, lo + b
                    # Split where the id's varint gets longer (at 2**7, 2**14, ...).
                    cuts = [a] + [c for c in (1 << (7 * k) for k in range(1, 10)) if a < c < b] + [b]
                    for c0, c1 in zip(cuts, cuts[1:]):
                        rows = serialize_examples(np.arange(c0, c1), np.ascontiguousarray(source[c0:c1]))
                        length, blob = rows.shape[1], rows.tobytes()
                        for at in range(0, len(blob), length):
                            write(blob[at:at + length])
        self.write_seconds = time.perf_counter() - start
        del source

    def files(self) -> List[str]:
        return list(self.paths)

    def dataset(self, samples: int, seed: int):
        """The pipeline of one pass of ``samples`` samples."""
        import tensorflow as tf
        profile = self.profile
        dtype = tf.uint8 if profile.dtype == "uint8" else tf.float16
        shape = (-1,) + tuple(profile.shape)
        kwargs = profile.kwargs()
        scale = tf.constant(kwargs["scale"], tf.float32) if profile.normalise else None
        offset = tf.constant(kwargs["offset"], tf.float32) if profile.normalise else None
        features = {"id": tf.io.FixedLenFeature([], tf.int64), "x": tf.io.FixedLenFeature([], tf.string)}

        def parse(serialized):
            parsed = tf.io.parse_example(serialized, features)
            x = tf.cast(tf.reshape(tf.io.decode_raw(parsed["x"], dtype), shape), tf.float32)
            if scale is not None:
                x = x * scale + offset
            return parsed["id"], x

        autotune = tf.data.AUTOTUNE
        return (tf.data.Dataset.from_tensor_slices(self.paths)
                .shuffle(len(self.paths), seed=seed)
                .interleave(tf.data.TFRecordDataset, cycle_length=min(self.CYCLE_LENGTH, len(self.paths)),
                            num_parallel_calls=autotune, deterministic=False)
                .shuffle(self.buffer, seed=seed)
                .take(samples)
                .batch(profile.batch)
                .map(parse, num_parallel_calls=autotune)
                .prefetch(autotune))

    def read_pass(self, order: np.ndarray) -> Batches:
        self.passes += 1
        for ids, x in self.dataset(len(order), self.SEED + self.passes):
            yield ids.numpy(), x.numpy()


# ---- torch DataLoader -------------------------------------------------------------------------


class MemmapBatches:
    """A map-style dataset whose items are batches: ``ds[ids]`` is the float32 batch of the
    samples ``ids`` (a list), by numpy.memmap fancy indexing + ``astype`` (+ ``x *= scale;
    x += offset``).

    A DataLoader takes any object with ``__getitem__`` and ``__len__`` as a map-style dataset, so
    this one does not subclass ``torch.utils.data.Dataset`` and this module needs no torch to
    import. Each process opens its own memory map on first use (a forked worker does not reuse its
    parent's), and pickling (spawn and forkserver workers) carries the file's layout, not a map."""

    def __init__(self, memmap: np.memmap, scale: Optional[np.ndarray], offset: Optional[np.ndarray]):
        self.filename, self.offset = memmap.filename, memmap.offset
        self.dtype, self.shape = memmap.dtype, memmap.shape
        self.scale, self.shift = scale, offset
        self._memmap: Optional[np.memmap] = None
        self._pid = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        if self._memmap is None or self._pid != os.getpid():
            self._memmap = np.memmap(self.filename, self.dtype, "r", offset=self.offset, shape=self.shape)
            self._pid = os.getpid()
        x = self._memmap[np.asarray(ids, np.intp)].astype(np.float32)
        if self.scale is not None:
            x *= self.scale
            x += self.shift
        return x

    def close(self) -> None:
        self._memmap = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _memmap=None, _pid=None)


class _Order:
    """A sampler whose order is set before each pass: a persistent DataLoader keeps its sampler."""

    def __init__(self):
        self.order = np.empty(0, np.int64)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class TorchReader(Reader):
    """``torch.utils.data.DataLoader`` with a ``BatchSampler`` over ``order`` and a dataset of
    batches (:class:`MemmapBatches`): one ``__getitem__`` per batch, ``batch_size=None`` (no
    collation), ``num_workers`` worker processes of the default start method (fork on Linux),
    ``prefetch_factor=2``. With workers, ``persistent_workers=True``, as a user running many epochs
    sets it: the workers start when the reader opens, not in every pass. The sampler iterates the
    order array itself, not a list of 8 million ints. Forking workers after TensorFlow has started
    its threads works: they run numpy only."""

    num_workers = 0

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return _missing("torch", "pip install torch")

    def __init__(self, data):
        super().__init__(data)
        self.memmap_batches: Optional[MemmapBatches] = None
        self.loader = None

    def open(self) -> None:
        from torch.utils.data import BatchSampler, DataLoader
        kwargs = self.profile.kwargs()
        memmap = self.data.open_memmap()
        self.memmap_batches = MemmapBatches(memmap, kwargs.get("scale"), kwargs.get("offset"))
        del memmap
        self.order = _Order()
        workers = self.num_workers
        sampler = BatchSampler(self.order, batch_size=self.profile.batch, drop_last=False)
        self.loader = DataLoader(self.memmap_batches, sampler=sampler, batch_size=None, num_workers=workers,
                                 persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
        if workers:
            self.order.order = np.arange(min(len(self.memmap_batches), self.profile.batch), dtype=np.int64)
            for _ in self.loader:  # start the workers now, untimed
                pass

    def close(self) -> None:
        self.loader = None  # the last reference: its persistent workers stop
        if self.memmap_batches is not None:
            self.memmap_batches.close()
        self.memmap_batches = None

    def read_pass(self, order: np.ndarray) -> Batches:
        self.order.order = order
        batches = iter(self.loader)
        try:
            for ids in self.batches(order):
                yield ids, next(batches).numpy()
        finally:
            del batches


class TorchW0Reader(TorchReader):
    name = "torch-w0"
    num_workers = 0


class TorchW2Reader(TorchReader):
    name = "torch-w2"
    num_workers = 2


PEERS = [H5pyReader, TFDataReader, TorchW0Reader, TorchW2Reader]
