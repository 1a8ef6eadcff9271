"""What the read benchmarks run on: the record profiles, one profile's dataset
(:class:`BenchData`), and the page-cache regimes: pinning files in memory (page-cached), evicting
them (cold), and capping the page cache with a memory cgroup (out-of-core)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

import shardfeed
from shardfeed import _core
from shardfeed.read_options import affine_layout
from shardfeed.read_options import STORED_KINDS
from shardfeed.format import HEADER_BYTES
from shardfeed.manifest import read_manifest

# ImageNet statistics: x_float = (x_uint8 / 255 - mean) / std = x * scale + offset, per channel.
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)
NORM_SCALE = (1.0 / (255.0 * _STD)).astype(np.float32).reshape(3, 1, 1)
NORM_OFFSET = (-_MEAN / _STD).astype(np.float32).reshape(3, 1, 1)

SEED = 20240607
CGROUP_MEMORY = "/sys/fs/cgroup/memory"

PAGE_CACHED, COLD, OUT_OF_CORE = "page-cached", "cold", "out-of-core"
REGIMES = [PAGE_CACHED, COLD, OUT_OF_CORE]
# What each regime's figures are compared with: the same records memcpy'd from a memory map and
# cast (page-cached), or the best fio random-read configuration (cold, out-of-core).
LIMITS = {PAGE_CACHED: "memcpy-ceiling", COLD: "fio-best", OUT_OF_CORE: "fio-best"}


@dataclass(frozen=True)
class Profile:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    batch: int
    normalise: bool  # uint8 -> (x * scale + offset) per channel

    @property
    def record_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def output_bytes(self) -> int:
        """float32 bytes of one output sample."""
        return int(np.prod(self.shape)) * 4

    def kwargs(self) -> dict:
        return {"scale": NORM_SCALE, "offset": NORM_OFFSET} if self.normalise else {}


PROFILES = [
    Profile("f16-128B", "float16", (64,), 256, False),
    Profile("f16-8KiB", "float16", (64, 64), 256, False),
    Profile("u8-147KiB-norm", "uint8", (3, 224, 224), 64, True),
]


def write_dataset(path: str, profile: Profile, count: int, rng: np.random.Generator) -> None:
    step = max(1, (32 << 20) // profile.record_bytes)
    with shardfeed.Writer(path, {"x": (profile.dtype, profile.shape)}, shard_size=1 << 40) as writer:
        for start in range(0, count, step):
            rows = (min(step, count - start),) + profile.shape
            if profile.dtype == "uint8":
                values = rng.integers(0, 256, rows, dtype=np.uint8)
            else:
                values = rng.standard_normal(rows, dtype=np.float32).astype(profile.dtype)
            writer.extend({"x": values})


# ---- page cache: pin, evict, cap --------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


# Run in a child process: it reads each file, mlock()s a map of it and holds it until its stdin
# closes; prints how many files it could lock.
_PIN_SCRIPT = """
import ctypes, sys
import numpy as np
libc = ctypes.CDLL(None, use_errno=True)
maps, locked = [], 0
for name in sys.argv[1:]:
    pages = np.memmap(name, dtype=np.uint8, mode="r")
    int(pages[::4096].sum())
    locked += libc.mlock(ctypes.c_void_p(pages.ctypes.data), ctypes.c_size_t(pages.nbytes)) == 0
    maps.append(pages)
