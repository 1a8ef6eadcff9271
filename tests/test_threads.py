"""Thread safety: many Python threads reading one Dataset at once get exact results; closing while
others read neither crashes nor corrupts; file descriptors do not leak."""

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest

import shardfeed
from shardfeed import _preload
from shardfeed.format import HEADER_BYTES

N = 2000


@pytest.fixture(scope="module")
def columns_and_path(tmp_path_factory):
    rng = np.random.default_rng(5)
    columns = {
        "x": rng.standard_normal((N, 8)).astype(np.float16),
        "img": rng.integers(0, 256, (N, 3, 4, 4), dtype=np.uint8),
        "y": np.arange(N, dtype=np.int64),
        "t": [np.full(i % 7, i, np.int32) for i in range(N)],
    }
    fields = {"x": ("float16", (8,)), "img": ("uint8", (3, 4, 4)), "y": ("int64", ()), "t": ("int32", (None,))}
    path = str(tmp_path_factory.mktemp("threads") / "ds")
    with shardfeed.Writer(path, fields=fields, shard_size=HEADER_BYTES + 150 * 88) as w:
        w.extend(columns)
    return path, columns


@pytest.mark.parametrize("native_threads", [1, 4])
def test_many_python_threads_read_one_dataset(columns_and_path, mmap_mode, native_threads, tools):
    path, columns = columns_and_path
    ds = shardfeed.open(path, mmap=mmap_mode, threads=native_threads)
    mean = np.float32(127.5)
    checked = []

    def reader(k):
        rng = np.random.default_rng(k)
        for round_ in range(25):
            indices = rng.integers(-N, N, size=int(rng.integers(1, 700)))
            picked = indices % N
            if round_ % 3 == 0:
                batch = ds.read(indices, fields=["img", "y"], scale={"img": 1 / mean}, offset={"img": -1.0})
                expected = columns["img"][picked].astype(np.float32) * np.float32(1 / mean) + np.float32(-1.0)
                np.testing.assert_array_equal(batch["img"].view(np.uint32), expected.view(np.uint32))
                np.testing.assert_array_equal(batch["y"], picked.astype(np.float32))
            else:
                batch = ds.read(indices, dtype="float32" if round_ % 2 else None)
                np.testing.assert_array_equal(batch["x"], columns["x"][picked].astype(batch["x"].dtype))
                np.testing.assert_array_equal(batch["img"], columns["img"][picked].astype(batch["img"].dtype))
                np.testing.assert_array_equal(batch["y"], picked)
                np.testing.assert_array_equal(batch.lengths["t"], picked % 7)
                for row, i in zip(batch["t"], picked):
                    assert (row[:i % 7] == i).all() and not row[i % 7:].any()
        checked.append(k)
    tools.run_threads(8, reader)
    assert sorted(checked) == list(range(8))


def test_close_while_other_threads_read(columns_and_path, mmap_mode, tools):
    path, columns = columns_and_path
    seen = set()
    for attempt in range(5):
        ds = shardfeed.open(path, mmap=mmap_mode, threads=4)
        reading = threading.Event()
        outcomes = []

        def reader(k):
            rng = np.random.default_rng(k + 10 * attempt)
            try:
                for round_ in range(300):
                    indices = rng.integers(0, N, 512)
                    batch = ds.read(indices, fields=["y", "t"] if k % 2 else ["x", "y"])
                    np.testing.assert_array_equal(batch["y"], indices)  # complete reads are exact
                    if round_ == 2:
                        reading.set()
            except ValueError as exc:
                assert "closed dataset" in str(exc), exc
                outcomes.append("closed")
                return
            outcomes.append("finished")

        def closer(k):
            if k == 0:
                reading.wait(10)
                ds.close()
            else:
                reader(k)
        tools.run_threads(5, closer)
        assert len(outcomes) == 4
        seen.update(outcomes)
    assert "closed" in seen  # some reads were refused after the close
    with pytest.raises(ValueError, match="I/O operation on a closed dataset"):
        ds.read([0])


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def wait_for_background_passes():
    """Waits for every background preload pass (the thread ``PRELOAD_THREAD_NAME``) to end: a pass of
    a dataset dropped without close stops after its read in progress, on its own thread, and holds
    its file's descriptor until then."""
    for thread in threading.enumerate():
        if thread.name == _preload.PRELOAD_THREAD_NAME:
            thread.join(30)
            assert not thread.is_alive()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_closing_releases_descriptors_and_reads_fail(columns_and_path):
    path, _ = columns_and_path
    gc.collect()
    wait_for_background_passes()  # (datasets earlier tests dropped)
    before = open_fds()
    ds = shardfeed.open(path, preload=False)  # the reader's descriptors only (no background pass)
    assert open_fds() == before + 2 * ds.num_shards  # .rec and .var of every shard
    ds.read(np.arange(100))
    ds.close()
    ds.close()  # twice is fine
    assert open_fds() == before
    for call in (lambda: ds.read([0]), lambda: ds[0], lambda: ds.read([0], fields="t"), lambda: ds.read([])):
        with pytest.raises(ValueError, match="I/O operation on a closed dataset"):
            call()
    with shardfeed.open(path) as ds2:
        ds2.read([1])
    assert open_fds() == before
    for _ in range(20):  # dropped without close: freed with the object
        shardfeed.open(path, mmap=True).read([3, 4])
    gc.collect()
    wait_for_background_passes()
    assert open_fds() == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_failed_open_leaks_nothing(columns_and_path, tmp_path):
    path, _ = columns_and_path
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(path):
        os.link(os.path.join(path, name), broken / name)
    (broken / "shard-000005.var").unlink()
    gc.collect()
    wait_for_background_passes()
    before = open_fds()
    for _ in range(10):
        with pytest.raises(shardfeed.ShardReadError):
            shardfeed.open(broken)
    assert open_fds() == before


def test_native_pool_is_persistent(columns_and_path):
    from shardfeed import _core
    path, _ = columns_and_path
    ds = shardfeed.open(path, threads=4, mmap=False)
    ds.read(np.arange(N))
    size = _core.pool_size()
    assert size >= 3
    for _ in range(20):
        ds.read(np.arange(N))
    assert _core.pool_size() == size


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_reads_stay_exact_under_a_signal_storm(columns_and_path):
    """Signals with a Python handler arrive every 200 us while the main thread reads (preadv calls
    interrupted with EINTR are retried); the pool threads block signals."""
    path, columns = columns_and_path
    ds = shardfeed.open(path, mmap=False)
    handled = []
    previous = signal.signal(signal.SIGALRM, lambda *_: handled.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        rng = np.random.default_rng(0)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            indices = rng.integers(0, N, 1000)
            for threads in (1, 4):
                batch = ds.read(indices, fields=["x", "t"], threads=threads)
                np.testing.assert_array_equal(batch["x"], columns["x"][indices])
                np.testing.assert_array_equal(batch.lengths["t"], indices % 7)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(handled) > 10
