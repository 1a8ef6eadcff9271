"""The readers a benchmark pass times: shardfeed, and what users would pick instead.

A reader turns an epoch order into float32 batches of one profile's records. The benchmark
(bench_read.py) builds each reader once per dataset, then for every timed pass: ``close()``,
evict ``files()`` from the page cache when the regime is cold, ``open()``, and iterate
``read_pass(order)`` to the end. Building a reader's own copy of the data (an HDF5 file, TFRecord
shards) happens in ``__init__`` and is never timed.

Every reader yields ``(ids, x)``: ``ids`` the dataset indices of the batch's samples (an array,
or a :class:`LazyIds` that computes them on ``np.asarray``; a timed pass takes only their
``len``), ``x`` a
float32 array ``(len(ids),) + profile.shape`` equal, bit for bit, to ``data.reference(ids)``
(numpy.memmap fancy indexing + ``astype(np.float32)``, then ``x *= scale; x += offset`` for the
normalised images). Most readers follow ``order``; a reader whose pipeline picks its own order
(tf.data's shuffle buffer) sets ``follows_order = False`` and yields ``len(order)`` distinct
samples in its order.

Every reader states the shuffle its passes really give (``shuffle``, in each entry's
``extra_info`` and the tables): ``GLOBAL_SHUFFLE`` for those that read the pass's order, a uniformly
random permutation of the dataset; the others say what they do instead. Comparisons are like for
like: global-shuffle readers against each other and fio's random-read limit, the others against
``shardfeed-block16`` (issue 18's decision, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from regimes import COLD, PAGE_CACHED

Batches = Iterator[Tuple[np.ndarray, np.ndarray]]


GLOBAL_SHUFFLE = "global permutation"


class LazyIds:
    """The dataset indices of a batch whose reader picked them (the torch readers' samplers),
    computed only when asked for (``np.asarray``): a timed pass takes only their number, and
    computing them would time a second computation of the epoch's order (the reader's own is
    inside the read) that no training loop does."""

    __slots__ = ("_sampler", "_epoch", "_batch", "_count")

    def __init__(self, sampler: Any, epoch: int, batch: int, count: int):
        """The first ``count`` indices of ``sampler.batch(epoch, batch)``."""
        self._sampler, self._epoch, self._batch, self._count = sampler, epoch, batch, count

    def __len__(self) -> int:
        return self._count

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        ids = np.asarray(self._sampler.batch(self._epoch, self._batch)[:self._count], dtype)
        if len(ids) != self._count:
            raise ValueError(f"a batch of {self._count} samples has {len(ids)} indices")
        return ids


class Reader:
    name = "?"
    follows_order = True
    shuffle = GLOBAL_SHUFFLE  # what a pass's order is (readers that pick their own order override it)
    skip_regimes: Tuple[str, ...] = ()  # regimes this reader cannot run in (see its docs)
    baseline = False  # the same-run baseline that ratios are computed against (memmap)

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this reader cannot run here (a peer library is not installed), or None."""
        return None

    def __init__(self, data):
        self.data = data
        self.profile = data.profile

    def files(self) -> List[str]:
        """Every file a pass reads: evicted before cold passes, pinned for page-cached ones."""
        return [self.data.record_file]

    def open(self) -> None:
        pass

    def close(self) -> None:
        """Drops every handle and memory map, so that eviction can drop the pages."""

    def batches(self, order: np.ndarray) -> Iterator[np.ndarray]:
        batch = self.profile.batch
        for start in range(0, len(order), batch):
            yield order[start:start + batch]

    def read_pass(self, order: np.ndarray) -> Batches:
        raise NotImplementedError


def same_values(reader, x: np.ndarray, expected: np.ndarray) -> bool:
    if x.shape != expected.shape or x.dtype != np.float32:
        return False
    if getattr(reader, "exact", True):
        return bool(np.array_equal(x.view(np.uint32), expected.view(np.uint32)))
    return bool(np.allclose(x, expected, rtol=reader.tolerance, atol=0))


def check_pass(reader: Reader, data, order: np.ndarray) -> None:
    """One pass over ``order``: every sample once (in ``order`` for readers that follow it), and
    every batch equal to numpy's."""
    seen = []
    for ids, x in reader.read_pass(order):
        ids, x = np.asarray(ids, np.int64), np.asarray(x)
        assert same_values(reader, x, data.reference(ids)), \
            f"{reader.name} differs from numpy.memmap + astype on profile {data.profile.name}"
        seen.append(ids)
    seen = np.concatenate(seen)
    assert len(seen) == len(order) and len(np.unique(seen)) == len(seen), \
        f"{reader.name}: a pass of {len(order)} samples gave {len(seen)} ({len(np.unique(seen))} distinct)"
    if reader.follows_order:
        assert np.array_equal(seen, order), f"{reader.name} did not read in the order given"
    else:
        assert np.isin(seen, np.arange(data.count)).all()


