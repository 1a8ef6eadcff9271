"""Recycled output arrays (``shardfeed.loader.ArrayPool``): the loader reads a batch into the
arrays of an earlier one only when nothing but its pool references them. Batches the consumer
keeps, views of them (of arrays that own their memory and of arrays that do not), buffers,
weak references and changed arrays are never written again; dropped batches are recycled; the
claim is atomic across threads; transforms, variable-length fields, pickling, fork, idle and
closed generators. Keras and tf.data feeds are in test_keras.py."""

import gc
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest

import shardfeed
import shardfeed.loader
from shardfeed import Sampler
from shardfeed.loader import ArrayPool, BatchPlan, Prefetcher

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
    path = str(tmp_path_factory.mktemp("recycle") / "ds")
    with shardfeed.Writer(path, fields=fields, shard_size=64 << 10) as w:
        w.extend(columns)
    with shardfeed.open(path) as ds:
        yield ds, columns


@pytest.fixture(autouse=True)
def recycle_small_batches(monkeypatch):
    """These batches are small (tens of KiB): recycle them all the same, to test the pool."""
    monkeypatch.setattr(shardfeed.loader, "RECYCLE_MIN_BYTES", 0)


@pytest.fixture
def pools(monkeypatch):
    """Every ArrayPool made during the test, in order."""
    made = []
    init = ArrayPool.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(ArrayPool, "__init__", recording)
    return made


SCALED = dict(scale={"image": SCALE}, offset={"image": OFFSET})
OPTIONS = dict(inputs="image", targets="label", seed=5, scale={"image": SCALE}, offset={"image": OFFSET})


def reference(ds, indices):
    """The batch read into new arrays (what every batch must hold)."""
    batch = ds.read(indices, ["image", "label"], dtype="float32", scale={"image": SCALE}, offset={"image": OFFSET})
    return batch["image"], batch["label"]


def assert_batch(ds, columns, step, x, y, sampler):
    indices = sampler.indices(step)
    rx, ry = reference(ds, indices)
    np.testing.assert_array_equal(x, rx, err_msg=f"step {step}")
    np.testing.assert_array_equal(y, ry, err_msg=f"step {step}")
    np.testing.assert_array_equal(y, columns["label"][indices].astype(np.float32), err_msg=f"step {step}")


def address(array):
    return array.__array_interface__["data"][0]


def test_batches_the_consumer_keeps_are_never_reused(data, pools, allocation):
    """Three epochs kept in a list: every array is new, and every batch still holds its samples
    once the last one was read."""
    ds, columns = data
    kept = list(ds.batches(64, epochs=3, **OPTIONS))
    pool = pools[-1]
    assert len(kept) == 3 * 11 and pool.reused == 0 and pool.allocated == len(kept)
    assert len({address(a) for batch in kept for a in batch}) == 2 * len(kept)
    sampler = Sampler(ds, 64, seed=5)
    for step, (x, y) in enumerate(kept):
        assert_batch(ds, columns, step, x, y, sampler)
    assert len(pool) == 0  # the finished generator dropped its pool


def test_batches_dropped_at_once_are_recycled(data, pools, allocation):
    """Each batch dropped before the next: after the first few, every batch is read into arrays
    of an earlier one, so the arrays ever handed out stay within the pool's capacity."""
    ds, columns = data
    sampler = Sampler(ds, 64, seed=5)
    addresses = set()
    steps = 0
    for step, (x, y) in enumerate(ds.batches(64, epochs=6, **OPTIONS)):
        assert_batch(ds, columns, step, x, y, sampler)
        addresses.add(address(x))
        steps += 1
    pool = pools[-1]
    assert steps == 66 and pool.allocated + pool.reused == steps
    assert pool.allocated <= pool.capacity and pool.reused >= steps - pool.capacity
    assert len(addresses) <= pool.capacity
    # Without recycling, the same loop allocates every batch.
    for _ in ds.batches(64, epochs=1, recycle=False, **OPTIONS):
        pass
    assert len(pools) == 1


