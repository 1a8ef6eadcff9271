"""Fuzzing of what shardfeed reads from disk: manifests, shard headers and shard contents.

Every input must give a clean shardfeed exception (ShardFormatError, ShardReadError) or a valid
dataset whose reads succeed or raise a shardfeed exception; ``verify`` must run and flag exactly
the shards whose bytes changed. Any other exception, or a crash, is a finding. The suite runs this
target with hypothesis (tests/test_fuzz.py); the long run (docs/reliability.md records the figures):

    python fuzz/fuzz_format.py -atheris_runs=100000        # coverage-guided, with atheris
    python fuzz/fuzz_format.py --hypothesis 100000         # without atheris

An input is bytes: the first chooses the kind (0 raw manifest text, 1 JSON edits of the valid
manifest, 2 shard-header bytes, 3 shard and heap bytes), the rest drives the edits.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

import shardfeed
from shardfeed.format import (
    FILE_KIND_CHECKSUMS, FILE_KIND_HEAP, FILE_KIND_RECORDS, HEADER_BYTES, MANIFEST_NAME, check_header,
)
from shardfeed.manifest import parse_manifest

KINDS = ("manifest-bytes", "manifest-json", "header", "contents")
# Values that break things: wrong types, huge and negative counts, paths out of the directory,
# names of other files, almost-valid checksums and dtypes.
INTERESTING = [
    None, True, False, 0, 1, -1, 2, 7, 64, 2 ** 31, 2 ** 32, 2 ** 62 - 1, 2 ** 62, 2 ** 63, 2 ** 64, -2 ** 63,
    0.5, -0.0, 1e308, float("inf"), float("nan"), "", ".", "..", "../x.rec", "/etc/passwd", "a/b", "nul\0",
    "shard-000000.rec", "shard-000001.rec", "shard-000000.var", "manifest.json", "crc32:00000000",
    "crc32:zzzzzzzz", "float128", "bfloat16", "int8", "bool", "shardfeed", [], {}, [None], [None, 2], [3, None],
    [0], [2 ** 40], [-1], {"name": "x", "dtype": "int8", "shape": []}, "x" * 300,
]


class Source:
    """Reads numbers out of the fuzzer's bytes (zeros once they run out)."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def byte(self) -> int:
        value = self.data[self.at] if self.at < len(self.data) else 0
        self.at += 1
        return value

    def below(self, n: int) -> int:
        return (self.byte() | self.byte() << 8) % n if n > 0 else 0

    def rest(self) -> bytes:
        data, self.at = self.data[self.at:], len(self.data)
        return data

    @property
    def left(self) -> bool:
        return self.at < len(self.data)


