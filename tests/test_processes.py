"""Worker processes: a child forked after the parent has read (with the native pool running) reads
correctly and the parent keeps working; spawn workers get a pickled Dataset and reopen it."""

import gc
import multiprocessing
import operator
import os
import pickle
import select
import signal
import sys
import threading
import time

import numpy as np
import pytest

import shardfeed
from shardfeed import _core, _prefetch, _preload
from shardfeed.format import HEADER_BYTES

N = 3000
SHARDFEED_DIR = os.path.join(os.path.dirname(shardfeed.__file__), "")  # where its code runs from
# Python 3.12+ warns about fork() in a process with threads (ours are the native pool's).
fork_warning = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(3)
    columns = {"x": rng.standard_normal((N, 16)).astype(np.float16), "y": np.arange(N, dtype=np.int64),
               "t": [np.arange(i % 5, dtype=np.int16) for i in range(N)]}
    path = str(tmp_path_factory.mktemp("proc") / "ds")
    with shardfeed.Writer(path, fields={"x": ("float16", (16,)), "y": "int64", "t": ("int16", (None,))},
                          shard_size=HEADER_BYTES + 500 * 56) as w:
        w.extend(columns)
    return path, columns


def check_batch(ds, columns, seed):
    """Reads a random batch on several native threads; raises AssertionError unless exact."""
    indices = np.random.default_rng(seed).integers(0, N, 2048)
    batch = ds.read(indices, dtype="float32", threads=4)
    np.testing.assert_array_equal(batch["x"], columns["x"][indices].astype(np.float32))
    np.testing.assert_array_equal(batch["y"], indices.astype(np.float32))
    np.testing.assert_array_equal(batch.lengths["t"], indices % 5)


def background_reader_names():
    """The names of the threads that read in the background: preload passes, and the prefetch
    threads of loaders (which end when their loader closes, or after 10 s unused); the torch
    loader's only where shardfeed.torch was imported (it imports torch; without it, no such thread)."""
    names = {_preload.PRELOAD_THREAD_NAME, _prefetch.PREFETCH_THREAD_NAME}
    torch_front_end = sys.modules.get("shardfeed.torch")
    if torch_front_end is not None:
        names.add(torch_front_end.LOADER_THREAD_NAME)
    return names


def read_ahead_pool_prefixes():
    """How the names of the threads of read-ahead pools begin: a StepPool's by default, and a Keras
    ShardSequence's where shardfeed.keras was imported. These threads wait for work between reads until their sequence
    closes or has been asked for nothing for 10 s (TensorFlow keeps sequences after a fit:
    tf.data's from_generator state holds Keras's adapter of one; 33 such threads were alive after
    tests/test_keras.py and test_kerasfit.py in one run before they stopped when idle)."""
    keras_front_end = sys.modules.get("shardfeed.keras")
    sequences = (keras_front_end.SEQUENCE_THREAD_NAME,) if keras_front_end is not None else ()
    return (_prefetch.STEP_POOL_THREAD_NAME,) + sequences