@pytest.mark.parametrize("hold", ["view", "view of a view", "memoryview", "weakref", "read-only", "reshaped"])
def test_what_a_consumer_holds_is_never_written(data, pools, allocation, hold):
    """The consumer drops batch 0 but keeps something of its array: the array is not written
    again (its pool lets it go when it was changed or weakly referenced), and the other
    batches are recycled."""
    ds, columns = data
    sampler = Sampler(ds, 64, seed=5)
    gen = ds.batches(64, epochs=3, **OPTIONS)
    x, y = next(gen)
    expected = x.copy()
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
    else:
        x.shape = (64, -1)
    del x, y
    for step, (x, y) in enumerate(gen, start=1):
        assert_batch(ds, columns, step, x, y, sampler)
        if hold == "weakref":
            assert held() is None or np.array_equal(held(), expected)
        elif hold not in ("read-only", "reshaped"):
            np.testing.assert_array_equal(np.asarray(held), expected, err_msg=f"after step {step}")
    assert pools[-1].reused > 20


def test_variable_length_fields_are_recycled_with_a_fixed_maxlen(data, pools, allocation):
    ds, columns = data
    sampler = Sampler(ds, 50, seed=2)
    for maxlen, recycled in ((8, ["tokens", "label"]), (None, ["label"])):
        gen = ds.batches(50, inputs="tokens", targets="label", seed=2, epochs=2, maxlen=maxlen, pad_value=-7,
                         dtype=None)
        for step, (tokens, label) in enumerate(gen):
            indices = sampler.indices(step)
            fresh = ds.read(indices, ["tokens", "label"], maxlen=maxlen, pad_value=-7)
            np.testing.assert_array_equal(tokens, fresh["tokens"])
            np.testing.assert_array_equal(label, columns["label"][indices])
            longest = min(int(LENGTHS[indices].max()), maxlen or 99)
            assert tokens.shape == (len(indices), maxlen or longest)
        pool = pools[-1]
        assert pool.fields == recycled and pool.reused > 0


def test_transforms(data, pools):
    """The arrays read before a transform are recycled once the transform's results no longer
    reference them; arrays a transform returns are never pooled."""
    ds, columns = data
    sampler = Sampler(ds, 64, seed=5)

    def new_arrays(batch):
        return {"image": batch["image"] * 2, "label": batch["label"] + 1}

    for step, (x, y) in enumerate(ds.batches(64, epochs=3, transform=new_arrays, **OPTIONS)):
        rx, ry = reference(ds, sampler.indices(step))
        np.testing.assert_array_equal(x, rx * 2)
        np.testing.assert_array_equal(y, ry + 1)
    assert pools[-1].reused > 20

    stash = []

    def keeps_a_view(batch):
        stash.append((batch["image"][:3], batch["image"][:3].copy()))
        return {"image": batch["image"] + 0, "label": batch["label"]}

    for _ in ds.batches(64, epochs=2, transform=keeps_a_view, **OPTIONS):
        pass
    assert pools[-1].reused == 0
    for view, copy in stash:
        np.testing.assert_array_equal(view, copy)

    kept = list(ds.batches(64, epochs=2, transform=lambda batch: batch, **OPTIONS))
    assert pools[-1].reused == 0
    for step, (x, y) in enumerate(kept):
        assert_batch(ds, columns, step, x, y, sampler)


def test_a_claimed_set_is_not_handed_out_twice(data):
    ds, _ = data
    plan = BatchPlan(ds, 64, inputs="image", targets="label")
    batch = plan.load(0)
    assert plan.pool.take(64) is None  # the consumer holds it
    del batch
    claimed = plan.pool.take(64)
    assert sorted(claimed) == ["image", "label"]
    assert plan.pool.take(64) is None  # the first claim holds it until dropped
    assert plan.pool.take(63) is None  # no set of that length
    del claimed
    assert plan.pool.take(64) is not None
    assert BatchPlan(ds, 64, inputs="image", recycle=False).pool is None
    with pytest.raises(TypeError, match="recycle"):
        BatchPlan(ds, 64, inputs="image", recycle=1)
    with pytest.raises(ValueError, match="pool size"):
        BatchPlan(ds, 64, inputs="image", pool_size=0)


