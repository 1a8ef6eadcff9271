"""Disk full and file-size limits: the writer raises ShardWriteError (an OSError) naming the file and
the cause, the dataset keeps the samples committed before, nothing half-written is left behind,
and append mode continues once there is room again. In subprocesses: RLIMIT_FSIZE, and a small
tmpfs mounted in a private mount namespace (root only)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(r'''
    import errno, json, os, resource, sys
    import numpy as np
    import shardfeed
    from shardfeed.format import MANIFEST_NAME

    path, scenario = sys.argv[1], sys.argv[2]
    width = 256 if scenario == "tmpfs" else 16  # 1 KiB or 64-byte records
    x = np.arange(1000 * width, dtype=np.float32).reshape(1000, width)
    report = {}

    def check(committed):
        ds = shardfeed.open(path)
        assert len(ds) == committed, (len(ds), committed)
        assert np.array_equal(ds.read(np.arange(committed))["x"], x[:committed])
        assert shardfeed.verify(path).ok, str(shardfeed.verify(path))
        names = set(os.listdir(path))
        listed = {name for s in ds._manifest.shards for name in (s.file, s.checksums_file)}
        assert names == listed | {MANIFEST_NAME}, sorted(names - listed)

    def write_until_failure(w, start):
        try:
            for at in range(start, 1000, 30):
                w.extend({"x": x[at:at + 30]})
            w.close()
        except shardfeed.ShardWriteError as exc:
            report.update(errno=exc.errno, filename=exc.filename, message=str(exc),
                          builtin=isinstance(exc, OSError), cause=type(exc.__cause__).__name__)
            return
        raise AssertionError("no error")

    if scenario in ("shard", "manifest"):
        # shard: 100 records (6464-byte files); manifest: 4 records (320-byte files), the manifest grows
        w = shardfeed.Writer(path, fields={"x": ("float32", (16,))},
                             shard_size=64 + (100 if scenario == "shard" else 4) * 64)
        w.extend({"x": x[:250]})
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        # shard: below the next shard file; manifest: room for a few more shard entries only
        limit = 3000 if scenario == "shard" else os.path.getsize(os.path.join(path, MANIFEST_NAME)) + 600
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        write_until_failure(w, 250)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    else:  # the dataset (1000 KiB) goes to a 2 MiB tmpfs, 1.5 MiB of it taken by a ballast file
        ballast = os.path.join(os.path.dirname(path), "ballast")
        with open(ballast, "wb") as f:
            f.write(b"\1" * (1536 << 10))
        w = shardfeed.Writer(path, fields={"x": ("float32", (256,))}, shard_size=64 + 120 * 1024)
        write_until_failure(w, 0)
        os.unlink(ballast)
    committed = len(shardfeed.open(path))
    report["committed"] = committed
    check(committed)
    with shardfeed.Writer(path, mode="a") as w:  # room again: append mode continues
        w.extend({"x": x[committed:]})
    check(1000)
    print(json.dumps(report))
''')


def run_child(args, timeout=60):
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs RLIMIT_FSIZE")
def test_file_size_limit_while_writing_a_shard(new_path):
    path = new_path()
    report = run_child([sys.executable, "-c", CHILD, path, "shard"])
    assert report["errno"] == 27 and report["builtin"] and report["cause"] == "OSError"  # EFBIG
    assert report["filename"] == os.path.join(path, "shard-000002.rec")
    assert "File too large (the file is larger than the file-size limit (ulimit -f)" in report["message"]
    assert "the dataset keeps its 200 committed samples" in report["message"]
    assert "continue with Writer(path, mode='a')" in report["message"]
    assert report["committed"] == 200


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs RLIMIT_FSIZE")
def test_file_size_limit_while_writing_the_manifest(new_path):
    path = new_path()
    report = run_child([sys.executable, "-c", CHILD, path, "manifest"])
    assert report["errno"] == 27
    assert os.path.basename(report["filename"]).startswith("manifest.json.tmp-")
    committed = report["committed"]
    assert committed % 4 == 0 and 250 < committed < 1000  # whole shards, some written under the limit
    assert f"the dataset keeps its {committed} committed samples" in report["message"]


def can_mount_tmpfs():
    if os.geteuid() != 0 or not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root and unshare -m to mount a small tmpfs")
def test_disk_full_on_a_small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    path = str(mount / "ds")
    script = f"mount -t tmpfs -o size=2m tmpfs {mount} && exec \"$0\" -c \"$1\" {path} tmpfs"
    report = run_child(["unshare", "-m", "sh", "-c", script, sys.executable, CHILD])
    assert report["errno"] == 28 and report["builtin"]  # ENOSPC
    assert report["filename"].startswith(path + os.sep)
    assert "No space left on device (the disk is full)" in report["message"]
    assert report["committed"] > 0 and report["committed"] % 120 == 0
    assert "the dataset keeps its" in report["message"]
