"""Ctrl-C and interpreter exit: SIGINT during a long batch read raises KeyboardInterrupt promptly
(a large batch is read in slices with a signal check between them) and leaves the dataset usable;
an interpreter that exits while reader threads (Python threads in native reads, the prefetching
generator's thread) are running exits at once, without hanging or crashing. Also: batches of
several slices read exactly."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shardfeed

LONG_READ = textwrap.dedent(r'''
    import signal, sys, time
    import numpy as np
    import shardfeed

    # Ctrl-C as in a terminal, whatever the suite's runner left this process: a job started in the
    # background by a shell without job control (`(pytest &)`, nohup) inherits SIGINT ignored,
    # and Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    path, kind, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fields = {"x": ("int64", (2,))} if kind == "fixed" else {"t": ("int16", (None,))}
    with shardfeed.Writer(path, fields=fields) as w:
        if kind == "fixed":
            w.extend({"x": np.arange(40000).reshape(20000, 2)})
        else:
            w.extend({"t": [np.full(i % 3, i, np.int16) for i in range(20000)]})
    ds = shardfeed.open(path, mmap=False)  # one preadv per record: a slow path on purpose
    indices = np.random.default_rng(0).integers(0, 20000, 100_000)
    started = time.perf_counter()
    ds.read(indices, threads=threads)
    per_100k = time.perf_counter() - started
    big = np.tile(indices, 150)  # 15 million samples: 150 times as long
    print(f"ready {per_100k * 150:.3f}", flush=True)
    started = time.perf_counter()
    try:
        ds.read(big, threads=threads)
    except KeyboardInterrupt:
        print(f"interrupted {time.perf_counter() - started:.3f}", flush=True)
    else:
        print(f"finished {time.perf_counter() - started:.3f}", flush=True)
    batch = ds.read(indices[:1000], threads=threads)  # still usable, and exact
    name = "x" if kind == "fixed" else "t"
    expected = indices[:1000] * 2 if kind == "fixed" else np.where(indices[:1000] % 3, indices[:1000], 0)
    assert np.array_equal(batch[name][:, 0], expected.astype(batch[name].dtype)), "wrong data after the interrupt"
    print("ok", flush=True)
''')


@pytest.mark.parametrize("kind, threads, read_io", [("fixed", 1, "pool"), ("fixed", 4, "pool"), ("variable", 2, "pool"),
                                                    ("fixed", 4, "uring")])
def test_ctrl_c_interrupts_a_long_batch_read(new_path, kind, threads, read_io):
    """read_io="uring": every record through io_uring (ext/uring.c), the same behaviour."""
    if read_io == "uring" and shardfeed._core.uring_error() != 0:
        pytest.skip("io_uring is not usable here")
    child = subprocess.Popen([sys.executable, "-c", LONG_READ, new_path(), kind, str(threads)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, SHARDFEED_READ_IO=read_io))
    try:
        word, expected_seconds = child.stdout.readline().split()
        assert word == "ready"
        time.sleep(0.3)  # inside the long read
        sent = time.perf_counter()
        child.send_signal(signal.SIGINT)
        word, elapsed = child.stdout.readline().split()
        reaction = time.perf_counter() - sent
        rest = child.stdout.read()
        assert child.wait(60) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert word == "interrupted", f"the read ran to the end ({elapsed} s) instead of stopping at Ctrl-C"
    assert reaction < 1.0 and float(elapsed) < 1.5, (reaction, elapsed)
    assert float(expected_seconds) > 2.0, expected_seconds  # the whole read would have taken much longer
    assert rest == "ok\n"


EXIT_WHILE_READING = textwrap.dedent(r'''
    import sys, threading
    import numpy as np
    import shardfeed

    path, mode = sys.argv[1], sys.argv[2]
    with shardfeed.Writer(path, fields={"x": ("float16", (64,)), "y": "int64"}, shard_size=64 + 400 * 136) as w:
        w.extend({"x": np.ones((4000, 64)), "y": np.arange(4000)})
    ds = shardfeed.open(path, mmap=mode == "mmap")
    started = threading.Barrier(5)

    def reader(k):
        rng = np.random.default_rng(k)
        started.wait()
        while True:
            ds.read(rng.integers(0, 4000, 50_000), dtype="float32", threads=8)

    for k in range(4):
        threading.Thread(target=reader, args=(k,), daemon=True).start()
    generator = ds.batches(256, inputs="x", targets="y", prefetch=4, epochs=None)
    next(generator)  # the prefetching thread is running too
    started.wait()
    print("exiting", flush=True)
''')


@pytest.mark.parametrize("mode", ["mmap", "preadv"])
def test_interpreter_exit_while_reads_run(new_path, mode):
    for attempt in range(3):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", EXIT_WHILE_READING, new_path(), mode],
                              capture_output=True, text=True, timeout=60)
        took = time.perf_counter() - started
        assert done.returncode == 0, (attempt, done.returncode, done.stderr[-3000:])
        assert done.stdout == "exiting\n" and done.stderr == "", done.stderr[-3000:]
        assert took < 20, took


def test_batches_of_several_slices_are_exact(new_path, mmap_mode):
    """65,536 samples per slice: a batch of 150,000 is read in three, each into its own rows."""
    n = 5000
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    rows = [np.full(i % 4, i, np.int32) for i in range(n)]
    path = new_path()
    with shardfeed.Writer(path, fields={"x": ("float32", (3,)), "t": ("int32", (None,))}, shard_size=64 + 700 * 32) as w:
        w.extend({"x": x, "t": rows})
    ds = shardfeed.open(path, mmap=mmap_mode)
    indices = np.random.default_rng(1).integers(-n, n, 150_000)
    batch = ds.read(indices, dtype={"x": "float32", "t": "float32"}, scale={"x": 2.0, "t": 0.5})
    picked = indices % n
    np.testing.assert_array_equal(batch["x"], x[picked] * np.float32(2.0))
    np.testing.assert_array_equal(batch.lengths["t"], picked % 4)
    expected_t = np.where(np.arange(3)[None, :] < (picked % 4)[:, None], picked[:, None] * np.float32(0.5), 0)
    np.testing.assert_array_equal(batch["t"], expected_t.astype(np.float32))
    out = {"x": np.full((150_000, 3), -1, np.float32)}
    ds.read(indices, fields="x", dtype="float32", out=out)
    np.testing.assert_array_equal(out["x"], x[picked])