def test_threads_sharing_a_plan_never_share_arrays(data):
    """Eight threads load batches from one plan (as Keras's workers do), each keeping a few for a
    while: every batch keeps its samples until its thread drops it."""
    ds, columns = data
    plan = BatchPlan(ds, 32, inputs="image", targets="label", seed=4, pool_size=48, **SCALED)
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
    assert plan.pool.reused > 100 and len(plan.pool) <= 48


def test_only_batches_of_at_least_the_threshold_are_recycled(data, monkeypatch):
    """By default a plan pools its arrays only when a batch's output is at least
    RECYCLE_MIN_BYTES: below that a new array costs less than the pool's checks."""
    ds, _ = data
    monkeypatch.setattr(shardfeed.loader, "RECYCLE_MIN_BYTES", 4 << 20)
    per_sample = 3 * 8 * 8 * 4 + 4  # float32 image + label
    assert BatchPlan(ds, 64, inputs="image", targets="label").pool is None
    large = -(-(4 << 20) // per_sample)
    assert BatchPlan(ds, large, inputs="image", targets="label").pool is not None
    assert BatchPlan(ds, large - 1, inputs="image", targets="label").pool is None
    # a variable-length field counts at its maxlen (float32 rows of one element)
    assert BatchPlan(ds, 700, inputs="tokens", maxlen=1500).pool is not None
    assert BatchPlan(ds, 700, inputs="tokens", maxlen=1497).pool is None
    monkeypatch.setattr(shardfeed.loader, "RECYCLE_MIN_BYTES", 0)
    assert BatchPlan(ds, 64, inputs="image", targets="label").pool is not None


def test_pickled_plans_start_with_an_empty_pool(data):
    ds, _ = data
    plan = BatchPlan(ds, 64, inputs="image", pool_size=5)
    plan.load(0)
    assert len(plan.pool) == 1
    copy = pickle.loads(pickle.dumps(plan))
    assert len(copy.pool) == 0 and copy.pool.capacity == 5 and copy.pool.fields == ["image"]
    np.testing.assert_array_equal(copy.load(0)[0], plan.load(0)[0])


FORK_SCRIPT = """
import os, sys, threading, time
import shardfeed
import shardfeed.loader
from shardfeed.loader import BatchPlan
shardfeed.loader.RECYCLE_MIN_BYTES = 0
plan = BatchPlan(shardfeed.open(sys.argv[1]), 64, inputs="image")
plan.load(0)
locked = threading.Event()
def hold():
    with plan.pool._lock:
        locked.set()
        time.sleep(2)
threading.Thread(target=hold, daemon=True).start()
locked.wait()
pid = os.fork()
if pid == 0:
    ok = len(plan.pool) == 0 and plan.load(1)[0].shape == (64, 3, 8, 8) and len(plan.pool) == 1
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_starts_with_an_empty_unlocked_pool(data, tmp_path):
    """Forked while another thread held the pool's lock: the child's pool is new (a copied held
    lock would hang it)."""
    ds, _ = data
    script = tmp_path / "fork.py"
    script.write_text(FORK_SCRIPT)
    done = subprocess.run([sys.executable, str(script), ds.path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["child", "0"], done.stderr[-2000:]


def test_closed_and_idle_generators_drop_their_pools(data, pools, monkeypatch):
    ds, _ = data
    gen = ds.batches(64, **OPTIONS)
    for _ in range(5):
        next(gen)
    assert len(pools[-1]) > 0
    gen.close()
    assert len(pools[-1]) == 0

    monkeypatch.setattr(Prefetcher, "IDLE_S", 0.3)
    gen = ds.batches(64, **OPTIONS)
    for _ in range(5):
        next(gen)
    deadline = time.monotonic() + 5
    while len(pools[-1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pools[-1]) == 0
    next(gen)  # restarts, and pools again
    assert len(pools[-1]) > 0
    gen.close()

    gen = ds.batches(64, prefetch=0, **OPTIONS)  # no thread to drop the pool of a generator nobody closes
    for _ in range(5):
        next(gen)
    assert pools[-1].allocated == 0
    del gen
    gc.collect()
