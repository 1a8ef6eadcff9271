"""The prefetching generator (ds.batches): batches equal numpy references in the sampler's order,
Keras-shaped tuples, exact resume, transforms on the prefetch thread, errors passed through,
prompt close, no leaks, fresh arrays, and flat private memory over epochs."""

import concurrent.futures
import contextlib
import dataclasses
import gc
import multiprocessing
import os
import sys
import threading
import time
import weakref

import numpy as np
import pytest

import shardfeed
from shardfeed import Sampler
from shardfeed._prefetch import PREFETCH_THREAD_NAME
from shardfeed.loader import BatchPlan, Prefetcher

N = 600


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(8)
    columns = {
        "image": rng.integers(0, 256, (N, 2, 3, 3), dtype=np.uint8),
        "meta": rng.standard_normal((N, 4)).astype(np.float16),
        "label": rng.integers(0, 10, N),
        "weight": rng.random(N).astype(np.float32),
        "id": np.arange(N),
    }
    fields = {"image": ("uint8", (2, 3, 3)), "meta": ("float16", (4,)), "label": ("int64", ()),
              "weight": ("float32", ()), "id": ("int64", ())}
    path = str(tmp_path_factory.mktemp("loader") / "ds")
    with shardfeed.Writer(path, fields=fields, shard_size=8192) as w:
        w.extend(columns)
    with shardfeed.open(path) as ds:
        yield ds, columns


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD_NAME]


