"""Compressed fields on real data (issue 18, section 4): the size ratio per data kind, and the
page-cached read of a compressed dataset against the same samples stored uncompressed, in the same
run: samples/s and the CPU time per sample the decoding adds.

Two kinds of real data, never synthetic noise:
* photos: natural photographs cut into 224x224x3 uint8 patches (scikit-image's sample images, the
  test extra installs it; without it matplotlib's one sample photograph, grace_hopper.jpg);
* text: byte-level tokens of the Python standard library's sources, uint8 sequences of 2048;
  text-512: the same sources in records of 512 bytes.

Text is also written with a trained dictionary (reader ``zstd-dict``: zstd's default size, 110 KiB,
``compression={"x": {"codec": "zstd", "dictionary": True}}``); photo patches gain nothing from one
(benchmarks/RESULTS.md, sixth session), so they are not.

Timed (``--benchmark-enable``) each dataset is ``--bench-dataset-mb`` MiB of values (the distinct
samples repeated; each sample is its own frame, so repetition does not change the ratio). Under
``--benchmark-disable`` (the normal test suite) each runs one small pass and checks the batches
against the uncompressed dataset's.

    python -m pytest benchmarks/bench_compress.py --benchmark-enable --benchmark-only -p no:cacheprovider \\
        --bench-dataset-mb 512
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import sys
import sysconfig
import time
from typing import Dict, Iterator, Tuple

import numpy as np
import pytest

import shardfeed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from regimes import Pin, read_in_order  # noqa: E402

PATCH = 224
TOKENS = 2048
BATCH = 256
ROUNDS = 20
_plain_results: Dict[str, Dict[str, float]] = {}  # kind -> the uncompressed reader's figures of this run
_page_cached_zstd: Dict[str, float] = {}  # kind -> the compressed reader's page-cached samples/s (decode's cap)


def photo_patches() -> Tuple[np.ndarray, str]:
    """Distinct 224x224x3 patches of natural photographs (stride 56, and mirrored)."""
    images = []
    try:
        import skimage.data as data
        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"):
            try:
                images.append(np.asarray(getattr(data, name)())[..., :3])
            except Exception:  # an image its version does not have, or one it would download
                continue
        source = "scikit-image " + ", ".join(n for n in ("astronaut", "chelsea", "coffee", "rocket",
                                                          "hubble_deep_field", "immunohistochemistry"))
    except ImportError:
        images = []
    if not images:
        import matplotlib.cbook
        from PIL import Image
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            images = [np.asarray(Image.open(f).convert("RGB"))]
        source = "matplotlib grace_hopper.jpg (scikit-image not installed)"
    patches = []
    for image in images:
        height, width = image.shape[:2]
        for top in range(0, height - PATCH + 1, 56):
            for left in range(0, width - PATCH + 1, 56):
                patch = image[top:top + PATCH, left:left + PATCH]
                patches += [patch, patch[:, ::-1]]
    return np.ascontiguousarray(np.stack(patches), dtype=np.uint8), source


def text_tokens(record: int = TOKENS) -> Tuple[np.ndarray, str]:
    """The standard library's .py sources as bytes, cut into sequences of ``record`` byte tokens."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(name for name in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
                   if "site-packages" not in os.path.relpath(name, stdlib).split(os.sep))
    data = b"".join(pathlib.Path(name).read_bytes() for name in files)
    count = len(data) // record
    return (np.frombuffer(data[:count * record], np.uint8).reshape(count, record),
            f"the {len(files)} .py files of Python {sys.version.split()[0]}'s standard library")


KINDS = {"photos": photo_patches, "text": text_tokens, "text-512": lambda: text_tokens(512)}
# The readers of each kind, and the compression option of each reader.
READERS = {"photos": ("plain", "zstd"), "text": ("plain", "zstd", "zstd-dict"),
           "text-512": ("plain", "zstd", "zstd-dict")}
COMPRESSION = {"plain": None, "zstd": {"x": "zstd"}, "zstd-dict": {"x": {"codec": "zstd", "dictionary": True}}}


