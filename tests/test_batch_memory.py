"""Output arrays of at least ``BATCH_MEMORY_MIN_BYTES`` live in reusable memory
(``_core.BatchMemory``): once numpy frees such an array, the next read of the same size takes
its pages back instead of mapping (and page-faulting) fresh ones. Memory that an array, a view or
a buffer still references is never handed out again; reused memory holds the previous batch, so
every byte of a new batch (padding included) must be written; the cache is bounded."""

import gc
import pickle
import threading

import numpy as np
import pytest

import shardfeed
from shardfeed import _core
from shardfeed.batch_reader import BATCH_MEMORY_MIN_BYTES

N = 600
BATCH = 96  # 96 samples of 16 KiB (float16 [64, 64] read as float32): 1.5 MiB
LENGTHS = np.random.default_rng(2).integers(0, 300, N)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(5)
    columns = {
        "x": rng.standard_normal((N, 64, 64)).astype(np.float16),
        "label": np.arange(N, dtype=np.int64),
        "tokens": [rng.integers(1, 1000, k).astype(np.int32) for k in LENGTHS],
    }
    path = str(tmp_path_factory.mktemp("batch_memory") / "ds")
    fields = {"x": ("float16", (64, 64)), "label": ("int64", ()), "tokens": ("int32", (None, 4))}
    columns["tokens"] = [np.repeat(t[:, None], 4, axis=1) for t in columns["tokens"]]
    with shardfeed.Writer(path, fields=fields, shard_size=1 << 20) as w:
        w.extend(columns)
    with shardfeed.open(path) as ds:
        yield ds, columns


@pytest.fixture(autouse=True)
def empty_cache():
    gc.collect()
    _core.free_batch_memory()
    yield
    _core.free_batch_memory()


def expected_x(columns, indices):
    return columns["x"][indices].astype(np.float32)


def test_a_freed_batch_is_read_again_into_the_same_memory(data):
    ds, columns = data
    rng = np.random.default_rng(0)
    first = rng.permutation(N)[:BATCH]
    x = ds.read(first, "x", dtype="float32")["x"]
    assert x.nbytes >= BATCH_MEMORY_MIN_BYTES
    np.testing.assert_array_equal(x, expected_x(columns, first))
    address = x.ctypes.data
    del x
    assert len(_core.cached_batch_memory()) == 1
    for _ in range(5):
        indices = rng.permutation(N)[:BATCH]
        x = ds.read(indices, "x", dtype="float32")["x"]
        assert x.ctypes.data == address
        np.testing.assert_array_equal(x, expected_x(columns, indices))
        del x


@pytest.mark.parametrize("holder", ["view", "element view", "memoryview", "batch", "copy of dict"])
def test_memory_still_referenced_is_never_reused(data, holder):
    ds, columns = data
    rng = np.random.default_rng(1)
    indices = rng.permutation(N)[:BATCH]
    batch = ds.read(indices, "x", dtype="float32")
    x = batch["x"]
    address = x.ctypes.data
    kept = {"view": lambda: x[10:20], "element view": lambda: x[7, 3], "memoryview": lambda: memoryview(x),
            "batch": lambda: batch, "copy of dict": lambda: dict(batch)}[holder]()
    del x, batch
    for _ in range(4):
        other = ds.read(rng.permutation(N)[:BATCH], "x", dtype="float32")["x"]
        assert other.ctypes.data != address
        other.fill(np.nan)  # whatever reused memory held, it was not the kept batch
        del other
    whole = np.frombuffer(kept, np.float32).reshape(BATCH, 64, 64) if holder == "memoryview" else None
    got = {"view": lambda: kept, "element view": lambda: kept, "memoryview": lambda: whole,
           "batch": lambda: kept["x"], "copy of dict": lambda: kept["x"]}[holder]()
    want = expected_x(columns, indices)
    want = {"view": want[10:20], "element view": want[7, 3]}.get(holder, want)
    np.testing.assert_array_equal(got, want)