def in_shardfeed(thread):
    """Whether `thread` is running shardfeed's code now (a pool thread waiting for work is not)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_filename.startswith(SHARDFEED_DIR):
            return True
        frame = frame.f_back
    return False


def wait_for_background_readers():
    """Waits (60 s at most in all) for the background readers to end, those of earlier tests
    included (a collection first, so that loaders and sequences nobody holds close now), and for
    the read-ahead pools' threads to be between reads; fails naming any still reading. A fork
    while another thread allocates can leave the child with the allocator's lock held where the
    allocator has no fork handlers (GCC 12's AddressSanitizer, in the sanitizer pass, where every
    Python object is malloc'ed, and where a native read allocates without the GIL): there, a child
    timed out, once with preload passes and once more since. These tests are about the native
    pool after fork."""
    gc.collect()
    deadline, names, pools = time.monotonic() + 60, background_reader_names(), read_ahead_pool_prefixes()
    for thread in threading.enumerate():
        if thread.name in names:
            thread.join(max(0.0, deadline - time.monotonic()))
        elif thread.name.startswith(pools):
            while in_shardfeed(thread) and time.monotonic() < deadline:
                time.sleep(0.01)
    reading = [thread.name for thread in threading.enumerate()
               if thread.name in names or (thread.name.startswith(pools) and in_shardfeed(thread))]
    assert not reading, f"background readers still reading after 60 s, not forking: {reading}"


def fork_and_check(ds, columns, seed):
    """Forks; the child checks a batch and reports through a pipe and its exit status."""
    wait_for_background_readers()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            check_batch(ds, columns, seed)
            check_batch(ds, columns, seed + 1)
            os.write(write_end, f"ok {_core.pool_size()}".encode())
            status = 0
        except BaseException as exc:
            os.write(write_end, f"child failed: {exc!r}"[:4000].encode())
        finally:
            os._exit(status)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + 60
    try:
        while True:  # a deadlocked child must fail the test, not hang it
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                chunks.append(b"child timed out (deadlock?)")
                break
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    return b"".join(chunks).decode(), wait_status


@needs_fork
@fork_warning
def test_forked_child_reads_after_parent_read(dataset, mmap_mode):
    path, columns = dataset
    ds = shardfeed.open(path, mmap=mmap_mode)
    check_batch(ds, columns, 0)  # the parent has read: the pool threads exist
    assert _core.pool_size() >= 3
    for child in range(3):
        report, wait_status = fork_and_check(ds, columns, 100 + child)
        assert os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0, (wait_status, report)
        assert report.startswith("ok ")
        assert int(report.split()[1]) >= 1  # the child started its own pool threads
        check_batch(ds, columns, 200 + child)  # and the parent keeps working


@needs_fork
@fork_warning
def test_fork_while_other_threads_are_reading(dataset):
    path, columns = dataset
    ds = shardfeed.open(path, mmap=False)
    # Once on this thread first: check_batch's first call imports modules (numpy.testing's), and a
    # child forked while another thread holds a module's import lock waits for it forever (a CPython
    # hazard of fork with threads, not the reader's; it hung this test in 3 of 8 runs without this).
    check_batch(ds, columns, 0)
    stop = threading.Event()
    errors = []

    def reader(k):
        try:
            seed = 1000 * k
            while not stop.is_set():
                check_batch(ds, columns, seed)
                seed += 1
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        for child in range(5):
            report, wait_status = fork_and_check(ds, columns, 300 + child)
            assert os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0, (wait_status, report)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[0]
    check_batch(ds, columns, 400)


def test_pickle_by_path(dataset, mmap_mode):
    path, columns = dataset
    ds = shardfeed.open(path, mmap=mmap_mode, threads=3)
    data = pickle.dumps(ds)
    assert len(data) < 500  # the path and options, not the data
    copy = pickle.loads(data)
    assert copy is not ds and copy.path == ds.path and copy.threads == 3 and len(copy) == N
    assert copy._use_map == ds._use_map
    check_batch(copy, columns, 7)
    ds.close()
    check_batch(copy, columns, 8)  # its own files
    reopened = pickle.loads(pickle.dumps(ds))  # a closed dataset pickles by path too
    check_batch(reopened, columns, 9)


def test_batch_pickles_with_lengths(dataset):
    path, _ = dataset
    batch = shardfeed.open(path).read([4, 3, 9])
    copy = pickle.loads(pickle.dumps(batch))
    assert isinstance(copy, shardfeed.Batch) and list(copy) == list(batch)
    for name in batch:
        np.testing.assert_array_equal(copy[name], batch[name])
    np.testing.assert_array_equal(copy.lengths["t"], [4, 3, 4])


def test_spawn_worker_reopens_a_pickled_dataset(dataset):
    path, columns = dataset
    ds = shardfeed.open(path, threads=4)
    ds.read(np.arange(100))
    indices = np.random.default_rng(1).integers(0, N, 1500)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(operator.methodcaller("read", indices, dtype="float32"), [(ds,), (ds,)])
        sizes = pool.map(len, [ds, ds])
    assert sizes == [N, N]
    for batch in results:
        np.testing.assert_array_equal(batch["x"], columns["x"][indices].astype(np.float32))
        np.testing.assert_array_equal(batch["y"], indices.astype(np.float32))
        np.testing.assert_array_equal(batch.lengths["t"], indices % 5)
    np.testing.assert_array_equal(ds.read(indices)["y"], indices)
