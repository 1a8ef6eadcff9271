"""Conversion throughput (MB/s of source data) against copying the source file, in the same run.

Three groups, each with ``copy`` as its baseline (``shutil.copyfile`` of the source files: what
"simply copying the data" costs on this machine). A copy does not wait for the disk, while the
converters fsync every shard they complete (the format's commit rule), so the .npy groups also
time ``copy-fsync``: the same copy followed by an fsync of each copied file, a durable copy.

- ``convert-npy``: one float32[N, 1024] ``.npy`` file; ``npy`` stores it as float32 (the
  converter's fast path: mapped pages checksummed and written as they are), ``npy-float16``
  narrows it to float16 and measures the error;
- ``convert-npy-2-fields``: float32[N, 256] features and int64 labels in two ``.npy`` files,
  interleaved into one record per sample;
- ``convert-csv``: one CSV file of 16 float columns (6 decimals) and an integer label, parsed in
  chunks into a float32[16] field and an int64 label.

One round converts (or copies) the whole source; before each round (not timed) the previous output
is removed, ``os.sync()`` writes dirty pages back and the source is read once, so every round
starts from the same state with the source in the page cache. ``extra_info``: ``source_bytes``, ``mb_per_s`` (from the median
round), ``ratio_to_copy`` (copy's median time over this entry's: 0.5 = half the speed of a copy),
``ratio_to_copy_fsync`` (the same against the durable copy), ``fsync`` and ``correct`` (the
dataset read back equals the source, checked every run).

With ``--benchmark-disable`` (the test suite's default) each entry runs once on a small source.
"""

from __future__ import annotations

import os
import shutil
import statistics

import numpy as np
import pytest

import shardfeed
from shardfeed import convert

TIMED_NPY_BYTES = 512 << 20
TIMED_CSV_ROWS = 400_000  # about 70 MB of text
TIMED_ROUNDS = 5
SEED = 20240607
_medians: dict = {}


def _timing_enabled(config) -> bool:
    return not config.getoption("benchmark_disable") or bool(config.getoption("benchmark_enable"))


@pytest.fixture(scope="module")
def sources(request, tmp_path_factory):
    timed = _timing_enabled(request.config)
    root = tmp_path_factory.mktemp("convert-bench")
    rng = np.random.default_rng(SEED)
    rows = (TIMED_NPY_BYTES if timed else 1 << 20) // 4096
    big = np.lib.format.open_memmap(root / "x.npy", mode="w+", dtype=np.float32, shape=(rows, 1024))
    for start in range(0, rows, 8192):
        big[start:start + 8192] = rng.standard_normal((min(8192, rows - start), 1024), dtype=np.float32)
    big.flush()
    del big
    features = rng.standard_normal((rows * 4, 256), dtype=np.float32)
    np.save(root / "f.npy", features)
    np.save(root / "l.npy", rng.integers(0, 1000, rows * 4))
    del features
    csv_rows = TIMED_CSV_ROWS if timed else 2000
    with open(root / "t.csv", "w") as f:
        f.write(",".join([f"f{i}" for i in range(16)] + ["label"]) + "\n")
        for start in range(0, csv_rows, 50_000):
            n = min(50_000, csv_rows - start)
            values = rng.standard_normal((n, 16))
            labels = rng.integers(0, 10, n)
            f.write("".join(",".join(f"{v:.6f}" for v in row) + f",{label}\n" for row, label in zip(values, labels)))
    yield {"root": root, "timed": timed}
    shutil.rmtree(root, ignore_errors=True)