def _write(path: str, samples: np.ndarray, count: int, compression) -> float:
    """Writes ``count`` samples (``samples`` cycled) with their index as label; returns seconds."""
    started = time.perf_counter()
    with shardfeed.Writer(path, {"x": ("uint8", samples.shape[1:]), "label": "int64"},
                          compression=compression) as writer:
        for at in range(0, count, 256):
            rows = np.arange(at, min(count, at + 256))
            writer.extend({"x": samples[rows % len(samples)], "label": rows})
    return time.perf_counter() - started


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request, bench_root, timing_enabled) -> Iterator[dict]:
    kind = request.param
    samples, source = KINDS[kind]()
    record_bytes = int(np.prod(samples.shape[1:]))
    if timing_enabled:
        count = (request.config.getoption("bench_dataset_mb") << 20) // record_bytes
    else:
        count = 2 * BATCH + 5
    paths = {name: os.path.join(bench_root, f"compress-{kind}-{name}") for name in READERS[kind]}
    seconds = {name: _write(paths[name], samples, count, COMPRESSION[name]) for name in paths}
    sizes = {name: shardfeed.open(paths[name]).compression()["x"] for name in paths if name != "plain"}
    try:
        yield dict(kind=kind, source=source, paths=paths, count=count, samples=samples, record_bytes=record_bytes,
                   size_ratio={name: size.ratio for name, size in sizes.items()},
                   stored_per_sample={name: size.stored / size.samples for name, size in sizes.items()},
                   dictionary_bytes={name: size.dictionary_bytes for name, size in sizes.items()},
                   distinct=len(samples), write_seconds=seconds)
    finally:
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)


def _files(path: str) -> list:
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.startswith("shard-"))


@pytest.mark.parametrize("pair, reader", [(kind, reader) for kind in KINDS for reader in READERS[kind]],
                         indirect=["pair"])
def test_page_cached(benchmark, pair, reader, timing_enabled):
    """Random batches of 256 from the page cache: samples/s and process CPU time per sample; the
    zstd entry carries its ratio to the plain reader's of this run and the decode's CPU cost."""
    benchmark.group = f"compress-{pair['kind']}"
    path = pair["paths"][reader]
    files = _files(path)
    read_in_order(files)
    pin = Pin(files)
    try:
        ds = shardfeed.open(path)
        rng = np.random.default_rng(0)
        orders = [rng.integers(0, pair["count"], BATCH) for _ in range(ROUNDS)]
        batch = ds.read(orders[0], dtype="float32", scale={"x": 1 / 255})
        expected = pair["samples"][orders[0] % pair["distinct"]].astype(np.float32) * np.float32(1 / 255)
        correct = bool(np.array_equal(batch["x"], expected) and np.array_equal(batch["label"], orders[0]))
        assert correct
        cpu = []

        def one_pass(order):
            started = time.process_time()
            ds.read(order, dtype="float32", scale={"x": 1 / 255})
            cpu.append(time.process_time() - started)

        step = iter(range(10 ** 9))
        benchmark.pedantic(one_pass, setup=lambda: ((orders[next(step) % ROUNDS],), {}),
                           rounds=ROUNDS if timing_enabled else 1, iterations=1)
    finally:
        pin.close()
    seconds = benchmark.stats.stats.median if benchmark.stats else 0.0
    figures = dict(samples_per_s=BATCH / seconds if seconds else 0.0,
                   cpu_us_per_sample=1e6 * float(np.median(cpu)) / BATCH)
    if reader == "plain":
        _plain_results[pair["kind"]] = figures
    elif reader == "zstd":
        _page_cached_zstd[pair["kind"]] = figures["samples_per_s"]
    info = dict(kind=pair["kind"], source=pair["source"], reader=reader, record_bytes=pair["record_bytes"],
                samples=pair["count"], distinct_samples=pair["distinct"],
                size_ratio=round(pair["size_ratio"].get(reader, 1.0), 3),
                stored_bytes_per_sample=round(pair["stored_per_sample"].get(reader, pair["record_bytes"]), 1),
                dictionary_bytes=pair["dictionary_bytes"].get(reader, 0), correct=correct,
                write_seconds=round(pair["write_seconds"][reader], 2), threads=ds.threads, **figures)
    plain = _plain_results.get(pair["kind"])
    if reader != "plain" and plain:
        info.update(ratio_to_plain=figures["samples_per_s"] / plain["samples_per_s"] if plain["samples_per_s"] else None,
                    decode_cpu_us_per_sample=figures["cpu_us_per_sample"] - plain["cpu_us_per_sample"])
    benchmark.extra_info.update(info)