@pytest.fixture
def new_threads():
    """Prefetch threads started during the test (other tests' generators that TensorFlow keeps
    alive may still have theirs for Prefetcher.IDLE_S)."""
    before = set(prefetch_threads())
    return lambda: [t for t in prefetch_threads() if t not in before]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def private_bytes():
    """Anonymous resident memory (RSS minus file-backed and shared pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def test_batches_match_numpy_in_sampler_order(data):
    ds, columns = data
    sampler = Sampler(ds, 64, seed=4)
    seen = []
    for step, (x, y) in enumerate(ds.batches(64, inputs="image", targets="label", seed=4, epochs=2)):
        indices = sampler.indices(step)
        assert x.dtype == np.uint8 and y.dtype == np.int64  # dtype="auto": integers as stored
        np.testing.assert_array_equal(x, columns["image"][indices])
        np.testing.assert_array_equal(y, columns["label"][indices])
        seen.append(indices)
    assert len(seen) == 2 * len(sampler) == 20
    for epoch in range(2):  # every epoch visits every sample exactly once
        order = np.concatenate(seen[epoch * 10:(epoch + 1) * 10])
        np.testing.assert_array_equal(np.sort(order), np.arange(N))
    assert not np.array_equal(np.concatenate(seen[:10]), np.concatenate(seen[10:]))


def test_structures_for_keras(data):
    ds, columns = data
    gen = ds.batches(50, inputs={"pixels": "image", "extra": "meta"}, targets=["label", "id"],
                     sample_weights="weight", seed=1, epochs=1, dtype={"image": "float32", "meta": "float32"},
                     scale={"image": 1 / 255}, offset={"image": -0.5})
    x, y, w = next(gen)
    indices = Sampler(ds, 50, seed=1).indices(0)
    assert set(x) == {"pixels", "extra"} and isinstance(y, tuple) and len(y) == 2
    expected = columns["image"][indices].astype(np.float32) * np.float32(1 / 255) + np.float32(-0.5)
    np.testing.assert_array_equal(x["pixels"], expected)
    np.testing.assert_array_equal(x["extra"], columns["meta"][indices].astype(np.float32))
    assert y[0].dtype == np.int64 and y[1].dtype == np.int64  # fields not named in a dtype dict stay as stored
    np.testing.assert_array_equal(y[1], indices)
    np.testing.assert_array_equal(w, columns["weight"][indices])
    gen.close()
    (x_only,) = next(ds.batches(8, inputs="meta", shuffle=False))
    np.testing.assert_array_equal(x_only, columns["meta"][:8].astype(np.float32))
    batch = next(ds.batches(8, shuffle=False, dtype=None))  # no inputs: the dict of fields
    assert isinstance(batch, shardfeed.Batch) and set(batch) == set(columns)
    np.testing.assert_array_equal(batch["id"], np.arange(8))


def test_epochs_drop_remainder_and_shuffle_off(data):
    ds, _ = data
    lengths = [len(y) for _, y in ds.batches(256, inputs="meta", targets="id", epochs=2, dtype=None)]
    assert lengths == [256, 256, 88] * 2
    lengths = [len(y) for _, y in ds.batches(256, inputs="meta", targets="id", epochs=2, drop_remainder=True)]
    assert lengths == [256, 256] * 2
    ids = np.concatenate([y for _, y in ds.batches(100, inputs="meta", targets="id", epochs=1, shuffle=False,
                                                   dtype=None)])
    np.testing.assert_array_equal(ids, np.arange(N))
    forever = ds.batches(256, inputs="meta", targets="id", dtype=None)
    assert len([next(forever) for _ in range(10)]) == 10  # epochs=None never ends
    forever.close()
    assert list(ds.batches(256, inputs="meta", epochs=0)) == []


@pytest.mark.parametrize("start", [1, 7, 10, 13, (1, 0), (2, 4)])
def test_resume_is_bit_identical(data, start):
    ds, _ = data
    options = dict(inputs="meta", targets="id", seed=9, epochs=3, dtype=None)
    whole = [y for _, y in ds.batches(60, **options)]
    sampler = Sampler(ds, 60, seed=9)
    step = sampler.step_of(start)
    position = sampler.position(step)
    for resume_at in (start, position, step):
        resumed = [y for _, y in ds.batches(60, start=resume_at, **options)]
        assert len(resumed) == len(whole) - step
        for a, b in zip(resumed, whole[step:]):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        ds.batches(60, start=position, **{**options, "seed": 10})
    with pytest.raises(ValueError, match="past the end"):
        ds.batches(60, start=31, **options)


def test_determinism_by_seed_and_views(data):
    ds, _ = data
    train = ds.split({"train": 0.75, "val": 0.25}, seed=0)["train"]

    def ids(seed):
        return np.concatenate([y for _, y in train.batches(32, inputs="meta", targets="id", seed=seed, epochs=2,
                                                             dtype=None)])
    np.testing.assert_array_equal(ids(5), ids(5))
    assert not np.array_equal(ids(5), ids(6))
    assert set(ids(5)) == set(train.indices())
    shard_ids = [np.concatenate([y for _, y in train.shard(r, 2).batches(25, inputs="meta", targets="id",
                                                                           epochs=1, dtype=None)])
                 for r in range(2)]
    assert len(shard_ids[0]) == len(shard_ids[1]) == 225 and not set(shard_ids[0]) & set(shard_ids[1])


def test_transform_runs_on_the_prefetch_thread(data):
    ds, columns = data
    calls = []

    def transform(batch):
        calls.append((threading.current_thread().name, batch.epoch, batch.step, batch.indices.copy()))
        return {"double": batch["meta"] * 2, "id": batch["id"]}

    gen = ds.batches(100, inputs="double", targets="id", transform=transform, seed=2, epochs=2, dtype=None,
                     fields=["meta", "id"])
    out = list(gen)
    assert len(out) == 12 and {name for name, *_ in calls} == {PREFETCH_THREAD_NAME}
    assert [(e, s) for _, e, s, _ in calls] == [(s // 6, s) for s in range(12)]
    for (x, y), (_, _, _, indices) in zip(out, calls):
        np.testing.assert_array_equal(y, indices)
        np.testing.assert_array_equal(x, columns["meta"][indices] * 2)
    with pytest.raises(TypeError, match="mapping"):
        next(ds.batches(10, inputs="meta", transform=lambda b: [1]))
    with pytest.raises(KeyError, match="transform"):
        next(ds.batches(10, inputs="nope", transform=lambda b: b))
    with pytest.raises(KeyError, match="no field 'nope'"):
        ds.batches(10, inputs="nope")


def test_errors_in_the_prefetch_thread_reach_the_consumer(data, new_threads):
    ds, _ = data

    def transform(batch):
        if batch.step == 3:
            raise ZeroDivisionError(f"bad batch {batch.step}")
        return batch

    gen = ds.batches(50, inputs="meta", transform=transform, epochs=1)
    assert len([next(gen) for _ in range(3)]) == 3
    with pytest.raises(ZeroDivisionError, match="bad batch 3"):
        next(gen)
    with pytest.raises(StopIteration):
        next(gen)
    deadline = time.monotonic() + 5
    while new_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not new_threads()


def test_read_errors_reach_the_consumer(tmp_path):
    path = str(tmp_path / "ds")
    with shardfeed.Writer(path, fields={"x": ("float32", (4,))}, shard_size=64 * 16 + 4096) as w:
        w.extend({"x": np.zeros((300, 4), np.float32)})
    ds = shardfeed.open(path, mmap=False)
    shard = os.path.join(path, ds._manifest.shards[-1].file)
    os.truncate(shard, 100)
    with pytest.raises(shardfeed.ShardReadError):
        for _ in ds.batches(32, inputs="x", shuffle=False, epochs=1):
            pass
    ds.close()


def test_close_stops_promptly_and_leaks_nothing(data, new_threads):
    ds, _ = data
    gc.collect()
    threads, fds = set(threading.enumerate()), open_fds()
    gen = ds.batches(64, inputs="image", targets="label", prefetch=3)
    next(gen)
    time.sleep(0.05)  # the queue fills and the thread waits on it
    assert len(new_threads()) == 1
    start = time.perf_counter()
    gen.close()
    assert time.perf_counter() - start < 0.5
    assert not new_threads()
    with pytest.raises(StopIteration):
        next(gen)
    # Leaving a `with closing(...)` block, and dropping an unfinished generator, stop it too.
    with contextlib.closing(ds.batches(64, inputs="image", prefetch=2)) as gen:
        next(gen)
    assert not new_threads()
    gen = ds.batches(64, inputs="image")
    next(gen)
    del gen
    assert not new_threads()
    # A generator never iterated starts no thread.
    unused = ds.batches(64, inputs="image")
    assert not new_threads()
    del unused
    assert not set(threading.enumerate()) - threads and open_fds() <= fds


def test_close_waits_only_for_the_batch_in_progress(data, new_threads):
    ds, _ = data

    def slow(batch):
        time.sleep(0.3)
        return batch

    gen = ds.batches(64, inputs="image", transform=slow, prefetch=4)
    next(gen)
    start = time.perf_counter()
    gen.close()
    assert time.perf_counter() - start < 0.6
    assert not new_threads()


def test_yielded_arrays_are_never_written_again(data):
    ds, columns = data
    sampler = Sampler(ds, 32, seed=3)
    kept = list(ds.batches(32, inputs="meta", targets="id", seed=3, prefetch=4, epochs=3, dtype=None))
    buffers = set()
    for step, (x, y) in enumerate(kept):  # compared only after every batch was read
        indices = sampler.indices(step)
        np.testing.assert_array_equal(y, indices)
        np.testing.assert_array_equal(x, columns["meta"][indices].astype(np.float32))
        buffers.add(x.__array_interface__["data"][0])
    assert len(buffers) == len(kept)


def test_prefetch_zero_reads_in_the_consumer(data, new_threads):
    ds, columns = data
    gen = ds.batches(16, inputs="meta", prefetch=0, shuffle=False)
    (x,) = next(gen)
    assert not new_threads()
    np.testing.assert_array_equal(x, columns["meta"][:16].astype(np.float32))


def test_argument_checks(data):
    ds, _ = data
    for kwargs, error in (
        (dict(batch_size=0), ValueError), (dict(prefetch=-1), ValueError), (dict(seed=-2), ValueError),
        (dict(targets="label", inputs=None), ValueError), (dict(inputs=3), TypeError),
        (dict(inputs={"a": 1}), TypeError), (dict(dtype="complex64"), ValueError), (dict(epochs=-1), ValueError),
        (dict(inputs="image", scale={"image": np.ones(5)}), ValueError),
    ):
        options = {"batch_size": 8, "inputs": "meta", **kwargs}
        with pytest.raises(error):
            ds.batches(options.pop("batch_size"), **options)


def test_feed_options_are_declared_once_and_checked_by_every_front_end(data):
    """One declaration (FeedOptions) behind batches(), BatchPlan, to_tf_dataset and ShardSequence:
    an unknown option is refused by name, and the plan keeps what it was given."""
    from shardfeed.loader import FeedOptions
    ds, columns = data
    with pytest.raises(TypeError, match=r"batches\(\) got an unexpected keyword argument 'shufle'.*shuffle"):
        ds.batches(8, inputs="meta", shufle=False)
    with pytest.raises(TypeError, match="BatchPlan got an unexpected keyword argument 'epochs'"):
        BatchPlan(ds, 8, epochs=2)
    with pytest.raises(TypeError, match="options must be a FeedOptions"):
        BatchPlan(ds, 8, {"inputs": "meta"})
    options = FeedOptions(inputs="meta", targets="label", seed=5, shuffle_block=4)
    plan = BatchPlan(ds, 8, options, drop_remainder=True)
    assert plan.options == FeedOptions(inputs="meta", targets="label", seed=5, shuffle_block=4, drop_remainder=True)
    assert (plan.sampler.seed, plan.sampler.shuffle_block, plan.sampler.drop_remainder) == (5, 4, True)
    x, y = plan.load(3)
    expected = Sampler(ds, 8, seed=5, shuffle_block=4, drop_remainder=True).indices(3)
    assert (x.dtype, y.dtype) == (np.float32, np.int64)  # dtype="auto": float16 as float32, int64 as stored
    np.testing.assert_array_equal(y, columns["label"][expected])
    np.testing.assert_array_equal(x, columns["meta"][expected].astype(np.float32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("helped", [True, False])
def test_a_waiting_step_pool_consumer_reads_groups_itself(data, helped):
    """A consumer that waits for its step reads a group that no worker started, on its own thread
    (plan.helped: small batches); each step is still exactly plan.load(step), in order."""
    from shardfeed.loader import StepPool
    ds, columns = data
    plan = BatchPlan(ds, 64, inputs="meta", targets="id", seed=9)
    assert plan.group > 1 and plan.helped
    readers = []

    class SlowPlan:  # a worker slower than the consumer
        group = plan.group

        def __init__(self):
            self.helped = helped

        def load_group(self, first, count):
            readers.append(threading.current_thread() is threading.main_thread())
            time.sleep(0.02)
            return plan.load_group(first, count)

        def load(self, step):
            return plan.load(step)

    sampler = Sampler(ds, 64, seed=9)
    pool = StepPool(SlowPlan(), workers=1, depth=3 * plan.group)
    try:
        steps = 8 * plan.group
        for step in range(steps):
            x, y = pool.get(step)
            np.testing.assert_array_equal(y, sampler.indices(step).astype(np.float32))
            np.testing.assert_array_equal(x, columns["meta"][sampler.indices(step)].astype(np.float32))
    finally:
        pool.close()
    assert any(readers) is helped, readers


@pytest.mark.parametrize("workers,processes", [(1, False), (3, False), (2, True)])
def test_step_pool_hands_out_each_step_only_for_itself(data, workers, processes):
    """StepPool (what ShardSequence reads ahead with): whatever order the steps are asked in
    (in order, restarts, jumps back and forth, several threads at once), get(step) is exactly
    plan.load(step); reads ahead that are not asked for are dropped, never handed out."""
    from shardfeed.loader import StepPool
    ds, columns = data
    plan = BatchPlan(ds, 64, inputs="meta", targets="id", seed=9)
    assert plan.group > 1  # steps are read in groups: each still handed out only for itself
    sampler = Sampler(ds, 64, seed=9)
    pool = StepPool(plan, workers=workers, processes=processes, depth=4)
    try:
        asked = [0, 1, 2, 3, 0, 1, 7, 8, 9, 2, 30, 31, 5, 5, 6]
        for step in asked:
            x, y = pool.get(step)
            np.testing.assert_array_equal(y, sampler.indices(step).astype(np.float32))
            np.testing.assert_array_equal(x, columns["meta"][sampler.indices(step)].astype(np.float32))
        if not processes:
            results = {}

            def ask(first):
                for step in range(first, first + 6):
                    results[(first, step)] = pool.get(step)[1]
            threads = [threading.Thread(target=ask, args=(first,)) for first in (0, 3, 40)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for (_, step), y in results.items():
                np.testing.assert_array_equal(y, sampler.indices(step).astype(np.float32))
    finally:
        pool.close()
    with pytest.raises(ValueError, match="workers"):
        StepPool(plan, workers=0)


def test_integer_fields_come_out_exact_by_default_in_every_loader(tmp_path):
    """Issue 13 item 7: int64 ids above 2**24 used to come out of the loaders rounded (float32 by
    default). Now the default keeps integers as stored, in the generator, the Sequence and tf.data;
    asking for float32 raises naming the field unless lossy=True, which rounds as numpy does."""
    ids = np.array([16777217, 123456789, 5, 2**40 + 1], np.int64)
    tokens = np.array([7, 2**31 - 1, -3, 0], np.int32)
    path = str(tmp_path / "ids")
    with shardfeed.Writer(path, fields={"id": ("int64", ()), "token": ("int32", ())}) as writer:
        writer.extend({"id": ids, "token": tokens})
    with shardfeed.open(path) as ds:
        (x, y), = list(ds.batches(4, inputs="token", targets="id", shuffle=False, epochs=1))
        assert (x.dtype, y.dtype) == (np.int32, np.int64)
        np.testing.assert_array_equal(y, ids)
        np.testing.assert_array_equal(x, tokens)
        with pytest.raises(shardfeed.ValueRangeError, match="id"):
            list(ds.batches(4, inputs="token", targets="id", shuffle=False, epochs=1, dtype="float32"))
        (_, rounded), = list(ds.batches(4, inputs="token", targets="id", shuffle=False, epochs=1, dtype="float32",
                                        lossy=True))
        np.testing.assert_array_equal(rounded, ids.astype(np.float32))
        pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed")
        pytest.importorskip("keras", reason="the tensorflow extra is not installed")
        from shardfeed.keras import ShardSequence
        x, y = ShardSequence(ds, 4, "token", "id", shuffle=False)[0]
        np.testing.assert_array_equal(y, ids)
        assert y.dtype == np.int64
        (x, y), = [(a.numpy(), b.numpy()) for a, b in ds.to_tf_dataset(4, inputs="token", targets="id",
                                                                       shuffle=False)]
        np.testing.assert_array_equal(y, ids)
        assert (x.dtype, y.dtype) == (np.int32, np.int64)


def test_prefetcher_contract():
    with Prefetcher(lambda k: k * k, 0, 5, depth=2) as fetcher:
        got = []
        with pytest.raises(StopIteration):
            while True:
                got.append(fetcher.get())
        assert got == [0, 1, 4, 9, 16] and fetcher.thread.name == PREFETCH_THREAD_NAME and fetcher.thread.daemon

    def produce(k):
        if k == 3:
            raise KeyError("from produce")
        return k
    fetcher = Prefetcher(produce, 2, None, depth=1)
    assert fetcher.get() == 2
    with pytest.raises(KeyError, match="from produce"):
        fetcher.get()
    fetcher.close()
    with pytest.raises(ValueError):
        Prefetcher(lambda k: k, 0, 1, depth=0)


@pytest.mark.parametrize("help_while_waiting", [False, True])
def test_prefetcher_groups_hand_out_every_step_once_in_order(help_while_waiting):
    """Steps computed a group at a time (produce_group), on the prefetch thread and, with
    help_while_waiting, on the waiting consumer's too: every result once, in step order, up to
    stop; an exception mid-group comes after the results before it."""
    calls, lock = [], threading.Lock()

    def produce_group(first, count):
        with lock:
            calls.append((first, count, threading.current_thread().name))
        for k in range(first, first + count):
            time.sleep(0.02)
            if k == 23:
                raise KeyError("step 23")
            yield k * k

    def run(stop):
        calls.clear()
        got = []
        with Prefetcher(None, 2, stop, depth=2, group=4, produce_group=produce_group,
                        help_while_waiting=help_while_waiting) as fetcher:
            try:
                with pytest.raises(StopIteration):
                    while True:
                        got.append(fetcher.get())
            finally:
                with pytest.raises(StopIteration):
                    fetcher.get()  # after the end or an exception, the fetcher is finished
        return got

    assert run(13) == [k * k for k in range(2, 13)]
    assert sorted((first, count) for first, count, _ in calls) == [(2, 4), (6, 4), (10, 3)]
    names = {name for _, _, name in calls}
    consumer = threading.current_thread().name
    assert names == ({PREFETCH_THREAD_NAME, consumer} if help_while_waiting else {PREFETCH_THREAD_NAME})
    with pytest.raises(KeyError, match="step 23"):
        run(None)
    assert sorted(first for first, _, _ in calls)[:6] == [2, 6, 10, 14, 18, 22]
    got = []
    with Prefetcher(None, 0, 30, depth=1, group=4, produce_group=produce_group) as fetcher:
        with pytest.raises(KeyError, match="step 23"):
            while True:
                got.append(fetcher.get())
    assert got == [k * k for k in range(23)]
    with pytest.raises(ValueError, match="group"):
        Prefetcher(lambda k: k, 0, 1, group=2)


def test_an_idle_prefetcher_frees_its_batches_and_resumes_exactly(data):
    """A generator nobody consumes (TensorFlow keeps the ones model.fit used) lets its thread and
    prefetched batches go after Prefetcher.IDLE_S, and continues exactly where it was."""
    ds, _ = data
    before = set(prefetch_threads())
    options = dict(inputs="meta", targets="id", seed=3, dtype=None)
    expected = [y for _, y in ds.batches(40, epochs=2, **options)]
    original = Prefetcher.IDLE_S
    Prefetcher.IDLE_S = 0.3
    try:
        gen = ds.batches(40, epochs=2, prefetch=3, **options)
        got = [next(gen)[1] for _ in range(4)]
        assert len(set(prefetch_threads()) - before) == 1
        deadline = time.monotonic() + 5
        while set(prefetch_threads()) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not set(prefetch_threads()) - before
        got.append(next(gen)[1])  # restarts at the first batch not consumed
        time.sleep(0.6)  # parks again, mid-stream
        got += [y for _, y in gen]
    finally:
        Prefetcher.IDLE_S = original
    assert len(got) == len(expected) == 30
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert not set(prefetch_threads()) - before


@pytest.mark.skipif(bool(shardfeed._core.BUILD_INFO["sanitizers"]),
                    reason="AddressSanitizer keeps freed memory in quarantine, so RSS grows by design; "
                           "the plain build runs this test")
def test_private_memory_stays_flat_over_epochs(tmp_path):
    """Several epochs over a dataset much larger than the prefetch depth (40 MiB, 1 MiB batches,
    prefetch 2): the anonymous memory (file pages of the dataset excluded) does not grow."""
    path = str(tmp_path / "big")
    n, shape = 2560, (64, 64)
    with shardfeed.Writer(path, fields={"x": ("float32", shape), "y": ("int64", ())}) as w:
        for start in range(0, n, 512):
            w.extend({"x": np.full((512,) + shape, 1.5, np.float32), "y": np.arange(start, start + 512)})
    with shardfeed.open(path) as ds:
        plan = BatchPlan(ds, 64, inputs="x", targets="y")
        steps_per_epoch = len(plan)
        readings = []
        gen = ds.batches(64, inputs="x", targets="y", prefetch=2, epochs=6)
        for step, (x, y) in enumerate(gen):
            assert x.shape == (64,) + shape
            if (step + 1) % steps_per_epoch == 0:
                gc.collect()
                readings.append(private_bytes())
    growth = max(readings[1:]) - readings[1]
    assert growth < 8 << 20, [f"{r / 2 ** 20:.1f} MiB" for r in readings]


def test_prefetcher_moves_steps_to_a_consumer_that_waits_and_back():
    """With inline_when, a consumer that waits for every step and comes straight back computes
    the steps itself (after INLINE_AFTER such steps; the thread exits); one that stays away
    longer than THREAD_AWAY steps' time gets them computed ahead on a thread again, and so does
    one whose predicate stops holding. Every result once, in step order, throughout."""
    from shardfeed import _prefetch
    consumer = threading.current_thread().name
    ran, holds = [], [True]

    def produce(k):
        ran.append((k, threading.current_thread().name))
        time.sleep(0.02)  # long beside scheduling delays on a loaded machine
        return k * k

    def take(fetcher, count, away_s=0.0):
        got = []
        for _ in range(count):
            got.append(fetcher.get())
            time.sleep(away_s)
        return got

    def where(steps):
        return {name for k, name in ran if k in steps}

    with Prefetcher(produce, 0, 60, depth=2, inline_when=lambda: holds[0]) as fetcher:
        got = take(fetcher, 16)  # straight back: inline after a few steps
        assert where(range(12, 16)) == {consumer}
        assert fetcher.thread is None  # the thread has exited
        got += take(fetcher, 16, away_s=0.08)  # 4x a step away: ahead on a thread again
        assert where(range(26, 32)) == {PREFETCH_THREAD_NAME}
        got += take(fetcher, 16)  # inline again
        assert where(range(44, 48)) == {consumer}
        holds[0] = False  # e.g. the reads started to miss the page cache: back to the thread at once
        got += take(fetcher, 12)
        assert where(range(50, 60)) == {PREFETCH_THREAD_NAME}
        with pytest.raises(StopIteration):
            fetcher.get()
    assert got == [k * k for k in range(60)]
    assert sorted(k for k, _ in ran) == list(range(60))  # each step computed once
    assert _prefetch.INLINE_AFTER < 12

    ran.clear()
    with Prefetcher(produce, 0, 20, depth=2) as fetcher:  # without inline_when: always the thread
        assert take(fetcher, 20) == [k * k for k in range(20)]
    assert where(range(20)) == {PREFETCH_THREAD_NAME}
    with pytest.raises(ValueError, match="exclusive"):
        Prefetcher(produce, 0, 1, help_while_waiting=True, inline_when=lambda: True)


def test_an_inline_prefetcher_hands_out_every_result_before_an_error_then_stops():
    """In the inline mode (the predicate holds from the start), steps computed on the consumer's
    thread one at a time or in groups: the results come in step order, those of a group before
    the step that failed included, then that step's exception, then StopIteration; a step is
    never computed twice, and none after the failure. (The consumer is a thread of its own, so
    that a prefetcher that loses track of its steps fails the test instead of hanging it.)"""
    ran = []

    def produce(k):
        ran.append((k, threading.current_thread().name))
        time.sleep(0.01)  # long beside the consumer's time away, even on a loaded machine
        if k == 17:
            raise ValueError(f"step {k} failed")
        return k * k

    def produce_group(first, count):
        for k in range(first, first + count):
            yield produce(k)

    def consume(group, seen):
        with Prefetcher(produce, 0, 30, depth=2, group=group, produce_group=produce_group,
                        inline_when=lambda: True) as fetcher:
            try:
                while True:
                    seen.append(fetcher.get())
            except ValueError as error:
                seen.append(error)
            try:
                fetcher.get()
            except StopIteration:
                seen.append("stopped")
            seen.append(fetcher.thread)

    for group in (1, 4):  # 17 is inside the group of steps 16-19
        ran.clear()
        seen = []
        consumer = threading.Thread(target=consume, args=(group, seen), name="consumer", daemon=True)
        consumer.start()
        consumer.join(30)
        assert not consumer.is_alive(), f"group {group}: the consumer hangs in get() after {seen}"
        assert seen[:17] == [k * k for k in range(17)], group
        assert isinstance(seen[17], ValueError) and str(seen[17]) == "step 17 failed", seen[17:]
        assert seen[18:] == ["stopped", None]  # no thread was ever started: inline from the first step
        assert [k for k, _ in ran] == list(range(18)), group
        assert {name for _, name in ran} == {"consumer"}


def test_the_loader_reads_page_cached_batches_itself_for_a_consumer_that_waits(tmp_path, monkeypatch, new_threads):
    """ds.batches of large batches (one step a read, no transform) taken as fast as they come
    from page-cached reads: after a few steps the consumer's thread reads them and the prefetch
    thread exits; a read that misses the page cache (scripted here) gives them back to a prefetch
    thread until READAHEAD_BATCHES reads have found everything cached again. Every batch is the
    sampler's, and none is written after it was handed out. With a transform, every read stays
    on the prefetch thread (where the transform is documented to run)."""
    from shardfeed.dataset import Dataset
    values = np.random.default_rng(5).standard_normal((640, 2048)).astype(np.float16)  # 4 KiB records
    path = str(tmp_path / "ds")
    with shardfeed.Writer(path, fields={"x": ("float16", (2048,))}) as writer:
        writer.extend({"x": values})
    read, reads = Dataset.read, []

    def scripted_read(self, indices, *args, **kwargs):
        batch = read(self, indices, *args, **kwargs)
        if len(indices):
            batch.uncached = 3 if len(reads) == 25 else 0
            reads.append(threading.current_thread().name)
            time.sleep(0.01)  # reads long beside scheduling delays on a loaded machine
        return batch

    monkeypatch.setattr(Dataset, "read", scripted_read)
    consumer = threading.current_thread().name
    batch_size, epochs = 64, 6  # 512 KiB of float32 a batch: one step a read
    with shardfeed.open(path) as ds:
        assert BatchPlan(ds, batch_size, inputs="x", dtype="float32").group == 1
        reads.clear()
        got, alive_at_20 = [], None
        for step, (x,) in enumerate(ds.batches(batch_size, inputs="x", seed=2, epochs=epochs, dtype="float32")):
            got.append(x)
            if step == 20:
                alive_at_20 = [t for t in new_threads() if t.is_alive()]
        assert alive_at_20 == []
        assert set(reads[10:25]) == {consumer}
        window = shardfeed.loader.READAHEAD_BATCHES
        assert set(reads[27:26 + window]) == {PREFETCH_THREAD_NAME}
        assert set(reads[-8:]) == {consumer}
        sampler = Sampler(ds, batch_size, seed=2)
        assert len(got) == len(reads) == epochs * len(sampler)
        for step, x in enumerate(got):
            np.testing.assert_array_equal(x, values[sampler.indices(step)].astype(np.float32))

        reads.clear()
        for (x,) in ds.batches(batch_size, inputs="x", seed=2, epochs=2, dtype="float32", transform=lambda b: b):
            pass
        assert set(reads) == {PREFETCH_THREAD_NAME}


def test_a_step_pool_dropped_while_its_worker_reads_ahead_shuts_down_cleanly(monkeypatch):
    """A StepPool that may read inline (one worker, inline_when), dropped by its consumer while
    the worker reads ahead (as a Keras Sequence made for each epoch is): its worker exits, and
    nothing is reported as an exception ignored in a finalizer (a task that kept the pool alive
    made the pool's finalizer run on the worker, which cannot join itself)."""
    from shardfeed.loader import StepPool
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: ignored.append(unraisable.exc_value))

    class Plan:
        group, helped = 1, False

        def load_group(self, first, count):
            for step in range(first, first + count):
                yield self.load(step)

        def load(self, step):
            time.sleep(0.05)
            return step

    for _ in range(3):
        pool = StepPool(Plan(), workers=1, depth=2, name="pool-drop", inline_when=lambda: False)
        assert pool.get(0) == 0  # read on the worker; steps 1 and 2 submitted behind it
        time.sleep(0.01)  # the worker is reading step 1
        del pool
        gc.collect()
        deadline = time.monotonic() + 10
        while any(t.name.startswith("pool-drop") for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not [t for t in threading.enumerate() if t.name.startswith("pool-drop")]
    assert ignored == []


class _Square:
    """A step's result in the idle-pool tests (an object, so that a test can see it freed)."""

    def __init__(self, step):
        self.value = step * step


class _SquarePlan:
    """A plan of the idle-pool tests, at module level so that a process pool can pickle it."""

    group, helped = 1, False

    def __init__(self):
        self.made = []  # weak references to the results made in this process
        self.threads = set()  # the threads that read them

    def load_group(self, first, count):
        for step in range(first, first + count):
            yield self.load(step)

    def load(self, step):
        time.sleep(0.6 if step == 3 else 0.01)  # step 3 longer than idle_s, with the consumer waiting for it
        result = _Square(step)
        self.made.append(weakref.ref(result))
        self.threads.add(threading.current_thread())
        return result


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_an_idle_step_pool_stops_its_workers_and_starts_them_again_when_asked(processes, monkeypatch):
    """A StepPool whose consumer asks for nothing for idle_s (a sequence that TensorFlow keeps
    after a fit) stops its worker threads or processes and drops its reads ahead; the thread that
    stops them exits once no pool has workers; the next get() starts workers again, and every
    step is still plan.load(step). The processes start from a forkserver: a fork of this process
    while a thread of an earlier test allocates could leave the child with the allocator's lock
    held where the allocator has no fork handlers (the AddressSanitizer pass; test_processes)."""
    from shardfeed._prefetch import POOL_REAPER_THREAD_NAME, StepPool
    get_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: get_context(method or "forkserver"))

    def workers_alive(before):
        if processes:
            return [child for child in multiprocessing.active_children() if child not in before]
        return [t for t in threading.enumerate() if t.name.startswith("pool-idle")]

    def wait_until(condition, seconds):
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)
        return condition()

    before = multiprocessing.active_children()
    plan = _SquarePlan()
    pool = StepPool(plan, workers=2, processes=processes, depth=2, name="pool-idle", idle_s=0.3)
    try:
        # Asked steadily for longer than idle_s (30 x 30 ms at least; the reads ahead are done
        # between the steps), and one read longer than idle_s: the same workers all along.
        got = []
        for step in range(30):
            got.append(pool.get(step).value)
            time.sleep(0.03)
        assert got == [k * k for k in range(30)]
        assert processes or len(plan.threads) <= 2
        assert workers_alive(before)
        assert any(t.name == POOL_REAPER_THREAD_NAME for t in threading.enumerate())
        assert wait_until(lambda: not workers_alive(before), 10), "the idle pool's workers are still alive"
        gc.collect()
        assert processes or len(plan.made) >= 32  # steps 30 and 31 were read ahead here
        assert [ref for ref in plan.made if ref() is not None] == []  # and dropped
        assert wait_until(lambda: not any(t.name == POOL_REAPER_THREAD_NAME for t in threading.enumerate()), 30)
        assert [pool.get(step).value for step in (35, 30, 31)] == [35 ** 2, 30 ** 2, 31 ** 2]  # 30, 31 read again
        assert workers_alive(before)
    finally:
        pool.close()
    assert wait_until(lambda: not workers_alive(before), 10)


