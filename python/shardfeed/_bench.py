"""``shardfeed bench``: random-read throughput of a dataset on this machine, page-cached and cold,
against numpy.memmap -- the command's options and output, and the measurements (:func:`bench`),
which know nothing of argparse. Registered by cli.py."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import dataset as _dataset
from ._text import human_bytes
from .cli import new_command, positive, say
from .format import HEADER_BYTES


class _MemmapReader:
    """The baseline: each shard's records as a structured numpy.memmap, fancy-indexed."""

    def __init__(self, ds: Any, names: List[str]):
        from ._casting import bfloat16_bits_to_float32

        self._bf16 = bfloat16_bits_to_float32
        manifest = ds._manifest
        self.dtype = manifest.schema.record_dtype
        self.maps = [np.memmap(os.path.join(ds.path, s.file), dtype=self.dtype, mode="r", offset=HEADER_BYTES,
                               shape=(s.num_samples,)) if s.num_samples else None for s in manifest.shards]
        self.starts = np.cumsum([0] + [s.num_samples for s in manifest.shards])
        self.names = names
        self.bfloat16 = {n for n in names if ds.fields[n].dtype == "bfloat16"}

    def read(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
        if len(self.maps) == 1:
            records = self.maps[0][indices]
        else:
            shard = np.searchsorted(self.starts, indices, side="right") - 1
            records = np.empty(len(indices), self.dtype)
            for k in np.unique(shard):
                mask = shard == k
                records[mask] = self.maps[k][indices[mask] - self.starts[k]]
        out = {}
        for name in self.names:
            values = np.ascontiguousarray(records[name])
            out[name] = self._bf16(values) if name in self.bfloat16 else values
        return out

    def close(self) -> None:
        self.maps = []


def _evict(paths: List[str]) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _read_through(paths: List[str]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass


def _random_batches(rng: np.random.Generator, count: int, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of indices: one random permutation of the samples after another."""
    while True:
        order = rng.permutation(count)
        for start in range(0, count, batch_size):
            yield order[start:start + batch_size]


def _timed(reader: Any, batches: Iterator[np.ndarray], seconds: float, most: Optional[int]) -> Tuple[int, float]:
    """Reads batches for ``seconds`` (or until ``most`` samples are read): (samples read, seconds)."""
    done = 0
    started = time.perf_counter()
    limit = started + seconds
    while True:
        indices = next(batches)
        reader(indices)
        done += len(indices)
        now = time.perf_counter()
        if now >= limit or (most is not None and done >= most):
            return done, now - started


def bench(path: str, *, batch_size: int = 256, seconds: float = 2.0, fields: Optional[List[str]] = None,
          threads: Optional[int] = None, cold: bool = True, memmap: bool = True, seed: int = 0,
          say: Any = None) -> Dict[str, Any]:
    """The measurements ``shardfeed bench`` prints, as a dict."""
    say = say or (lambda *a: None)
    ds = _dataset.open(path, threads=threads)
    names = fields or list(ds.fields)
    for name in names:
        if name not in ds.fields:
            ds.close()
            raise KeyError(f"no field {name!r}; the dataset has {list(ds.fields)}")
    manifest = ds._manifest
    files = [os.path.join(path, n) for s in manifest.shards for n in (s.file, s.heap_file) if n]
    record_bytes = manifest.schema.record_bytes
    total_bytes = sum(os.path.getsize(f) for f in files)
    fixed = not any(ds.fields[n].in_heap for n in names)
    count = len(ds)
    result: Dict[str, Any] = {
        "path": path, "samples": count, "record_bytes": record_bytes, "shards": len(manifest.shards),
        "dataset_bytes": total_bytes, "batch_size": batch_size, "threads": ds.threads, "fields": names,
        "memmap": "yes" if (memmap and fixed) else ("no: variable-length or compressed fields" if memmap else "not asked"),
        "results": [],
    }
    ds.close()
    if count == 0:
        return result
    rng = np.random.default_rng(seed)

    def run(reader: Any, condition: str, name: str, cold: bool) -> None:
        done, elapsed = _timed(reader, _random_batches(rng, count, batch_size), seconds,
                               max(batch_size, count // 8) if cold else None)
        entry = {"condition": condition, "reader": name, "samples": done, "seconds": elapsed,
                 "samples_per_s": done / elapsed, "mb_per_s": done * record_bytes / elapsed / 1e6}
        result["results"].append(entry)
        say(f"  {condition:<12} {name:<10} {entry['samples_per_s']:>14,.0f} samples/s {entry['mb_per_s']:>10,.1f} MB/s")

    conditions = ["page-cached"] + (["cold"] if cold else [])
    available = None
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for condition in conditions:
        for name in ["shardfeed"] + (["memmap"] if memmap and fixed else []):
            if condition == "cold":
                if not _evict(files):
                    result["cold"] = "not measured: no posix_fadvise on this system"
                    say("  cold: not measured (no posix_fadvise on this system)")
                    break
            else:
                if available is not None and total_bytes > available // 2:
                    result["page_cached_note"] = "dataset larger than half the free memory: partly cold"
                _read_through(files)
            if name == "shardfeed":
                with _dataset.open(path, threads=threads) as reading:
                    run(lambda idx: reading.read(idx, names), condition, name, condition == "cold")
            else:
                with _dataset.open(path) as opened:
                    baseline = _MemmapReader(opened, names)
                try:
                    run(baseline.read, condition, name, condition == "cold")
                finally:
                    baseline.close()
    by_condition: Dict[str, Dict[str, float]] = {}
    for entry in result["results"]:
        by_condition.setdefault(entry["condition"], {})[entry["reader"]] = entry["samples_per_s"]
    for entry in result["results"]:
        base = by_condition[entry["condition"]].get("memmap")
        entry["ratio_to_memmap"] = entry["samples_per_s"] / base if base else None
    return result


def check_same(path: str, names: List[str]) -> bool:
    """shardfeed and the memmap baseline return the same values (checked on one batch)."""
    with _dataset.open(path) as ds:
        if not len(ds) or any(ds.fields[n].in_heap for n in names):
            return True
        indices = np.random.default_rng(1).integers(0, len(ds), min(len(ds), 64))
        ours = ds.read(indices, names)
        baseline = _MemmapReader(ds, names)
        try:
            theirs = baseline.read(indices)
        finally:
            baseline.close()
    return all(np.array_equal(ours[n].view(np.uint8), theirs[n].view(np.uint8)) for n in names)


_BENCH_HELP = """\
Measures random-read throughput of a dataset on this machine: batches of uniformly random sample
indices read with shardfeed (all fields, or --fields, in their stored dtype), and the same records
read with numpy.memmap (fancy indexing of each shard's records, then one array per field) when the
fields have a fixed shape. Two conditions:

  page-cached  after reading every shard file once (if the dataset fits in the page cache)
  cold         every shard file evicted from the page cache (posix_fadvise DONTNEED) before each
               reader's pass; each pass reads a random permutation, so no record twice

Each measurement runs for --seconds; a cold pass also stops after an eighth of the samples, so
that the kernel's readahead around earlier records (memmap's page faults read 128 KiB or more)
does not turn it into a sequential read of the whole file.
Prints samples/s, MB/s of records and the ratio to memmap; --json for a machine-readable result.
The dataset is only read."""


def _bench(args: argparse.Namespace) -> int:
    names = args.fields.split(",") if args.fields else None
    with _dataset.open(args.path) as ds:
        for name in names or []:
            if name not in ds.fields:
                args.parser.error(f"no field {name!r}; the dataset has {list(ds.fields)}")
        description = (f"{ds.path}: {len(ds)} samples of {ds.schema.record_bytes} B in {ds.num_shards} shard(s), "
                       f"{human_bytes(sum(s.size + s.heap_size for s in ds._manifest.shards))}; batches of "
                       f"{args.batch_size}, {ds.threads if args.threads is None else args.threads} threads")
        names = names or list(ds.fields)
    if not args.json:
        say(args, description)
    result = bench(args.path, batch_size=args.batch_size, seconds=args.seconds, fields=names, threads=args.threads,
                   cold=not args.no_cold, memmap=not args.no_memmap,
                   say=(lambda *a: None) if args.json or args.quiet else print)
    result["same_values_as_memmap"] = check_same(args.path, names) if result["memmap"] == "yes" else None
    if args.json:
        print(json.dumps(result, indent=1))
    elif not args.quiet:
        for entry in result["results"]:
            if entry["reader"] == "shardfeed" and entry["ratio_to_memmap"]:
                print(f"{entry['condition']}: shardfeed reads {entry['ratio_to_memmap']:.2f}x as many samples/s as numpy.memmap")
        if result["memmap"] != "yes":
            print(f"memmap baseline: {result['memmap']}")
        if result.get("page_cached_note"):
            print(f"note: {result['page_cached_note']}")
    return 0 if result["same_values_as_memmap"] is not False else 1


def add_command(commands: Any) -> None:
    """Adds ``bench`` to the ``shardfeed`` sub-command parser."""
    p = new_command(commands, "bench", _bench, description=_BENCH_HELP,
                    help="random-read throughput of a dataset, page-cached and cold, vs numpy.memmap")
    p.add_argument("path")
    p.add_argument("--batch-size", type=positive, default=256, help="samples per read (default 256)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default 2)")
    p.add_argument("--fields", metavar="A,B", help="fields to read (default: all)")
    p.add_argument("--threads", type=positive, help="native reader threads (default: shardfeed's automatic choice)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold measurements")
    p.add_argument("--no-memmap", action="store_true", help="skip the numpy.memmap baseline")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing (the exit status says whether "
                   "shardfeed and memmap read the same values)")