def _fresh(path, files, timed: bool) -> None:
    """Before each round (not timed): no output, no dirty pages, the source in the page cache."""
    shutil.rmtree(path, ignore_errors=True)
    if timed:  # system-wide, so it can take a while on a busy machine: only when timing
        os.sync()
        for name in files:  # DAMON pageout (see RESULTS.md) may have evicted the source since
            with open(name, "rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass


def _copy(files, out, fsync=False):
    os.makedirs(out, exist_ok=True)
    for name in files:
        copied = os.path.join(out, os.path.basename(name))
        shutil.copyfile(name, copied)
        if fsync:
            fd = os.open(copied, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _check_npy(out, converter, root) -> bool:
    with shardfeed.open(out) as ds:
        rows = np.load(root / "x.npy", mmap_mode="r")
        picks = np.unique(np.linspace(0, len(rows) - 1, 64).astype(np.int64))
        got = ds.read(picks, "x")["x"]
        want = rows[picks] if converter == "npy" else rows[picks].astype(np.float16)
        return len(ds) == len(rows) and bool(np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)))


def _check_two_fields(out, root) -> bool:
    with shardfeed.open(out) as ds:
        x, y = np.load(root / "f.npy", mmap_mode="r"), np.load(root / "l.npy", mmap_mode="r")
        picks = np.unique(np.linspace(0, len(x) - 1, 64).astype(np.int64))
        batch = ds.read(picks)
        return len(ds) == len(x) and bool(np.array_equal(batch["x"], x[picks]) and np.array_equal(batch["y"], y[picks]))


def _check_csv(out, root) -> bool:
    with shardfeed.open(out) as ds:
        first = np.loadtxt(root / "t.csv", delimiter=",", skiprows=1, max_rows=50)
        batch = ds.read(np.arange(50))
        return bool(np.array_equal(batch["x"], first[:, :16].astype(np.float32))
                    and np.array_equal(batch["label"], first[:, 16].astype(np.int64)))


CASES = {
    "convert-npy": ["copy", "copy-fsync", "npy", "npy-float16"],
    "convert-npy-2-fields": ["copy", "copy-fsync", "npy"],
    "convert-csv": ["copy", "csv"],
}


@pytest.mark.parametrize("group, converter", [(g, c) for g, cs in CASES.items() for c in cs])
def test_conversion_throughput(benchmark, sources, group, converter):
    root = sources["root"]
    out = root / f"out-{group}-{converter}"
    files = {"convert-npy": ["x.npy"], "convert-npy-2-fields": ["f.npy", "l.npy"], "convert-csv": ["t.csv"]}[group]
    files = [str(root / name) for name in files]
    source_bytes = sum(os.path.getsize(name) for name in files)
    if converter.startswith("copy"):
        def work():
            _copy(files, out, fsync=converter == "copy-fsync")
    elif group == "convert-npy":
        def work():
            convert.from_npy(out, files[0], dtypes=None if converter == "npy" else "float16")
    elif group == "convert-npy-2-fields":
        def work():
            convert.from_npy(out, {"x": files[0], "y": files[1]})
    else:
        def work():
            convert.from_csv(out, files[0], label="label")

    rounds = TIMED_ROUNDS if sources["timed"] else 1
    benchmark.group = group
    benchmark.pedantic(work, setup=lambda: _fresh(out, files, sources["timed"]), rounds=rounds, warmup_rounds=1 if sources["timed"] else 0,
                       iterations=1)
    if converter.startswith("copy"):
        correct = all(os.path.getsize(os.path.join(out, os.path.basename(n))) == os.path.getsize(n) for n in files)
    elif group == "convert-npy":
        correct = _check_npy(out, converter, root)
    elif group == "convert-npy-2-fields":
        correct = _check_two_fields(out, root)
    else:
        correct = _check_csv(out, root)
    median = statistics.median(benchmark.stats.stats.data) if benchmark.stats else None
    _medians[(group, converter)] = median
    benchmark.extra_info.update(converter=converter, baseline=converter == "copy", source_bytes=source_bytes,
                                fsync=converter != "copy", correct=correct)
    if median:
        benchmark.extra_info["mb_per_s"] = source_bytes / median / 1e6
        for reference in ("copy", "copy-fsync"):
            base = _medians.get((group, reference))
            if base and converter != reference:
                benchmark.extra_info[f"ratio_to_{reference.replace('-', '_')}"] = base / median
    shutil.rmtree(out, ignore_errors=True)
    assert correct, f"{group}/{converter}: the dataset differs from the source"