class MemmapReader(Reader):
    """The baseline everyone writes by hand: ``np.memmap`` fancy indexing, then ``astype``."""

    name = "memmap"
    baseline = True

    def open(self) -> None:
        self.memmap = self.data.open_memmap()

    def close(self) -> None:
        self.memmap = None

    def read_pass(self, order: np.ndarray) -> Batches:
        for ids in self.batches(order):
            yield ids, self.data.normalise(self.memmap[ids].astype(np.float32))


class ShardfeedReader(Reader):
    """``ds.read(ids, "x", dtype="float32", out=...)`` into one reused buffer, the way a training
    loop that owns its batch buffer reads."""

    name = "shardfeed"
    reuse_buffer = True
    # shardfeed.open's options: bench_read.py's cold regime opens with preload=False (random reads,
    # compared with fio's random-read limit); bench_first_epoch.py times the default.
    open_options: dict = {}
    # The process-wide read I/O while this reader is open (``_core.set_read_io``), or None: as set.
    read_io: Optional[str] = None

    def open(self) -> None:
        import shardfeed
        from shardfeed import _core
        self.read_io_before = _core.set_read_io(self.read_io) if self.read_io else None
        self.dataset = shardfeed.open(self.data.path, **self.open_options)
        self.buffer = np.empty((self.profile.batch,) + self.profile.shape, np.float32)

    def close(self) -> None:
        if getattr(self, "dataset", None) is not None:
            self.dataset.close()
        self.dataset = None
        if getattr(self, "read_io_before", None) is not None:
            from shardfeed import _core
            _core.set_read_io(self.read_io_before)
            self.read_io_before = None

    def read_pass(self, order: np.ndarray) -> Batches:
        kwargs = self.profile.kwargs()
        for ids in self.batches(order):
            out = {"x": self.buffer[:len(ids)]} if self.reuse_buffer else None
            yield ids, self.dataset.read(ids, "x", dtype="float32", out=out, **kwargs)["x"]


class ShardfeedAllocReader(ShardfeedReader):
    """The same with a new array per batch, as memmap returns (and as a prefetching loader must)."""

    name = "shardfeed-alloc"
    reuse_buffer = False


class ShardfeedUringReader(ShardfeedReader):
    """``shardfeed`` with the records that miss the page cache read through io_uring instead of
    the thread pool of blocking preadv (``_core.set_read_io("auto")``, ``SHARDFEED_READ_IO=auto``).
    From disk only (page-cached reads never wait for the disk, so both paths are the same)."""

    name = "shardfeed-uring"
    skip_regimes = (PAGE_CACHED,)
    read_io = "auto"


class ShardfeedBufferedReader(ShardfeedAllocReader):
    """``shardfeed-alloc`` read through the page cache on the thread pool of blocking preadv
    (``direct_io=False``, ``set_read_io("pool")``): what ``open`` did for every dataset before
    direct reads, against which their CPU time per sample is compared. From disk only."""

    name = "shardfeed-buffered"
    skip_regimes = (PAGE_CACHED,)
    open_options = {"direct_io": False}
    read_io = "pool"


class ShardfeedDirectReader(ShardfeedBufferedReader):
    """``shardfeed-alloc`` with ``direct_io=True``: every record read with O_DIRECT, through
    io_uring (the default read I/O, ``"direct-uring"``), whatever the dataset's size. What
    ``direct_io="auto"`` chooses out of core for records of 4 KiB or more. Out of core only (a
    dataset that fits in RAM is better served by the page cache)."""

    name = "shardfeed-direct"
    skip_regimes = (PAGE_CACHED, COLD)
    open_options = {"direct_io": True}
    read_io = "direct-uring"


class ShardfeedLoaderReader(ShardfeedReader):
    """``ds.batches(...)``: the prefetching generator a ``model.fit`` user iterates, in the given
    order (a new array per batch, read ahead on a background thread)."""

    name = "shardfeed-loader"

    def read_pass(self, order: np.ndarray) -> Batches:
        kwargs = self.profile.kwargs()
        batches = self.dataset.subset(order).batches(self.profile.batch, fields="x", shuffle=False, dtype="float32", **kwargs)
        for ids, batch in zip(self.batches(order), batches):
            yield ids, batch["x"]


