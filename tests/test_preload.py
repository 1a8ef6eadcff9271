"""Dataset.preload: every file of the dataset read once, front to back, into the page cache; skipped
when the dataset cannot fit in the memory the process may use."""

import errno
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import shardfeed
from shardfeed import _preload
from shardfeed.errors import ShardReadError
from shardfeed.manifest import read_manifest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import regimes  # noqa: E402

N = 3000
REAL_MEMORY_AVAILABLE = _preload.memory_available
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
    with shardfeed.open(path, preload=False) as ds:
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
    with shardfeed.open(path, preload=False) as ds:
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
    monkeypatch.setattr(_preload, "memory_available", lambda: total - 1)
    with shardfeed.open(path, preload=False) as ds:
        if not evicted(path):
            pytest.skip("files here cannot be evicted from the page cache")
        assert ds.preload() is False
        assert regimes.resident_fraction(data_files(path)) < 0.5
        ids = np.arange(0, N, 7)
        np.testing.assert_array_equal(ds.read(ids, "x")["x"], x[ids])
    monkeypatch.setattr(_preload, "memory_available", lambda: total)
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
    assert _preload.memory_available(proc, cgroups) == expected


def test_memory_available_honours_the_memory_cgroup_limit():
    root = regimes.CGROUP_MEMORY
    if os.geteuid() != 0 or not os.access(os.path.join(root, "cgroup.procs"), os.W_OK):
        pytest.skip("needs root and a cgroup v1 memory controller")
    limit = regimes.MemoryLimit(96 << 20)
    try:
        script = "from shardfeed import _preload; print(_preload.memory_available())"
        done = subprocess.run(["sh", "-c", 'echo $$ > "$0" && exec "$@"', limit.procs, sys.executable, "-c", script],
                              capture_output=True, text=True, check=True)
        assert int(done.stdout) == 96 << 20
    finally:
        limit.remove()


# ---- open(preload=...): the background pass -----------------------------------------------------


def dataset_bytes(path):
    return sum(os.path.getsize(f) for f in data_files(path))


@pytest.mark.parametrize("option,size,available,expected", [
    ("auto", 100, 1000, True),
    ("auto", 800, 1000, True),  # at most AUTO_MAX_SHARE (0.8) of what is available
    ("auto", 801, 1000, False),
    ("auto", 100, None, False),  # not known (not Linux): random reads, as before
    (True, 10_000, 1000, True),
    (True, 100, None, True),
    (False, 100, 1000, False),
])
def test_the_background_pass_starts_when_the_dataset_fits(option, size, available, expected):
    assert _preload.AUTO_MAX_SHARE == 0.8
    assert _preload.background_wanted(option, size, available) is expected