print(locked, flush=True)
sys.stdin.read()
"""


class Pin:
    """Keeps files in the page cache while a page-cached pass is timed: a child process reads them
    and mlock()s them where allowed (root, or a large RLIMIT_MEMLOCK), because some machines evict
    a file's pages seconds after a read even with memory free (DAMON pageout). A child, so that the
    locked maps do not count in this process's RSS. Close it before evicting the files."""

    def __init__(self, files: List[str]):
        self.child = subprocess.Popen([sys.executable, "-c", _PIN_SCRIPT, *files], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self.locked = int(self.child.stdout.readline() or 0) == len(files)

    def close(self) -> None:
        with self.child:  # closes its stdin (so it exits) and stdout, then waits
            pass


def evict(files: List[str]) -> None:
    """Drops the files' pages from the page cache (no root needed). Pages mapped or locked by this
    process stay: close readers and drop pins first."""
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_in_order(files: List[str]) -> None:
    """Reads the files front to back once, the way ``Dataset.preload`` does (and ``cat`` would),
    so the page cache holds them as a sequential read leaves them: in large folios where the
    kernel has them (Linux 6.16+ ext4), which memory maps then map with 2 MiB pages."""
    chunk = bytearray(8 << 20)
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while os.readv(fd, [chunk]) > 0:
                pass
        finally:
            os.close(fd)


def resident_fraction(files: List[str]) -> float:
    """Share of the files' pages in the page cache (mincore on a fresh map)."""
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for name in files:
        size = os.path.getsize(name)
        if size == 0:
            continue
        pages = np.memmap(name, dtype=np.uint8, mode="r")
        count = (size + page - 1) // page
        vec = np.zeros(count, np.uint8)
        rc = _libc.mincore(ctypes.c_void_p(pages.ctypes.data), ctypes.c_size_t(size), vec.ctypes.data_as(ctypes.c_void_p))
        del pages
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"mincore({name})")
        resident += int((vec & 1).sum())
        total += count
    return resident / total if total else 0.0


def memory_cgroup_unavailable() -> Optional[str]:
    if os.geteuid() != 0:
        return "the out-of-core regime needs root (it runs the pass in a memory cgroup)"
    if not os.access(os.path.join(CGROUP_MEMORY, "cgroup.procs"), os.W_OK):
        return f"no writable cgroup v1 memory controller at {CGROUP_MEMORY}"
    return None