class Target:
    """A small valid dataset (3 shards: fixed, bool and variable-length fields) copied to a work
    directory before each input."""

    FIELDS = {"x": ("float16", (2, 3)), "flag": "bool", "label": ("int64", ()), "t": ("int32", (None,))}

    def __init__(self, root: str):
        self.template = os.path.join(root, "template")
        self.work = os.path.join(root, "work")
        rng = np.random.default_rng(0)
        n = 17
        self.columns = {"x": rng.standard_normal((n, 2, 3)).astype(np.float16), "flag": np.arange(n) % 2 == 0,
                        "label": np.arange(n, dtype=np.int64) - 5,
                        "t": [np.arange(i % 4, dtype=np.int32) + i for i in range(n)]}
        with shardfeed.Writer(self.template, fields=self.FIELDS, shard_size=HEADER_BYTES + 7 * 48) as w:
            w.extend(self.columns)
        self.files = {}
        for name in sorted(os.listdir(self.template)):
            with open(os.path.join(self.template, name), "rb") as f:
                self.files[name] = f.read()
        self.manifest = json.loads(self.files[MANIFEST_NAME])
        self.shard_files = sorted(name for name in self.files if name != MANIFEST_NAME)
        self.runs = {kind: 0 for kind in KINDS}
        self.opened = 0

    def fresh(self, files: dict) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        for name, data in files.items():
            with open(os.path.join(self.work, name), "wb") as f:
                f.write(data)

    def run(self, data: bytes) -> None:
        source = Source(data)
        kind = KINDS[source.byte() % len(KINDS)]
        self.runs[kind] += 1
        files = dict(self.files)
        changed = set()
        if kind == "manifest-bytes":
            files[MANIFEST_NAME] = source.rest()
            self.parse_only(files[MANIFEST_NAME])
        elif kind == "manifest-json":
            doc = copy.deepcopy(self.manifest)
            for _ in range(1 + source.byte() % 4):
                doc = edit_json(doc, source)
            files[MANIFEST_NAME] = json.dumps(doc).encode()
            self.parse_only(files[MANIFEST_NAME])
        else:
            for _ in range(1 + source.byte() % 3):
                name = self.shard_files[source.below(len(self.shard_files))]
                content = bytearray(files[name])
                if kind == "header":
                    at = source.below(HEADER_BYTES + 8)
                else:
                    at = HEADER_BYTES + source.below(max(1, len(content) - HEADER_BYTES + 8))
                action = source.byte() % 8
                if action == 0:
                    del content[at:]
                elif action == 1:
                    content[at:at] = bytes(1 + source.byte() % 16)
                else:
                    for offset in range(1 + source.byte() % 8):
                        if at + offset < len(content):
                            content[at + offset] = source.byte()
                files[name] = bytes(content)
                if kind == "header":
                    self.check_header_oracle(name, files[name])
            changed = {name for name in self.shard_files if files[name] != self.files[name]}
        self.fresh(files)
        self.open_and_read(source)
        if kind in ("header", "contents"):
            self.verify_oracle(changed)

    def parse_only(self, text: bytes) -> None:
        try:
            parse_manifest("manifest.json", text)
        except shardfeed.ShardFormatError:
            pass

    def check_header_oracle(self, name: str, data: bytes) -> None:
        """The header check passes exactly when the 44 bytes it describes are intact."""
        original = self.files[name]
        kind = {".var": FILE_KIND_HEAP, ".crc": FILE_KIND_CHECKSUMS}.get(name[-4:], FILE_KIND_RECORDS)
        schema = shardfeed.format.Schema.from_spec(self.manifest["fields"])
        intact = len(data) >= HEADER_BYTES and data[:44] == original[:44]
        try:
            check_header(name, data[:HEADER_BYTES], kind, schema)
        except shardfeed.ShardFormatError as exc:
            assert not intact, f"an intact header was refused: {exc}"
            assert str(exc).startswith(name + ": "), exc
        else:
            assert intact, f"a damaged header was accepted: {data[:HEADER_BYTES]!r}"

    def open_and_read(self, source: Source) -> None:
        try:
            choice = source.byte()  # mmap or preadv; reads checked against the record checksums or not
            ds = shardfeed.open(self.work, mmap=bool(choice % 2), verify=bool(choice & 2))
        except shardfeed.ShardfeedError as exc:
            assert isinstance(exc, (ValueError, OSError)), type(exc)
            return
        self.opened += 1
        with ds:
            n = len(ds)
            indices = np.arange(n, dtype=np.int64)
            for options in ({}, {"dtype": "float32"}, {"dtype": "float32", "scale": {"x": 2.0}, "maxlen": 2}):
                try:
                    batch = ds.read(indices[::-1], **options)
                except shardfeed.ShardfeedError as exc:
                    assert isinstance(exc, (ValueError, OSError)), type(exc)
                    continue
                assert all(len(values) == n for values in batch.values())
        report = shardfeed.verify(self.work)
        assert isinstance(report.ok, bool)

    def verify_oracle(self, changed: set) -> None:
        """verify() flags exactly the shards whose files changed (CRC-32 of whole files)."""
        report = shardfeed.verify(self.work)
        bad_files = {os.path.basename(p.file) for p in report.problems}
        names = {name: number for number, s in enumerate(self.manifest["shards"])
                 for name in (s["file"], s.get("heap", {}).get("file"), s.get("checksums", {}).get("file"))}
        assert report.bad_shards == sorted({names[name] for name in changed}), (changed, str(report))
        assert bad_files <= changed, (bad_files, changed)


def edit_json(doc, source: Source):
    """One edit somewhere in the document: replace a value, delete or add a key, drop or repeat a
    list item."""
    path = []
    node = doc
    while isinstance(node, (dict, list)) and node and source.byte() % 3:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = keys[source.below(len(keys))]
        path.append(key)
        node = node[key]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = source.byte() % 6
    value = INTERESTING[source.below(len(INTERESTING))] if action < 3 else source.below(1 << 16) - 100
    if not path:
        return copy.deepcopy(value) if action == 0 else doc
    key = path[-1]
    if action in (0, 1, 3):
        parent[key] = copy.deepcopy(value)
    elif action == 2 and isinstance(parent, dict):
        parent["k" + str(source.byte())] = copy.deepcopy(value)
    elif action == 4:
        del parent[key]
    elif action == 5 and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    return doc


def main(argv) -> int:
    root = tempfile.mkdtemp(prefix="shardfeed-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    target = Target(root)
    started = time.perf_counter()
    try:
        if argv[1:2] == ["--hypothesis"]:
            from hypothesis import HealthCheck, given, settings
            from hypothesis import strategies as st

            runs = int(argv[2]) if len(argv) > 2 else 100_000

            @settings(max_examples=runs, deadline=None, database=None, derandomize=False,
                      suppress_health_check=list(HealthCheck))
            @given(st.binary(max_size=512))
            def fuzz(data):
                target.run(data)
            fuzz()
        else:
            import atheris

            def run(data: bytes) -> None:
                target.run(data)
                total = sum(target.runs.values())
                if total % 10_000 == 0:  # libFuzzer exits without returning here: report as we go
                    report(target, started)

            atheris.instrument_all()  # coverage feedback from the shardfeed (and numpy) Python code
            atheris.Setup(argv, run)
            atheris.Fuzz()
    finally:
        report(target, started)
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(target: Target, started: float) -> None:
    elapsed = time.perf_counter() - started
    total = sum(target.runs.values())
    print(f"shardfeed fuzz: {total} inputs in {elapsed:.0f} s ({total / max(elapsed, 1e-9):.0f}/s); by kind "
          f"{target.runs}; {target.opened} opened as a dataset", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
