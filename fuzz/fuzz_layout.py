"""Fuzzing of what a dataset directory holds besides valid bytes: files of other kinds (FIFOs,
directories, devices through links), symbolic and hard links in every position (manifest, shards,
heaps, the writer's lock, temporary manifests, the merge journal, the next shard's name), manifests
claiming huge counts, shapes numpy cannot represent, names that are not UTF-8 or not encodable,
irregular shard names; then open and read, verify, append (Writer mode="a") and merge.

Oracles: only shardfeed's exceptions escape (plus the FileExistsError / FileNotFoundError of the
documented mode checks), no call blocks (a FIFO) or reads without limit (/dev/zero), no file
outside the dataset directory is written (a victim file beside it keeps its bytes; nothing else
appears there), and an append loses nothing: the samples that read before it read the same after
it, followed by the new ones. The suite runs this target with hypothesis (tests/test_fuzz_layout.py);
a long run:

    python fuzz/fuzz_layout.py --hypothesis 20000
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings

import numpy as np

import shardfeed
from shardfeed.format import LOCK_NAME, MANIFEST_NAME, MERGE_JOURNAL_NAME, temporary_manifest_name

POSITIONS = ("manifest", "rec", "var", "lock", "temporary-manifest", "journal", "next-rec", "next-var")
KINDS = ("fifo", "directory", "link-victim", "link-inside", "link-dev-zero", "link-dangling", "hard-link-victim",
         "junk")
EDITS = ("huge-counts", "bad-shape", "non-utf8-name", "surrogate-name", "drop-entry", "rename-shards")
VICTIM_BYTES = b"4242 elsewhere\nthe victim: no shardfeed call may change this file\n"
_ALLOWED = (shardfeed.ShardfeedError, FileExistsError, FileNotFoundError)


class Finding(AssertionError):
    pass


class Source:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def byte(self) -> int:
        value = self.data[self.at] if self.at < len(self.data) else 0
        self.at += 1
        return value

    def pick(self, options):
        return options[self.byte() % len(options)]


def _deadline(seconds: int):
    def expired(signum, frame):
        raise Finding(f"a call blocked for {seconds} s")
    signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)


class Target:
    FIELDS = {"x": ("float16", (2,)), "flag": "bool", "t": ("int32", (None,))}

    def __init__(self, root: str):
        self.root = root
        self.template = os.path.join(root, "template")
        self.work = os.path.join(root, "work")
        self.victim = os.path.join(root, "victim")
        n = 9
        self.columns = {"x": np.arange(2 * n, dtype=np.float16).reshape(n, 2), "flag": np.arange(n) % 2 == 0,
                        "t": [np.arange(i % 3, dtype=np.int32) + i for i in range(n)]}
        with shardfeed.Writer(self.template, fields=self.FIELDS, shard_size=64 + 3 * 24) as w:
            w.extend(self.columns)
        self.runs = {"mutations": 0, "opened": 0, "appended": 0, "merged": 0}

    # ---- building one input's directory ---------------------------------------------------------

    def fresh(self) -> None:
        for path in (self.work, os.path.join(self.root, "merged")):
            if os.path.lexists(path):
                _make_removable(path)
                shutil.rmtree(path)
        shutil.copytree(self.template, self.work)
        with open(self.victim, "wb") as f:
            f.write(VICTIM_BYTES)

    def path_of(self, position: str, shard: int) -> str:
        names = {"manifest": MANIFEST_NAME, "rec": f"shard-{shard:06d}.rec", "var": f"shard-{shard:06d}.var",
                 "lock": LOCK_NAME, "temporary-manifest": temporary_manifest_name(os.getpid()),
                 "journal": MERGE_JOURNAL_NAME, "next-rec": "shard-000003.rec", "next-var": "shard-000003.var"}
        return os.path.join(self.work, names[position])

    def place(self, position: str, kind: str, shard: int) -> None:
        path = self.path_of(position, shard)
        if os.path.lexists(path):
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.remove(path)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            os.mkdir(path)
        elif kind == "link-victim":
            os.symlink(self.victim, path)
        elif kind == "link-inside":
            os.symlink(f"shard-{(shard + 1) % 3:06d}.rec", path)
        elif kind == "link-dev-zero":
            os.symlink("/dev/zero", path)
        elif kind == "link-dangling":
            os.symlink(os.path.join(self.root, "nowhere"), path)
        elif kind == "hard-link-victim":
            os.link(self.victim, path)
        else:
            with open(path, "wb") as f:
                f.write(b"SHRDFEED junk")

    def edit(self, edit: str, source: Source) -> None:
        """One edit of a manifest a writer wrote (none once the manifest was replaced: the harness
        itself must not write through a link)."""
        manifest = os.path.join(self.work, MANIFEST_NAME)
        if os.path.islink(manifest) or not os.path.isfile(manifest) or os.stat(manifest).st_nlink != 1:
            return
        try:
            with open(manifest, "rb") as f:
                doc = json.loads(f.read())
            self._edit(doc, edit, source)
        except (OSError, ValueError, KeyError, TypeError, IndexError, ZeroDivisionError):
            return  # the dataset was already changed so that this edit does not apply
        with open(manifest, "w") as f:
            json.dump(doc, f)

    def _edit(self, doc: dict, edit: str, source: Source) -> None:
        shards = doc["shards"]
        if edit == "huge-counts":
            k = source.byte() % len(shards)
            count = [2 ** 31, 250_000_000, 10 ** 12, 2 ** 61 // 24][source.byte() % 4]
            shards[k].update(num_samples=count, size=64 + count * doc["record_bytes"])
        elif edit == "bad-shape":
            doc["fields"][0]["shape"] = [[1] * 65, [0, 2 ** 31], [2 ** 31 - 1, 0], [None, 2 ** 40]][source.byte() % 4]
        elif edit in ("non-utf8-name", "surrogate-name"):
            k = source.byte() % len(shards)
            if edit == "non-utf8-name":  # a real file whose name is not UTF-8: readable
                new = os.fsdecode(b"shard-\xff\xfe%d.rec" % k)
                os.rename(os.path.join(self.work, shards[k]["file"]), os.path.join(self.work, new))
            else:
                new = "shard-\ud800.rec"
            shards[k]["file"] = new
        elif edit == "drop-entry":
            del shards[source.byte() % len(shards)]
        else:  # rename-shards: listed names shifted up, so that a writer's next name is a listed one
            for k in reversed(range(len(shards))):
                for entry in (shards[k], shards[k]["heap"]):
                    new = entry["file"].replace(f"{k:06d}", f"{k + 1:06d}")
                    os.rename(os.path.join(self.work, entry["file"]), os.path.join(self.work, new))
                    entry["file"] = new
        doc["num_samples"] = sum(s["num_samples"] for s in shards)

    # ---- one input ---------------------------------------------------------------------------------

    def run(self, data: bytes) -> None:
        source = Source(data)
        self.fresh()
        for _ in range(source.byte() % 4):
            if source.byte() % 3:
                self.place(source.pick(POSITIONS), source.pick(KINDS), source.byte() % 3)
            else:
                self.edit(source.pick(EDITS), source)
            self.runs["mutations"] += 1
        before = set(os.listdir(self.root))
        _deadline(20)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", shardfeed.ShardfeedWarning)
                self.operations(source)
        finally:
            signal.alarm(0)
        with open(self.victim, "rb") as f:
            if f.read() != VICTIM_BYTES:
                raise Finding("the victim file outside the dataset was written")
        if set(os.listdir(self.root)) - before - {"merged"}:
            raise Finding(f"files appeared outside the dataset: {set(os.listdir(self.root)) - before}")

    def operations(self, source: Source) -> None:
        snapshot = self.read_all(mmap=bool(source.byte() % 2))
        report = _call(shardfeed.verify, self.work)
        if report is not None:
            assert isinstance(report.ok, bool) and str(report)
        extra = {"x": np.full((2, 2), 7, np.float16), "flag": np.array([True, False]),
                 "t": [np.arange(1, dtype=np.int32), np.arange(0, dtype=np.int32)]}
        writer = _call(shardfeed.Writer, self.work, mode="a", shard_size=64 + 3 * 24)
        if writer is not None:
            appended = _call(lambda: (writer.extend(extra), writer.close()))
            if appended is not None and snapshot is not None:
                after = self.read_all(mmap=False)
                if after is None:
                    raise Finding("the dataset read before an append no longer opens after it")
                n = len(snapshot["x"])
                for name in ("x", "flag"):
                    if not np.array_equal(after[name][:n].view(np.uint8), snapshot[name].view(np.uint8)) or \
                            not np.array_equal(after[name][n:].view(np.uint8), extra[name].view(np.uint8)):
                        raise Finding(f"an append changed committed samples of field {name!r}")
                self.runs["appended"] += 1
        if _call(shardfeed.merge, [self.work], os.path.join(self.root, "merged")) is not None:
            self.runs["merged"] += 1

    def read_all(self, mmap: bool):
        ds = _call(shardfeed.open, self.work, mmap=mmap)
        if ds is None:
            return None
        self.runs["opened"] += 1
        with ds:
            return _call(ds.read, np.arange(len(ds), dtype=np.int64)[::-1][::-1])


def _call(function, *args, **kwargs):
    """The call's result, or None when it raised one of the allowed (documented) errors."""
    try:
        return function(*args, **kwargs)
    except _ALLOWED as exc:
        if isinstance(exc, OSError) and exc.errno is None and not isinstance(exc, shardfeed.ShardfeedError):
            raise Finding(f"an OSError without errno: {exc!r}") from exc
        return None


def _make_removable(path: str) -> None:
    for directory, _, _ in os.walk(path):
        try:
            os.chmod(directory, 0o755)
        except OSError:
            pass


def main(argv) -> int:
    root = tempfile.mkdtemp(prefix="shardfeed-fuzz-layout-")
    target = Target(root)
    started = time.perf_counter()
    runs = int(argv[2]) if argv[1:2] == ["--hypothesis"] and len(argv) > 2 else 10_000
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        @settings(max_examples=runs, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=24))
        def fuzz(data):
            target.run(data)
        fuzz()
    finally:
        print(f"shardfeed layout fuzz: {target.runs} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        _make_removable(root)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