def test_padding_is_written_into_reused_memory(data):
    """Reused memory holds the previous batch: padding (even pad_value 0, which fresh pages of
    zeros would hide) and short rows must be written again."""
    ds, columns = data
    rng = np.random.default_rng(2)
    for _ in range(6):
        indices = rng.permutation(N)[:BATCH * 3]
        batch = ds.read(indices, "tokens", maxlen=300)
        tokens = batch["tokens"]
        assert tokens.nbytes >= BATCH_MEMORY_MIN_BYTES
        want = np.zeros((len(indices), 300, 4), np.int32)
        for row, i in enumerate(indices):
            want[row, :LENGTHS[i]] = columns["tokens"][i]
        np.testing.assert_array_equal(tokens, want)
        np.testing.assert_array_equal(batch.lengths["tokens"], LENGTHS[indices])
        tokens.fill(-7)  # the next batch reuses these pages
        del batch, tokens


def test_arrays_are_ordinary_arrays(data):
    ds, columns = data
    indices = np.arange(BATCH)[::-1]
    x = ds.read(indices, "x", dtype="float32")["x"]
    assert x.shape == (BATCH, 64, 64) and x.dtype == np.float32
    assert x.flags.c_contiguous and x.flags.writeable and x.flags.aligned
    assert x.ctypes.data % 4096 == 0
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(x)), expected_x(columns, indices))
    x += 1  # writable in place
    np.testing.assert_array_equal(x, expected_x(columns, indices) + 1)
    out = np.empty_like(x)
    assert ds.read(indices, "x", dtype="float32", out={"x": out})["x"] is out
    np.testing.assert_array_equal(out, expected_x(columns, indices))


def test_small_batches_are_plain_numpy_arrays(data):
    ds, columns = data
    x = ds.read(np.arange(8), "x", dtype="float32")["x"]
    assert x.nbytes < BATCH_MEMORY_MIN_BYTES and x.flags.owndata
    labels = ds.read(np.arange(BATCH), "label")["label"]
    assert labels.flags.owndata
    np.testing.assert_array_equal(labels, np.arange(BATCH))
    del x, labels
    assert _core.cached_batch_memory() == []


def test_the_cache_is_bounded():
    slots, cap = _core.BATCH_MEMORY_CACHE["blocks"], _core.BATCH_MEMORY_CACHE["bytes"]
    page = 4096
    blocks = [_core.BatchMemory((k + 1) * page) for k in range(slots + 3)]
    while blocks:  # freed in order: the first three are unmapped to keep `slots`
        del blocks[0]
    assert _core.cached_batch_memory() == [(k + 1) * page for k in range(3, slots + 3)]
    big = _core.BatchMemory(cap // 2 + page)
    bigger = _core.BatchMemory(cap // 2)
    del big, bigger  # together over the cap: the older big block and the small ones go
    assert _core.cached_batch_memory() == [cap // 2]
    too_big = _core.BatchMemory(cap + 1)
    del too_big
    assert _core.cached_batch_memory() == [cap // 2]
    assert sum(_core.cached_batch_memory()) <= cap
    reused = _core.BatchMemory(cap // 2 - 100)  # the same page count: the cached block
    assert _core.cached_batch_memory() == []
    del reused


def test_concurrent_readers_never_share_memory(data):
    """Threads reading and dropping batches of one size at once: each batch equals numpy's after
    the others' reads (no two live arrays were given the same block)."""
    ds, columns = data
    failures = []

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(30):
            indices = rng.permutation(N)[:BATCH]
            x = ds.read(indices, "x", dtype="float32", threads=2)["x"]
            before = x.copy()
            x2 = ds.read(rng.permutation(N)[:BATCH], "x", dtype="float32", threads=2)["x"]
            if x2.ctypes.data == x.ctypes.data or not np.array_equal(x, before) \
                    or not np.array_equal(x, expected_x(columns, indices)):
                failures.append(seed)
            del x, x2

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_free_batch_memory_returns_the_cached_blocks(data):
    ds, _ = data
    x = ds.read(np.arange(BATCH), "x", dtype="float32")["x"]
    nbytes = x.nbytes
    del x
    assert sum(_core.cached_batch_memory()) >= nbytes
    assert shardfeed.free_batch_memory() >= nbytes
    assert _core.cached_batch_memory() == [] and shardfeed.free_batch_memory() == 0


def test_a_failed_mapping_raises_memory_error():
    with pytest.raises(MemoryError, match="could not map"):
        _core.BatchMemory(1 << 62)
