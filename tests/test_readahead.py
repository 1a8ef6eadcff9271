"""Reading ahead from disk: ``Batch.uncached`` (records a read did not find in the page cache),
``Dataset.readahead`` (posix_fadvise WILLNEED), and the loader's rule of reading the next read's records
ahead while reads miss the page cache, never while they hit it."""

import os
import sys
import time

import numpy as np
import pytest

import shardfeed
import shardfeed.loader
from shardfeed.dataset import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import regimes  # noqa: E402

N = 2048
RECORD = 4096  # one page per record: eviction and readahead are exact per record

needs_fadvise = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise to evict files")
# SHARDFEED_READ_IO=uring: reads without a map skip their page-cache pass (every record through
# io_uring), so batch.uncached counts every record; the page-cache pass is what these tests count.
pytestmark = pytest.mark.skipif(shardfeed._core.read_io() == "uring",
                                reason="SHARDFEED_READ_IO=uring: no page-cache pass to count")


def files(path):
    return [os.path.join(path, name) for name in os.listdir(path)]


def evict(path):
    """Drops the dataset's files from the page cache (written back first)."""
    regimes.evict(files(path))


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("readahead") / "ds")
    values = np.arange(N * RECORD, dtype=np.int64).reshape(N, RECORD).astype(np.uint8)
    with shardfeed.Writer(path, fields={"x": ("uint8", (RECORD,))}) as writer:
        writer.extend({"x": values})
    return path, values


def evictable(path):
    """Whether eviction works on this file system (not on tmpfs, say), asked of mincore, not of
    the reader under test."""
    evict(path)
    return regimes.resident_fraction(files(path)) < 0.5


@needs_fadvise
@pytest.mark.parametrize("mmap", [False, True], ids=["preadv", "map"])
def test_uncached_counts_the_records_that_missed_the_page_cache(pages, mmap):
    path, values = pages
    if not evictable(path):
        pytest.skip("files here cannot be evicted from the page cache")
    ids = np.random.default_rng(1).permutation(N)[:300]
    evict(path)
    with shardfeed.open(path, mmap=mmap, preload=False) as ds:
        cold = ds.read(ids)
        warm = ds.read(ids)
        warm_one_thread = ds.read(ids, threads=1)
    np.testing.assert_array_equal(cold["x"], values[ids])
    np.testing.assert_array_equal(warm["x"], values[ids])
    assert 0 < cold.uncached <= len(ids)
    assert warm.uncached == 0 and warm_one_thread.uncached == 0


@needs_fadvise
def test_readahead_brings_the_records_into_the_page_cache(pages):
    path, values = pages
    if not evictable(path):
        pytest.skip("files here cannot be evicted from the page cache")
    ids = np.random.default_rng(2).permutation(N)[:200]
    others = np.setdiff1d(np.arange(N), ids)[:200]
    evict(path)
    with shardfeed.open(path, mmap=False, preload=False) as ds:
        assert ds.readahead(ids) is None
        deadline = time.monotonic() + 10
        while True:  # the disk reads were started, not awaited: give them time to land
            time.sleep(0.2)
            batch = ds.read(ids[-20:], threads=1)
            if batch.uncached == 0 or time.monotonic() > deadline:
                break
        batch = ds.read(ids, threads=1)
        # WILLNEED is advice: the kernel gives up on readahead pages it cannot allocate at once (the
        # sanitizer CI run, under memory pressure, lost 2 of 200), and a page still being read counts
        # as a miss. Nearly all must have landed, against most of the records never advised.
        assert batch.uncached <= len(ids) // 10, "records read ahead were not in the page cache"
        np.testing.assert_array_equal(batch["x"], values[ids])
        assert ds.read(others, threads=1).uncached >= len(others) // 2  # only what was asked for
        ds.readahead(np.array([], np.int64))
        ds.readahead([-1, 0, 5, 6, 7])  # negative indices count from the end, as in read
        with pytest.raises(IndexError, match=f"index {N}"):
            ds.readahead([0, N])
        with pytest.raises(TypeError, match="integers"):
            ds.readahead(np.array([0.5]))
    with pytest.raises(ValueError, match="closed"):
        ds.readahead([0])