@pytest.mark.parametrize("figure,expected_started", [("fits", True), ("does not fit", False)])
def test_open_decides_from_the_memory_available(dataset, monkeypatch, figure, expected_started):
    path = dataset[0]
    total = dataset_bytes(path)
    available = int(total / _preload.AUTO_MAX_SHARE) + 1 if figure == "fits" else total
    monkeypatch.setattr(_preload, "memory_available", lambda: available)
    with shardfeed.open(path) as ds:
        assert (ds.preloading is not None) is expected_started
        if ds.preloading is not None:
            assert ds.preloading.files == [(f, os.path.getsize(f)) for f in
                                           sorted(data_files(path), key=lambda f: (f.endswith(".var"), f))]
    with shardfeed.open(path, preload=False) as ds:
        assert ds.preloading is None
    with shardfeed.open(path, preload=True) as ds:
        assert ds.preloading is not None


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cgroup_limit_below_the_dataset_means_random_reads(dataset, tmp_path, monkeypatch, version):
    """MemAvailable says it fits; the process's memory cgroup says it does not."""
    path = dataset[0]
    total = dataset_bytes(path)
    lines, limit_file = {"v1": (["4:memory:/job", "0::/"], "memory/job/memory.limit_in_bytes"),
                         "v2": (["0::/job"], "job/memory.max")}[version]
    for limit, expected in ((total // 2, False), (total * 2, True)):
        root = tmp_path / f"{version}-{limit}"
        proc, cgroups = fake_system(root, 64 << 20, lines, {limit_file: str(limit)})
        monkeypatch.setattr(_preload, "memory_available",
                            lambda proc=proc, cgroups=cgroups: REAL_MEMORY_AVAILABLE(proc, cgroups))
        with shardfeed.open(path) as ds:
            assert (ds.preloading is not None) is expected, (limit, total)


def test_the_preload_option_is_checked_and_pickled(dataset):
    import pickle
    with pytest.raises(ValueError, match="preload must be"):
        shardfeed.open(dataset[0], preload="yes")
    with pytest.raises(ValueError, match="preload must be"):
        shardfeed.open(dataset[0], preload=1)
    with shardfeed.open(dataset[0], preload=False) as ds:
        copy = pickle.loads(pickle.dumps(ds))
        assert copy.preloading is None
        copy.close()


class Gate:
    """Holds the background pass before its ``after``-th chunk until opened, so a test acts while
    the pass is certainly under way (``_preload._cached`` is called once per chunk)."""

    def __init__(self, monkeypatch, after):
        self.reached, self.opened, self.calls = threading.Event(), threading.Event(), 0
        real = _preload._cached

        def gated(*args):
            self.calls += 1
            if self.calls == after:
                self.reached.set()
                assert self.opened.wait(30), "the test never opened the gate"
            return real(*args)

        monkeypatch.setattr(_preload, "_cached", gated)
        monkeypatch.setattr(_preload, "CHUNK_BYTES", 64 << 10)  # many chunks per file


@needs_fadvise
def test_the_background_pass_caches_the_files_and_skips_what_is_cached(dataset):
    path = dataset[0]
    with shardfeed.open(path, preload=False):
        if not evicted(path):
            pytest.skip("files here cannot be evicted from the page cache")
    with shardfeed.open(path, preload=True) as ds:
        assert ds.preloading.wait(60)
        assert ds.preloading.error is None
        assert ds.preloading.bytes_read >= 0.9 * dataset_bytes(path)
        for name in data_files(path):
            assert regimes.resident_fraction([name]) > 0.9, name
    with shardfeed.open(path, preload=True) as ds:  # everything cached: nothing read again
        assert ds.preloading.wait(60)
        assert ds.preloading.bytes_read == 0


@needs_fadvise
def test_reads_during_the_background_pass_equal_numpy(dataset, monkeypatch):
    path, x, tokens = dataset
    gate = Gate(monkeypatch, after=5)
    with shardfeed.open(path, preload=False):
        if not evicted(path):
            pytest.skip("files here cannot be evicted from the page cache")
    rng = np.random.default_rng(5)
    with shardfeed.open(path, preload=True) as ds:
        assert gate.reached.wait(30)
        assert not ds.preloading.done
        for step in range(6):
            if step == 3:
                gate.opened.set()  # the rest of the reads race the pass
            ids = rng.permutation(N)[:400]
            batch = ds.read(ids, dtype="float32")
            np.testing.assert_array_equal(batch["x"], x[ids].astype(np.float32))
            for row, i in enumerate(ids[:50]):
                np.testing.assert_array_equal(batch["tokens"][row, :batch.lengths["tokens"][row]], tokens[i])
        assert ds.preloading.wait(60) and ds.preloading.error is None


def preload_threads():
    return [t for t in threading.enumerate() if t.name == _preload.PRELOAD_THREAD_NAME]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_close_stops_the_pass_and_leaves_no_thread_or_descriptor(dataset, monkeypatch):
    path = dataset[0]
    before = open_fds()
    for _ in range(3):  # stopped mid-pass: close() returns with the thread gone
        gate = Gate(monkeypatch, after=3)
        ds = shardfeed.open(path, preload=True)
        assert gate.reached.wait(30)
        assert preload_threads(), "the pass runs on a thread named PRELOAD_THREAD_NAME"
        pass_ = ds.preloading
        closing = threading.Thread(target=ds.close)
        closing.start()  # close() asks the pass to stop, then waits for the chunk held at the gate
        closing.join(0.2)
        assert closing.is_alive(), "close() returned while the pass was still reading"
        gate.opened.set()
        closing.join(30)
        assert pass_.done and gate.calls == 3 and not preload_threads()
        assert open_fds() == before
    monkeypatch.undo()
    for _ in range(30):  # open/close cycles, pass finished or not
        with shardfeed.open(path, preload=True) as ds:
            ds.read([0, -1])
        assert not preload_threads() and open_fds() == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_collected_dataset_stops_its_pass(dataset, monkeypatch):
    import gc
    path = dataset[0]
    before = open_fds()
    gate = Gate(monkeypatch, after=3)
    ds = shardfeed.open(path, preload=True)
    assert gate.reached.wait(30)
    pass_ = ds.preloading
    del ds
    gc.collect()
    gate.opened.set()
    assert pass_.wait(30)
    assert gate.calls == 3, "the pass went on after its dataset was collected"
    assert not preload_threads()
    assert open_fds() == before


def test_a_dataset_truncated_or_deleted_during_the_pass(tmp_path, monkeypatch):
    """The pass ends early, says why, and the reader's own errors are as without it."""
    path = str(tmp_path / "ds")
    values = np.arange(40_000 * 32, dtype=np.int32).reshape(40_000, 32)
    with shardfeed.Writer(path, fields={"x": ("int32", (32,))}, shard_size=1 << 20) as writer:
        writer.extend({"x": values})
    files = data_files(path)
    assert len(files) >= 4
    gate = Gate(monkeypatch, after=2)
    ds = shardfeed.open(path, preload=True, mmap=False)
    assert gate.reached.wait(30)
    os.truncate(files[0], os.path.getsize(files[0]) // 2)  # the file being read
    os.remove(files[2])  # a file not opened yet by the pass (the reader holds it open)
    gate.opened.set()
    assert ds.preloading.wait(30)
    error = ds.preloading.error
    assert isinstance(error, ShardReadError) and error.errno == errno.ENOENT and error.filename == files[2]
    starts = np.cumsum([0] + [s.num_samples for s in read_manifest(path).shards])
    np.testing.assert_array_equal(ds.read(np.arange(starts[2], starts[3]))["x"],
                                  values[starts[2]:starts[3]])  # unlinked, still open
    with pytest.raises(ShardReadError):
        ds.read([starts[1] - 1])  # in the truncated half
    ds.close()


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/fd"), reason="needs fork and /proc")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_a_forked_child_does_not_inherit_the_pass_descriptor(dataset, monkeypatch):
    gate = Gate(monkeypatch, after=2)
    with shardfeed.open(dataset[0], preload=True) as ds:
        assert gate.reached.wait(30)
        fd = ds.preloading._fd
        assert fd >= 0 and os.path.samefile(f"/proc/self/fd/{fd}", ds.preloading.files[0][0])
        pid = os.fork()
        if pid == 0:
            try:
                os.fstat(fd)
                os._exit(1)  # still open in the child
            except OSError:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        gate.opened.set()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the child kept the pass's descriptor"
