"""Reading ahead on threads: :class:`Prefetcher` (the steps of a stream, in order, on a named
daemon thread, for ``ds.batches`` and ``shardfeed.torch.ShardLoader``) and :class:`StepPool`
(steps a consumer asks for in any order, read ahead on threads or processes, for
``shardfeed.keras.ShardSequence``). Both take a :class:`~shardfeed.loader.BatchPlan`'s reads
(``plan.load``, ``plan.load_group``); :mod:`shardfeed.loader` re-exports them."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

DEFAULT_PREFETCH = 2
# The name of a Prefetcher's thread unless its owner gives another (tests wait for these threads).
PREFETCH_THREAD_NAME = "shardfeed-prefetch"


class Prefetcher:
    """Computes ``produce(step)`` for the steps ``first, first + 1, ...`` (up to ``stop``, or
    forever when ``stop`` is None), in order, on a named daemon thread, up to ``depth`` results
    ahead of the consumer. :meth:`get` returns the next result, raises StopIteration after the
    last one and re-raises an exception of ``produce`` (after the results before it).
    :meth:`close` stops the thread promptly (after the call to ``produce`` in progress, if any),
    drops the results not consumed and joins the thread; it is idempotent.

    With ``group`` > 1 and ``produce_group(first, count)`` (an iterable of the results of the
    steps ``first`` to ``first + count - 1``, in order), steps are computed ``group`` at a time
    and handed over together: one wake-up of the consumer per group instead of per step (a
    hand-off costs 20-50 us on loaded cores), and ``depth`` counts groups.

    With ``help_while_waiting``, a consumer that finds its next result still being computed
    computes the group after the last one started, on its own thread, instead of sleeping: a
    consumer faster than the thread (one that trains for less time than a read takes) gets two
    groups computed at once instead of waiting for one; a consumer slower than the thread never
    waits, so never helps. Every result is still handed out in step order, exactly once. Only
    for a ``produce`` that may run on any thread (the loaders ask for it when there is no
    transform, which is documented to run on the prefetch thread).

    When the consumer takes nothing for ``idle_s`` seconds, the thread drops its results and
    exits; the next :meth:`get` starts a new one at the first step not consumed. (TensorFlow
    never frees a generator that ``model.fit`` consumed, so a generator that is not closed
    would otherwise keep its thread and ``depth`` batches for the life of the process.) The
    steps are recomputed, so ``produce`` must be a pure function of the step, as ``BatchPlan.load``
    is (a transform included, if its randomness is seeded from the step)."""

    POLL_S = 0.1
    IDLE_S = 10.0

    def __init__(self, produce: Callable[[int], Any], first: int = 0, stop: Optional[int] = None,
                 depth: int = DEFAULT_PREFETCH, name: str = PREFETCH_THREAD_NAME, idle_s: Optional[float] = None,
                 group: int = 1, produce_group: Optional[Callable[[int, int], Iterable[Any]]] = None,
                 help_while_waiting: bool = False):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"prefetch depth must be an int >= 1, got {depth!r}")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1 or (group > 1 and produce_group is None):
            raise ValueError(f"group must be an int >= 1, and produce_group given when it is > 1; got {group!r}")
        self._produce_group = produce_group if produce_group is not None else (lambda step, _: (produce(step),))
        self._group, self._depth, self._help = group, depth, bool(help_while_waiting)
        self._stop_step = stop
        self._name = name
        self._idle_s = self.IDLE_S if idle_s is None else idle_s
        self._cond = threading.Condition(threading.Lock())
        # All below under self._cond.
        self._ready: Dict[int, Tuple[List[Any], Optional[BaseException]]] = {}  # group's first step -> results
        self._pending: Deque[Any] = collections.deque()  # results of a group received, not yet handed out
        self._error: Optional[BaseException] = None  # raised once the pending results are handed out
        self._next = first  # the first step not received by the consumer (pending results excluded)
        self._started = first  # the first step no thread has started computing
        self._generation = 0  # bumped when a thread parks: results of older generations are dropped
        self._closed = False
        self._finished = False
        self._taken = time.monotonic()  # when the consumer last asked for a result
        self._thread: Optional[threading.Thread] = None
        self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, args=(self._generation,), name=self._name, daemon=True)
        self._thread.start()

    def _claim(self) -> Optional[Tuple[int, int, int]]:
        """(first, count, generation) of the next group to compute, or None at the end (under the lock)."""
        first, stop = self._started, self._stop_step
        if stop is not None and first >= stop:
            return None
        count = self._group if stop is None else min(self._group, stop - first)
        self._started = first + count
        return first, count, self._generation

    def _compute(self, first: int, count: int) -> Tuple[List[Any], Optional[BaseException]]:
        values: List[Any] = []
        try:
            for value in self._produce_group(first, count):
                values.append(value)
                del value
                if self._closed:
                    break  # close() waits for one step, not for the rest of its group
        except BaseException as exc:  # noqa: B902 - handed to the consumer, whatever it is
            return values, exc
        return values, None

    def _run(self, generation: int) -> None:
        ahead = self._depth * self._group
        failed = False
        while True:
            with self._cond:
                while True:
                    if self._closed or generation != self._generation:
                        return
                    done = failed or (self._stop_step is not None and self._started >= self._stop_step)
                    if done and not self._ready and not self._pending:
                        return  # everything handed out
                    if not done and self._started - self._next + len(self._pending) < ahead:
                        break
                    # Waiting for room, or at the end for the consumer to take what is left.
                    if time.monotonic() - self._taken >= self._idle_s:  # the consumer is away: free the batches
                        self._park()
                        return
                    self._cond.wait(self.POLL_S)
                claim = self._claim()
            if claim is None:
                continue
            first, count, _ = claim
            result = self._compute(first, count)
            failed = result[1] is not None
            with self._cond:
                if generation == self._generation and not self._closed:
                    self._ready[first] = result
                    self._cond.notify_all()
            del result

    def _park(self) -> None:
        """Drops every result not handed out; the next get() starts a thread at the first such step."""
        self._generation += 1
        self._next -= len(self._pending)
        self._pending.clear()
        self._error = None  # met again when its step is recomputed
        self._ready.clear()
        self._started = self._next
        self._thread = None

    def get(self) -> Any:
        if self._finished:
            raise StopIteration
        self._taken = time.monotonic()
        with self._cond:
            while True:
                if self._pending:
                    return self._pending.popleft()
                if self._error is not None:
                    error, self._error, self._finished = self._error, None, True
                    raise error
                if self._closed or (self._stop_step is not None and self._next >= self._stop_step):
                    self._finished = True
                    raise StopIteration
                entry = self._ready.pop(self._next, None)
                if entry is not None:
                    values, self._error = entry
                    self._next += len(values)
                    self._pending.extend(values)
                    del values, entry
                    self._cond.notify_all()  # room for the thread
                    continue
                if self._thread is None:  # parked: restart where the consumer is
                    self._start()
                if self._help and self._started - self._next < (self._depth + 1) * self._group:
                    claim = self._claim()
                    if claim is not None:
                        self._help_with(*claim)
                        continue
                self._cond.wait(self.POLL_S)
                self._taken = time.monotonic()

    def _help_with(self, first: int, count: int, generation: int) -> None:
        """Computes a group on the consumer's thread (called and returning under the lock)."""
        self._cond.release()
        try:
            result = self._compute(first, count)
        finally:
            self._cond.acquire()
        if generation == self._generation and not self._closed:
            self._ready[first] = result

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._finished = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and threading.current_thread() is not thread:
            thread.join()
        with self._cond:
            self._ready.clear()
            self._pending.clear()
            self._error = None

    @property
    def thread(self) -> Optional[threading.Thread]:
        return self._thread

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


