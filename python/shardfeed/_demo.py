"""``shardfeed demo``: writes a synthetic image dataset in a temporary directory and trains a small
Keras model on it from the shards (a validation split, a new random order every epoch), printing
per-epoch samples/s and memory next to the dataset's size. Without Keras, or with
``--read-only``, it reads random batches instead and prints the read throughput.

Memory: the synthetic images are made a bounded chunk at a time (a few MiB, whatever
``--size-mb``), so the demo runs in a small memory cgroup; every mode reports the process's
private (anonymous) memory next to its RSS, which also counts the dataset's page-cache pages
mapped while reading. Its temporary directory is named after its pid: a demo that was killed
(SIGKILL, the OOM killer) leaves one behind, and the next demo removes it.
TensorFlow's start-up log lines are held back (shown only if the demo fails)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional

import numpy as np

from . import dataset as _dataset
from ._process import process_alive
from ._text import human_bytes
from .writer import Writer

CLASSES = 10


def memory() -> Dict[str, int]:
    """``VmHWM``: the peak RSS; where /proc has them, ``private``: the anonymous memory now (the
    process's own: Python, numpy arrays, batches, the model; ``Anonymous`` of smaps_rollup, else
    ``RssAnon``), and ``RssFile``: the file pages mapped now (the dataset's, while reading)."""
    figures: Dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    figures[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "Anonymous":
                    figures["private"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if "private" not in figures and "RssAnon" in figures:
        figures["private"] = figures["RssAnon"]
    if "VmHWM" not in figures:  # macOS: ru_maxrss is in bytes there (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        figures["VmHWM"] = peak if sys.platform == "darwin" else peak * 1024
    return figures


def memory_line(figures: Dict[str, int]) -> str:
    """'peak RSS 264.6 MiB, private 41.2 MiB' (private where the system reports it)."""
    private = f", private {human_bytes(figures['private'])}" if "private" in figures else ""
    return f"peak RSS {human_bytes(figures['VmHWM'])}{private}"


# The images are made this many bytes of records at a time: the temporaries (uint16 arithmetic on
# a chunk) stay a few MiB whatever the dataset size.
GENERATE_CHUNK_BYTES = 1 << 20


def write_images(path: str, samples: int, side: int) -> float:
    """uint8[3, side, side] images whose class (0-9) shows as a faint class pattern under noise,
    and int64 labels, written a bounded chunk at a time. Returns the seconds it took."""
    rng = np.random.default_rng(0)
    # image = (13 * pattern + 243 * noise) / 256: 5% of the class pattern under 95% noise, in uint16
    patterns = (rng.integers(0, 256, (CLASSES, 3, side, side)) * 13).astype(np.uint16)
    record_bytes = 3 * side * side + 8
    chunk = max(1, GENERATE_CHUNK_BYTES // record_bytes)
    started = time.perf_counter()
    with Writer(path, fields={"image": ("uint8", (3, side, side)), "label": ("int64", ())},
                metadata={"classes": [f"class_{i}" for i in range(CLASSES)], "source": "shardfeed demo"}) as writer:
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            labels = rng.integers(0, CLASSES, n)
            mixed = rng.integers(0, 256, (n, 3, side, side), dtype=np.uint16)
            mixed *= 243
            mixed += patterns[labels]
            mixed >>= 8
            writer.extend({"image": mixed.astype(np.uint8), "label": labels})
            del mixed
    return time.perf_counter() - started


_TEMPORARY_PREFIX = "shardfeed-demo-"


def remove_stale_directories(parent: Optional[str]) -> List[str]:
    """Removes the temporary directories of demos that were killed (their pid is gone): a demo's
    directory is ``shardfeed-demo-<pid>-<random>``. Returns the paths removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = re.fullmatch(re.escape(_TEMPORARY_PREFIX) + r"(\d+)-\w+", entry.name)
        if not match or not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
            continue
        if process_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed



@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler) ends the demo through its ``finally`` blocks, so its
    temporary directory goes; SIGKILL cannot be caught: the next demo removes what it left."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _held_back_stderr() -> Iterator[None]:
    """File descriptor 2 goes to a temporary file while TensorFlow starts and trains (its C++
    start-up lines ignore TF_CPP_MIN_LOG_LEVEL in part: absl's "All log messages before
    absl::InitializeLog()", CUDA factory registrations); what it caught is shown if the demo
    fails, and dropped otherwise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                caught.seek(0)
                sys.stderr.write(caught.read().decode(errors="replace"))
                sys.stderr.flush()


def _samples(args: argparse.Namespace) -> int:
    record_bytes = 3 * args.image_size ** 2 + 8
    return args.samples if args.samples else max(20, int(args.size_mb * (1 << 20)) // record_bytes)


def run(args: argparse.Namespace) -> int:
    with _terminate_as_exit():
        remove_stale_directories(args.dir)
        if args.read_only:
            return _run(args, None)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with _held_back_stderr():
            try:
                import keras
            except ImportError:
                keras = None
            if keras is not None:
                return _run(args, keras)
        print("Keras is not installed, so the demo only reads batches; to train a model, install the "
              "extra: pip install 'shardfeed[tensorflow]'")
        return _run(args, None)


def _run(args: argparse.Namespace, keras) -> int:
    side = args.image_size
    samples = _samples(args)
    with tempfile.TemporaryDirectory(prefix=f"{_TEMPORARY_PREFIX}{os.getpid()}-", dir=args.dir) as root:
        path = os.path.join(root, "images")
        elapsed = write_images(path, samples, side)
        size = samples * (3 * side * side + 8)
        print(f"wrote {samples:,} samples ({human_bytes(size)}) of uint8[3,{side},{side}] images + int64 labels "
              f"in {elapsed:.1f} s ({size / elapsed / 1e6:.0f} MB/s) to {path}", flush=True)
        with _dataset.open(path) as ds:
            if keras is None:
                return _read_only(ds, args, size)
            return _train(keras, ds, args, size)


def _train(keras, ds, args: argparse.Namespace, size: int) -> int:
    from .keras import ShardSequence

    train, val = ds.split([1 - args.validation, args.validation], seed=0)
    side = args.image_size
    read = dict(dtype={"image": "float32"}, scale={"image": 1 / 127.5}, offset={"image": -1.0})
    train_seq = ShardSequence(train, args.batch_size, "image", "label", seed=0, **read)
    val_seq = ShardSequence(val, args.batch_size, "image", "label", shuffle=False, **read)
    print(f"training a Keras ({keras.backend.backend()}) MLP on {len(train):,} samples, validating on "
          f"{len(val):,}: batches of {args.batch_size} read from the shards by {ds.threads} native threads, "
          "a new random order of the whole training split every epoch")

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((3, side, side)), keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(CLASSES, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    private: List[int] = []

    class Report(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started, self.trained = time.perf_counter(), None

        def on_test_begin(self, logs=None):
            self.trained = time.perf_counter() - self.started

        def on_epoch_end(self, epoch, logs=None):
            seconds = self.trained if self.trained is not None else time.perf_counter() - self.started
            figures = memory()
            if "private" in figures:
                private.append(figures["private"])
            print(f"epoch {epoch + 1}/{args.epochs}: loss {logs['loss']:.3f}, accuracy {logs['accuracy']:.3f}, "
                  f"val_accuracy {logs['val_accuracy']:.3f} | {len(train) / seconds:,.0f} samples/s | "
                  f"{memory_line(figures)}", flush=True)

    model.fit(train_seq, validation_data=val_seq, epochs=args.epochs, shuffle=False, verbose=0,
              callbacks=[Report()])
    figures = memory()
    peak = figures["VmHWM"]
    print(f"dataset {human_bytes(size)}; {memory_line(figures)}; peak RSS = {peak / size:.2f} x the dataset")
    if private:
        print(f"private (anonymous) memory at each epoch's end: "
              f"{', '.join(human_bytes(p) for p in private)}: it depends on the model and a few batches, not "
              "on the dataset. The rest of the RSS is the dataset's pages in the page cache, mapped while "
              "reading, which the kernel reclaims when memory is short.")
    print("try --size-mb with more than your RAM (and --epochs 1): the private memory stays the same")
    return 0


def _read_only(ds, args: argparse.Namespace, size: int) -> int:
    side = args.image_size
    print(f"opened {ds.num_shards} shard(s); reading random batches of {args.batch_size} with "
          f"{ds.threads} native threads, uint8 -> normalised float32 in place")
    scale, offset = np.float32(1 / 127.5), np.float32(-1.0)
    read = batches = 0
    most_private = 0
    started = time.perf_counter()
    for x, y in ds.batches(args.batch_size, inputs="image", targets="label", seed=0, epochs=args.epochs,
                           dtype={"image": "float32"}, scale={"image": scale}, offset={"image": offset}):
        read += len(y)
        batches += 1
        if batches % 16 == 1:
            most_private = max(most_private, memory().get("private", 0))
    elapsed = time.perf_counter() - started
    figures = memory()
    most_private = max(most_private, figures.get("private", 0))
    private = (f", private at most {human_bytes(most_private)} (the rest of the RSS: the dataset's pages in the "
               "page cache, mapped while reading, which the kernel reclaims when memory is short)"
               if "private" in figures else "")
    print(f"read {read:,} samples in {elapsed:.2f} s: {read / elapsed:,.0f} samples/s, "
          f"{read * 3 * side * side * 4 / elapsed / 1e9:.2f} GB/s of float32 output; "
          f"peak RSS {human_bytes(figures['VmHWM'])} for a {human_bytes(size)} dataset{private}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mb", type=float, default=256, help="dataset size in MiB (default 256; pick more "
                        "than your RAM to see the out-of-core case)")
    parser.add_argument("--samples", type=int, default=0, help="number of samples (overrides --size-mb)")
    parser.add_argument("--image-size", type=int, default=32, help="images are uint8[3, N, N] (default 32)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--validation", type=float, default=0.1, help="fraction held out for validation")
    parser.add_argument("--read-only", action="store_true", help="read random batches instead of training")
    parser.add_argument("--dir", default=None, help="directory for the temporary dataset (default: system temp)")

