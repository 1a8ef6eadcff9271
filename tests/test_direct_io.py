"""Direct reads (``open(..., direct_io=...)``, ext/records.h "Direct reads"): records read with
O_DIRECT past the page cache, through io_uring or the thread pool, give the same batches as numpy
at any alignment (records straddling 4 KiB blocks, the last record of a file that ends mid-block,
runs of adjacent records), leave the page cache as it was, fail a truncated shard naming the file,
and are chosen by ``"auto"`` only for a dataset far larger than the memory the page cache may use
and records of 4 KiB or more."""

import errno
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shardfeed
from shardfeed import _core, _preload
from shardfeed.errors import ShardReadError
from shardfeed.format import HEADER_BYTES

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import regimes  # noqa: E402

URING = _core.uring_error() == 0
MODES = ["direct-uring", "pool", "auto"] if URING else ["pool"]
N = 1500
RECORD_SHAPE = (3, 683)  # float16: 4098 bytes a record, so records straddle 4 KiB blocks


def data_files(path):
    with shardfeed.open(path, preload=False, direct_io=False) as ds:
        return [os.path.join(path, s.file) for s in ds._manifest.shards]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """N records of float16[3, 683] and an int64 label, in shards whose sizes end mid-block."""
    path = str(tmp_path_factory.mktemp("direct") / "ds")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N,) + RECORD_SHAPE).astype(np.float16)
    label = np.arange(N, dtype=np.int64) * 3 - 11
    record_bytes = 2 * 3 * 683 + 8
    with shardfeed.Writer(path, fields={"x": ("float16", RECORD_SHAPE), "label": ("int64", ())},
                          shard_size=HEADER_BYTES + 347 * record_bytes) as writer:
        writer.extend({"x": x, "label": label})
    with shardfeed.open(path, direct_io=True, preload=False) as ds:
        if not ds.direct_reads:
            pytest.skip(f"the file system under {path} does not take O_DIRECT")
    return path, x, label


@pytest.fixture
def read_io():
    before = _core.read_io()
    yield _core.set_read_io
    _core.set_read_io(before)


def last_of_each_shard(path):
    with shardfeed.open(path, preload=False, direct_io=False) as ds:
        return np.cumsum([s.num_samples for s in ds._manifest.shards]) - 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_map", [False, True])
def test_direct_reads_equal_numpy(dataset, read_io, rng, mode, use_map):
    path, x, label = dataset
    read_io(mode)
    with shardfeed.open(path, direct_io=True, mmap=use_map, preload=False) as ds:
        assert ds.direct_reads
        regimes.evict(data_files(path))
        picks = [rng.permutation(N)[:700],                 # scattered records
                 np.arange(200, 900),                      # one long run across shards
                 last_of_each_shard(path),                 # files that end mid-block
                 np.array([0, 1, 2, N - 1, N - 2, 5, 5])]  # repeats, both ends
        for idx in picks:
            batch = ds.read(idx)
            np.testing.assert_array_equal(batch["x"], x[idx])
            np.testing.assert_array_equal(batch["label"], label[idx])
            assert batch.uncached == len(idx)  # no page-cache pass
            converted = ds.read(idx, "x", dtype="float32", scale=0.5, offset=1.0)["x"]
            np.testing.assert_array_equal(converted, x[idx].astype(np.float32) * np.float32(0.5) + np.float32(1.0))
            labels_only = ds.read(idx, "label")["label"]  # a field at the end of the record
            np.testing.assert_array_equal(labels_only, label[idx])


def test_direct_reads_leave_the_page_cache_alone(dataset):
    path, x, _ = dataset
    files = data_files(path)
    for direct, expect_cached in ((True, False), (False, True)):
        with shardfeed.open(path, direct_io=direct, mmap=False, preload=False) as ds:
            regimes.evict(files)
            if regimes.resident_fraction(files) > 0.1:
                pytest.skip("files here cannot be evicted from the page cache")
            np.testing.assert_array_equal(ds.read(np.arange(N))["x"], x)
            cached = regimes.resident_fraction(files)
        assert (cached > 0.9) if expect_cached else (cached < 0.1), (direct, cached)


