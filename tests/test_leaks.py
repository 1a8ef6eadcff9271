"""Leak test: thousands of batches (all read paths, errors included), thousands of open/close cycles,
writer sessions and forks leave the process's anonymous memory (RssAnon) and its open file
descriptors flat. Runs in a fresh interpreter, measured after a warm-up."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

import shardfeed

LEAKS = textwrap.dedent(r'''
    import gc, json, os, pickle, shutil, sys
    import numpy as np
    import shardfeed

    root = sys.argv[1]
    path, broken, appended = (os.path.join(root, name) for name in ("ds", "broken", "appended"))
    fields = {"x": ("float16", (8, 8)), "img": ("uint8", (3, 8, 8)), "y": "int64", "t": ("int32", (None,))}
    n = 4000
    rng = np.random.default_rng(0)
    columns = {"x": rng.standard_normal((n, 8, 8)).astype(np.float16), "img": rng.integers(0, 255, (n, 3, 8, 8), np.uint8),
               "y": np.arange(n), "t": [np.arange(i % 9, dtype=np.int32) for i in range(n)]}
    for target in (path, broken):
        with shardfeed.Writer(target, fields=fields, shard_size=64 + 400 * 344) as w:
            w.extend(columns)
    bad = shardfeed.open(broken, mmap=False)
    os.truncate(os.path.join(broken, "shard-000003.rec"), 64 + 100 * 344)  # reads of shard 3 fail now
    with shardfeed.Writer(appended, fields={"x": "int32"}) as w:
        w.extend({"x": np.arange(10)})

    def anon_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    def fds():
        return len(os.listdir("/proc/self/fd"))

    def batches(count, seed):
        rng = np.random.default_rng(seed)
        maps = [shardfeed.open(path, mmap=True), shardfeed.open(path, mmap=False)]
        out = {"x": np.empty((256, 8, 8), np.float32)}
        for k in range(count):
            ds = maps[k % 2]
            indices = rng.integers(-n, n, 256)
            kind = k % 6
            if kind == 0:
                ds.read(indices)
            elif kind == 1:
                ds.read(indices, dtype="float32", scale={"img": 1 / 255, "x": 2.0}, offset={"img": -0.5})
            elif kind == 2:
                ds.read(indices, fields="x", dtype="float32", out=out)
            elif kind == 3:
                ds.read(indices, fields="t", maxlen=5, pad_value=-1)
            elif kind == 4:
                try:
                    ds.read(np.append(indices, n + 5))  # refused before any I/O
                except IndexError:
                    pass
            else:
                try:
                    bad.read(np.arange(1150, 1250 + k % 50))  # fails in the native read
                except shardfeed.ShardReadError:
                    pass
        for ds in maps:
            ds.close()

    def open_close(count):
        for k in range(count):
            with shardfeed.open(path, mmap=bool(k % 2)) as ds:
                ds.read([k % n, -1])
            pickle.loads(pickle.dumps(ds)).close()
            try:
                shardfeed.open(os.path.join(root, "missing"))
            except shardfeed.ShardReadError:
                pass
            if k % 10 == 0:
                with shardfeed.Writer(appended, mode="a") as w:
                    w.append({"x": k})

    def forks(count):
        ds = shardfeed.open(path)
        ds.read(np.arange(300), threads=4)  # the native pool runs in the parent
        for k in range(count):
            pid = os.fork()
            if pid == 0:
                ok = len(ds.read(np.arange(k, k + 300), threads=4)["y"]) == 300
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        ds.close()

    phases = [("batches", lambda: batches(6000, 1)), ("open/close", lambda: open_close(1500)), ("forks", lambda: forks(60))]
    batches(600, 0)  # warm-up: caches, pool threads, allocator arenas
    open_close(150)
    forks(6)
    gc.collect()
    readings = [("start", anon_kib(), fds())]
    for name, run in phases:
        run()
        gc.collect()
        readings.append((name, anon_kib(), fds()))
    print(json.dumps(readings))
''')


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or not hasattr(os, "fork"),
                    reason="needs Linux /proc and fork")
@pytest.mark.skipif(shardfeed._core.BUILD_INFO["sanitizers"] != "",
                    reason="sanitizer runtimes quarantine freed memory")
def test_memory_and_descriptors_stay_flat(tmp_path):
    done = subprocess.run([sys.executable, "-c", LEAKS, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    readings = json.loads(done.stdout)
    print("phase, RssAnon KiB, open fds:", readings)
    start_kib, start_fds = readings[0][1], readings[0][2]
    for name, kib, fds in readings[1:]:
        assert fds == start_fds, f"{name}: {fds} open descriptors, {start_fds} before"
        assert kib - start_kib < 1024, f"{name}: RssAnon grew by {kib - start_kib} KiB ({readings})"


# A buffer the program frees after using shardfeed must go back to the system. With glibc, freeing
# a block it had mapped (above its mmap threshold, 128 KiB at first) raises that threshold to the
# block's size, up to 32 MiB, and the trim threshold to twice that: later blocks below it come from
# the heap, and that much freed heap stays resident. A 16 MiB block freed at every manifest read
# (a read asking for far more than the file held) and a writer's 16 MiB checksum buffer (records of
# 1 byte) did that: RssAnon then rose by megabytes, by chance, over open/close cycles above. Here a
# freed 12 MiB buffer (more than the 4 MiB write buffer) is the measure, which does not vary.
FREED = textwrap.dedent(r'''
    import os, sys
    import numpy as np
    import shardfeed

    def anon_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    root = sys.argv[1]
    path, labels = os.path.join(root, "ds"), os.path.join(root, "labels")
    with shardfeed.Writer(path, fields={"x": ("float32", (4,)), "t": ("int32", (None,))}) as w:
        w.extend({"x": np.ones((100, 4), np.float32), "t": [np.arange(i % 5, dtype=np.int32) for i in range(100)]})
    if sys.argv[2] == "write":
        for k in range(3):  # records of 1 byte: their checksums outweigh them
            with shardfeed.Writer(labels, fields={"y": "uint8"}, mode="w" if k == 0 else "a") as w:
                w.extend({"y": np.arange(1000) % 256})
    else:
        for k in range(3):
            with shardfeed.open(path, mmap=bool(k % 2)) as ds:
                ds.read([k, -1])
            shardfeed.verify(path)
    before = anon_kib()
    block = bytearray(12 << 20)  # zero-filled: every page touched
    del block
    print(anon_kib() - before)
''')


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or platform.libc_ver()[0] != "glibc",
                    reason="measures glibc's allocator through Linux /proc")
@pytest.mark.skipif(shardfeed._core.BUILD_INFO["sanitizers"] != "",
                    reason="sanitizer runtimes have allocators of their own")
@pytest.mark.parametrize("use", ["read", "write"])
def test_memory_freed_after_using_the_library_goes_back(tmp_path, use):
    done = subprocess.run([sys.executable, "-c", FREED, str(tmp_path), use], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    kept = int(done.stdout)
    assert kept < 1024, f"a freed 12 MiB buffer left RssAnon {kept} KiB higher"
