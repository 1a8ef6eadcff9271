"""Parameter sweeps behind the defaults recorded in benchmarks/RESULTS.md.

    python benchmarks/sweep.py threads            # page-cached and cold, threads = 1..32
    python benchmarks/sweep.py mmap               # mmap vs preadv by record size, cached and cold
    python benchmarks/sweep.py order              # sequential, block-shuffled and random batches
    python benchmarks/sweep.py readahead          # cold loader epochs, reading ahead off and on
    python benchmarks/sweep.py fields             # page-cached: one small field vs whole records
    python benchmarks/sweep.py read_io            # cold ds.read: io_uring vs the thread pool
    python benchmarks/sweep.py loaders --no-cold  # page-cached: the loaders against ds.read, alternating
    python benchmarks/sweep.py threads --no-cold  # skip the cold runs

Writes the datasets under a temporary directory (removed at exit) and prints markdown tables of
samples/s. Page-cached figures are the median per-batch time over interleaved passes; cold figures
evict every shard file (posix_fadvise DONTNEED) right before each pass, and a pass reads batches of
one random permutation (or, for `order`, of one sequential or block-shuffled pass), so no record is
read twice. Every dataset is opened with ``preload=False``: these sweeps measure the random reads
(a dataset opened by default that fits in memory is also read front to back in the background;
that first epoch is measured by bench_first_epoch.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import shutil
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Sequence, Tuple, TypeVar

import numpy as np

import shardfeed
from shardfeed.manifest import read_manifest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import readers  # noqa: E402
import regimes  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
NORM = {"scale": (1 / (255 * STD)).astype(np.float32).reshape(3, 1, 1),
        "offset": (-MEAN / STD).astype(np.float32).reshape(3, 1, 1)}

# name: (dtype, shape, batch, normalise)
PROFILES = {
    "f16-128B": ("float16", (64,), 256, False),
    "f16-8KiB": ("float16", (64, 64), 256, False),
    "u8-147KiB-norm": ("uint8", (3, 224, 224), 64, True),
}
THREADS = [1, 2, 4, 8, 16, 32]
MMAP_SIZES = [128, 512, 1024, 4096, 8192, 16384, 32768, 65536, 131072]  # float16 records of these byte sizes
ORDERS = ["sequential", "block64", "random"]
ORDER_SIZES = [512, 8192]  # float16 records of these byte sizes


def write_dataset(path: str, dtype: str, shape: Tuple[int, ...], total_bytes: int) -> int:
    record = int(np.prod(shape)) * np.dtype(dtype).itemsize
    count = total_bytes // record
    rng = np.random.default_rng(0)
    step = max(1, (32 << 20) // record)
    with shardfeed.Writer(path, {"x": (dtype, shape)}) as writer:
        for start in range(0, count, step):
            rows = (min(step, count - start),) + shape
            values = rng.integers(0, 256, rows, dtype=np.uint8) if dtype == "uint8" else \
                rng.standard_normal(rows, dtype=np.float32).astype(dtype)
            writer.extend({"x": values})
    return count


def shard_files(path: str) -> List[str]:
    return [os.path.join(path, s.file) for s in read_manifest(path).shards]


def evict(path: str) -> None:
    regimes.evict(shard_files(path))


def warm(path: str) -> regimes.Pin:
    """Keeps the dataset's shard files in the page cache until the returned pin is closed."""
    return regimes.Pin(shard_files(path))


