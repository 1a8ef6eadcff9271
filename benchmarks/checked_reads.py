"""Checked against unchecked page-cached reads of 8 KiB records, in CPU time: a script to run under
two builds in turn (e.g. ``.venv/bin/python`` of two trees) on a shared machine.

    python benchmarks/checked_reads.py DIR --make   # once: 8192 float16[4096] records (64 MiB)
    python benchmarks/checked_reads.py DIR          # mapped and preadv, plain and verify=True

Each reader reads the same 100 random batches of 256 into a reused ``out=`` array, five passes
alternating plain and checked, on the calling thread (``threads=1``) and timed with
``time.thread_time``: CPU time is what the check adds, and unlike wall time it barely moves when
other jobs share the cores (the wall-clock comparison is ``bench_checks.py``). Prints the best and
the median pass per batch, and the load average.
"""

import argparse
import os
import statistics
import time

import numpy as np

import shardfeed

RECORDS, ELEMENTS, BATCH, BATCHES, PASSES = 8192, 4096, 256, 100, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--make", action="store_true", help="write the dataset and stop")
    args = parser.parse_args()
    if args.make:
        data = np.random.default_rng(0).standard_normal((RECORDS, ELEMENTS)).astype(np.float16)
        with shardfeed.Writer(args.path, fields={"x": ("float16", (ELEMENTS,))}, shard_size=8 << 20) as w:
            w.extend({"x": data})
        return
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, RECORDS, BATCH) for _ in range(BATCHES)]
    out = np.empty((BATCH, ELEMENTS), np.float16)
    print(f"load average {os.getloadavg()[0]:.1f}, CRC32C kernel {shardfeed._core.BUILD_INFO.get('crc32c_kernel', '?')}")
    for mmap in (True, False):
        readers = {"plain": shardfeed.open(args.path, mmap=mmap, threads=1),
                   "checked": shardfeed.open(args.path, mmap=mmap, verify=True, threads=1)}
        for ds in readers.values():  # every page cached and mapped
            for batch in batches:
                ds.read(batch, out={"x": out})
        passes = {name: [] for name in readers}
        for _ in range(PASSES):
            for name, ds in readers.items():
                start = time.thread_time()
                for batch in batches:
                    ds.read(batch, out={"x": out})
                passes[name].append((time.thread_time() - start) / BATCHES * 1e6)
        plain, checked = min(passes["plain"]), min(passes["checked"])
        print(f"{'mapped' if mmap else 'preadv'}: plain {plain:.1f} us/batch, checked {checked:.1f} us/batch, "
              f"ratio {checked / plain:.2f} (medians {statistics.median(passes['plain']):.1f} / "
              f"{statistics.median(passes['checked']):.1f})")
        for ds in readers.values():
            ds.close()


if __name__ == "__main__":
    main()
