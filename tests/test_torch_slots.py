"""DataLoader workers' shared-memory slots (shardfeed._torch_slots): a worker reads each batch into
one of a few shared-memory slots that it reuses once the main process has freed every tensor of
the batch. Checked from the outside: batches kept (and views of them) are never overwritten by
later ones, every batch equals numpy's, slots are reused (the same main-process mapping comes
back), the number of shared-memory mappings stays bounded over epochs, and once the workers exit
and the batches are dropped the main process maps no shared memory and /dev/shm holds nothing
new."""

import gc
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install \"shardfeed[torch]\")")

import shardfeed  # noqa: E402
from shardfeed.torch import ShardDataset, ShardSampler, collate  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")

N, BATCH = 512, 32  # 16 batches an epoch, 256 KiB of float32 x each
SLOTS = 4  # shardfeed._torch_slots.WORKER_SLOTS, stated here as the documented bound


@pytest.fixture(scope="module")
def data(tmp_path_factory, tools):
    path, columns = tools.indexed_dataset(tmp_path_factory.mktemp("slots") / "ds", N, (32, 64), seed=9,
                                          shard_size=1 << 21)
    with shardfeed.open(path) as ds:
        yield ds, columns


def check(x, y, columns):
    """The batch against numpy: y holds the dataset indices (label = index)."""
    ids = y.numpy().astype(np.int64)
    np.testing.assert_array_equal(x.numpy(), columns["x"][ids].astype(np.float32))
    return ids


def shm_mappings():
    """This process's mappings of shared-memory segments (torch's live under /dev/shm, unlinked
    or not; multiprocessing's semaphores, ``sem.*``, are not counted), as ``start-end`` ranges."""
    with open("/proc/self/maps") as maps:
        return {line.split()[0] for line in maps if "/dev/shm/" in line and "/dev/shm/sem." not in line}


def shm_files():
    return set(os.listdir("/dev/shm"))


