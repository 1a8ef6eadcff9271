"""The loader's batches in batch memory (``_core.BatchMemory``, here for arrays of every size): a
batch the consumer keeps, and anything it keeps of one (views, views of views, memoryviews,
read-only or reshaped arrays), is never written again, while dropped batches lend their memory
to later ones; variable-length fields, transforms, threads sharing a plan, pickled plans, and
closed or idle generators. Keras and tf.data feeds are in test_keras.py; ``Dataset.read``'s own
tests are in test_batch_memory.py."""

import gc
import pickle
import threading
import time
import weakref

import numpy as np
import pytest

import shardfeed
from shardfeed import Sampler, _core, batch_reader
from shardfeed.loader import BatchPlan, Prefetcher

N = 700
SCALE, OFFSET = np.float32(1 / 255), np.float32(-0.5)
LENGTHS = np.random.default_rng(3).integers(0, 12, N)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(9)
    columns = {
        "image": rng.integers(0, 256, (N, 3, 8, 8), dtype=np.uint8),
        "label": np.arange(N, dtype=np.int64),
        "tokens": [rng.integers(-99, 99, k).astype(np.int32) for k in LENGTHS],
    }
    fields = {"image": ("uint8", (3, 8, 8)), "label": ("int64", ()), "tokens": ("int32", (None,))}
    path = str(tmp_path_factory.mktemp("loader_memory") / "ds")
    with shardfeed.Writer(path, fields=fields, shard_size=64 << 10) as w:
        w.extend(columns)
    with shardfeed.open(path) as ds:
        yield ds, columns


@pytest.fixture(autouse=True)
def batch_memory_for_every_size(monkeypatch):
    """These batches are small (tens of KiB): put them in batch memory all the same."""
    monkeypatch.setattr(batch_reader, "BATCH_MEMORY_MIN_BYTES", 0)
    gc.collect()
    _core.free_batch_memory()
    yield
    _core.free_batch_memory()


SCALED = dict(scale={"image": SCALE}, offset={"image": OFFSET})
OPTIONS = dict(inputs="image", targets="label", seed=5, **SCALED)


def reference(columns, indices):
    """What every batch must hold, computed by numpy (the reader's float32 multiply, then add)."""
    return (columns["image"][indices].astype(np.float32) * SCALE + OFFSET,
            columns["label"][indices].astype(np.float32))


def assert_batch(ds, columns, step, x, y, sampler):
    rx, ry = reference(columns, sampler.indices(step))
    np.testing.assert_array_equal(x, rx, err_msg=f"step {step}")
    np.testing.assert_array_equal(y, ry, err_msg=f"step {step}")


def address(array):
    return array.__array_interface__["data"][0]


def block(array):
    """Where the memory the array views begins: small batches are read several at a time
    (BatchPlan.group), each batch a view of the read's array, so memory is reused by blocks."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return address(array)


def test_batches_the_consumer_keeps_are_never_reused(data):
    """Three epochs kept in a list: every array has memory of its own, and every batch still holds
    its samples once the last one was read."""
    ds, columns = data
    kept = list(ds.batches(64, epochs=3, **OPTIONS))
    assert len(kept) == 3 * 11
    assert len({address(a) for batch in kept for a in batch}) == 2 * len(kept)
    sampler = Sampler(ds, 64, seed=5)
    for step, (x, y) in enumerate(kept):
        assert_batch(ds, columns, step, x, y, sampler)


def test_dropped_batches_lend_their_memory(data):
    """Six epochs, each batch dropped once checked: later batches take back the memory of dropped
    ones, so the loader's memory stays within the few batches alive at once (the prefetch queue,
    the batch being read, the consumer's)."""
    ds, columns = data
    sampler = Sampler(ds, 64, seed=5)
    addresses = set()
    steps = 0
    for step, (x, y) in enumerate(ds.batches(64, epochs=6, **OPTIONS)):
        assert_batch(ds, columns, step, x, y, sampler)
        addresses.update((block(x), block(y)))
        steps += 1
    assert steps == 66
    # Alive at once: the consumer's read, two in the queue, one waiting to be queued, one being
    # read; the cache can hold the blocks of four more (8 blocks) before it unmaps any.
    assert len(addresses) <= 2 * (5 + 4), len(addresses)


@pytest.mark.parametrize("hold", ["view", "view of a view", "memoryview", "weakref", "read-only", "reshaped"])
def test_what_a_consumer_holds_is_never_written(data, hold):
    """The consumer drops batch 0 but keeps something of its array: the memory is not handed out
    again while it does, and the other batches' memory is."""
    ds, columns = data
    sampler = Sampler(ds, 64, seed=5)
    gen = ds.batches(64, epochs=12, **OPTIONS)
    group = BatchPlan(ds, 64, **OPTIONS).group
    assert group > 1  # batch 0 is a view of a read of several batches
    x, y = next(gen)
    expected = x.copy()
    first = block(x)
    if hold == "view":
        held = x[:10]
        expected = expected[:10]
    elif hold == "view of a view":
        held = x[5:20][::2, 1]
        expected = expected[5:20][::2, 1]
    elif hold == "memoryview":
        held = memoryview(x)
    elif hold == "weakref":
        held = weakref.ref(x)
    elif hold == "read-only":
        x.flags.writeable = False
        held = x
    else:
        x.shape = (64, -1)
        held = x
        expected = expected.reshape(64, -1)
    del x, y
    addresses = []
    for step, (x, y) in enumerate(gen, start=1):
        assert_batch(ds, columns, step, x, y, sampler)
        addresses.append(block(x))
        if hold == "weakref":
            assert held() is None or np.array_equal(held(), expected)
        else:
            assert block(x) != first or step < group  # the steps read with batch 0 share its block
            np.testing.assert_array_equal(np.asarray(held), expected, err_msg=f"after step {step}")
    first_of_reads = addresses[group - 1::group]  # step r * group begins read r
    assert len(set(first_of_reads)) < len(first_of_reads) // 2  # the other reads' blocks are reused