def test_a_step_pool_is_not_stopped_while_its_consumer_wakes_from_a_read_just_done(monkeypatch):
    """Between a read's end and the consumer waiting for it waking up (slow to be scheduled on a
    loaded machine), every read is done and the last get() started more than idle_s ago: the
    pool is still in use and keeps its workers. Simulated: the consumer's wait returns only after
    idle_s, and the idle stop is tried right then."""
    from shardfeed._prefetch import StepPool
    plan = _SquarePlan()
    pool = StepPool(plan, workers=2, depth=2, name="pool-wake", idle_s=0.2)
    consumer, tried = threading.current_thread(), []
    result = concurrent.futures.Future.result

    def result_then_stop(future, timeout=None):
        value = result(future, timeout)
        if threading.current_thread() is consumer and not tried:
            deadline = time.monotonic() + 5  # the reads ahead (steps 1 and 2) done, idle_s gone by
            while len(plan.made) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(pool.idle_s * 1.5)
            tried.append(pool.stop_if_idle())
        return value

    monkeypatch.setattr(concurrent.futures.Future, "result", result_then_stop)
    try:
        assert [pool.get(step).value for step in range(6)] == [k * k for k in range(6)]
        assert tried == [False]
        assert len(plan.threads) <= 2  # the same workers all along
    finally:
        pool.close()