def test_a_dataset_that_reads_directly_reads_nothing_ahead(dataset):
    """readahead (the loader's, for the next batch) would bring into the page cache what the direct
    read then reads again from disk."""
    path, _, _ = dataset
    files = data_files(path)
    for direct in (True, False):
        with shardfeed.open(path, direct_io=direct, mmap=False, preload=False) as ds:
            regimes.evict(files)
            if regimes.resident_fraction(files) > 0.1:
                pytest.skip("files here cannot be evicted from the page cache")
            ds.readahead(np.arange(N))
            deadline = time.monotonic() + 10
            while not direct and regimes.resident_fraction(files) < 0.9 and time.monotonic() < deadline:
                time.sleep(0.02)
            cached = regimes.resident_fraction(files)
        assert (cached < 0.1) if direct else (cached > 0.9), (direct, cached)


@pytest.mark.skipif(not URING, reason="io_uring is not usable here")
def test_direct_reads_go_through_io_uring_by_default(dataset, read_io, rng):
    path, x, _ = dataset
    read_io("direct-uring")
    idx = rng.permutation(np.arange(0, N, 3))[:300]  # no two adjacent: one run a record
    with shardfeed.open(path, direct_io=False, mmap=False, preload=False) as ds:
        regimes.evict(data_files(path))
        before = _core.uring_runs()
        ds.read(idx)
        assert _core.uring_runs() == before  # buffered reads: the pool
    with shardfeed.open(path, direct_io=True, mmap=False, preload=False) as ds:
        before = _core.uring_runs()
        np.testing.assert_array_equal(ds.read(idx)["x"], x[idx])
        assert _core.uring_runs() - before == len(idx)  # scattered: one run a record


@pytest.mark.parametrize("mode", MODES)
def test_a_truncated_shard_fails_a_direct_read_naming_the_file(tmp_path, read_io, mode):
    read_io(mode)
    path = str(tmp_path / "ds")
    values = np.arange(400 * 5000, dtype=np.uint32).reshape(400, 5000).astype(np.uint8)
    with shardfeed.Writer(path, fields={"v": ("uint8", (5000,))}, shard_size=HEADER_BYTES + 100 * 5000) as w:
        w.extend({"v": values})
    with shardfeed.open(path, mmap=False, preload=False, direct_io=True) as ds:
        if not ds.direct_reads:
            pytest.skip(f"the file system under {path} does not take O_DIRECT")
        shard = os.path.join(path, ds._manifest.shards[2].file)
        os.truncate(shard, HEADER_BYTES + 30 * 5000 + 5)  # record 30 of shard 2 cut, those after it gone
        np.testing.assert_array_equal(ds.read(np.arange(200, 230))["v"], values[200:230])  # what is left reads
        with pytest.raises(ShardReadError, match="file ended before the data of sample 230 "):
            ds.read(np.array([5, 230]))  # the record the cut went through
        with pytest.raises(ShardReadError) as caught:
            ds.read(np.array([5, 210, 241, 399]))
    assert caught.value.filename == shard
    assert caught.value.errno == errno.EIO
    assert "file ended before the data of sample 241" in str(caught.value)