def test_variable_length_fields(data):
    """Padding is written into reused memory (pad_value -7), with a fixed maxlen and without."""
    ds, columns = data
    sampler = Sampler(ds, 50, seed=2)
    for maxlen in (8, None):
        gen = ds.batches(50, inputs="tokens", targets="label", seed=2, epochs=3, maxlen=maxlen, pad_value=-7,
                         dtype=None)
        for step, (tokens, label) in enumerate(gen):
            indices = sampler.indices(step)
            longest = min(int(LENGTHS[indices].max()), maxlen or 99)
            want = np.full((len(indices), maxlen or longest), -7, np.int32)
            for row, i in enumerate(indices):
                kept = columns["tokens"][i][:want.shape[1]]
                want[row, :len(kept)] = kept
            np.testing.assert_array_equal(tokens, want, err_msg=f"maxlen {maxlen}, step {step}")
            np.testing.assert_array_equal(label, columns["label"][indices])


def test_transforms(data):
    """Arrays a transform returns, and what it keeps of the arrays read before it, are never
    written again."""
    ds, columns = data
    sampler = Sampler(ds, 64, seed=5)

    def new_arrays(batch):
        return {"image": batch["image"] * 2, "label": batch["label"] + 1}

    for step, (x, y) in enumerate(ds.batches(64, epochs=3, transform=new_arrays, **OPTIONS)):
        rx, ry = reference(columns, sampler.indices(step))
        np.testing.assert_array_equal(x, rx * 2)
        np.testing.assert_array_equal(y, ry + 1)

    stash = []

    def keeps_a_view(batch):
        stash.append((batch["image"][:3], batch["image"][:3].copy()))
        return {"image": batch["image"] + 0, "label": batch["label"]}

    for _ in ds.batches(64, epochs=2, transform=keeps_a_view, **OPTIONS):
        pass
    for view, copy in stash:
        np.testing.assert_array_equal(view, copy)

    kept = list(ds.batches(64, epochs=2, transform=lambda batch: batch, **OPTIONS))
    for step, (x, y) in enumerate(kept):
        assert_batch(ds, columns, step, x, y, sampler)


def test_threads_sharing_a_plan_never_share_arrays(data):
    """Eight threads load batches from one plan (as Keras's workers do), each keeping a few for a
    while: every batch keeps its samples until its thread drops it."""
    ds, columns = data
    plan = BatchPlan(ds, 32, inputs="image", targets="label", seed=4, **SCALED)
    errors = []

    def work(worker):
        rng = np.random.default_rng(worker)
        held = []
        try:
            for k in range(60):
                step = int(rng.integers(0, 4 * len(plan)))
                x, y = plan.load(step)
                np.testing.assert_array_equal(y, plan.sampler.indices(step).astype(np.float32))
                held.append((step, x, y, x.copy()))
                if len(held) > rng.integers(0, 4):
                    step, x, y, copy = held.pop(int(rng.integers(0, len(held))))
                    np.testing.assert_array_equal(x, copy)
                    np.testing.assert_array_equal(y, plan.sampler.indices(step).astype(np.float32))
        except BaseException as exc:  # noqa: B902 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_pickled_plans_read_the_same_batches(data):
    ds, _ = data
    plan = BatchPlan(ds, 64, inputs="image", **SCALED)
    first = plan.load(0)[0]
    copy = pickle.loads(pickle.dumps(plan))
    np.testing.assert_array_equal(copy.load(0)[0], first)


def test_closed_and_idle_generators_free_their_batches(data, monkeypatch):
    """The batches a generator read ahead go back to batch memory when it is closed or idles."""
    ds, _ = data
    gen = ds.batches(64, **OPTIONS)
    for _ in range(5):
        next(gen)
    _core.free_batch_memory()
    gen.close()
    assert len(_core.cached_batch_memory()) >= 2  # image and label of at least one batch read ahead

    monkeypatch.setattr(Prefetcher, "IDLE_S", 0.3)
    gen = ds.batches(64, **OPTIONS)
    for _ in range(5):
        next(gen)
    _core.free_batch_memory()
    deadline = time.monotonic() + 5
    while len(_core.cached_batch_memory()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_core.cached_batch_memory()) >= 2
    x, _ = next(gen)  # restarts where it stopped
    assert x.shape == (64, 3, 8, 8)
    gen.close()
