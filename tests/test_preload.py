"""Dataset.preload: every file of the dataset read once, front to back, into the page cache; skipped
when the dataset cannot fit in the memory the process may use."""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

import shardfeed
import shardfeed.dataset
from shardfeed.errors import ShardReadError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import regimes  # noqa: E402

N = 3000
needs_fadvise = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise to evict files")


def data_files(path):
    """The files preload reads: records and heaps (not the manifest, nor the per-record checksums,
    which only open(verify=True) reads, whole, at open)."""
    return sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith((".rec", ".var")))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Fixed-size records over several shards, and a variable-length field (heap files)."""
    path = str(tmp_path_factory.mktemp("preload") / "ds")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, 700)).astype(np.float16)
    tokens = [rng.integers(0, 1000, rng.integers(0, 40)).astype(np.int32) for _ in range(N)]
    with shardfeed.Writer(path, fields={"x": ("float16", (700,)), "tokens": ("int32", (None,))},
                          shard_size=1 << 20) as writer:
        for i in range(N):
            writer.append({"x": x[i], "tokens": tokens[i]})
    return path, x, tokens


def evicted(path):
    """Evicts the dataset's files; False where this file system keeps them (tmpfs), as mincore
    tells, not the code under test."""
    regimes.evict(data_files(path))
    return regimes.resident_fraction(data_files(path)) < 0.5


@needs_fadvise
def test_preload_reads_every_file_into_the_page_cache(dataset):
    path, x, tokens = dataset
    files = data_files(path)
    assert any(f.endswith(".var") for f in files) and sum(f.endswith(".rec") for f in files) > 1
    with shardfeed.open(path) as ds:
        if not evicted(path):
            pytest.skip("files here cannot be evicted from the page cache")
        assert ds.preload() is True
        for name in files:  # each file, heap files included, not just most of the bytes
            assert regimes.resident_fraction([name]) > 0.9, name
        ids = np.random.default_rng(0).permutation(N)[:500]
        batch = ds.read(ids, dtype="float32")
    assert batch.uncached == 0
    np.testing.assert_array_equal(batch["x"], x[ids].astype(np.float32))
    for row, i in enumerate(ids):
        np.testing.assert_array_equal(batch["tokens"][row, :batch.lengths["tokens"][row]], tokens[i])


@needs_fadvise
def test_a_view_preloads_the_whole_dataset(dataset):
    path, x, _ = dataset
    with shardfeed.open(path) as ds:
        train, val = ds.split([0.9, 0.1], seed=0)
        if not evicted(path):
            pytest.skip("files here cannot be evicted from the page cache")
        assert val.preload() is True
        assert regimes.resident_fraction(data_files(path)) > 0.9
        np.testing.assert_array_equal(val.read(np.arange(len(val)), "x")["x"], x[val.indices()])


@needs_fadvise
def test_preload_reads_nothing_when_the_dataset_does_not_fit(dataset, monkeypatch):
    path, x, _ = dataset
    total = sum(os.path.getsize(f) for f in data_files(path))
    monkeypatch.setattr(shardfeed.dataset, "_memory_available", lambda: total - 1)
    with shardfeed.open(path) as ds:
        if not evicted(path):
            pytest.skip("files here cannot be evicted from the page cache")
        assert ds.preload() is False
        assert regimes.resident_fraction(data_files(path)) < 0.5
        ids = np.arange(0, N, 7)
        np.testing.assert_array_equal(ds.read(ids, "x")["x"], x[ids])
    monkeypatch.setattr(shardfeed.dataset, "_memory_available", lambda: total)
    with shardfeed.open(path) as ds:
        assert ds.preload() is True


def test_preload_of_a_closed_dataset_raises(dataset):
    ds = shardfeed.open(dataset[0])
    ds.close()
    with pytest.raises(ValueError, match="closed"):
        ds.preload()


def test_preload_names_a_file_that_went_missing(tmp_path):
    path = str(tmp_path / "ds")
    with shardfeed.Writer(path, fields={"x": ("uint8", (64,))}) as writer:
        writer.extend({"x": np.zeros((10, 64), np.uint8)})
    with shardfeed.open(path) as ds:
        shard = data_files(path)[0]
        os.remove(shard)
        with pytest.raises(ShardReadError) as raised:
            ds.preload()
        assert raised.value.filename == shard and raised.value.errno == errno.ENOENT


def fake_system(root, meminfo_kib, cgroup_lines, limits):
    """A /proc and /sys/fs/cgroup of our own: ``limits`` maps a path under the cgroup root to the
    text of its memory limit file."""
    proc, cgroups = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    if meminfo_kib is not None:
        (proc / "meminfo").write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {meminfo_kib} kB\n")
    (proc / "self" / "cgroup").write_text("".join(line + "\n" for line in cgroup_lines))
    for relative, text in limits.items():
        (cgroups / relative).parent.mkdir(parents=True, exist_ok=True)
        (cgroups / relative).write_text(text + "\n")
    return str(proc), str(cgroups)


@pytest.mark.parametrize("case,expected", [
    ("no cgroup limit (v1: a huge number)", 4096 * 1024),
    ("v1 limit below MemAvailable", 64 << 20),
    ("v2 max", 4096 * 1024),
    ("v2 limit below MemAvailable", 1 << 20),
    ("no meminfo, v2 limit", 1 << 20),
    ("nothing readable", None),
])
def test_memory_available_is_the_lower_of_meminfo_and_the_cgroup_limit(tmp_path, case, expected):
    v1 = ["4:memory:/jobs/a", "0::/"]
    v2 = ["0::/user.slice/job"]
    setups = {
        "no cgroup limit (v1: a huge number)": (4096, v1, {"memory/jobs/a/memory.limit_in_bytes": "9223372036854771712"}),
        "v1 limit below MemAvailable": (4096 * 1024, v1, {"memory/jobs/a/memory.limit_in_bytes": str(64 << 20)}),
        "v2 max": (4096, v2, {"user.slice/job/memory.max": "max"}),
        "v2 limit below MemAvailable": (4096 * 1024, v2, {"user.slice/job/memory.max": str(1 << 20)}),
        "no meminfo, v2 limit": (None, v2, {"user.slice/job/memory.max": str(1 << 20)}),
        "nothing readable": (None, v1, {}),
    }
    meminfo_kib, lines, limits = setups[case]
    proc, cgroups = fake_system(tmp_path, meminfo_kib, lines, limits)
    assert shardfeed.dataset._memory_available(proc, cgroups) == expected


def test_memory_available_honours_the_memory_cgroup_limit():
    root = regimes.CGROUP_MEMORY
    if os.geteuid() != 0 or not os.access(os.path.join(root, "cgroup.procs"), os.W_OK):
        pytest.skip("needs root and a cgroup v1 memory controller")
    limit = regimes.MemoryLimit(96 << 20)
    try:
        script = "import shardfeed.dataset as d; print(d._memory_available())"
        done = subprocess.run(["sh", "-c", 'echo $$ > "$0" && exec "$@"', limit.procs, sys.executable, "-c", script],
                              capture_output=True, text=True, check=True)
        assert int(done.stdout) == 96 << 20
    finally:
        limit.remove()