def segment_of(tensor):
    """The inode of the shared-memory segment the tensor's memory is in (a new segment has a
    new inode; a reused slot keeps its own)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if start <= address < end:
                assert len(fields) >= 6 and "/dev/shm/" in fields[5], line
                return int(fields[4])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_kept_batches_are_never_overwritten_and_slots_are_reused(data, context):
    ds, columns = data
    items = ShardDataset(ds, "x", "label", dtype="float32")
    sampler = ShardSampler(items, BATCH, seed=5)
    loader = DataLoader(items, batch_sampler=sampler, collate_fn=collate, num_workers=2,
                        multiprocessing_context=context, persistent_workers=True)

    def check_kept(kept):
        for x, y, ids in kept:
            np.testing.assert_array_equal(x.numpy(), columns["x"][ids].astype(np.float32))
            np.testing.assert_array_equal(np.asarray(y), ids)

    # Every batch of an epoch kept: more than the workers' slots (the rest in one-off segments).
    kept = [(x, y, check(x, y, columns)) for x, y in loader]
    assert len(kept) > 2 * SLOTS
    check_kept(kept)
    del kept
    # Some batches kept (a view and a numpy array over a batch keep it too) while later ones
    # reuse the slots of the batches dropped.
    kept = []
    for epoch in range(1, 7):
        for b, (x, y) in enumerate(loader):
            ids = check(x, y, columns)
            if b == epoch:
                kept.append((x[1:], y.numpy()[1:], ids[1:]))
    check_kept(kept)
    del kept, x, y
    # Nothing kept: every batch comes in one of the two workers' slots, the same few segments.
    segments = []
    for epoch in range(7, 10):
        for x, y in loader:
            check(x, y, columns)
            segments.append(segment_of(x))
    assert len(set(segments)) <= 2 * SLOTS < len(segments), segments
    del x, y, loader


@pytest.mark.parametrize("persistent", [True, False])
def test_shared_memory_stays_bounded_over_epochs(data, persistent):
    ds, columns = data
    items = ShardDataset(ds, "x", "label", dtype="float32")
    loader = DataLoader(items, batch_sampler=ShardSampler(items, BATCH, seed=6), collate_fn=collate, num_workers=2,
                        persistent_workers=persistent)
    before = shm_mappings()
    counts = []
    for epoch in range(8):
        for x, y in loader:
            check(x, y, columns)
        counts.append(len(shm_mappings() - before))
    # Two workers' slots, plus (new workers each epoch) the ones of the workers that just exited
    # until their last batch is freed.
    assert max(counts) <= 2 * SLOTS + 2, counts
    assert counts[-1] <= counts[1] + 1, counts  # no growth with epochs
    del x, y, loader


@pytest.mark.parametrize("strategy", ["file_descriptor", "file_system"])
def test_worker_shutdown_frees_the_shared_memory(data, strategy):
    import torch.multiprocessing as tmp
    ds, columns = data
    old = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy(strategy)
    try:
        files, mapped = shm_files(), shm_mappings()
        items = ShardDataset(ds, "x", "label", dtype="float32")
        loader = DataLoader(items, batch_sampler=ShardSampler(items, BATCH, seed=7), collate_fn=collate,
                            num_workers=2, persistent_workers=True)
        for epoch in range(3):
            for x, y in loader:
                check(x, y, columns)
        last = (x, y)
        assert len(shm_mappings() - mapped) >= 2  # the slots were mapped here
        del loader, x, y  # the workers stop (persistent: with the DataLoader)
        gc.collect()
        check(*last, columns)  # the batch held outlives its worker
        del last  # its release finds the workers gone and unmaps their slots
        gc.collect()
        assert shm_mappings() - mapped == set()
        assert shm_files() - files == set()
    finally:
        tmp.set_sharing_strategy(old)


def test_a_collate_that_works_on_the_tensors_in_the_worker_gets_tensors(data):
    """A user's collate_fn runs in the worker on the slot's tensors; what it computes is an
    ordinary tensor (sent as torch sends any), and the batches stay right."""
    ds, columns = data
    items = ShardDataset(ds, "x", "label", dtype="float32")

    loader = DataLoader(items, batch_sampler=ShardSampler(items, BATCH, seed=8), collate_fn=_double_x, num_workers=2)
    for _ in range(2):
        for x, y in loader:
            ids = y.numpy().astype(np.int64)
            np.testing.assert_array_equal(x.numpy(), 2 * columns["x"][ids].astype(np.float32))


def _double_x(batch):
    x, y = batch
    doubled = x * 2
    assert type(doubled) is torch.Tensor
    return doubled, y


def test_pickle_and_torch_save_see_an_ordinary_tensor(data, monkeypatch, tmp_path):
    """Outside multiprocessing's pickler a slot's tensor pickles by value."""
    ds, columns = data
    items = ShardDataset(ds, "x", "label", dtype="float32")
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    x, y = items.__getitems__([3, 1, 4])
    copy = pickle.loads(pickle.dumps(x))
    np.testing.assert_array_equal(copy.numpy(), columns["x"][[3, 1, 4]].astype(np.float32))
    torch.save(y, tmp_path / "y.pt")
    np.testing.assert_array_equal(torch.load(tmp_path / "y.pt").numpy(), [3, 1, 4])


class _BatchesWithCorruptOnes:
    """A batch sampler: every epoch, 8 batches of good samples, then 2 batches holding ``bad``."""

    def __init__(self, bad):
        self.bad, self.epoch = bad, 0

    def __iter__(self):
        self.epoch += 1
        order = np.random.default_rng(self.epoch).permutation([i for i in range(N) if i != self.bad])
        for b in range(8):
            yield order[b * BATCH:(b + 1) * BATCH].tolist()
            if b in (2, 5):
                yield [int(order[0]), self.bad]

    def __len__(self):
        return 10


def test_a_read_that_fails_gives_its_slot_back(data, tmp_path):
    """A batch whose read fails (a corrupt record, opened with verify=True) reaches the main
    process as the error; its slot is free again, so later batches still come in the workers'
    few slots rather than in one-off segments."""
    _, columns = data
    path = str(tmp_path / "corrupt")
    with shardfeed.Writer(path, fields={"x": ("float16", (32, 64)), "label": ("int32", ())}, shard_size=1 << 21) as w:
        w.extend(columns)
    shard = max((os.path.join(path, name) for name in os.listdir(path) if name.endswith(".rec")), key=os.path.getsize)
    with open(shard, "r+b") as f:  # flip a byte in the middle of the first shard's records
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with shardfeed.open(path, verify=True) as ds:
        bad = [i for i in range(N) if _fails(ds, i)]
        assert len(bad) == 1, bad
        items = ShardDataset(ds, "x", "label", dtype="float32")
        loader = DataLoader(items, batch_sampler=_BatchesWithCorruptOnes(bad[0]), collate_fn=collate, num_workers=2,
                            persistent_workers=True)
        failures, segments = 0, []
        for epoch in range(4):
            batches = iter(loader)
            while True:
                try:
                    x, y = next(batches)
                except StopIteration:
                    break
                except shardfeed.errors.RecordChecksumError:
                    failures += 1
                    continue
                check(x, y, columns)
                segments.append(segment_of(x))
        assert failures == 8
        assert len(set(segments)) <= 2 * SLOTS < len(segments), segments
        del batches, loader, x, y


def _fails(ds, index):
    try:
        ds.read([index], "x")
    except shardfeed.errors.RecordChecksumError:
        return True
    return False


def test_threads_reading_in_one_worker_never_share_a_slot(data, monkeypatch):
    """Several threads of one worker read batches at once (all kept, as if none had been
    released): no two batches are in the same memory, and each is numpy's."""
    import sys
    import threading
    ds, columns = data
    items = ShardDataset(ds, "x", "label", dtype="float32")
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as the interpreter allows
    results, start = [], threading.Barrier(6)

    def read(seed):
        rng = np.random.default_rng(seed)
        start.wait()
        for _ in range(5):
            positions = rng.integers(0, N, 64).tolist()
            results.append((positions, items.__getitems__(positions)))

    threads = [threading.Thread(target=read, args=(seed,)) for seed in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(results) == 30
    assert len({x.data_ptr() for _, (x, _) in results}) == 30
    for positions, (x, y) in results:
        assert check(x, y, columns).tolist() == positions


def test_large_batches_get_fewer_slots(tmp_path, monkeypatch):
    """Slot memory per worker is bounded in bytes too (32 MiB: WORKER_SLOT_BYTES): with 12 MiB
    batches a worker keeps at most 2 slots, and a third batch held at the same time goes to a
    one-off segment. The worker and the main process are this process here (get_worker_info
    patched), each batch sent through multiprocessing's pickler and received back; every batch
    is numpy's."""
    from multiprocessing.reduction import ForkingPickler
    rng = np.random.default_rng(4)
    n, batch = 3 * 1536, 1536  # uint8[32, 64] read as float32: 8 KiB a sample, 12 MiB a batch
    columns = {"x": rng.integers(0, 255, (n, 32, 64), dtype=np.uint8), "label": np.arange(n, dtype=np.int32)}
    path = str(tmp_path / "large")
    with shardfeed.Writer(path, fields={"x": ("uint8", (32, 64)), "label": ("int32", ())}) as w:
        w.extend(columns)
    with shardfeed.open(path) as ds:
        items = ShardDataset(ds, "x", "label", dtype="float32")
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
        rounds = []
        for round in range(4):
            held = []
            for b in range(3):  # three batches held at once, as a training step with two prefetched
                positions = rng.permutation(n)[:batch].tolist()
                x, y = pickle.loads(ForkingPickler.dumps(items.__getitems__(positions)))
                assert check(x, y, columns).tolist() == positions
                held.append((x, y))
            rounds.append([segment_of(x) for x, _ in held])
            del held, x, y
    kept = set(rounds[0]).intersection(*rounds[1:])  # the segments every round used: the slots
    assert len(kept) == 2, rounds
