"""Crash safety of the writer: SIGKILL at every I/O step of a two-session write (shard files,
manifest updates, the lock file) leaves a dataset that opens with exactly the samples committed
before the kill, and that append mode recovers; one writer per dataset (the lock file).

The kills are deterministic. A driver subprocess runs the write once to list its I/O steps, then
forks one child per kill point; the child counts the writer's I/O calls (os.open, os.write,
os.pwrite, os.ftruncate, os.fsync, os.replace, os.unlink and the shard-file writes, each flushed
to the file) and SIGKILLs itself just before call k, or half-way through it ("torn": half of the
bytes written, then the kill). The same runs again with field ``x`` compressed with a trained
dictionary (its file written, then the frames that use it).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import shardfeed
from shardfeed.format import HEADER_BYTES, MANIFEST_NAME
from shardfeed.writer import LOCK_NAME

FIELDS = {"x": ("float32", (3,)), "label": ("int64", ()), "t": ("int16", (None,))}
RECORD_BYTES = 40  # x at 0 (12 bytes), label at 16, t's descriptor at 24
SHARD_SIZE = HEADER_BYTES + 5 * RECORD_BYTES  # 5 samples per shard
SESSIONS = [(23, 3), (14, 4)]  # (samples, batch size): mode "w" then mode "a"
# Each run's compression (the record keeps its 40 bytes: x's descriptor takes its 12 bytes' place).
COMPRESSIONS = {"plain": None, "dictionary": {"x": {"codec": "zstd", "dictionary": True}}}
TOTAL = sum(n for n, _ in SESSIONS)


def make_data():
    rng = np.random.default_rng(42)
    return {"x": rng.standard_normal((TOTAL, 3)).astype(np.float32),
            "label": np.arange(TOTAL, dtype=np.int64) * 7 - 50,
            "t": [rng.integers(-1000, 1000, size=i % 4, dtype=np.int16) for i in range(TOTAL)]}


def take(data, start, stop):
    return {name: values[start:stop] for name, values in data.items()}


DRIVER = textwrap.dedent(r'''
    import json, os, signal, sys
    import numpy as np
    import shardfeed
    from shardfeed import shardfile as W

    root, shard_size = sys.argv[1], int(sys.argv[2])
    fields, sessions, compression, data = CONFIG
    real = {name: getattr(os, name) for name in ("open", "write", "pwrite", "ftruncate", "fsync", "replace", "unlink")}
    real_write = W._OutputFile.write


    class Steps:
        """Counts I/O calls; SIGKILLs the process at call `kill_at` (torn: after half of its bytes)."""
        def __init__(self, kill_at=None, torn=False):
            self.count, self.kill_at, self.torn = 0, kill_at, torn
            self.log, self.committed, self.busy = [], None, False

        def step(self, name, partial=None):
            if self.busy:
                return
            self.log.append((name, self.committed))
            if self.count == self.kill_at:
                if self.torn and partial is not None:
                    partial()
                os.kill(os.getpid(), signal.SIGKILL)
            self.count += 1

        def install(self):
            steps = self

            def wrap(name):
                def call(*args, **kwargs):
                    partial = None
                    if name == "write":
                        fd, payload = args
                        partial = lambda: real["write"](fd, bytes(payload)[:max(1, len(payload) // 2)])
                    steps.step(f"os.{name}", partial)
                    result = real[name](*args, **kwargs)
                    if name == "replace" and str(args[1]).endswith("manifest.json"):
                        steps.busy = True
                        with open(args[1], "rb") as f:
                            steps.committed = json.load(f)["num_samples"]
                        steps.busy = False
                    return result
                return call

            def shard_write(self, data):
                raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)

                def partial():
                    self.file.write(raw[:max(1, raw.size // 2)])
                    self.file.flush()
                steps.step("shard write", partial)
                start = real_write(self, data)
                self.file.flush()  # on disk now: a kill after this leaves a partial shard file
                return start

            for name in real:
                setattr(os, name, wrap(name))
            W._OutputFile.write = shard_write


    def scenario(path):
        start = 0
        for session, (count, batch) in enumerate(sessions):
            mode = "w" if session == 0 else "a"
            with shardfeed.Writer(path, fields=fields if mode == "w" else None, mode=mode, shard_size=shard_size,
                                  metadata={"session": session}, compression=compression if mode == "w" else None) as w:
                for at in range(start, start + count, batch):
                    stop = min(at + batch, start + count)
                    w.extend({name: values[at:stop] for name, values in data.items()})
            start += count


    dry = Steps()
    dry.install()
    scenario(os.path.join(root, "dry"))
    points = [(k, False) for k in range(dry.count)]
    points += [(k, True) for k, (name, _) in enumerate(dry.log) if name in ("os.write", "shard write")]
    results = []
    for k, torn in points:
        path = os.path.join(root, f"kill-{k}{'-torn' if torn else ''}")
        pid = os.fork()
        if pid == 0:
            try:
                Steps(k, torn).install()
                scenario(path)
            finally:
                os._exit(3)  # the kill did not happen
        _, status = os.waitpid(pid, 0)
        name, committed = dry.log[k]
        results.append({"path": path, "step": k, "torn": torn, "call": name, "committed": committed, "pid": pid,
                        "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL})
    print(json.dumps({"steps": dry.count, "results": results}))
''')


@pytest.fixture(scope="module", params=list(COMPRESSIONS))
def kill_runs(tmp_path_factory, request):
    compression = COMPRESSIONS[request.param]
    data = make_data()
    lists = {"x": data["x"].tolist(), "label": data["label"].tolist(), "t": [r.tolist() for r in data["t"]]}
    # the driver rebuilds the exact arrays from the lists (float32 values survive repr() exactly)
    driver = DRIVER.replace("fields, sessions, compression, data = CONFIG", textwrap.dedent(f"""
        fields, sessions, compression, raw = {(FIELDS, SESSIONS, compression, lists)!r}
        data = {{"x": np.array(raw["x"], np.float32), "label": np.array(raw["label"], np.int64),
                "t": [np.array(r, np.int16) for r in raw["t"]]}}"""))
    root = tmp_path_factory.mktemp("kills")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", driver, str(root), str(SHARD_SIZE)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), data, compression


def test_there_are_enough_kill_points(kill_runs):
    runs, _, _ = kill_runs
    results = runs["results"]
    assert len(results) >= 50, len(results)
    assert all(r["killed"] for r in results), [r for r in results if not r["killed"]][:3]
    calls = {r["call"] for r in results}
    assert {"os.replace", "os.fsync", "os.write", "shard write", "os.open", "os.unlink"} <= calls, calls
    # kills before the first commit, between commits of both sessions, and after the last one
    committed = {r["committed"] for r in results}
    assert None in committed and 0 in committed and TOTAL in committed and len(committed) >= 9, committed
    calls = {name: sum(r["call"] == name for r in results) for name in sorted(calls)}
    print(f"{len(results)} kill points ({sum(r['torn'] for r in results)} torn) over {runs['steps']} I/O steps; "
          f"by call {calls}; {len(committed)} committed states")


def check_dataset(path, data, count):
    ds = shardfeed.open(path)
    assert len(ds) == count
    batch = ds.read(np.arange(count))
    np.testing.assert_array_equal(batch["x"], data["x"][:count])
    np.testing.assert_array_equal(batch["label"], data["label"][:count])
    for i in range(count):
        np.testing.assert_array_equal(batch["t"][i, :batch.lengths["t"][i]], data["t"][i])
    ds.close()


def test_every_kill_leaves_the_committed_samples_and_append_recovers(kill_runs):
    runs, data, compression = kill_runs
    recovered_with_warning = 0
    for run in runs["results"]:
        path, committed = run["path"], run["committed"]
        where = f"kill before step {run['step']} ({run['call']}{', torn' if run['torn'] else ''})"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if committed is None:
                # killed before the first commit: no dataset, said clearly; mode "w" starts again
                with pytest.raises(shardfeed.ShardReadError, match="no manifest.json: .*never committed"):
                    shardfeed.open(path)
                with pytest.raises(FileNotFoundError, match="no dataset to append to"):
                    shardfeed.Writer(path, mode="a")
                writer = shardfeed.Writer(path, fields=FIELDS, shard_size=SHARD_SIZE, compression=compression)
                committed = 0
            else:
                check_dataset(path, data, committed)
                assert shardfeed.open(path).metadata["session"] in (0, 1), where
                writer = shardfeed.Writer(path, mode="a", shard_size=SHARD_SIZE, compression=compression)
                assert len(writer) == committed, where
            with writer:
                writer.extend(take(data, committed, TOTAL))
        notices = [str(w.message) for w in caught if issubclass(w.category, shardfeed.ShardfeedWarning)]
        assert len(notices) == len(caught) <= 1, (where, [str(w.message) for w in caught])
        if notices:
            recovered_with_warning += 1
            if f"pid {run['pid']}" in notices[0]:
                assert "did not finish" in notices[0], notices
            else:  # killed before the pid was in the lock file: the warning names no writer
                assert run["call"] in ("os.open", "os.ftruncate", "os.pwrite"), (where, notices)
                assert "removed files the manifest does not list" in notices[0], notices
        check_dataset(path, data, TOTAL)
        report = shardfeed.verify(path)
        assert report.ok and not report.notes, (where, str(report))
        with open(os.path.join(path, MANIFEST_NAME)) as f:
            manifest = json.load(f)
        listed = {s["file"] for s in manifest["shards"]}
        heaps = {name.replace(".rec", ext) for name in listed for ext in (".var", ".crc")}
        dictionaries = {d["file"] for d in manifest.get("dictionaries", [])}
        assert set(os.listdir(path)) == listed | heaps | dictionaries | {MANIFEST_NAME}, (where, os.listdir(path))
        if compression is not None:  # every frame written with a dictionary, whatever was killed
            assert dictionaries and all(s["dictionaries"]["x"] in dictionaries for s in manifest["shards"]), where
    assert recovered_with_warning >= len(runs["results"]) // 2


# ---- the lock file ----------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(new_path):
    path = new_path()
    with shardfeed.Writer(path, fields={"x": "int8"}) as first:
        first.extend({"x": np.arange(3)})
        with pytest.raises(shardfeed.WriterLockedError) as info:
            shardfeed.Writer(path, mode="a")
        assert isinstance(info.value, OSError) and info.value.pid == os.getpid()
        assert f"another writer (pid {os.getpid()} on host {os.uname().nodename})" in str(info.value)
        assert info.value.filename == os.path.join(path, LOCK_NAME)
        # another process too, and mode "w" on the same directory
        code = f"import shardfeed; shardfeed.Writer({path!r}, mode='a')"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and f"WriterLockedError: [Errno 11] another writer (pid {os.getpid()}" in done.stderr
        first.extend({"x": np.arange(3, 5)})
    with shardfeed.Writer(path, mode="a") as again:  # free once the first writer closed
        again.extend({"x": [5]})
    np.testing.assert_array_equal(shardfeed.open(path).read(np.arange(6))["x"], np.arange(6))
    assert not os.path.exists(os.path.join(path, LOCK_NAME))


def test_mode_w_is_refused_while_a_writer_creates_the_dataset(new_path):
    path = new_path()
    os.makedirs(path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, fcntl, os
        fd = os.open({os.path.join(path, LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{{os.getpid()}} host-b\\n".encode())
        print("locked", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(shardfeed.WriterLockedError, match=f"pid {holder.pid} on host host-b"):
            shardfeed.Writer(path, fields={"x": "int8"})
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
    # the holder is gone (the kernel dropped its lock): its lock file is stale and taken over
    with pytest.warns(shardfeed.ShardfeedWarning, match=f"a writer \\(pid {holder.pid} on host host-b\\) did not finish"):
        w = shardfeed.Writer(path, fields={"x": "int8"})
    w.close()


def test_writer_killed_by_sigkill_releases_the_lock(new_path):
    """The lock dies with its holder: a killed writer never blocks the next one."""
    path = new_path()
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, numpy as np, shardfeed
        w = shardfeed.Writer({path!r}, fields={{"x": "int32"}}, shard_size=64 + 40)
        w.extend({{"x": np.arange(25)}})
        print("written", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "written\n"
    with pytest.raises(shardfeed.WriterLockedError, match=f"pid {child.pid}"):
        shardfeed.Writer(path, mode="a")
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    child.stdin.close()
    child.stdout.close()
    with pytest.warns(shardfeed.ShardfeedWarning, match=f"pid {child.pid} .* did not finish; continuing after the 20 "
                                                        r"committed samples, removed its uncommitted files "
                                                        r"\['shard-000002.crc', 'shard-000002.rec'\]"):
        w = shardfeed.Writer(path, mode="a")
    with w:
        w.extend({"x": np.arange(20, 30)})
    np.testing.assert_array_equal(shardfeed.open(path)[:]["x"], np.arange(30))


def test_failed_open_releases_the_lock(tools, new_path):
    path = tools.write_dataset(new_path(), {"x": "int8"}, {"x": np.arange(3)})
    with pytest.raises(shardfeed.SchemaError):
        shardfeed.Writer(path, fields={"x": "int16"}, mode="a")
    with pytest.raises(ValueError, match="metadata must be JSON"):
        shardfeed.Writer(path, mode="a", metadata={"bad": float("nan")})
    assert not os.path.exists(os.path.join(path, LOCK_NAME))
    with shardfeed.Writer(path, mode="a") as w:  # no stale-lock warning: nothing was left behind
        w.append({"x": 3})


@pytest.mark.parametrize("interrupt_at, committed", [(1, 4), (2, 4), (3, 8)],
                         ids=["flushing", "flushing-checksums", "new-shard"])
def test_keyboard_interrupt_in_extend_keeps_the_committed_shards(new_path, monkeypatch, interrupt_at, committed):
    """An exception that is not a value error (Ctrl-C) in the middle of writing ends the writer
    without committing the half-written shard; the committed ones stay, nothing else is left."""
    from shardfeed import shardfile
    path = new_path()
    w = shardfeed.Writer(path, fields={"x": "int64"}, shard_size=HEADER_BYTES + 8 * 4)
    w.extend({"x": np.arange(6)})  # shard 0 committed, 2 samples buffered for shard 1
    original = shardfile._OutputFile.write
    calls = []

    def interrupted(self, data):  # calls 1-2 flush shard 1 and its checksums (then it commits), 3 starts shard 2
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return original(self, data)
    monkeypatch.setattr(shardfile._OutputFile, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with w:
            w.extend({"x": np.arange(6, 20)})
    monkeypatch.undo()
    shards = [f"shard-{k:06d}.{ext}" for k in range(committed // 4) for ext in ("crc", "rec")]
    assert sorted(os.listdir(path)) == [MANIFEST_NAME] + shards
    np.testing.assert_array_equal(shardfeed.open(path)[:]["x"], np.arange(committed))
    with pytest.raises(ValueError, match="is closed"):
        w.extend({"x": [1]})
    with shardfeed.Writer(path, mode="a") as again:  # the lock was released: no warning
        again.extend({"x": np.arange(committed, 20)})
    np.testing.assert_array_equal(shardfeed.open(path)[:]["x"], np.arange(20))