def out_of_core_limit(dataset_bytes: int) -> int:
    """The out-of-core regime's memory cap: a quarter of the dataset. Not below 384 MiB: the
    allocations the process makes while inside (batches, a reader's buffers, direct reads' bounce
    buffers, the pages its forked workers copy) are charged too, and a cap below them gets the
    process killed rather than its page cache shrunk. At 256 MiB, a full run's process (1.4 GiB of
    anonymous memory by its last profile: TensorFlow, torch) was killed at 147 KiB out of core when
    `shardfeed-torch-w2`'s two workers read directly (38 MiB batches, io_uring bounce buffers),
    once those reads became the default there (ninth session)."""
    return max(dataset_bytes // 4, 384 << 20)


class MemoryLimit:
    """A cgroup v1 memory cgroup that caps this process's page cache (and new allocations) at
    ``limit_bytes`` while entered: every thread of the process, and processes it starts, are
    moved in. Pages cached before entering are charged elsewhere and would still hit: evict the
    dataset's files first."""

    def __init__(self, limit_bytes: int):
        self.path = os.path.join(CGROUP_MEMORY, f"shardfeed-bench-{os.getpid()}")
        self.limit_bytes = limit_bytes
        os.makedirs(self.path, exist_ok=True)
        self._write("memory.limit_in_bytes", limit_bytes)
        self.procs = os.path.join(self.path, "cgroup.procs")

    def _write(self, name: str, value) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def __enter__(self) -> "MemoryLimit":
        with open(self.procs, "w") as f:
            f.write(str(os.getpid()))
        return self

    def __exit__(self, *exc) -> None:
        with open(os.path.join(CGROUP_MEMORY, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def remove(self) -> None:
        try:
            self._write("memory.force_empty", 0)
        except OSError:
            pass
        os.rmdir(self.path)

    def failcnt(self) -> int:
        with open(os.path.join(self.path, "memory.failcnt")) as f:
            return int(f.read())


def reset_peak_rss() -> None:
    """Resets VmHWM (Linux: writing 5 to /proc/self/clear_refs; no root needed)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM:")


def rss_bytes() -> int:
    return _status_bytes("VmRSS:")


def file_pmd_mapped_bytes() -> int:
    """Bytes of files this process maps with 2 MiB pages (FilePmdMapped; 0 where not reported)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("FilePmdMapped:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def anon_bytes() -> int:
    """Private (anonymous) resident memory: RSS without the pages of mapped files."""
    return _status_bytes("RssAnon:")


# ---- one profile's data ------------------------------------------------------------------------


class BenchData:
    """One profile's dataset (a shardfeed dataset with one shard) and the readers built on it."""

    def __init__(self, root: str, profile: Profile, count: int):
        self.profile = profile
        self.count = count
        self.path = os.path.join(root, profile.name)
        self.peer_dir = os.path.join(root, profile.name + "-peers")
        os.makedirs(self.peer_dir)
        write_dataset(self.path, profile, count, np.random.default_rng(SEED))
        shards = read_manifest(self.path).shards
        assert len(shards) == 1, "the memmap readers expect a single shard"
        self.record_file = os.path.join(self.path, shards[0].file)
        self.readers: Dict[str, object] = {}
        self.fio_best: Dict[str, Tuple[str, int]] = {}  # regime: fio's best (engine, parallel), test_disk_limit
        self.pin: Optional[Pin] = None
        self._memmap = self.open_memmap()
        with shardfeed.open(self.path) as ds:
            field = ds.fields["x"]
        self._cast = STORED_KINDS[profile.dtype]
        self._affine = affine_layout(field, NORM_SCALE, NORM_OFFSET) if profile.normalise else None

    @property
    def dataset_bytes(self) -> int:
        return self.count * self.profile.record_bytes

    def memory_limit(self) -> MemoryLimit:
        """A memory cgroup for the out-of-core regime (see :func:`out_of_core_limit`)."""
        return MemoryLimit(out_of_core_limit(self.dataset_bytes))

    def open_memmap(self) -> np.memmap:
        return np.memmap(self.record_file, dtype=self.profile.dtype, mode="r", offset=HEADER_BYTES,
                         shape=(self.count,) + self.profile.shape)

    def normalise(self, x: np.ndarray) -> np.ndarray:
        if self.profile.normalise:
            x *= NORM_SCALE
            x += NORM_OFFSET
        return x

    def reference(self, ids: np.ndarray) -> np.ndarray:
        """What every reader must return: numpy.memmap fancy indexing + astype (+ normalisation)."""
        if self._memmap is None:
            self._memmap = self.open_memmap()
        return self.normalise(self._memmap[ids].astype(np.float32))

    def convert(self, stored: np.ndarray, out: np.ndarray, stream: bool = False) -> None:
        """Casts stored records to float32 (normalising images) with shardfeed's kernel; with
        ``stream``, its variant with non-temporal stores."""
        _core.convert(self._cast, stored.reshape(-1).view(np.uint8), out.reshape(-1), self._affine, stream=stream)

    def output_streamed(self, n: int) -> bool:
        """Whether shardfeed's reads convert a batch of ``n`` of these records with non-temporal stores."""
        return _core.output_streamed(self.profile.output_bytes, n)

    def reader(self, cls):
        if cls.name not in self.readers:
            self.readers[cls.name] = cls(self)
        return self.readers[cls.name]

    def orders(self, seed: int) -> Iterator[np.ndarray]:
        """Fresh uniformly random permutations of the whole dataset, one per epoch."""
        rng = np.random.default_rng(seed)
        while True:
            yield rng.permutation(self.count).astype(np.int64)

    def release(self) -> None:
        """Closes every reader and drops every pin and map of this process on the files, so that
        eviction drops their pages (the kernel keeps pages that are mapped or locked)."""
        for reader in self.readers.values():
            reader.close()
        if self.pin is not None:
            self.pin.close()
        self.pin = None
        self._memmap = None

    def close(self) -> None:
        self.release()
        self.readers = {}