def test_a_step_pool_started_again_while_it_is_stopped_is_stopped_again_when_idle(monkeypatch):
    """A get() that starts a pool's workers again between the idle stop and the stopping thread
    forgetting the pool (simulated: the get() runs right after the stop, on that thread) leaves the
    pool watched: its new workers stop too once it is idle again."""
    from shardfeed._prefetch import StepPool
    stop_if_idle, raced = StepPool.stop_if_idle, []

    def stop_then_get(pool):
        stopped = stop_if_idle(pool)
        if stopped and not raced:
            raced.append(pool.get(3).value)
        return stopped

    def pool_threads():
        return [t for t in threading.enumerate() if t.name.startswith("pool-race")]

    monkeypatch.setattr(StepPool, "stop_if_idle", stop_then_get)
    pool = StepPool(_SquarePlan(), workers=1, depth=1, name="pool-race", idle_s=0.2)
    try:
        assert pool.get(0).value == 0
        deadline = time.monotonic() + 10
        while not raced and time.monotonic() < deadline:
            time.sleep(0.02)
        assert raced == [9] and pool_threads()  # started again by the get()
        deadline = time.monotonic() + 10
        while pool_threads() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pool_threads(), "the pool started again is no longer stopped when idle"
    finally:
        pool.close()


def test_a_step_pool_reads_on_the_consumers_thread_while_it_waits_and_ahead_when_it_stays_away():
    """StepPool with inline_when and one worker thread: a consumer that comes straight back gets
    its steps read on its own thread (no reads ahead), one away longer than a read gets them read
    ahead on the worker again, and a predicate that stops holding sends them there at once.
    Every step is plan.load(step), each read once, whatever the mode; several workers never
    read inline."""
    from shardfeed.loader import StepPool
    consumer = threading.current_thread().name
    ran, holds = [], [True]

    class Plan:
        group, helped = 1, False

        def load_group(self, first, count):
            for step in range(first, first + count):
                yield self.load(step)

        def load(self, step):
            ran.append((step, threading.current_thread().name))
            time.sleep(0.02)
            return step * step

    def where(steps):
        return {name for k, name in ran if k in steps}

    pool = StepPool(Plan(), workers=1, depth=2, name="pool-test", inline_when=lambda: holds[0])
    try:
        got = [pool.get(step) for step in range(10)]  # straight back: inline from the start
        assert where(range(10)) == {consumer}
        for step in range(10, 30):
            got.append(pool.get(step))
            time.sleep(0.08)  # 4x a read away: read ahead on the worker
        assert {name[:9] for name in where(range(20, 30))} == {"pool-test"}
        got += [pool.get(step) for step in range(30, 45)]  # inline again
        assert where(range(40, 45)) == {consumer}
        holds[0] = False
        got += [pool.get(step) for step in range(45, 55)]
        assert {name[:9] for name in where(range(47, 55))} == {"pool-test"}
    finally:
        pool.close()
    assert got == [k * k for k in range(55)]
    assert sorted(k for k, _ in ran)[:55] == list(range(55))  # each read once (reads ahead may go past 55)

    ran.clear()
    holds[0] = True
    pool = StepPool(Plan(), workers=2, depth=2, name="pool-test", inline_when=lambda: holds[0])
    try:
        assert [pool.get(step) for step in range(12)] == [k * k for k in range(12)]
    finally:
        pool.close()
    assert consumer not in where(range(12))