def batches(count: int, batch: int, seed: int, order: str = "random") -> List[np.ndarray]:
    """The batches of one pass: a random permutation, `sequential` (storage order from a random
    start) or `block<k>` (blocks of k consecutive records in random order, the tail left out)."""
    rng = np.random.default_rng(seed)
    if order == "random":
        indices = rng.permutation(count)
    elif order == "sequential":
        indices = np.roll(np.arange(count), -int(rng.integers(count)))
    else:
        block = int(order[len("block"):])
        indices = (rng.permutation(count // block)[:, None] * block + np.arange(block)).reshape(-1)
    return [indices[i:i + batch] for i in range(0, len(indices) - batch + 1, batch)]


Mode = TypeVar("Mode")
Result = TypeVar("Result")


def alternate(modes: Sequence[Mode], rounds: int, run: Callable[[Mode, int], Result],
              warmup: int = 0) -> Dict[Mode, List[Result]]:
    """``run(mode, round)`` for every mode in each of ``warmup + rounds`` rounds, the modes' order
    reversed every other round so that the machine's drift hits all alike; each mode's results in
    round order, the ``warmup`` rounds left out."""
    results: Dict[Mode, List[Result]] = {mode: [] for mode in modes}
    for r in range(warmup + rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            result = run(mode, r)
            if r >= warmup:
                results[mode].append(result)
    return results


def median_ratio(values: Sequence[float], base: Sequence[float]) -> float:
    """The median of the per-round ratios of ``values`` to ``base``."""
    return statistics.median(v / b for v, b in zip(values, base))


def cached_rates(readers: Dict[str, Callable[[np.ndarray], object]], count: int, batch: int,
                 seconds: float = 0.6, passes: int = 3, order: str = "random") -> Dict[str, float]:
    """Median samples/s per reader, passes interleaved so machine noise hits all alike."""
    times: Dict[str, List[float]] = {name: [] for name in readers}
    work = batches(count, batch, seed=1, order=order)
    for _ in range(passes):
        for name, read in readers.items():
            read(work[0])
            end = time.perf_counter() + seconds / passes
            i = 0
            while time.perf_counter() < end:
                indices = work[i % len(work)]
                i += 1
                start = time.perf_counter()
                read(indices)
                times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def cold_rates(path: str, openers: Dict[str, Callable[[], "shardfeed.Dataset"]],
               make_reader: Callable[[object, str], Callable[[np.ndarray], object]], count: int,
               batch: int, max_batches: int, passes: int = 2, order: str = "random") -> Dict[str, float]:
    """samples/s of each reader right after eviction; best of `passes` (each a fresh order). The
    dataset is reopened after eviction: pages mapped by an open dataset would not be evicted."""
    rates: Dict[str, float] = {name: 0.0 for name in openers}
    for p in range(passes):
        for k, (name, opener) in enumerate(openers.items()):
            work = batches(count, batch, seed=100 + p * 100 + k, order=order)[:max_batches]
            evict(path)
            with opener() as ds:
                read = make_reader(ds, name)
                start = time.perf_counter()
                for indices in work:
                    read(indices)
                rates[name] = max(rates[name], batch * len(work) / (time.perf_counter() - start))
    return rates


def table(title: str, columns: Sequence[str], rows: Dict[str, Dict[str, float]]) -> None:
    print(f"\n{title}\n")
    print("| | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[c]:,.0f}" for c in columns) + " |")


def reader(ds, normalise: bool, batch: int, shape, threads=None):
    out = np.empty((batch,) + tuple(shape), np.float32)
    kwargs = NORM if normalise else {}
    return lambda idx: ds.read(idx, "x", dtype="float32", out={"x": out}, threads=threads, **kwargs)


def sweep_threads(root: str, size: int, cold: bool) -> None:
    cached_rows, cold_rows = {}, {}
    for name, (dtype, shape, batch, normalise) in PROFILES.items():
        path = os.path.join(root, name)
        count = write_dataset(path, dtype, shape, size)
        pins = warm(path)
        ds = shardfeed.open(path, preload=False)
        ds.read(np.arange(0, count, max(1, 4096 // ds._record_bytes)), "x")  # fault in the map
        readers = {str(t): reader(ds, normalise, batch, shape, t) for t in THREADS}
        cached_rows[name] = cached_rates(readers, count, batch)
        ds.close()
        pins.close()
        if cold and name != "f16-128B":
            openers = {str(t): lambda t=t: shardfeed.open(path, threads=t, preload=False) for t in THREADS}
            cold_rows[name] = cold_rates(path, openers, lambda d, _: reader(d, normalise, batch, shape), count,
                                         batch, max_batches=8 if batch == 64 else 6)
        shutil.rmtree(path)
    table(f"Page-cached samples/s by threads (default now {shardfeed.get_num_threads()})",
          [str(t) for t in THREADS], cached_rows)
    if cold_rows:
        table("Cold samples/s by threads", [str(t) for t in THREADS], cold_rows)


def sweep_mmap(root: str, size: int, cold: bool) -> None:
    cached_rows, cold_rows = {}, {}
    for record in MMAP_SIZES:
        shape = (record // 2,)
        path = os.path.join(root, f"f16-{record}")
        count = write_dataset(path, "float16", shape, size)
        pins = warm(path)
        readers = {}
        handles = []
        for mapped in (True, False):
            ds = shardfeed.open(path, mmap=mapped, preload=False)
            handles.append(ds)
            ds.read(np.arange(0, count, max(1, 4096 // record)), "x")
            readers["mmap" if mapped else "preadv"] = reader(ds, False, 256, shape)
        label = f"{record} B"
        cached_rows[label] = cached_rates(readers, count, 256)
        for ds in handles:
            ds.close()
        pins.close()
        if cold:
            openers = {"mmap": lambda: shardfeed.open(path, mmap=True, preload=False),
                       "preadv": lambda: shardfeed.open(path, mmap=False, preload=False)}
            cold_rows[label] = cold_rates(path, openers, lambda d, _: reader(d, False, 256, shape), count, 256,
                                          max_batches=4)
        shutil.rmtree(path)
    table(f"Page-cached samples/s, float16 records, batch 256, threads {shardfeed.get_num_threads()}",
          ["mmap", "preadv"], cached_rows)
    if cold_rows:
        table("Cold samples/s, same", ["mmap", "preadv"], cold_rows)


def sweep_order(root: str, size: int, cold: bool) -> None:
    """Batches of 256 in storage order, in blocks of 64 and at random, on both read paths: records
    adjacent on disk are read by one preadv per run (ext/reader.c)."""
    cached_rows, cold_rows = {}, {}
    for record in ORDER_SIZES:
        shape = (record // 2,)
        path = os.path.join(root, f"f16-{record}")
        count = write_dataset(path, "float16", shape, size)
        for mapped in (True, False):
            label = f"{record} B, {'mmap' if mapped else 'preadv'}"
            pins = warm(path)
            with shardfeed.open(path, mmap=mapped, preload=False) as ds:
                ds.read(np.arange(0, count, max(1, 4096 // record)), "x")
                read = reader(ds, False, 256, shape)
                cached_rows[label] = {o: cached_rates({o: read}, count, 256, order=o)[o] for o in ORDERS}
            pins.close()
            if cold:
                opener = {label: lambda: shardfeed.open(path, mmap=mapped, preload=False)}
                cold_rows[label] = {o: cold_rates(path, opener, lambda d, _: reader(d, False, 256, shape), count, 256,
                                                  max_batches=16, order=o)[label] for o in ORDERS}
        shutil.rmtree(path)
    table(f"Page-cached samples/s by order, float16 records, batch 256, threads {shardfeed.get_num_threads()}",
          ORDERS, cached_rows)
    if cold_rows:
        table("Cold samples/s by order, same", ORDERS, cold_rows)


def sweep_readahead(root: str, size: int, cold: bool, rounds: int = 5, samples: int = 32768) -> None:
    """Cold ``ds.batches`` epochs (random order, new arrays per batch, prefetch 2) with the loader's
    reading ahead off (``READAHEAD_BATCHES = 0``) and on (the default), alternating, the order
    swapped every round; each pass reads ``samples`` samples (at most half the dataset) right after
    eviction. Prints the median samples/s of each and the median of the per-round ratios."""
    import shardfeed.loader
    default = shardfeed.loader.READAHEAD_BATCHES
    rows = {}
    for name, (dtype, shape, batch, normalise) in PROFILES.items():
        path = os.path.join(root, name)
        count = write_dataset(path, dtype, shape, size)
        take = min(samples, count // 2) // batch

        def epoch_rate(mode: str, r: int) -> float:
            shardfeed.loader.READAHEAD_BATCHES = default if mode == "on" else 0
            evict(path)
            with shardfeed.open(path, preload=False) as ds:
                epoch = ds.batches(batch, fields="x", seed=r, epochs=1, dtype="float32",
                                   **(NORM if normalise else {}))
                start = time.perf_counter()
                for step, _ in zip(range(take), epoch):
                    pass
                rate = take * batch / (time.perf_counter() - start)
                epoch.close()
            return rate

        try:
            rates = alternate(["off", "on"], rounds, epoch_rate)
        finally:
            shardfeed.loader.READAHEAD_BATCHES = default
        shutil.rmtree(path)
        rows[name] = {"off": statistics.median(rates["off"]), "on": statistics.median(rates["on"]),
                      "on / off": median_ratio(rates["on"], rates["off"])}
    print(f"\nCold ds.batches samples/s, reading ahead off and on, {rounds} rounds, "
          f"{size >> 20} MiB per profile, threads {shardfeed.get_num_threads()}\n")
    print("| profile | off | on | on / off (median of rounds) |")
    print("|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['off']:,.0f} | {row['on']:,.0f} | {row['on / off']:.2f} |")


def sweep_read_io(root: str, size: int, cold: bool, rounds: int = 6, samples: int = 32768) -> None:
    """Cold ``ds.read`` passes (random order, one reused output buffer) with the records that miss
    the page cache read by the thread pool of preadv and by io_uring (``_core.set_read_io``),
    alternating, the order swapped every round; each pass reads ``samples`` samples (at most half
    the dataset) right after eviction. Prints the median samples/s and CPU microseconds per sample
    (user + system of the whole process, io_uring's kernel workers included) of each, and the
    median of the per-round ratios."""
    from shardfeed import _core
    if _core.uring_error():
        raise SystemExit(f"io_uring is not usable here: {os.strerror(_core.uring_error())}")
    before = _core.read_io()
    rows = {}
    for name, (dtype, shape, batch, normalise) in PROFILES.items():
        path = os.path.join(root, name)
        count = write_dataset(path, dtype, shape, size)
        take = min(samples, count // 2) // batch

        def pass_rate_and_cpu(mode: str, r: int) -> Tuple[float, float]:
            _core.set_read_io(mode)
            work = batches(count, batch, seed=1000 + r)[:take]
            evict(path)
            with shardfeed.open(path, preload=False) as ds:
                read = reader(ds, normalise, batch, shape)
                times, start = os.times(), time.perf_counter()
                for indices in work:
                    read(indices)
                seconds, after = time.perf_counter() - start, os.times()
            cpu_seconds = after.user + after.system - times.user - times.system
            return take * batch / seconds, 1e6 * cpu_seconds / (take * batch)

        try:
            runs = alternate(["pool", "uring"], rounds, pass_rate_and_cpu)
        finally:
            _core.set_read_io(before)
        shutil.rmtree(path)
        rates = {mode: [rate for rate, _ in results] for mode, results in runs.items()}
        rows[name] = {mode: (statistics.median(rates[mode]), statistics.median(cpu for _, cpu in runs[mode]))
                      for mode in runs}
        rows[name]["ratio"] = median_ratio(rates["uring"], rates["pool"])
    print(f"\nCold ds.read samples/s and CPU us per sample, thread pool vs io_uring, {rounds} rounds "
          f"alternating, {size >> 20} MiB per profile, threads {shardfeed.get_num_threads()}\n")
    print("| profile | pool samples/s | io_uring samples/s | io_uring / pool (median of rounds) "
          "| pool CPU us/sample | io_uring CPU us/sample |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['pool'][0]:,.0f} | {row['uring'][0]:,.0f} | {row['ratio']:.2f} "
              f"| {row['pool'][1]:.1f} | {row['uring'][1]:.1f} |")


def sweep_fields(root: str, size: int, cold: bool, batches_per_pass: int = 400, passes: int = 4) -> None:
    """Page-cached reads of a small field alone and of whole records: records of float16[256] ``x``
    + int64 ``y`` (520 B), batches of 256 random records as float32, on the map path. Prints the
    median microseconds per ``ds.read`` of each over ``passes`` passes (each of ``batches_per_pass``
    new random batches)."""
    path = os.path.join(root, "x-y")
    count = size // 520
    rng = np.random.default_rng(0)
    with shardfeed.Writer(path, {"x": ("float16", (256,)), "y": "int64"}) as writer:
        for start in range(0, count, 1 << 16):
            rows = min(1 << 16, count - start)
            writer.extend({"x": rng.standard_normal((rows, 256), dtype=np.float32).astype(np.float16),
                           "y": rng.integers(0, 10, rows)})
    reads = {"y alone": "y", "x and y": ["x", "y"]}
    times: Dict[str, List[float]] = {name: [] for name in reads}
    pins = warm(path)
    with shardfeed.open(path, mmap=True, preload=False) as ds:
        for p in range(passes):
            for name, fields in reads.items():
                work = batches(count, 256, seed=p)[:batches_per_pass]
                start = time.perf_counter()
                for indices in work:
                    ds.read(indices, fields, dtype="float32")
                times[name].append((time.perf_counter() - start) / len(work) * 1e6)
    pins.close()
    shutil.rmtree(path)
    print(f"\nPage-cached us per ds.read of 256 random 520 B records, {size >> 20} MiB, median of {passes} passes\n")
    print("| fields read | us per read |")
    print("|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} |")


LOADER_READERS = [readers.LOADERS_BASELINE, *readers.LOADERS]
LOADER_PASS_SAMPLES = {"f16-128B": 1 << 20, "f16-8KiB": 65536}  # the others: 4096


def sweep_loaders(root: str, size: int, cold: bool, rounds: int = 8) -> None:
    """Page-cached passes of the benchmark's own readers (readers.py) over one dataset per
    profile, alternating in one process, the order reversed every round: ``ds.read`` into new
    arrays (``shardfeed-alloc``, the baseline: what issue 18's loader target compares with) and
    the loaders (``ds.batches``, ``ShardSequence``, ``ShardLoader``; those whose framework is not
    installed are left out). A full garbage collection before each pass, untimed: with
    TensorFlow and torch imported one takes ~100 ms, as long as a pass. Prints each reader's
    median samples/s and the median and range of its per-round ratios to the baseline, which are
    steadier than ratios of figures minutes apart in a full run. Page-cached only (``cold`` is
    ignored)."""
    import gc
    by_name = {cls.name: cls for cls in readers.READERS}
    classes = [by_name[name] for name in LOADER_READERS if by_name[name].unavailable() is None]
    if not classes or classes[0].name != readers.LOADERS_BASELINE:
        raise SystemExit(f"the loaders sweep compares with {readers.LOADERS_BASELINE}: name it first in --readers")
    print(f"\nPage-cached passes, alternating, {rounds} rounds after one untimed, {size >> 20} MiB per profile, "
          f"threads {shardfeed.get_num_threads()}\n")
    print("| profile | reader | samples/s (median) | x shardfeed-alloc, median of rounds | range |")
    print("|---|---|---:|---:|---:|")
    for profile in regimes.PROFILES:
        if profile.name not in PROFILES:
            continue
        where = os.path.join(root, profile.name + "-loaders")
        data = regimes.BenchData(where, profile, size // profile.record_bytes)
        try:
            ring = [data.reader(cls) for cls in classes]
            for reader in ring:
                reader.open()
            samples = min(data.count, LOADER_PASS_SAMPLES.get(profile.name, 4096))
            orders = data.orders(seed=7)

            def pass_rate(reader, r: int) -> float:
                order = next(orders)[:samples]
                gc.collect()
                start, read = time.perf_counter(), 0
                for ids, _ in reader.read_pass(order):
                    read += len(ids)
                return read / (time.perf_counter() - start)

            rates = alternate(ring, rounds, pass_rate, warmup=1)  # the first round warms every reader up
        finally:
            data.close()
            shutil.rmtree(where, ignore_errors=True)
        base = rates[ring[0]]
        for reader, values in rates.items():
            ratios = [rate / b for rate, b in zip(values, base)]
            print(f"| {profile.name} | {reader.name} | {statistics.median(values):,.0f} | "
                  f"{median_ratio(values, base):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["threads", "mmap", "order", "readahead", "fields", "read_io", "loaders"])
    parser.add_argument("--no-cold", action="store_true", help="page-cached runs only")
    parser.add_argument("--mb", type=int, default=320, help="dataset size per profile in MiB")
    parser.add_argument("--threads", default=",".join(map(str, THREADS)), help="thread counts to try")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="profiles for the threads and loaders sweeps")
    parser.add_argument("--readers", default=",".join(LOADER_READERS),
                        help="benchmark readers for the loaders sweep, the baseline (shardfeed-alloc) first")
    args = parser.parse_args()
    known = {cls.name for cls in readers.READERS}
    unknown = [name for name in args.readers.split(",") if name not in known]
    if unknown:
        parser.error(f"--readers: no benchmark reader {unknown[0]!r} (readers.py has {sorted(known)})")
    LOADER_READERS[:] = args.readers.split(",")
    THREADS[:] = [int(t) for t in args.threads.split(",")]
    for name in set(PROFILES) - set(args.profiles.split(",")):
        del PROFILES[name]
    root = tempfile.mkdtemp(prefix="shardfeed-sweep-")
    try:
        sweep = {"threads": sweep_threads, "mmap": sweep_mmap, "order": sweep_order,
                 "readahead": sweep_readahead, "fields": sweep_fields, "read_io": sweep_read_io,
                 "loaders": sweep_loaders}[args.what]
        sweep(root, args.mb << 20, not args.no_cold)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