OUT_OF_CORE_SAMPLES = 2048  # samples per timed pass from disk (8 batches of 256)


@pytest.mark.parametrize("pair", ["photos"], indirect=True)
@pytest.mark.parametrize("reader", ["plain", "zstd"])
def test_out_of_core(benchmark, pair, reader, timing_enabled):
    """The photo patches from disk, the page cache capped by a memory cgroup at a quarter of the
    uncompressed dataset: each pass reads 2048 random samples, after a paired fio run (inside the
    cgroup) of random reads of whole uncompressed records over the plain dataset's shard files.
    ``limit_samples_per_s``: fio's byte rate x the size ratio / the record size (the samples/s if
    the compressed bytes came at fio's rate), for the plain reader fio's byte rate / record size."""
    # (untimed, inside the suite: a small dataset under the regime's smallest cap, 256 MiB, so only
    # the way it is measured is checked, not that the page cache is too small)
    samples = OUT_OF_CORE_SAMPLES if timing_enabled else min(pair["count"], 2 * BATCH)
    import fio
    from regimes import MemoryLimit, evict, memory_cgroup_unavailable, out_of_core_limit
    why = memory_cgroup_unavailable() or fio.unavailable()
    if why:
        pytest.skip(why)
    benchmark.group = "compress-out-of-core"
    plain_files = [f for f in _files(pair["paths"]["plain"]) if f.endswith(".rec")]
    full = max(os.path.getsize(f) for f in plain_files)  # (fio reads equally sized files: the full shards)
    plain_files = [f for f in plain_files if os.path.getsize(f) == full]
    record_bytes = shardfeed.open(pair["paths"]["plain"]).schema.record_bytes
    files = _files(pair["paths"][reader])
    dataset_bytes = sum(os.path.getsize(f) for f in _files(pair["paths"]["plain"]))
    rng = np.random.default_rng(7)
    paired, passes = [], []  # fio's bytes/s before each pass; each pass's seconds (also when untimed)
    for name in files + plain_files:
        evict([name])
    limit = MemoryLimit(out_of_core_limit(dataset_bytes))
    try:
        with limit:
            ds = shardfeed.open(pair["paths"][reader], preload=False)

            def start():
                evict(files + plain_files)
                found = fio.best_fio(plain_files, record_bytes, 64, samples, cgroup_procs=limit.procs,
                                     evict=lambda: evict(plain_files), configurations=fio.QUICK_CONFIGURATIONS)
                paired.append(found["bytes_per_s"])
                evict(files)
                return (rng.choice(pair["count"], samples, replace=False),), {}

            def one_pass(order):
                started = time.perf_counter()
                for at in range(0, len(order), BATCH):
                    ds.read(order[at:at + BATCH], dtype="float32", scale={"x": 1 / 255})
                passes.append(time.perf_counter() - started)

            benchmark.pedantic(one_pass, setup=start, rounds=5 if timing_enabled else 1, iterations=1)
            ds.close()
        hits = limit.failcnt()
    finally:
        limit.remove()
    samples_per_s = samples / float(np.median(passes))
    fio_bytes = float(np.median(paired))
    ratio = pair["size_ratio"]["zstd"] if reader == "zstd" else 1.0
    limit_samples = fio_bytes * ratio / record_bytes
    benchmark.extra_info.update(kind=pair["kind"], reader=reader, samples_per_s=samples_per_s,
                                fio_bytes_per_s=fio_bytes, fio_runs=paired, size_ratio=round(ratio, 3),
                                limit_samples_per_s=limit_samples, ratio_to_limit=samples_per_s / limit_samples,
                                dataset_bytes=dataset_bytes, memory_limit_bytes=limit.limit_bytes, limit_hits=hits,
                                page_cached_zstd_samples_per_s=_page_cached_zstd.get(pair["kind"]))