def import_error(module: str) -> Optional[str]:
    """Why ``module`` cannot be imported (its ImportError's text, which for shardfeed's front ends
    names the extra to install), or None when it can."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return str(e)
    return None


class ShardfeedSequenceReader(ShardfeedReader):
    """``shardfeed.keras.ShardSequence``: what ``model.fit(seq)`` reads, batch by batch in the given
    order (its ``StepPool`` reads the next batches ahead on a thread). Needs keras."""

    name = "shardfeed-sequence"

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return import_error("shardfeed.keras")

    def read_pass(self, order: np.ndarray) -> Batches:
        from shardfeed.keras import ShardSequence
        sequence = ShardSequence(self.dataset.subset(order), self.profile.batch, fields="x", shuffle=False,
                                 dtype="float32", **self.profile.kwargs())
        for ids, batch in zip(self.batches(order), sequence):
            yield ids, batch["x"]


class ShardfeedBlockReader(ShardfeedReader):
    """``ds.batches(..., shuffle_block=16)``: the loader with a block shuffle, every epoch a uniform
    order of blocks of 16 records adjacent on disk, each block read by one ``preadv``. Like tf.data's
    windowed shuffle it trades shuffle quality for larger disk reads, in another way: any block can
    go anywhere in the epoch, but a batch holds ``batch / 16`` runs of storage neighbours. It picks
    its own order (``order`` sets only the number of samples), a new seed each pass."""

    name = "shardfeed-block16"
    follows_order = False
    SHUFFLE_BLOCK = 16
    shuffle = f"blocks of {SHUFFLE_BLOCK} neighbours"
    passes = 0  # passes read so far: each pass's seed

    def read_pass(self, order: np.ndarray) -> Batches:
        import shardfeed
        self.passes += 1
        batch, left = self.profile.batch, len(order)
        options = dict(shuffle_block=self.SHUFFLE_BLOCK, seed=self.passes)
        sampler = shardfeed.Sampler(self.dataset, batch, **options)
        batches = self.dataset.batches(batch, fields="x", dtype="float32", epochs=1, **options,
                                       **self.profile.kwargs())
        try:
            for step, read in enumerate(batches):
                take = min(left, batch)
                yield sampler.indices(step)[:take], read["x"][:take]
                left -= take
                if left == 0:
                    break
        finally:
            batches.close()  # stops its prefetch thread before the next pass evicts the files


class ShardfeedTorchReader(ShardfeedReader):
    """``torch.utils.data.DataLoader`` over ``shardfeed.torch.ShardDataset`` with a
    ``ShardSampler`` as its batch sampler and the pass-through collate, as a PyTorch user writes
    it: one ``__getitems__`` (one native read) per batch, ``num_workers`` worker processes of the
    default start method (persistent, started untimed when the reader opens, as the torch peer's).
    The sampler picks the order (epoch = pass number), so ``order`` sets only the number of samples."""

    name = "shardfeed-torch-w0"
    follows_order = False
    shuffle = "global permutation, its own"  # the ShardSampler's epoch order, not the pass's
    num_workers = 0
    BATCH_SEED = 0

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return import_error("shardfeed.torch")

    def open(self) -> None:
        import shardfeed
        from shardfeed.torch import ShardDataset, ShardSampler, collate
        from torch.utils.data import DataLoader
        super().open()
        items = ShardDataset(self.dataset, "x", dtype="float32", **self.profile.kwargs())
        self.sampler = ShardSampler(items, self.profile.batch, seed=self.BATCH_SEED)
        self.order = shardfeed.Sampler(self.dataset, self.profile.batch, seed=self.BATCH_SEED)
        workers = self.num_workers
        self.loader = DataLoader(items, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
                                 persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
        self.passes = 0
        if workers:
            for _ in zip(range(1), self.loader):  # start the workers now, untimed
                pass

    def close(self) -> None:
        self.loader = None  # the last reference: its persistent workers stop
        super().close()

    def read_pass(self, order: np.ndarray) -> Batches:
        self.passes += 1
        self.sampler.set_epoch(self.passes)
        left = len(order)
        batches = iter(self.loader)
        try:
            # As little per batch as the other readers' loops: a batch's Python work runs with the
            # caches cold from the read, at several times its cost in a loop of its own.
            for b, (x,) in enumerate(batches):
                size = x.shape[0]
                take = size if size <= left else left
                array = x.numpy()
                yield LazyIds(self.order, self.passes, b, take), array if take == size else array[:take]
                left -= take
                if left == 0:
                    break
        finally:
            del batches


class ShardfeedTorchW2Reader(ShardfeedTorchReader):
    """Two worker processes. Run out-of-core too since each worker reads its batches into shared
    memory, at most 32 MiB of reused slots per worker (none for 38 MiB batches) (no batch-memory cache of its own): with
    147 KiB images (38 MiB float32 batches) two workers used to hold more than the regime's
    256 MiB memory cgroup and one got killed, with the cache and again with 4 slots per worker."""

    name = "shardfeed-torch-w2"
    num_workers = 2


class ShardfeedTorchThreadReader(ShardfeedTorchReader):
    """``shardfeed.torch.ShardLoader``: tensors read ahead on one thread, no worker processes."""

    name = "shardfeed-torch-thread"

    def open(self) -> None:
        import shardfeed
        from shardfeed.torch import ShardLoader
        ShardfeedReader.open(self)
        self.loader = ShardLoader(self.dataset, self.profile.batch, "x", dtype="float32", seed=self.BATCH_SEED,
                                  **self.profile.kwargs())
        self.sampler = self.loader
        self.order = shardfeed.Sampler(self.dataset, self.profile.batch, seed=self.BATCH_SEED)
        self.passes = 0

    def read_pass(self, order: np.ndarray) -> Batches:
        batches = super().read_pass(order)
        try:
            yield from batches
        finally:
            batches.close()  # stops the prefetch thread before the next pass evicts the files


class CopyCeilingReader(Reader):
    """The page-cached ceiling: the same records copied with one memcpy each from a memory map
    (``np.take``), then cast (and normalised) by shardfeed's conversion kernel into a reused
    buffer, a few hundred KiB at a time so the copy is still in cache when it is cast: with
    non-temporal stores where shardfeed's reads of the batch use them (``_core.output_streamed``:
    16 MiB of output or more), as they do. Batches of more than 1 MiB are split over one thread
    per CPU (both calls release the GIL); smaller ones run on the calling thread, where handing
    them to threads would cost more than it saves."""

    name = "memcpy-ceiling"
    CHUNK_BYTES = 256 << 10
    THREADED_BATCH_BYTES = 1 << 20

    def open(self) -> None:
        from concurrent.futures import ThreadPoolExecutor
        self.memmap = self.data.open_memmap()
        shape = (self.profile.batch,) + self.profile.shape
        self.stored = np.empty(shape, self.profile.dtype)
        self.buffer = np.empty(shape, np.float32)
        self.chunk = max(1, self.CHUNK_BYTES // self.profile.record_bytes)
        self.workers = len(os.sched_getaffinity(0))
        threaded = self.profile.batch * self.profile.record_bytes > self.THREADED_BATCH_BYTES
        self.pool = ThreadPoolExecutor(self.workers) if threaded and self.workers > 1 else None

    def close(self) -> None:
        self.memmap = None
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown()
        self.pool = None

    def _copy_cast(self, ids: np.ndarray, lo: int, hi: int, stream: bool) -> None:
        for start in range(lo, hi, self.chunk):
            stop = min(hi, start + self.chunk)
            np.take(self.memmap, ids[start:stop], axis=0, out=self.stored[start:stop])
            self.data.convert(self.stored[start:stop], self.buffer[start:stop], stream)

    def read_pass(self, order: np.ndarray) -> Batches:
        for ids in self.batches(order):
            n = len(ids)
            stream = self.data.output_streamed(n)
            if self.pool is None:
                self._copy_cast(ids, 0, n, stream)
            else:
                bounds = np.linspace(0, n, self.workers + 1).astype(int)
                for done in [self.pool.submit(self._copy_cast, ids, lo, hi, stream)
                             for lo, hi in zip(bounds, bounds[1:])]:
                    done.result()
            yield ids, self.buffer[:n]


# The loaders of issue 18's item 3 (what training iterates), each pass of which bench_read.py
# pairs with a pass of ``shardfeed-alloc`` (``ds.read`` into new arrays) run just before it.
LOADERS = ("shardfeed-loader", "shardfeed-sequence", "shardfeed-torch-thread")
LOADERS_BASELINE = "shardfeed-alloc"

READERS = [MemmapReader, ShardfeedReader, ShardfeedAllocReader, ShardfeedUringReader, ShardfeedBufferedReader,
           ShardfeedDirectReader, ShardfeedLoaderReader, ShardfeedSequenceReader,
           ShardfeedBlockReader,
           ShardfeedTorchReader, ShardfeedTorchW2Reader, ShardfeedTorchThreadReader, CopyCeilingReader]
