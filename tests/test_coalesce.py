"""Reads of records that are adjacent on disk: consecutive items of a batch that are records k, k+1,
k+2, ... of one shard are fetched with one preadv (ext/records.c, collect_run/read_run). Results are
checked bit for bit against numpy for every kind of run, on both read paths, page-cached and with
the shards evicted from the page cache (so the blocking pass reads them); a count of the process's
read system calls shows that the coalescing happens."""

import os

import numpy as np
import pytest

import shardfeed
from shardfeed.format import HEADER_BYTES

# 5 fields, 64-byte records: a(10) b(12) c(14) d(8) e(16) bytes, in this order in the record.
FIELDS = {"a": ("float16", (5,)), "b": ("uint8", (3, 4)), "c": ("bfloat16", (7,)), "d": ("int64", ()),
          "e": ("float64", (2,))}
RECORD = 64
N = 700
PER_SHARD = 97  # several shards, sizes not dividing the batches


def evict(path):
    """Drops the dataset's files from the page cache (they are written back first)."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def as_float32(values):
    with np.errstate(over="ignore", invalid="ignore"):  # float64 -> float32 overflows to inf
        return np.asarray(values).astype(np.float32)


def expected(columns, name, indices, scale=None, offset=None):
    """numpy's float32 answer: the stored values at indices, then x * scale + offset with
    separately rounded float32 operations."""
    values = as_float32(np.asarray(columns[name])[indices])
    with np.errstate(over="ignore", invalid="ignore"):
        if scale is not None:
            values = (values * np.float32(scale)).astype(np.float32)
        if offset is not None:
            values = (values + np.float32(offset)).astype(np.float32)
    return values


@pytest.fixture
def data(tools, rng, new_path):
    columns = {name: tools.random_values(rng, dtype, (N,) + shape) for name, (dtype, shape) in FIELDS.items()}
    path = tools.write_dataset(new_path(), FIELDS, columns, shard_size=HEADER_BYTES + PER_SHARD * RECORD)
    assert len(os.listdir(path)) == 2 * (N // PER_SHARD + 1) + 1  # shards, their checksums and the manifest
    return path, columns


def index_pattern(kind, rng):
    if kind == "sequential":
        return np.arange(N)
    if kind == "across-shards":  # runs that start mid-shard and cross several shard boundaries
        return np.arange(PER_SHARD - 5, 4 * PER_SHARD + 3)
    if kind == "runs-and-random":
        pieces = []
        while sum(len(p) for p in pieces) < 2 * N:
            start = int(rng.integers(0, N))
            pieces.append(np.arange(start, min(N, start + int(rng.integers(1, 60)))))
            pieces.append(rng.integers(0, N, int(rng.integers(0, 4))))
        return np.concatenate(pieces)
    if kind == "duplicates":  # 5, 5, 6, 6, 7, 7, ...: each record twice in a row
        return np.repeat(np.arange(100, 400), 2)
    if kind == "descending":
        return np.arange(N)[::-1]
    if kind == "interleaved":  # two runs in alternation: neighbours in the batch are never adjacent
        return np.stack([np.arange(0, 300), np.arange(350, 650)], axis=1).reshape(-1)
    if kind == "block-shuffle":  # blocks of 64 in random order, the last one short
        return shardfeed.order.BlockPermutation(N, 64, (1, 2)).apply(np.arange(N))
    raise AssertionError(kind)


PATTERNS = ["sequential", "across-shards", "runs-and-random", "duplicates", "descending", "interleaved",
            "block-shuffle"]


@pytest.mark.parametrize("cold", [False, True], ids=["cached", "evicted"])
@pytest.mark.parametrize("threads", [1, 7])
@pytest.mark.parametrize("kind", PATTERNS)
def test_runs_read_exactly_what_numpy_gives(tools, rng, data, mmap_mode, threads, cold, kind):
    path, columns = data
    indices = index_pattern(kind, rng)
    if cold:
        evict(path)
    with shardfeed.open(path, mmap=mmap_mode, threads=threads, preload=False) as ds:  # the disk path
        stored = ds.read(indices)
        for name in FIELDS:
            tools.assert_identical(stored[name], tools.expected_natural(FIELDS[name][0], columns[name][indices]),
                                   f"{kind} {name} stored")
        if cold:
            evict(path)
        converted = ds.read(indices, dtype="float32", scale={"b": 1 / 255}, offset={"b": -0.5}, lossy=True)
        for name in FIELDS:
            scale, offset = (1 / 255, -0.5) if name == "b" else (None, None)
            tools.assert_identical(converted[name], expected(columns, name, indices, scale, offset),
                                   f"{kind} {name} float32")


@pytest.mark.parametrize("names", [["a"], ["e"], ["b", "d"], ["a", "c", "e"], ["c", "b"], ["d", "a", "e"]])
@pytest.mark.parametrize("cold", [False, True], ids=["cached", "evicted"])
def test_field_subsets_leave_gaps_inside_and_between_records(tools, rng, data, mmap_mode, names, cold):
    path, columns = data
    indices = np.concatenate([np.arange(10, 400), rng.integers(0, N, 50), np.arange(600, N)])
    if cold:
        evict(path)
    with shardfeed.open(path, mmap=mmap_mode, threads=3, preload=False) as ds:
        batch = ds.read(indices, fields=names, dtype={name: "float32" for name in names[::2]}, lossy=True)
    assert list(batch) == names
    for position, name in enumerate(names):
        want = (expected(columns, name, indices) if position % 2 == 0
                else tools.expected_natural(FIELDS[name][0], columns[name][indices]))
        tools.assert_identical(batch[name], want, name)


@pytest.mark.parametrize("cold", [False, True], ids=["cached", "evicted"])
@pytest.mark.parametrize("threads", [1, 4])
def test_batches_of_more_records_than_iov_max(tools, rng, new_path, mmap_mode, threads, cold):
    """3000 sequential records of 2 fields with a gap (4 iovecs each): runs end at IOV_MAX iovecs."""
    n = 3000
    fields = {"x": ("uint8", (6,)), "skip": ("int16", ()), "y": ("float16", (3,))}
    columns = {name: tools.random_values(rng, dtype, (n,) + shape) for name, (dtype, shape) in fields.items()}
    path = tools.write_dataset(new_path(), fields, columns)
    if cold:
        evict(path)
    with shardfeed.open(path, mmap=mmap_mode, threads=threads, preload=False) as ds:  # the disk path
        batch = ds.read(np.arange(n), fields=["x", "y"], dtype={"y": "float32"})
        tools.assert_identical(batch["x"], columns["x"])
        tools.assert_identical(batch["y"], as_float32(columns["y"]))
        tail = np.arange(n - 2500, n)
        tools.assert_identical(ds.read(tail, fields="y")["y"], columns["y"][tail])


@pytest.mark.parametrize("per_record", [300_000, 1_200_000], ids=["3-per-run", "past-the-cap"])
@pytest.mark.parametrize("cold", [False, True], ids=["cached", "evicted"])
def test_records_near_and_past_the_byte_cap(tools, rng, new_path, per_record, cold):
    """float16 records of 600 KB (runs of one: past the 1 MiB cap) and 150 KB (three per run)."""
    n = 7
    fields = {"x": ("float16", (per_record // 2,)), "y": ("float64", ())}
    columns = {name: tools.random_values(rng, dtype, (n,) + shape) for name, (dtype, shape) in fields.items()}
    path = tools.write_dataset(new_path(), fields, columns, shard_size=64 << 20)
    indices = np.array([0, 1, 2, 3, 4, 5, 6, 2, 3, 3, 4])
    if cold:
        evict(path)
    with shardfeed.open(path, mmap=False, threads=2) as ds:
        batch = ds.read(indices, dtype="float32", lossy=True)
    tools.assert_identical(batch["x"], as_float32(columns["x"][indices]))
    tools.assert_identical(batch["y"], as_float32(columns["y"][indices]))


@pytest.mark.parametrize("cold", [False, True], ids=["cached", "evicted"])
def test_large_batches_convert_runs_from_scratch(tools, rng, new_path, mmap_mode, cold):
    """A batch of more than 16 MiB of float32 output converts with streaming stores from a scratch
    buffer that holds a whole run."""
    n = 2200
    fields = {"h": ("float16", (2048,)), "u": ("uint8", (100,)), "f": ("float64", (3,))}
    columns = {name: tools.random_values(rng, dtype, (n,) + shape) for name, (dtype, shape) in fields.items()}
    path = tools.write_dataset(new_path(), fields, columns, shard_size=4 << 20)
    indices = np.concatenate([np.arange(n), np.arange(300, 900)])
    if cold:
        evict(path)
    with shardfeed.open(path, mmap=mmap_mode, threads=3, preload=False) as ds:
        batch = ds.read(indices, dtype="float32", scale={"u": 0.5}, offset={"u": 1.0}, lossy=True)
    tools.assert_identical(batch["h"], as_float32(columns["h"][indices]))
    tools.assert_identical(batch["u"], expected(columns, "u", indices, 0.5, 1.0))
    tools.assert_identical(batch["f"], as_float32(columns["f"][indices]))


def test_reads_into_out_buffers_and_block_shuffled_batches(tools, data, mmap_mode):
    path, columns = data
    with shardfeed.open(path, mmap=mmap_mode, threads=2) as ds:
        sampler = shardfeed.Sampler(ds, 100, seed=3, shuffle_block=16)
        out = {"a": np.empty((100, 5), np.float32), "d": np.empty(100, np.int64)}
        for step in range(len(sampler)):
            indices = sampler.indices(step)
            rows = len(indices)
            got = ds.read(indices, fields=["d", "a"], dtype={"a": "float32"},
                          out={"a": out["a"][:rows], "d": out["d"][:rows]})
            tools.assert_identical(got["a"], as_float32(columns["a"][indices]))
            tools.assert_identical(got["d"], columns["d"][indices])


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, cut, failed, at", [
    (None, 3 * 24 + 5, 23, 3 * 24),         # record 23 is cut in the middle: records 20-22 are whole
    ("y", 3 * 24 + 20, 23, 3 * 24 + 16),     # record 23's y (bytes 16-24) is cut
    ("y", 3 * 24 + 12, 23, 3 * 24 + 16),     # cut before record 23's y: the skip before it is short
    ("x", 0, 20, 0),                         # nothing of the run is there
])
def test_a_short_read_in_a_run_names_the_first_record_not_read(tools, rng, new_path, fields, cut, failed, at):
    columns = {"x": tools.random_values(rng, "float16", (50, 2, 3)), "y": np.arange(50, dtype=np.int64)}
    path = tools.write_dataset(new_path(), {"x": ("float16", (2, 3)), "y": "int64"}, columns,
                               shard_size=HEADER_BYTES + 10 * 24)
    shard = os.path.join(path, "shard-000002.rec")
    with shardfeed.open(path, mmap=False, threads=1) as ds:
        os.truncate(shard, HEADER_BYTES + cut)
        np.testing.assert_array_equal(ds.read(np.arange(20, failed), fields="y")["y"], np.arange(20, failed))
        with pytest.raises(shardfeed.ShardReadError) as info:
            ds.read(np.arange(10, 40), fields=fields)
    assert info.value.filename == shard
    assert f"sample {failed} at byte offset {HEADER_BYTES + at}" in str(info.value)
    assert "truncated" in str(info.value)


# ---- the coalescing itself --------------------------------------------------------------------------


def read_syscalls():
    """Read-type system calls of this process so far (/proc/self/io syscr: read, pread, preadv...)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("syscr:"):
                return int(line.split()[1])
    raise AssertionError("no syscr line in /proc/self/io")