_WORKER_PLAN: Any = None  # a BatchPlan  # the plan of a StepPool's worker process


def _set_worker_plan(plan: Any) -> None:
    global _WORKER_PLAN
    _WORKER_PLAN = plan


class _Failed:
    """The exception that computing a step raised, in the place of its batch."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


_TAKEN = object()  # a group's result already handed out


def _load_group(plan: Any, first: int, count: int) -> List[Any]:
    """``plan.load`` of ``count`` steps from ``first``, read together: a list of batches, cut
    short after a ``_Failed`` for a step that raised."""
    results: List[Any] = []
    try:
        for batch in plan.load_group(first, count):
            results.append(batch)
            del batch
    except Exception as exc:  # noqa: BLE001 - raised by get() for its step
        results.append(_Failed(exc))
    return results


def _load_group_in_worker(first: int, count: int) -> List[Any]:
    assert _WORKER_PLAN is not None, "a StepPool worker process without its plan"
    return _load_group(_WORKER_PLAN, first, count)


class StepPool:
    """``plan.load(step)`` for the steps a consumer asks for, with the next ``depth`` steps read
    ahead on ``workers`` threads (or processes, with ``processes``: the plan is pickled to them
    once, its dataset reopened by path, and the batches come back pickled).

    Steps are read in groups of ``plan.group`` (one ``Dataset.read`` for several small batches,
    see ``GROUP_BYTES``): step ``s`` belongs to the group of the steps ``s // plan.group *
    plan.group`` and after, and ``depth`` steps ahead means the groups holding them.

    Results are keyed by step: :meth:`get` returns exactly ``plan.load(step)`` whatever was asked
    before, each read once (a step asked again is read again), and a read ahead that the
    consumer does not ask for next (it jumped, or restarted an epoch) is dropped, never handed
    out for another step. Thread-safe. :meth:`close` cancels the
    reads ahead and stops the workers; the pool also closes when it is garbage-collected and at
    interpreter exit. Processes start with the ``multiprocessing`` start method in effect."""

    def __init__(self, plan: Any, *, workers: int = 1, processes: bool = False, depth: int = DEFAULT_PREFETCH,
                 name: str = "shardfeed-steps"):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"the read-ahead depth must be an int >= 0, got {depth!r}")
        self.plan, self.workers, self.processes, self.depth, self.name = plan, workers, bool(processes), depth, name
        self._lock = threading.Lock()
        self._ahead: Dict[int, Any] = {}  # group number -> Future of its list of results
        self._executor: Any = None
        self._finalizer: Any = None

    def _start(self) -> Any:
        if self._executor is None:
            if self.processes:
                import multiprocessing
                self._executor = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context(), initializer=_set_worker_plan,
                    initargs=(self.plan,))
            else:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
            self._finalizer = weakref.finalize(self, _shutdown, self._executor)
        return self._executor

    def _submit(self, number: int) -> Any:
        group = self.plan.group
        if self.processes:
            return self._start().submit(_load_group_in_worker, number * group, group)
        return self._start().submit(_load_group, self.plan, number * group, group)

    def _groups_ahead(self) -> int:
        """Groups read ahead of the one asked for: those holding the next ``depth`` steps."""
        return -(-self.depth // self.plan.group)

    def get(self, step: int) -> Any:
        if self.depth == 0 and not self.processes:
            return self.plan.load(step)  # read in the caller's thread
        group = self.plan.group
        number = step // group
        ahead = self._groups_ahead()
        with self._lock:
            for other in [n for n in self._ahead if not number <= n <= number + ahead]:
                self._ahead.pop(other).cancel()
            future = self._ahead.get(number)
            if future is None:
                future = self._ahead[number] = self._submit(number)
            for later in range(number + 1, number + ahead + 1):
                if later not in self._ahead:
                    self._ahead[later] = self._submit(later)
        if not future.done() and not self.processes and getattr(self.plan, "helped", False):
            future = self._help(number, future)
        try:
            results = future.result()
        except concurrent.futures.CancelledError:  # another thread's get() jumped elsewhere first
            return self._load_again(step)
        at = step - number * group
        with self._lock:
            result = results[at] if at < len(results) else _TAKEN
            if at < len(results) and not isinstance(result, _Failed):
                results[at] = _TAKEN  # handed out once: the pool keeps no reference to it
            if at == group - 1 and self._ahead.get(number) is future:
                del self._ahead[number]
        if result is _TAKEN:  # asked again, or after a step of its group that raised
            return self._load_again(step)
        if isinstance(result, _Failed):
            raise result.error
        return result

    def _help(self, number: int, future: Any) -> Any:
        """The consumer, waiting for group ``number`` (``future``), reads a group that no worker
        has started yet on its own thread instead of sleeping: its own group if it is still
        queued, else the first later one. For plans whose reads are mostly Python overhead
        (``plan.helped``: small batches), which a second thread runs beside the first while the
        native reads release the GIL, as :class:`Prefetcher`'s ``help_while_waiting`` does.
        Returns the future of group ``number`` (a finished one if this thread read it)."""
        group = self.plan.group
        ahead = self._groups_ahead()
        with self._lock:
            for taken in range(number, number + ahead + 1):  # the groups get() keeps ahead, in order
                queued = self._ahead.get(taken)
                if queued is not None and not queued.done() and queued.cancel():  # no worker had started it
                    mine = self._ahead[taken] = concurrent.futures.Future()
                    mine.set_running_or_notify_cancel()
                    break
            else:
                return future
        try:
            results = _load_group(self.plan, taken * group, group)  # raises nothing but BaseException
        except BaseException:  # KeyboardInterrupt while reading: whoever waits for it reads it again
            with self._lock:
                if self._ahead.get(taken) is mine:
                    del self._ahead[taken]
            mine.set_exception(concurrent.futures.CancelledError())
            raise
        mine.set_result(results)
        return mine if taken == number else future

    def _load_again(self, step: int) -> Any:
        if self.processes:
            return _unwrap(self._start().submit(_load_group_in_worker, step, 1).result())
        return self.plan.load(step)

    def cancel(self) -> None:
        """Drops the reads ahead (those not started are cancelled)."""
        with self._lock:
            for future in self._ahead.values():
                future.cancel()
            self._ahead.clear()

    def close(self) -> None:
        self.cancel()
        with self._lock:
            finalizer, self._finalizer, self._executor = self._finalizer, None, None
        if finalizer is not None:
            finalizer()


def _unwrap(results: List[Any]) -> Any:
    if isinstance(results[0], _Failed):
        raise results[0].error
    return results[0]


def _shutdown(executor: Any) -> None:
    executor.shutdown(wait=True, cancel_futures=True)
