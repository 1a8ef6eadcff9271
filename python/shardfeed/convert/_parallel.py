"""Parallel conversion: parts converted in processes, then merged without copying shard data."""

from __future__ import annotations

import collections
import importlib
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Optional

from ..format import MANIFEST_NAME
from ..manifest import read_manifest
from ._options import PathLike, Progress
from ._progress import progress_bar
from ._report import MAX_EXAMPLES, ConversionReport
from ._sink import refuse_foreign_directory

_progress_queue: Any = None  # in a worker process: where its progress goes (set by _worker_init)


def _worker_init(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue


class _QueueProgress:
    """Sends a worker's progress to the parent, at most every 0.2 s."""

    def __init__(self) -> None:
        self.pending, self.last = 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.pending += n
        now = time.monotonic()
        if now - self.last >= 0.2:
            self.flush()
            self.last = now

    def flush(self) -> None:
        if self.pending and _progress_queue is not None:
            _progress_queue.put(self.pending)
        self.pending = 0


def _worker_convert(module: str, name: str, path: str, args: tuple, kwargs: Dict[str, Any]) -> ConversionReport:
    """In a worker process: converts one part with converter ``module.name``."""
    progress = _QueueProgress()
    try:
        return getattr(importlib.import_module(module), name)(path, *args, progress=progress, **kwargs)
    finally:
        progress.flush()


def run_parallel(func: Callable[..., ConversionReport], path: PathLike, args: tuple, kwargs: Dict[str, Any],
                 workers: Any, progress: Progress, total: Optional[int] = None, unit: str = "B") -> ConversionReport:
    """Runs ``func`` in ``workers`` processes, part k of n each into a part directory next to
    ``path``, then merges the parts into ``path`` (moving their shard files: nothing is copied)."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    from ..merge import merge

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if kwargs.get("mode", "w") != "w":
        raise ValueError("workers > 1 writes a new dataset: mode must be 'w' (merge parts into a new dataset instead)")
    target = os.fspath(path)
    if os.path.exists(os.path.join(target, MANIFEST_NAME)):
        raise FileExistsError(f"a dataset already exists at {target}")
    refuse_foreign_directory(target)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix=".shardfeed-parts-", dir=parent)
    started = time.perf_counter()
    bar = progress_bar(progress, total, "converting", unit)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    parts = [os.path.join(root, f"part-{k:05d}") for k in range(workers)]

    def drain() -> None:
        while True:
            try:
                bar.update(queue.get_nowait())
            except Exception:  # queue.Empty
                return

    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(queue,)) as pool:
            futures = [pool.submit(_worker_convert, func.__module__, func.__name__, parts[k], args, dict(kwargs, part=(k, workers)))
                       for k in range(workers)]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
                drain()
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    for f in pending:
                        f.cancel()
                    raise failed[0].exception()
            drain()
        reports = [f.result() for f in futures]
        result = merge(parts, target, move=True)
    finally:
        bar.close()
        queue.close()
        queue.join_thread()
        shutil.rmtree(root, ignore_errors=True)
    fields = {name: first.merged([r.fields[name] for r in reports[1:]]) for name, first in reports[0].fields.items()}
    manifest = read_manifest(target)
    return ConversionReport(
        path=target, num_samples=result.num_samples, dataset_samples=result.num_samples, num_shards=result.num_shards,
        source_bytes=sum(r.source_bytes for r in reports),
        dataset_bytes=sum(s.size + s.heap_size for s in manifest.shards), seconds=time.perf_counter() - started,
        fields=fields, skipped=sum(r.skipped for r in reports),
        skipped_examples=[e for r in reports for e in r.skipped_examples][:MAX_EXAMPLES], parts=workers,
        notes=list(dict.fromkeys(note for r in reports for note in r.notes)), image_mode=reports[0].image_mode,
        images_converted=dict(sum((collections.Counter(r.images_converted) for r in reports), collections.Counter())))