@pytest.mark.parametrize("grouped", [True, False])
def test_the_loader_reads_ahead_exactly_while_reads_miss_the_cache(pages, monkeypatch, grouped):
    """A stand-in read reports a scripted number of uncached records per read: the loader reads
    the records of read r + 1 ahead before read r exactly when one of the READAHEAD_BATCHES reads
    before r missed the cache, and the batches are the sampler's whatever it does. A read is the
    steps of one group (small batches are read several at a time, BatchPlan.group), or one step
    (large batches: as if GROUP_BYTES were one byte)."""
    path, values = pages
    if not grouped:
        monkeypatch.setattr(shardfeed.loader, "GROUP_BYTES", 1)
    misses = {1: 5, 2: 1, 14: 2}  # read -> uncached records
    read, calls = Dataset.read, []
    reads = []  # the indices of every read

    def scripted_read(self, indices, *args, **kwargs):
        batch = read(self, indices, *args, **kwargs)
        if len(indices) == 0:  # the plan's check of the read options
            return batch
        batch.uncached = misses.get(len(reads), 0)
        reads.append(np.array(indices))
        return batch

    def recording_readahead(self, indices):
        calls.append((len(reads), np.array(indices)))

    monkeypatch.setattr(Dataset, "read", scripted_read)
    monkeypatch.setattr(Dataset, "readahead", recording_readahead)
    batch_size = 32
    with shardfeed.open(path) as ds:
        group = shardfeed.loader.BatchPlan(ds, batch_size, inputs="x", dtype=None).group
        assert (group > 1) == grouped and (N // batch_size) % group == 0
        sampler = shardfeed.Sampler(ds, batch_size, seed=3)
        # prefetch=0: the reads in order on one thread (with a prefetch thread, the consumer reads
        # a group itself while it waits, so the reads' order is not the steps')
        for step, (x,) in enumerate(ds.batches(batch_size, inputs="x", seed=3, epochs=1, dtype=None, prefetch=0)):
            np.testing.assert_array_equal(x, values[sampler.indices(step)])

    def steps_of_read(r):
        return np.concatenate([sampler.indices(s) for s in range(r * group, (r + 1) * group)])
    count = N // batch_size // group
    assert len(reads) == count
    for r, indices in enumerate(reads):
        np.testing.assert_array_equal(indices, steps_of_read(r))
    window = shardfeed.loader.READAHEAD_BATCHES
    expected = [r for r in range(count) if any(0 < r - m <= window for m in misses)]
    assert [r for r, _ in calls] == expected
    for r, indices in calls:  # before read r, the records of read r + 1
        np.testing.assert_array_equal(indices, steps_of_read(r + 1))


@needs_fadvise
def test_a_cold_epoch_reads_ahead_and_a_cached_one_does_not(pages, monkeypatch):
    path, values = pages
    if not evictable(path):
        pytest.skip("files here cannot be evicted from the page cache")
    readahead, calls = Dataset.readahead, []

    def counting(self, indices):
        calls.append(len(indices))
        return readahead(self, indices)

    monkeypatch.setattr(Dataset, "readahead", counting)
    with shardfeed.open(path, mmap=False, preload=False) as ds:
        evict(path)
        group = shardfeed.loader.BatchPlan(ds, 64, inputs="x", dtype=None).group
        cold = [x.copy() for (x,) in ds.batches(64, inputs="x", seed=4, epochs=1, dtype=None)]
        assert calls and calls[0] == 64 * group  # the first read missed the cache: the next ones are read ahead
        calls.clear()
        ds.read(np.arange(N))  # the whole file in the page cache
        warm = [x.copy() for (x,) in ds.batches(64, inputs="x", seed=4, epochs=1, dtype=None)]
    assert calls == []
    sampler = shardfeed.Sampler(ds, 64, seed=4)
    for step, (a, b) in enumerate(zip(cold, warm)):
        np.testing.assert_array_equal(a, values[sampler.indices(step)])
        np.testing.assert_array_equal(b, a)