def test_auto_reads_directly_only_far_past_the_memory_available(dataset, monkeypatch):
    path, x, _ = dataset
    total = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path)
                if name.endswith(".rec"))
    assert _preload.DIRECT_MIN_RATIO == 2 and _preload.DIRECT_MIN_RECORD_BYTES == 4096
    for available, direct in ((total // 2, True), (total // 2 + 4096, False), (None, False)):
        monkeypatch.setattr(_preload, "memory_available", lambda: available)
        with shardfeed.open(path, preload=False) as ds:
            assert ds.direct_reads is direct, available
            np.testing.assert_array_equal(ds.read(np.arange(0, N, 3))["x"], x[::3])
    monkeypatch.setattr(_preload, "memory_available", lambda: 1)
    with shardfeed.open(path, preload=False, direct_io=False) as ds:
        assert not ds.direct_reads
    assert _preload.direct_wanted("auto", 10 << 30, 4095, 1 << 30) is False  # records under 4 KiB
    assert _preload.direct_wanted("auto", 10 << 30, 4096, 1 << 30) is True
    assert _preload.direct_wanted(True, 1, 1, None) is True


def test_direct_io_is_checked_and_survives_pickling(dataset):
    path, x, _ = dataset
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="direct_io must be 'auto', True or False"):
            shardfeed.open(path, direct_io=bad)
    with shardfeed.open(path, direct_io=True, preload=False) as ds:
        copy = pickle.loads(pickle.dumps(ds))
        with copy:
            assert copy.direct_reads
            np.testing.assert_array_equal(copy.read(np.arange(10))["x"], x[:10])


def runs_of_length(length, count=20):
    """`count` runs of `length` adjacent records, spread over the dataset (a gap after each)."""
    starts = np.arange(count) * (N // count)
    return np.concatenate([np.arange(s, s + length) for s in starts])


@pytest.mark.skipif(not URING, reason="io_uring is not usable here")
def test_a_ring_keeps_its_bounce_buffers_and_grows_them_for_longer_runs(dataset, read_io, rng):
    """One thread's batches take the same ring, whose slots keep their bounce buffers from one batch
    to the next (ext/ring.h, ext/uring.c): batches of ever longer runs (spans of 2 to 61 blocks, then runs of
    up to 1 MiB) need each slot's buffer grown; scattered records after them read into the larger
    buffers at other alignments."""
    path, x, label = dataset
    read_io("direct-uring")
    with shardfeed.open(path, direct_io=True, mmap=False, preload=False) as ds:
        picks = [rng.permutation(N)[:200]] + [runs_of_length(k) for k in (1, 2, 7, 30, 60)]
        picks += [np.arange(N), rng.permutation(N)[:300], runs_of_length(3), np.arange(N)[::-1]]
        for idx in picks:
            before = _core.uring_runs()
            batch = ds.read(idx)
            assert _core.uring_runs() > before
            np.testing.assert_array_equal(batch["x"], x[idx])
            np.testing.assert_array_equal(batch["label"], label[idx])
            converted = ds.read(idx, "x", dtype="float32")["x"]
            np.testing.assert_array_equal(converted, x[idx].astype(np.float32))


@pytest.mark.skipif(not URING, reason="io_uring is not usable here")
def test_more_threads_read_directly_at_once_than_rings_are_kept(dataset, read_io, tools):
    """20 threads at once take 20 rings; 16 go back to the idle list with their bounce buffers
    and the others are freed with theirs (ext/ring.c sf_ring_put), batch after batch."""
    path, x, label = dataset
    read_io("direct-uring")
    with shardfeed.open(path, direct_io=True, mmap=False, preload=False) as ds:
        def reader(k):
            rng = np.random.default_rng(k)
            for j in range(8):
                idx = runs_of_length(1 + (j * 7 + k) % 60) if j % 2 else rng.permutation(N)[:700]
                batch = ds.read(idx, threads=1)
                assert np.array_equal(batch["x"], x[idx]) and np.array_equal(batch["label"], label[idx]), (k, j)
        tools.run_threads(20, reader)


@pytest.mark.skipif(not URING or not hasattr(os, "fork"), reason="needs io_uring and fork")
def test_direct_reads_in_a_forked_child_and_its_parent(dataset, read_io, rng):
    """The child of a parent whose idle ring holds bounce buffers drops that ring, closing its
    descriptor and freeing nothing (ext/ring.c after_fork_child), and reads with a ring of its
    own; the parent reads on with its ring."""
    path, x, _ = dataset
    read_io("direct-uring")
    scattered, runs = rng.permutation(N)[:300], runs_of_length(40)
    with shardfeed.open(path, direct_io=True, mmap=False, preload=False) as ds:
        np.testing.assert_array_equal(ds.read(runs)["x"], x[runs])  # the idle ring keeps large buffers
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                before = _core.uring_runs()
                ok = all(np.array_equal(ds.read(idx)["x"], x[idx]) for idx in (scattered, runs, np.arange(N)))
                code = 0 if ok and _core.uring_runs() > before else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        for idx in (scattered, np.arange(N)):
            np.testing.assert_array_equal(ds.read(idx)["x"], x[idx])


def anon_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not URING or not os.path.exists("/proc/self/status"), reason="needs io_uring and /proc")
@pytest.mark.skipif(_core.BUILD_INFO["sanitizers"] != "", reason="sanitizer runtimes have allocators of their own")
def test_a_ring_does_not_keep_a_bounce_buffer_past_its_limit(new_path, read_io):
    """A record of 40 MiB is read into a bounce buffer of its size, which the ring frees after the
    batch (it keeps 16 MiB at most: ext/ring.h SF_URING_KEEP_BOUNCE_BYTES). Blocks that large are
    mapped by glibc at any threshold, so freeing it gives the memory back. (The first read, through
    the pool, whose bounce buffers last one read, leaves the memory of a batch's output resident.)"""
    path = new_path()
    record = np.random.default_rng(1).integers(0, 256, (2, 40 << 20), dtype=np.uint8)
    with shardfeed.Writer(path, fields={"v": ("uint8", (40 << 20,))}) as w:
        w.extend({"v": record})
    with shardfeed.open(path, direct_io=True, mmap=False, preload=False) as ds:
        if not ds.direct_reads:
            pytest.skip(f"the file system under {path} does not take O_DIRECT")
        read_io("pool")
        assert np.array_equal(ds.read(np.array([1]))["v"][0], record[1])
        read_io("direct-uring")
        for k in (0, 1, 0):
            before, runs = anon_kib(), _core.uring_runs()
            ok = np.array_equal(ds.read(np.array([k]))["v"][0], record[k])
            grew = anon_kib() - before
            assert ok and _core.uring_runs() == runs + 1
            assert grew < 8 << 10, f"RssAnon {grew} KiB higher after reading a 40 MiB record"


@pytest.mark.skipif(not URING, reason="io_uring is not usable here")
def test_free_batch_memory_frees_the_bounce_buffers_idle_rings_keep(new_path, read_io):
    """After a direct read through io_uring, the calling thread's ring (idle again) keeps a bounce
    buffer per slot: free_batch_memory() frees them with the cached batch blocks and counts them
    (each buffer at least its record's 1 MiB), a second call finds nothing, and the
    ring reads again after it (its buffers allocated anew), exactly."""
    path, record, n = new_path(), 1 << 20, 12
    values = np.random.default_rng(8).integers(0, 256, (n, record), dtype=np.uint8)
    with shardfeed.Writer(path, fields={"v": ("uint8", (record,))}) as w:
        w.extend({"v": values})
    picked = np.array([9, 1, 5, 3, 11, 7])  # no two adjacent: one run, one slot and buffer each
    with shardfeed.open(path, direct_io=True, mmap=False, preload=False) as ds:
        if not ds.direct_reads:
            pytest.skip(f"the file system under {path} does not take O_DIRECT")
        read_io("direct-uring")
        shardfeed.free_batch_memory()
        runs = _core.uring_runs()
        assert np.array_equal(ds.read(picked)["v"], values[picked])  # its 6 MiB output freed here
        assert _core.uring_runs() == runs + len(picked)
        cached = sum(_core.cached_batch_memory())
        released = shardfeed.free_batch_memory()
        assert released >= cached + len(picked) * record, (released, cached)
        assert shardfeed.free_batch_memory() == 0
        again = picked[::-1]
        assert np.array_equal(ds.read(again)["v"], values[again])
        assert _core.uring_runs() == runs + 2 * len(picked)


# posix_memalign with the alignment of direct reads fails while fail_bounce(1) is on (LD_PRELOAD).
FAILING_BOUNCE_SHIM = r"""
#define _GNU_SOURCE 1
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
static int failing;
void fail_bounce(int on) { __atomic_store_n(&failing, on, __ATOMIC_RELAXED); }
int posix_memalign(void **p, size_t align, size_t size)
{
    static int (*real)(void **, size_t, size_t);
    if (align == 4096 && __atomic_load_n(&failing, __ATOMIC_RELAXED))
        return ENOMEM;
    if (!real)
        real = (int (*)(void **, size_t, size_t))dlsym(RTLD_NEXT, "posix_memalign");
    return real(p, align, size);
}
"""

FAILING_BOUNCE = textwrap.dedent(r'''
    import ctypes, sys
    import numpy as np
    import shardfeed
    from shardfeed import _core
    from shardfeed.format import HEADER_BYTES

    path, shim = sys.argv[1], ctypes.CDLL(sys.argv[2])
    n = 600
    values = np.random.default_rng(5).integers(0, 256, (n, 5000), dtype=np.uint8)
    with shardfeed.Writer(path, fields={"v": ("uint8", (5000,))}, shard_size=HEADER_BYTES + 250 * 5000) as w:
        w.extend({"v": values})
    scattered, runs = np.random.default_rng(6).permutation(n)[:200], np.arange(100, 500)
    with shardfeed.open(path, direct_io=True, mmap=False, preload=False) as ds:
        if not ds.direct_reads:
            print("NO DIRECT")
            sys.exit(0)
        _core.set_read_io("pool")
        shim.fail_bounce(1)
        try:
            ds.read(scattered)
        except MemoryError as exc:
            print("POOL", exc)
        shim.fail_bounce(0)
        assert np.array_equal(ds.read(scattered)["v"], values[scattered])
        if _core.uring_error() == 0:
            _core.set_read_io("direct-uring")
            for idx, fail in ((scattered, 1), (scattered, 0), (runs, 1), (runs, 0), (scattered, 1)):
                shim.fail_bounce(fail)  # runs after scattered records: the slots' buffers cannot grow
                before = _core.uring_runs()
                batch = ds.read(idx)
                assert np.array_equal(batch["v"], values[idx]) and _core.uring_runs() > before, fail
            print("URING exact")
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an LD_PRELOAD shim of glibc's posix_memalign")
@pytest.mark.skipif(shutil.which("gcc") is None, reason="the LD_PRELOAD shim is built with gcc, not found")
def test_a_bounce_buffer_that_cannot_be_allocated(new_path, tmp_path):
    """A direct read on the pool whose bounce buffer cannot be had fails with MemoryError (the batch
    named no record); through io_uring, a slot without its buffer, or whose buffer cannot grow,
    reads its run through the page cache: the batch is exact."""
    source, shim = tmp_path / "shim.c", tmp_path / "failing-bounce.so"
    source.write_text(FAILING_BOUNCE_SHIM)
    built = subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"], capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [str(shim), os.environ.get("LD_PRELOAD")])))
    if _core.BUILD_INFO["sanitizers"]:  # the sanitizer runtime is preloaded too, after the shim
        env["ASAN_OPTIONS"] = os.environ.get("ASAN_OPTIONS", "") + " verify_asan_link_order=0"
    done = subprocess.run([sys.executable, "-c", FAILING_BOUNCE, new_path(), str(shim)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout == "NO DIRECT\n":
        pytest.skip("the file system here does not take O_DIRECT")
    assert "POOL out of memory in a native batch read\n" in done.stdout, done.stdout
    assert done.stdout.endswith("URING exact\n") or not URING, done.stdout
