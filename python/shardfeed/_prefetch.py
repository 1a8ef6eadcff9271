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
# A Prefetcher given ``inline_when`` computes the steps on the consumer's thread (inline) from
# the start when ``inline_when()`` holds then, and after INLINE_AFTER consecutive steps in which
# the consumer waited for its thread, came back less than INLINE_AWAY steps' computing time after
# the step before, and ``inline_when()`` held. It moves them to a thread after INLINE_AFTER steps
# in which the consumer stayed away more than THREAD_AWAY steps' time, or at once when
# ``inline_when()`` no longer holds. A thread costs a consumer that reads page-cached 4 MiB
# batches and does nothing else ~30% (3-4 batch blocks in turn in the cache against 2, and two
# hand-offs a step; benchmarks/RESULTS.md, tenth session), which a consumer away for more than
# about that fraction of a step's read gets back as overlap.
INLINE_AWAY = 0.25
THREAD_AWAY = 0.5
INLINE_AFTER = 3
# How the names of a StepPool's worker threads begin unless its owner gives another.
STEP_POOL_THREAD_NAME = "shardfeed-steps"
# The thread that stops the workers of idle StepPools (one for the process, while some pool has
# workers).
POOL_REAPER_THREAD_NAME = "shardfeed-idle-pools"


class InlineChoice:
    """Where a reader ahead computes its steps, the consumer's thread (``inline``) or its own
    threads, from what it sees (the rule above ``INLINE_AWAY``): how long steps take to compute
    (:meth:`computed`), how long the consumer stays away between steps (:meth:`handed_out`, then
    :meth:`asked`) and whether ``holds()`` (e.g. "the last reads found their records in the page
    cache"). Not thread-safe: its owner calls it under its own lock."""

    def __init__(self, holds: Callable[[], bool]):
        self.holds = holds
        self.inline = bool(holds())  # start inline, until the consumer is seen to stay away
        self._votes = 0  # consecutive steps that argued for leaving the mode in use
        self._step_s: Optional[float] = None  # moving average of the seconds computing one step took
        self._returned: Optional[float] = None  # when the consumer was last handed a new group
        self._returned_steps = 1  # the steps of that group

    def computed(self, started: float, count: int) -> None:
        """A group of ``count`` steps was computed from ``started`` (``time.monotonic()``) to now."""
        step_s = (time.monotonic() - started) / max(1, count)
        self._step_s = step_s if self._step_s is None else 0.75 * self._step_s + 0.25 * step_s

    def handed_out(self, steps: int = 1) -> None:
        """The consumer was just handed a new group of ``steps`` steps."""
        self._returned, self._returned_steps = time.monotonic(), steps

    def asked(self, at: float, waited: bool) -> bool:
        """The consumer asked for a new group at ``at`` and ``waited`` for it (its result was not
        ready). Returns True when ``inline`` changed."""
        if self._returned is None or self._step_s is None:
            return False
        away = (at - self._returned) / self._returned_steps  # the consumer's time per step
        holds = bool(self.holds())
        if not self.inline:
            argues = holds and waited and away < INLINE_AWAY * self._step_s
            self._votes = self._votes + 1 if argues else 0
            leave = self._votes >= INLINE_AFTER
        else:
            self._votes = self._votes + 1 if away > THREAD_AWAY * self._step_s else 0
            leave = not holds or self._votes >= INLINE_AFTER
        if leave:
            self.inline, self._votes = not self.inline, 0
        return leave


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

    With ``inline_when`` (a predicate, e.g. "the last reads found their records in the page
    cache"), the steps are computed on the consumer's thread while a thread cannot help: when the
    consumer waits for every step and does little between them (see ``INLINE_AWAY``), a thread
    only adds hand-offs and keeps more results' memory in turn than the cache holds. They start
    there when the predicate holds at construction, move to a thread when the consumer spends
    longer away or the predicate stops holding, and back again when the consumer waits again.
    Results are handed out in step order, exactly once, either way. Not with
    ``help_while_waiting``, and only for a ``produce`` that may run on any thread.

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
                 help_while_waiting: bool = False, inline_when: Optional[Callable[[], bool]] = None):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"prefetch depth must be an int >= 1, got {depth!r}")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1 or (group > 1 and produce_group is None):
            raise ValueError(f"group must be an int >= 1, and produce_group given when it is > 1; got {group!r}")
        if help_while_waiting and inline_when is not None:
            raise ValueError("help_while_waiting and inline_when are exclusive")
        self._produce = produce
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
        self._retired: Optional[threading.Thread] = None  # the last thread that exited for the inline mode
        self._choice = InlineChoice(inline_when) if inline_when is not None else None
        if not self._inline:
            self._start()

    @property
    def _inline(self) -> bool:
        """Whether the consumer computes the steps (its thread exits, or was never started)."""
        return self._choice is not None and self._choice.inline

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
            if count == 1:  # one step: produce() itself, without produce_group's generators
                values.append(self._produce(first))
                return values, None
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
                    if self._inline:  # the consumer computes the steps now
                        self._thread, self._retired = None, threading.current_thread()
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
            started = time.monotonic()
            result = self._compute(first, count)
            failed = result[1] is not None
            with self._cond:
                self._timed(started, count)
                if generation == self._generation and not self._closed:
                    self._ready[first] = result
                    self._cond.notify_all()
            del result

    def _timed(self, started: float, count: int) -> None:
        if self._choice is not None:
            self._choice.computed(started, count)

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
        asked = self._taken = time.monotonic()
        with self._cond:
            if self._pending:
                return self._pending.popleft()
            if self._inline and self._started == self._next and not self._ready and self._error is None:
                return self._get_inline(asked)
            waited = self._next not in self._ready
            value = self._next_result()
            if self._choice is not None:
                self._handed_out(asked, waited)
            return value

    def _get_inline(self, asked: float) -> Any:
        """get() in the inline mode with nothing computed ahead: the next group computed here and
        received at once, without passing through ``_ready`` and ``_next_result``'s loop (a
        page-cached 4 MiB batch takes ~0.5 ms, and every 10 us spent around it is 2% of the
        loader's rate). Under the lock, as get() calls it."""
        claim = None if self._closed else self._claim()
        if claim is not None:
            result = self._compute_here(*claim)
            if result is not None:
                self._receive(*result)
        # The first result received, or (none received) the end or the error there was instead.
        value = self._pending.popleft() if self._pending else self._next_result()
        self._handed_out(asked, True)
        return value

    def _handed_out(self, asked: float, waited: bool) -> None:
        """Tells the inline choice that the consumer, which asked at ``asked`` and ``waited`` (or
        not) for its result, was handed a group, and moves the steps where it now says (under the
        lock)."""
        choice = self._choice
        if choice.asked(asked, waited):  # type: ignore[union-attr]  # callers check there is a choice
            if self._inline:
                self._cond.notify_all()  # the thread exits after the step it is computing, if any
            elif self._thread is None and not self._closed:
                self._start()
        choice.handed_out(1 + len(self._pending))  # type: ignore[union-attr]

    def _receive(self, values: List[Any], error: Optional[BaseException]) -> None:
        """Takes the results of the group at ``self._next`` in (under the lock); ``error`` is
        raised once they are handed out."""
        self._next += len(values)
        self._error = error
        self._pending.extend(values)

    def _next_result(self) -> Any:
        """The next result, computing or waiting for it (under the lock)."""
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
                self._receive(*entry)
                del entry
                self._cond.notify_all()  # room for the thread
                continue
            if self._inline:
                if self._started == self._next:  # not in progress on the thread: compute it here
                    claim = self._claim()
                    if claim is not None:
                        self._help_with(*claim)
                        continue
            elif self._thread is None:  # parked: restart where the consumer is
                self._start()
            if self._help and self._started - self._next < (self._depth + 1) * self._group:
                claim = self._claim()
                if claim is not None:
                    self._help_with(*claim)
                    continue
            self._cond.wait(self.POLL_S)
            self._taken = time.monotonic()

    def _compute_here(self, first: int, count: int,
                      generation: int) -> Optional[Tuple[List[Any], Optional[BaseException]]]:
        """Computes a group on the consumer's thread (called and returning under the lock): its
        results and error, or None when they were dropped meanwhile (by close() or a park)."""
        started = time.monotonic()
        self._cond.release()
        try:
            result = self._compute(first, count)
        finally:
            self._cond.acquire()
        self._timed(started, count)
        if generation == self._generation and not self._closed:
            return result
        return None

    def _help_with(self, first: int, count: int, generation: int) -> None:
        """Computes a group on the consumer's thread, for ``_next_result`` to receive in turn."""
        result = self._compute_here(first, count, generation)
        if result is not None:
            self._ready[first] = result

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._finished = True
            threads = (self._thread, self._retired)
            self._cond.notify_all()
        for thread in threads:
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
    out for another step. Thread-safe.

    With ``inline_when`` and one worker thread, the steps are read on the consumer's thread
    instead while the consumer waits for every step and does little between them (the rule of
    :class:`InlineChoice`, as :class:`Prefetcher`'s ``inline_when``): no reads ahead then.

    When the consumer asks for nothing for ``idle_s`` seconds and no read is in progress, the
    reads ahead are dropped, the workers stop and the next :meth:`get` starts new ones:
    TensorFlow keeps every sequence that ``model.fit`` read, so a process that fits many models
    would otherwise keep every pool's idle threads, or processes, to the end.

    :meth:`close` cancels the reads ahead and stops the workers; the pool also closes when it is
    garbage-collected and at interpreter exit. Processes start with the ``multiprocessing`` start
    method in effect."""

    IDLE_S = 10.0

    def __init__(self, plan: Any, *, workers: int = 1, processes: bool = False, depth: int = DEFAULT_PREFETCH,
                 name: str = STEP_POOL_THREAD_NAME, inline_when: Optional[Callable[[], bool]] = None,
                 idle_s: Optional[float] = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"the read-ahead depth must be an int >= 0, got {depth!r}")
        self.plan, self.workers, self.processes, self.depth, self.name = plan, workers, bool(processes), depth, name
        self._lock = threading.Lock()
        self._ahead: Dict[int, Any] = {}  # group number -> Future of its list of results
        self._executor: Any = None
        self._finalizer: Any = None
        self.idle_s = self.IDLE_S if idle_s is None else idle_s
        self._asked = time.monotonic()  # when a get() last started or returned
        self._getting = 0  # get() calls in progress (waiting for a read, or reading)
        # One worker thread only: several, or processes, are what the consumer asked for.
        adaptive = inline_when is not None and workers == 1 and not self.processes and depth > 0
        self._choice = InlineChoice(inline_when) if adaptive else None

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
            _IDLE_POOLS.watch(self)
        return self._executor

    def stop_if_idle(self) -> bool:
        """Stops the workers and drops the reads ahead when no get() has started or returned for
        ``idle_s`` seconds, none is in progress (a consumer waiting for a slow read, or for worker
        processes to start, or woken by a read just done) and no read is in progress. True when the
        pool has no workers now."""
        with self._lock:
            if self._executor is None:
                return True
            if (self._getting or time.monotonic() - self._asked < self.idle_s
                    or not all(f.done() for f in self._ahead.values())):
                return False
            self._ahead.clear()
            finalizer, self._finalizer, self._executor = self._finalizer, None, None
        finalizer()
        return True

    def _submit(self, number: int) -> Any:
        group = self.plan.group
        if self.processes:
            return self._start().submit(_load_group_in_worker, number * group, group)
        if self._choice is not None:
            return self._start().submit(_load_group_timed, self.plan, self._choice, self._lock, number * group, group)
        return self._start().submit(_load_group, self.plan, number * group, group)

    def _get_inline(self, step: int, asked: float) -> Any:
        """``plan.load(step)`` on the caller's thread, while the choice says so."""
        started = time.monotonic()
        try:
            return self.plan.load(step)
        finally:
            with self._lock:
                self._choice.computed(started, 1)
                self._choice.asked(asked, True)  # back to the worker from the next get() on, if it changed
                self._choice.handed_out()

    def _groups_ahead(self) -> int:
        """Groups read ahead of the one asked for: those holding the next ``depth`` steps."""
        return -(-self.depth // self.plan.group)

    def get(self, step: int) -> Any:
        if self.depth == 0 and not self.processes:
            return self.plan.load(step)  # read in the caller's thread
        with self._lock:
            self._getting += 1
        try:
            return self._get(step)
        finally:
            with self._lock:
                self._getting -= 1
                self._asked = time.monotonic()

    def _get(self, step: int) -> Any:
        """get() once it is counted in ``_getting``: the idle stop leaves the workers alone while
        a consumer waits, including between a read's end and the consumer waking."""
        group = self.plan.group
        number = step // group
        ahead = self._groups_ahead()
        with self._lock:
            asked = self._asked = time.monotonic()
            inline = False
            if self._choice is not None and self._choice.inline:
                inline = number not in self._ahead
                ahead = 0  # a group read ahead before the consumer came to wait is still taken
            if inline:
                self._drop_ahead()
            else:
                for other in [n for n in self._ahead if not number <= n <= number + ahead]:
                    self._ahead.pop(other).cancel()
                future = self._ahead.get(number)
                if future is None:
                    future = self._ahead[number] = self._submit(number)
                for later in range(number + 1, number + ahead + 1):
                    if later not in self._ahead:
                        self._ahead[later] = self._submit(later)
        if inline:
            return self._get_inline(step, asked)
        waited = not future.done()
        if waited and not self.processes and getattr(self.plan, "helped", False):
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
            if self._choice is not None:
                if self._choice.asked(asked, waited):  # inline from the next get() on: no more reads ahead
                    for later in [n for n, queued in self._ahead.items() if queued.cancel()]:  # not started
                        del self._ahead[later]
                self._choice.handed_out()
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
            with self._lock:
                future = self._start().submit(_load_group_in_worker, step, 1)
            return _unwrap(future.result())
        return self.plan.load(step)

    def cancel(self) -> None:
        """Drops the reads ahead (those not started are cancelled)."""
        with self._lock:
            self._drop_ahead()

    def _drop_ahead(self) -> None:
        for future in self._ahead.values():  # under the lock
            future.cancel()
        self._ahead.clear()

    def close(self) -> None:
        self.cancel()
        with self._lock:
            finalizer, self._finalizer, self._executor = self._finalizer, None, None
        if finalizer is not None:
            finalizer()


class _IdlePools:
    """Stops the workers of the :class:`StepPool` s that stay idle (``StepPool.stop_if_idle``),
    from one daemon thread that runs while some watched pool has workers. Holds the pools weakly:
    a pool dropped by its owner closes as it would without it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: "weakref.WeakSet[StepPool]" = weakref.WeakSet()
        self._thread: Optional[threading.Thread] = None

    def watch(self, pool: StepPool) -> None:
        with self._lock:
            self._pools.add(pool)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=POOL_REAPER_THREAD_NAME, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pools:
                    self._thread = None
                    return
                wait = min(pool.idle_s for pool in self._pools) / 2
            time.sleep(min(1.0, max(0.01, wait)))
            for pool in list(self._pools):
                if pool.stop_if_idle():
                    with self._lock:
                        self._pools.discard(pool)
                    if not pool.stop_if_idle():  # a get() started workers again meanwhile
                        self.watch(pool)
                del pool  # not kept alive while sleeping


_IDLE_POOLS = _IdlePools()


def _load_group_timed(plan: Any, choice: InlineChoice, lock: Any, first: int, count: int) -> List[Any]:
    """:func:`_load_group`, timed for ``choice`` (under ``lock``). A worker's task holds no
    reference to its StepPool: were the pool's last reference dropped on a worker as a task ends,
    its finalizer would join that worker from itself."""
    started = time.monotonic()
    results = _load_group(plan, first, count)
    with lock:
        choice.computed(started, count)
    return results


def _unwrap(results: List[Any]) -> Any:
    if isinstance(results[0], _Failed):
        raise results[0].error
    return results[0]


def _shutdown(executor: Any) -> None:
    executor.shutdown(wait=True, cancel_futures=True)
