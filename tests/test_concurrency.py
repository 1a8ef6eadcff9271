"""Concurrency under load: reader processes (several threads each) read one dataset while another
process appends to it in append mode. Every open sees a manifest the writer committed (the old or
the new one, never a mix: its length is one the writer committed and its shards add up), every
read is exact, and datasets opened before the appends keep reading their own samples."""

import json
import subprocess
import sys
import textwrap
import time

import numpy as np

import shardfeed
from shardfeed.format import HEADER_BYTES, Schema

FIELDS = {"i": "int64", "v": ("float32", (4,)), "t": ("int16", (None,))}
RECORD_BYTES = 40  # i at 0, v at 8, t's descriptor at 24
PER_SHARD = 200
START = 2000
SESSIONS = 8
PER_SESSION = 450  # commits after 200, 400 (full shards) and 450 (close) samples


def sample_values(indices):
    indices = np.asarray(indices, dtype=np.int64)
    return {"i": indices, "v": indices[:, None] * np.array([1, -2, 3, 0.5], np.float32),
            "t": [np.full(i % 5, i % 30000, np.int16) for i in indices]}


def committed_lengths():
    lengths = {START}
    for s in range(SESSIONS):
        lengths |= {START + s * PER_SESSION + k for k in (200, 400, 450)}
    return lengths


READER = textwrap.dedent(r'''
    import json, os, sys, threading, time
    import numpy as np
    import shardfeed

    path, go, stop, valid = sys.argv[1], sys.argv[2], sys.argv[3], set(json.loads(sys.argv[4]))
    stats = {"opens": 0, "reads": 0, "samples": 0, "old_reads": 0, "lengths": set(), "errors": []}
    lock = threading.Lock()

    def check(ds, indices):
        batch = ds.read(indices, dtype={"v": "float32"})
        assert np.array_equal(batch["i"], indices), "wrong samples"
        assert np.array_equal(batch["v"], indices[:, None] * np.array([1, -2, 3, 0.5], np.float32)), "wrong values"
        assert np.array_equal(batch.lengths["t"], indices % 5), "wrong lengths"
        rows = batch["t"]
        expected = np.where(np.arange(rows.shape[1])[None, :] < (indices % 5)[:, None], (indices % 30000)[:, None], 0)
        assert np.array_equal(rows, expected), "wrong rows"

    def reader(k, old):
        rng = np.random.default_rng(k)
        try:
            while not os.path.exists(stop):
                ds = shardfeed.open(path, mmap=bool(k % 2))
                n = len(ds)
                assert n in valid, f"opened {n} samples, which the writer never committed"
                assert sum(s.num_samples for s in ds._manifest.shards) == n
                for _ in range(5):
                    indices = np.append(rng.integers(0, n, 300), n - 1)
                    check(ds, indices)
                    check(old, rng.integers(0, len(old), 100))  # opened before the appends
                ds.close()
                with lock:
                    stats["opens"] += 1
                    stats["reads"] += 10
                    stats["samples"] += 5 * 401
                    stats["lengths"].add(n)
        except BaseException as exc:
            with lock:
                stats["errors"].append(repr(exc))

    old = shardfeed.open(path)
    while not os.path.exists(go):
        time.sleep(0.005)
    threads = [threading.Thread(target=reader, args=(k, old)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["lengths"] = sorted(stats["lengths"])
    print(json.dumps(stats))
''')

APPENDER = textwrap.dedent(r'''
    import sys, time
    import numpy as np
    import shardfeed
    path, sessions, per_session, start, shard_size = sys.argv[1], *map(int, sys.argv[2:])

    def sample_values(indices):  # as in the test module
        return {"i": indices, "v": indices[:, None] * np.array([1, -2, 3, 0.5], np.float32),
                "t": [np.full(i % 5, i % 30000, np.int16) for i in indices]}
    at = start
    for s in range(sessions):
        with shardfeed.Writer(path, mode="a", shard_size=shard_size) as w:
            for lo in range(at, at + per_session, 50):
                w.extend(sample_values(np.arange(lo, lo + 50)))
                time.sleep(0.01)
        at += per_session
    print(at)
''')


def test_readers_see_old_or_new_manifest_while_a_process_appends(new_path, tmp_path):
    path = new_path()
    assert Schema.from_spec(FIELDS).record_bytes == RECORD_BYTES
    shard_size = HEADER_BYTES + PER_SHARD * RECORD_BYTES
    with shardfeed.Writer(path, fields=FIELDS, shard_size=shard_size) as w:
        w.extend(sample_values(np.arange(START)))
    go, stop = str(tmp_path / "go"), str(tmp_path / "stop")
    valid = json.dumps(sorted(committed_lengths()))
    readers = [subprocess.Popen([sys.executable, "-c", READER, path, go, stop, valid], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        time.sleep(0.5)  # the readers have opened their "old" dataset
        open(go, "w").close()
        appender = subprocess.run([sys.executable, "-c", APPENDER, path, str(SESSIONS), str(PER_SESSION), str(START),
                                   str(shard_size)],
                                  capture_output=True, text=True, timeout=120)
        time.sleep(0.2)
    finally:
        open(stop, "w").close()
        outputs = [r.communicate(timeout=120) for r in readers]
    assert appender.returncode == 0, appender.stderr[-3000:]
    final = START + SESSIONS * PER_SESSION
    assert int(appender.stdout) == final
    seen = set()
    for reader, (out, err) in zip(readers, outputs):
        assert reader.returncode == 0, err[-3000:]
        stats = json.loads(out)
        assert stats["errors"] == [], stats["errors"][:3]
        assert stats["opens"] >= 3, stats
        seen |= set(stats["lengths"])
    print(f"3 processes x 4 threads: lengths seen {sorted(seen)}; "
          f"{sum(json.loads(o)['opens'] for o, _ in outputs)} opens")
    assert len(seen) >= 5 and final in seen, sorted(seen)  # the readers saw the dataset grow
    ds = shardfeed.open(path)
    assert len(ds) == final and ds.verify().ok
    np.testing.assert_array_equal(ds.read(np.arange(final))["i"], np.arange(final))
