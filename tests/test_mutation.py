"""Python code that changes a read's arrays while the read runs (another thread writing into the
indices, ``out=`` or scale/offset) gets wrong data or an error, never a crash: the native core
validates and reads private copies of everything it trusts (docs/reliability.md). Each stress run
is a subprocess, so that a crash fails the test instead of killing pytest."""

import subprocess
import sys
import textwrap

import pytest

STRESS = textwrap.dedent("""
    import sys, threading
    import numpy as np
    import shardfeed

    path, mmap, target = sys.argv[1], sys.argv[2] == "mmap", sys.argv[3]
    n = 4000
    with shardfeed.Writer(path, fields={"x": ("uint8", (64,)), "y": ("int32", ()), "t": ("int16", (None,))},
                          shard_size=64 + 200 * 80) as w:
        w.extend({"x": np.arange(n * 64, dtype=np.uint32).astype(np.uint8).reshape(n, 64),
                  "y": np.arange(n, dtype=np.int32),
                  "t": [np.full(k % 5, k, np.int16) for k in range(n)]})
    ds = shardfeed.open(path, mmap=mmap, threads=4)
    indices = np.arange(n, dtype=np.int64)
    out = np.empty((n, 64), np.float32)
    scale = np.full(64, 0.5, np.float32)
    stop = threading.Event()
    bad = [np.int64(2 ** 62), np.int64(-2 ** 62), np.int64(n), np.int64(-1), np.int64(2 ** 40)]

    def mutate():
        k = 0
        while not stop.is_set():
            k += 1
            if target == "indices":
                indices[k % n] = bad[k % len(bad)]
                indices[(k * 7) % n] = k % n
            elif target == "out":
                out[k % n] = -1.0
            else:
                scale[k % 64] = float(k)

    thread = threading.Thread(target=mutate)
    thread.start()
    errors = reads = 0
    try:
        for _ in range(300):
            indices[:] = np.arange(n)
            try:
                if target == "indices":
                    ds.read(indices)
                    ds.read(indices, fields=["y", "t"])
                    ds.readahead(indices)
                elif target == "out":
                    ds.read(indices, fields="x", dtype="float32", out={"x": out})
                else:
                    ds.read(indices, fields="x", scale=scale)
                reads += 1
            except (IndexError, shardfeed.ShardfeedError) as exc:
                errors += 1
    finally:
        stop.set()
        thread.join()
    print("done", reads, errors)
""")


@pytest.mark.parametrize("target", ["indices", "out", "scale"])
def test_arrays_changed_during_a_read_never_crash(new_path, mmap_mode, target):
    path = new_path()
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", STRESS, path,
                           "mmap" if mmap_mode else "preadv", target],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"
    words = done.stdout.split()
    assert words[0] == "done" and int(words[1]) + int(words[2]) == 300, done.stdout
