"""The read benchmark's peers (benchmarks/peers.py: h5py, tf.data, torch DataLoader) and its disk
limit (benchmarks/fio.py), on small datasets: every pass yields each sample once, equal to numpy's
``memmap[ids].astype(float32)`` (+ normalisation), and fio reads each record once, record-aligned.

The data object is the benchmark's own (benchmarks/regimes.py), at small shapes."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from shardfeed.format import HEADER_BYTES

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import fio  # noqa: E402
import peers  # noqa: E402
from readers import check_pass  # noqa: E402
from regimes import BenchData, Profile  # noqa: E402

LIBRARY = {peers.H5pyReader: "h5py", peers.TFDataReader: "tensorflow",
           peers.TorchW0Reader: "torch", peers.TorchW2Reader: "torch"}
# Python 3.12+ warns at every fork of a process with threads (numpy's BLAS, TensorFlow's pools);
# the torch workers are forked, and only run numpy.
FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"


PROFILES = [
    Profile("f16-128B", "float16", (64,), 32, False),
    Profile("f16-8KiB", "float16", (64, 64), 32, False),
    Profile("u8-norm", "uint8", (3, 8, 8), 16, True),  # the image profile's normalisation, small
]
COUNT = 300  # ids cross 128, where a TFRecord id's varint gets a byte longer; a partial last batch


@pytest.fixture(scope="module", params=PROFILES, ids=[p.name for p in PROFILES])
def data(request, tmp_path_factory):
    data = BenchData(os.fspath(tmp_path_factory.mktemp("peers")), request.param, COUNT)
    yield data
    data.close()


@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("cls", peers.PEERS, ids=[cls.name for cls in peers.PEERS])
def test_peer_passes(cls, data):
    pytest.importorskip(LIBRARY[cls], reason=f"{LIBRARY[cls]} is not installed (the {cls.name} peer needs it; "
                                             "the torch peer comes with the [torch] extra, which .ci/run installs)")
    assert cls.unavailable() is None
    reader = cls(data)
    assert reader.files()
    assert sum(os.path.getsize(f) for f in reader.files()) >= data.count * data.profile.record_bytes
    order = np.random.default_rng(7).permutation(data.count)
    reader.open()
    try:
        check_pass(reader, data, order)                               # an epoch: every sample once
        check_pass(reader, data, order[:data.count // 2 + 3].copy())  # part of one, partial batch
        cut = reader.read_pass(order)                                 # cut short, as a timed pass is
        next(cut)
        cut.close()
    finally:
        reader.close()
    reader.open()  # reopens after close (a cold pass closes, evicts, opens)
    try:
        check_pass(reader, data, order[::-1].copy())
    finally:
        reader.close()


@pytest.mark.parametrize("cls", peers.PEERS, ids=[cls.name for cls in peers.PEERS])
def test_peer_unavailable_names_the_library(cls, monkeypatch):
    monkeypatch.setitem(sys.modules, LIBRARY[cls], None)  # import raises ImportError
    assert LIBRARY[cls] in cls.unavailable()


def test_tfrecord_examples_parse():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(3)
    for lo, hi, size in [(0, 128, 150), (128, 130, 150), (16383, 16384, 37), (16384, 16386, 3 * 224 * 224),
                         (2**21, 2**21 + 1, 8192), (2**35, 2**35 + 2, 128)]:
        ids = np.arange(lo, hi)
        records = rng.integers(0, 256, (len(ids), size), dtype=np.uint8)
        rows = peers.serialize_examples(ids, records)
        for i, row in enumerate(rows):
            example = tf.train.Example.FromString(row.tobytes())
            assert list(example.features.feature["id"].int64_list.value) == [ids[i]]
            assert example.features.feature["x"].bytes_list.value == [records[i].tobytes()]


# ---- fio --------------------------------------------------------------------------------------


def _shard(path, record_bytes: int, records: int) -> str:
    with open(path, "wb") as f:
        f.write(b"\xff" * HEADER_BYTES)
        f.write(np.random.default_rng(records).integers(0, 256, records * record_bytes, dtype=np.uint8).tobytes())
    return os.fspath(path)


def _evict(files):
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _fio_reads(args, tmp_path):
    """Runs fio, returning each job's reads as (offset, size) pairs, from per-job latency logs
    (fio's I/O log is one file that parallel jobs corrupt)."""
    prefix = os.fspath(tmp_path / "reads")
    read = fio.run_fio(args + [f"--write_lat_log={prefix}", "--log_offset=1", "--per_job_logs=1"])
    jobs = []
    for name in sorted(os.listdir(tmp_path), key=lambda n: n.split(".")):
        if name.startswith("reads_lat.") and name.endswith(".log"):
            with open(tmp_path / name) as f:
                rows = [[int(v) for v in line.split(",")[2:5]] for line in f if line.strip()]
            jobs.append([(offset, size) for ddir, size, offset in rows if ddir == 0])
    assert sum(map(len, jobs)) == read["total_ios"]
    return jobs


@pytest.fixture
def fio_here():
    why = fio.unavailable()
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("record_bytes,records,reads,engine,parallel",
                         [(128, 1000, 600, "psync", 4), (3 * 224 * 224, 24, 20, "psync", 2),
                          (128, 1000, 1000, "libaio", 4)])
def test_fio_reads_each_record_once(fio_here, tmp_path, record_bytes, records, reads, engine, parallel):
    """Every read is one whole record at ``header + k * record_bytes`` (block sizes that are not
    powers of two included), and parallel jobs read disjoint records."""
    files = [_shard(tmp_path / "a.rec", record_bytes, records)]
    args = fio.fio_command(files, record_bytes, HEADER_BYTES, reads, engine, parallel, os.fspath(tmp_path / "out.json"))
    ios = [io for job in _fio_reads(args, tmp_path) for io in job]
    jobs = parallel if engine == "psync" else 1
    offsets = np.array([offset for offset, _ in ios])
    assert {size for _, size in ios} == {record_bytes}
    assert len(offsets) == reads // jobs * jobs and len(np.unique(offsets)) == len(offsets)
    assert ((offsets - HEADER_BYTES) % record_bytes == 0).all()
    assert offsets.min() >= HEADER_BYTES and offsets.max() + record_bytes <= HEADER_BYTES + records * record_bytes


def test_fio_reads_every_file(fio_here, tmp_path):
    """Several (equally sized) shards: each job reads its own part of each, every record once."""
    files = [_shard(tmp_path / f"{k}.rec", 256, 400) for k in range(2)]
    jobs = _fio_reads(fio.fio_command(files, 256, HEADER_BYTES, 800, "psync", 2, os.fspath(tmp_path / "out.json")),
                      tmp_path)
    assert len(jobs) == 2
    for j, job in enumerate(jobs):  # the log has no file name: each offset read once in each file
        offsets, counts = np.unique([offset for offset, _ in job], return_counts=True)
        np.testing.assert_array_equal(offsets, HEADER_BYTES + 256 * np.arange(200 * j, 200 * (j + 1)))
        assert (counts == 2).all()
    with pytest.raises(ValueError, match="equally sized"):
        fio.fio_command(files + [_shard(tmp_path / "short.rec", 256, 10)], 256, HEADER_BYTES, 800, "psync", 2, "x")


def test_best_fio(fio_here, tmp_path):
    files = [_shard(tmp_path / "a.rec", 4096, 2048)]
    evictions = []
    configurations = fio.QUICK_CONFIGURATIONS + [("psync", 1), ("psync", 4096)]  # the last cannot split
    result = fio.best_fio(files, 4096, HEADER_BYTES, 1024, evict=lambda: (evictions.append(1), _evict(files)),
                          configurations=configurations)
    labels = [fio.label(*c) for c in configurations]
    assert list(result["by_configuration"]) == labels
    assert result["by_configuration"]["psync-j4096"] is None and "psync-j4096" in result["errors"]
    ran = {k: v for k, v in result["by_configuration"].items() if v is not None}
    assert ran and all(v > 0 for v in ran.values())
    assert result["iops"] == max(ran.values()) == ran[result["best"]] and result["bytes_per_s"] > 0
    assert len(evictions) == len(configurations) - 1
    assert result["best_runs"] == [result["iops"]]


def test_best_fio_repeats_the_best_configuration_and_reports_its_median(fio_here, tmp_path):
    files = [_shard(tmp_path / "a.rec", 4096, 2048)]
    evictions = []
    result = fio.best_fio(files, 4096, HEADER_BYTES, 1024, evict=lambda: (evictions.append(1), _evict(files)),
                          configurations=fio.QUICK_CONFIGURATIONS, repeats=3)
    runs = result["best_runs"]
    assert len(runs) == 3 and all(r > 0 for r in runs)
    assert runs[0] == result["by_configuration"][result["best"]]  # the sweep's run of the best comes first
    assert result["iops"] == sorted(runs)[1]
    assert len(evictions) == len(fio.QUICK_CONFIGURATIONS) + 2


def test_best_fio_limit_is_the_median_run_of_the_best_configuration(tmp_path, monkeypatch):
    """Scripted fio results (no fio needed): the sweep picks the best configuration by its one
    run, then the limit is the median of that configuration's runs, not its first (luckiest)."""
    files = [_shard(tmp_path / "a.rec", 4096, 2048)]
    scripted = iter([{"iops": 900.0, "bw_bytes": 9.0}, {"iops": 1000.0, "bw_bytes": 10.0},  # the sweep
                     {"iops": 600.0, "bw_bytes": 6.0}, {"iops": 800.0, "bw_bytes": 8.0}])  # the repeats
    ran = []

    def fake_run_fio(args, cgroup_procs=None):
        ran.append(next(a for a in args if a.startswith("--ioengine=")))
        return next(scripted)

    monkeypatch.setattr(fio, "unavailable", lambda: None)
    monkeypatch.setattr(fio, "run_fio", fake_run_fio)
    configurations = [("psync", 4), ("io_uring", 16)]
    result = fio.best_fio(files, 4096, HEADER_BYTES, 1024, configurations=configurations, repeats=3)
    assert result["best"] == "io_uring-qd16" and result["by_configuration"] == {"psync-j4": 900.0, "io_uring-qd16": 1000.0}
    assert ran == ["--ioengine=psync", "--ioengine=io_uring", "--ioengine=io_uring", "--ioengine=io_uring"]
    assert result["best_runs"] == [1000.0, 600.0, 800.0]
    assert (result["iops"], result["bytes_per_s"]) == (800.0, 8.0)


def test_best_fio_in_memory_cgroup(fio_here, tmp_path):
    root = "/sys/fs/cgroup/memory"
    if os.geteuid() != 0 or not os.access(os.path.join(root, "cgroup.procs"), os.W_OK):
        pytest.skip("needs root and a cgroup v1 memory controller")
    files = [_shard(tmp_path / "a.rec", 8192, 1024)]
    _evict(files)
    group = os.path.join(root, f"shardfeed-test-fio-{os.getpid()}")
    os.mkdir(group)
    try:
        with open(os.path.join(group, "memory.limit_in_bytes"), "w") as f:
            f.write(str(64 << 20))
        result = fio.best_fio(files, 8192, HEADER_BYTES, 512, cgroup_procs=os.path.join(group, "cgroup.procs"),
                              configurations=[("psync", 2)])
        with open(os.path.join(group, "memory.max_usage_in_bytes")) as f:
            assert int(f.read()) > 0  # fio's reads were charged here
        assert result["iops"] > 0
    finally:
        os.rmdir(group)


# ---- the shuffle each reader gives --------------------------------------------------------------


def test_every_reader_states_the_shuffle_it_gives():
    """The tables' shuffle column: a reader that reads the pass's order (a uniformly random
    permutation) says so; one that picks its own order says what it does instead."""
    import readers
    for cls in readers.READERS + peers.PEERS:
        assert cls.shuffle, cls.name
        assert (cls.shuffle == readers.GLOBAL_SHUFFLE) == cls.follows_order, cls.name


def test_block_reader_reads_blocks_of_16_neighbours(data):
    """shardfeed-block16's passes are what its shuffle says: whole blocks of 16 adjacent records,
    in a different block order each pass."""
    import readers
    reader = readers.ShardfeedBlockReader(data)
    assert reader.shuffle == f"blocks of {reader.SHUFFLE_BLOCK} neighbours"
    reader.open()
    try:
        passes = [np.concatenate([ids for ids, _ in reader.read_pass(np.arange(data.count))]) for _ in range(2)]
    finally:
        reader.close()
    for seen in passes:
        assert sorted(seen) == list(range(data.count))
        starts = np.flatnonzero(np.diff(seen, prepend=-2) != 1)  # where a run of neighbours begins
        runs = np.diff(np.append(starts, len(seen)))
        block = reader.SHUFFLE_BLOCK
        assert (seen[starts] % block == 0).all() and (runs % block == 0)[seen[starts] + runs < data.count].all()
    assert not np.array_equal(passes[0], passes[1])


def test_tf_data_shuffle_names_its_window(data):
    pytest.importorskip("tensorflow")
    reader = peers.TFDataReader(data)
    window = min(10_000, max(data.profile.batch, (64 << 20) // data.profile.record_bytes))
    assert reader.buffer == window and reader.shuffle == f"sequential files, window of {window:,}"