needs_proc_io = pytest.mark.skipif(not os.path.exists("/proc/self/io"),
                                   reason="no /proc/self/io to count read system calls")


@pytest.fixture
def sequential_512(new_path):
    n = 4096
    path = new_path()
    with shardfeed.Writer(path, fields={"x": ("uint8", (512,))}) as w:
        w.extend({"x": np.arange(n * 512, dtype=np.int64).reshape(n, 512).astype(np.uint8)})
    return path, n


def count_reads(path, indices, cold, **read_options):
    """Read system calls of one read on the thread pool of preadv (io_uring reads are not read
    calls: tests/test_uring.py counts its runs)."""
    if cold:
        evict(path)
    read_io = shardfeed._core.set_read_io("pool")
    try:
        with shardfeed.open(path, mmap=False, threads=1) as ds:
            ds.read(indices[:1])  # the first read of a dataset pays for anything lazily set up
            if cold:
                evict(path)
            before = read_syscalls()
            batch = ds.read(indices, **read_options)
            done = read_syscalls() - before
    finally:
        shardfeed._core.set_read_io(read_io)
    return batch, done


@needs_proc_io
@pytest.mark.parametrize("cold", [False, True], ids=["cached", "evicted"])
def test_sequential_records_take_far_fewer_read_calls(sequential_512, rng, cold):
    """4096 sequential 512-byte records: at most 1 MiB per preadv, so 2 MiB in a handful of calls
    (twice that when evicted: the page-cache pass tries each run once without waiting); 4096 random
    ones take one call each (twice when evicted)."""
    path, n = sequential_512
    batch, sequential = count_reads(path, np.arange(n), cold)
    np.testing.assert_array_equal(batch["x"][:, 0], (np.arange(n) * 512).astype(np.uint8))
    assert sequential < n // 8, f"{sequential} read calls for {n} sequential records"
    order = rng.permutation(n)
    batch, random = count_reads(path, order, cold)
    np.testing.assert_array_equal(batch["x"][:, 0], (order * 512).astype(np.uint8))
    assert random >= n * 0.95, f"{random} read calls for {n} records in random order"
    blocks = shardfeed.order.BlockPermutation(n, 64, (5,)).apply(np.arange(n))
    batch, blocked = count_reads(path, blocks, cold)
    np.testing.assert_array_equal(batch["x"][:, 0], (blocks * 512).astype(np.uint8))
    assert blocked <= 2 * (n // 64) + 4, f"{blocked} read calls for {n // 64} blocks of 64 records"


@needs_proc_io
def test_a_small_field_of_large_records_is_read_record_by_record(new_path):
    """Between one record's int64 and the next one's lie 8 KiB that were not asked for: reading
    them into a discard buffer would cost more than the calls it saves."""
    n = 1000
    path = new_path()
    with shardfeed.Writer(path, fields={"id": ("int64", ()), "pixels": ("uint8", (8192,))}) as w:
        w.extend({"id": np.arange(n), "pixels": np.zeros((n, 8192), np.uint8)})
    batch, calls = count_reads(path, np.arange(n), False, fields="id")
    np.testing.assert_array_equal(batch["id"], np.arange(n))
    assert calls >= n, calls
    batch, calls = count_reads(path, np.arange(n), False)
    assert calls < n // 8, calls
