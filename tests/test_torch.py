"""The PyTorch front end (shardfeed.torch): ShardDataset's batched reads in torch's DataLoader (workers
0 and 2, fork and spawn), ShardSampler's epoch order, rank parts and exact resume (also through
torchdata's StatefulDataLoader), the thread-prefetched ShardLoader, DDP with two gloo ranks, and
tensors that are never overwritten while referenced. Every batch is checked against numpy."""

import os
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install \"shardfeed[torch]\")")

import shardfeed  # noqa: E402
from shardfeed import Sampler  # noqa: E402
from shardfeed.torch import (LOADER_THREAD_NAME, Positions, ShardDataset, ShardLoader, ShardSampler,  # noqa: E402
                             collate)
from torch.utils.data import DataLoader  # noqa: E402

N = 203

# DataLoader workers forked from this multi-threaded process (the native reader's threads): Python
# >= 3.12 warns; the workers run shardfeed's reader, which is fork-safe (tests/test_processes.py).
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(14)
    columns = {
        "x": rng.standard_normal((N, 3, 4)).astype(np.float16),
        "label": rng.integers(0, 1000, N).astype(np.int32),
        "tok": [rng.integers(0, 100, rng.integers(0, 6)).astype(np.int16) for _ in range(N)],
    }
    fields = {"x": ("float16", (3, 4)), "label": ("int32", ()), "tok": ("int16", (None,))}
    path = str(tmp_path_factory.mktemp("torch") / "ds")
    with shardfeed.Writer(path, fields=fields, shard_size=2000) as w:
        for i in range(N):
            w.append({k: v[i] for k, v in columns.items()})
    with shardfeed.open(path) as ds:
        yield ds, columns


def reference(columns, indices):
    """numpy's batch of dataset ``indices``: x and label as float32."""
    indices = np.asarray(indices)
    return columns["x"][indices].astype(np.float32), columns["label"][indices].astype(np.float32)


def check_xy(batch, columns, indices):
    x, y = batch
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    ex, ey = reference(columns, indices)
    np.testing.assert_array_equal(x.numpy(), ex)
    np.testing.assert_array_equal(y.numpy(), ey)


@pytest.fixture(scope="module")
def unique(tmp_path_factory, tools):
    """A dataset whose label is the sample's index, so a batch says which samples it holds."""
    path, columns = tools.indexed_dataset(tmp_path_factory.mktemp("torch") / "unique", N, (3, 4), seed=3,
                                          shard_size=1500)
    with shardfeed.open(path) as ds:
        yield ds, columns


# ---- ShardDataset --------------------------------------------------------------------------------


def test_dataset_items_and_batches_equal_numpy(data):
    ds, columns = data
    view = ds.split([0.6, 0.4], seed=5)[0]
    items = ShardDataset(view, "x", "label")
    assert len(items) == len(view)
    positions = [7, 0, len(view) - 1, 7, 3]
    indices = view.indices(positions)
    check_xy(items.__getitems__(positions), columns, indices)
    x, y = items[4]
    ex, ey = reference(columns, view.indices([4]))
    np.testing.assert_array_equal(x.numpy(), ex[0])
    assert float(y) == ey[0]
    with pytest.raises(IndexError, match="position 999"):
        items.__getitems__([1, 999])


def test_dataset_without_inputs_is_a_batch_of_tensors_with_lengths(data):
    ds, columns = data
    items = ShardDataset(ds, dtype=None)
    positions = [5, 1, 9]
    batch = items.__getitems__(positions)
    assert isinstance(batch, shardfeed.Batch) and set(batch) == {"x", "label", "tok"}
    np.testing.assert_array_equal(batch["x"].numpy(), columns["x"][positions])
    assert batch["label"].dtype == torch.int32
    lengths = batch.lengths["tok"].numpy()
    for row, i in enumerate(positions):
        assert lengths[row] == len(columns["tok"][i])
        np.testing.assert_array_equal(batch["tok"][row, :lengths[row]].numpy(), columns["tok"][i])
    one = items[9]
    np.testing.assert_array_equal(one["tok"].numpy(), columns["tok"][9])  # unpadded


def test_dataset_refuses_order_options_and_shards(data):
    ds, _ = data
    with pytest.raises(TypeError, match="ShardSampler"):
        ShardDataset(ds, "x", shuffle=True)
    with pytest.raises(TypeError, match="ShardDataset"):
        ShardSampler(ds, 10, dtype=None)
    with pytest.raises(TypeError, match="'shufle'.*FeedOptions"):
        ShardSampler(ds, 10, shufle=False)
    with pytest.raises(ValueError, match="rank/world_size"):
        ShardDataset(ds.shard(0, 2), "x")


def test_transform_sees_epoch_and_step_from_the_sampler(unique):
    ds, columns = unique
    seen = []

    def transform(batch):
        seen.append((batch.epoch, batch.step, list(batch.indices)))
        return batch

    items = ShardDataset(ds, "x", "label", transform=transform)
    sampler = ShardSampler(items, 50, seed=2)
    sampler.set_epoch(3)
    for positions in sampler:
        assert isinstance(positions, Positions) and isinstance(positions, list)
        items.__getitems__(positions)
    assert [(e, s) for e, s, _ in seen] == [(3, 3 * len(sampler) + b) for b in range(len(sampler))]
    reference_sampler = Sampler(ds, 50, seed=2)
    assert [ids for _, _, ids in seen] == [list(reference_sampler.batch(3, b)) for b in range(len(sampler))]


# ---- ShardSampler ------------------------------------------------------------------------------


def epoch_ids(sampler, view):
    return [list(view.indices(positions)) for positions in sampler]


@pytest.mark.parametrize("world_size", [1, 3])
def test_sampler_is_the_librarys_order_of_each_rank(unique, world_size):
    ds, _ = unique
    view = ds.split([0.9, 0.1], seed=1)[0]
    parts = []
    for rank in range(world_size):
        sampler = ShardSampler(view, 16, seed=9, rank=rank, world_size=world_size)
        expected = Sampler(view.shard(rank, world_size) if world_size > 1 else view, 16, seed=9)
        assert len(sampler) == len(expected)
        for epoch in range(3):  # without set_epoch each iteration is the next epoch
            got = epoch_ids(sampler, view)
            assert got == [list(expected.batch(epoch, b)) for b in range(len(expected))]
            if epoch == 1:
                parts.append(np.concatenate(got))
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == len(view) // world_size
    union = np.concatenate(parts)
    assert len(np.unique(union)) == len(union)  # disjoint


def test_sampler_set_epoch_and_exact_resume(unique):
    ds, _ = unique
    sampler = ShardSampler(ds, 30, seed=4, drop_remainder=True)
    sampler.set_epoch(5)
    whole = [list(p) for p in sampler]
    assert sampler.state_dict()["epoch"] == 6 and sampler.state_dict()["batch"] == 0
    sampler.set_epoch(5)
    it = iter(sampler)
    head = [list(next(it)) for _ in range(3)]
    state = sampler.state_dict()
    assert (state["epoch"], state["batch"]) == (5, 3)
    other = ShardSampler(ds, 30, seed=4, drop_remainder=True)
    other.load_state_dict(state)
    assert head + [list(p) for p in other] == whole
    fresh = ShardSampler(ds, 30, seed=4, drop_remainder=True)
    fresh.set_epoch(6)
    assert [list(p) for p in other] == [list(p) for p in fresh]  # then the next epoch, from its start
    assert whole != [list(p) for p in fresh]


def test_sampler_refuses_a_state_of_another_stream(unique):
    ds, _ = unique
    state = ShardSampler(ds, 30, seed=4, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardSampler(ds, 30, seed=5, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(ds, 30, seed=4, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        ShardSampler(ds, 30, seed=4, rank=0, world_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="both rank and world_size"):
        ShardSampler(ds, 30, rank=1)
    with pytest.raises(ValueError, match="no batches"):
        ShardSampler(ds.head(5), 30, drop_remainder=True)


# ---- DataLoader --------------------------------------------------------------------------------


def loader_epochs(loader, epochs, columns):
    """Dataset indices of each batch of ``epochs`` epochs, every batch checked against numpy."""
    out = []
    for epoch in range(epochs):
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        batches = []
        for x, y in loader:
            ids = y.numpy().astype(np.int64)
            check_xy((x, y), columns, ids)
            batches.append(list(ids))
        out.append(batches)
    return out


@pytest.mark.parametrize("workers,context", [(0, None), (2, "fork"), (2, "spawn")])
def test_dataloader_batches_are_the_samplers_whole_batches(unique, workers, context):
    ds, columns = unique
    view = ds.split([0.8, 0.2], seed=3)[0]
    items = ShardDataset(view, "x", "label")
    sampler = ShardSampler(items, 32, seed=11)
    loader = DataLoader(items, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        multiprocessing_context=context, persistent_workers=workers > 0)
    got = loader_epochs(loader, 2, columns)
    expected = Sampler(view, 32, seed=11)
    for epoch in range(2):
        assert got[epoch] == [list(expected.batch(epoch, b)) for b in range(len(expected))]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_with_torchs_own_batching(unique, workers):
    ds, columns = unique
    items = ShardDataset(ds, "x", "label")
    torch.manual_seed(0)
    loader = DataLoader(items, batch_size=40, shuffle=True, collate_fn=collate, num_workers=workers)
    seen = []
    for x, y in loader:
        ids = y.numpy().astype(np.int64)
        check_xy((x, y), columns, ids)
        seen.extend(ids)
    assert sorted(seen) == list(range(N))  # every sample once: no worker duplicates a batch


def test_dataloader_without_auto_collation(unique):
    ds, columns = unique
    items = ShardDataset(ds, "x", "label")
    loader = DataLoader(items, sampler=ShardSampler(items, 64, seed=1), batch_size=None, collate_fn=collate)
    expected = Sampler(ds, 64, seed=1)
    for b, (x, y) in enumerate(loader):
        check_xy((x, y), columns, expected.batch(0, b))


# torchdata 0.11's StatefulDataLoader calls torch.set_vital, which torch 2.13 deprecates.
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_mid_epoch(unique, workers):
    stateful = pytest.importorskip("torchdata.stateful_dataloader", reason="torchdata is not installed")
    ds, columns = unique
    items = ShardDataset(ds, "x", "label")

    def make():
        return stateful.StatefulDataLoader(items, batch_sampler=ShardSampler(items, 16, seed=7), collate_fn=collate,
                                           num_workers=workers)

    whole = []
    loader = make()
    for epoch in range(2):
        whole.append([list(y.numpy().astype(np.int64)) for _, y in loader])
    loader = make()
    first = [list(y.numpy().astype(np.int64)) for _, y in loader]
    it = iter(loader)
    head = [list(next(it)[1].numpy().astype(np.int64)) for _ in range(5)]
    state = loader.state_dict()
    del it, loader
    resumed = make()
    resumed.load_state_dict(state)
    tail = []
    for x, y in resumed:
        check_xy((x, y), columns, y.numpy().astype(np.int64))
        tail.append(list(y.numpy().astype(np.int64)))
    assert first == whole[0]
    assert head + tail == whole[1]


# ---- ShardLoader -------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_batches_and_exact_resume(unique, prefetch):
    ds, columns = unique
    view = ds.split([0.7, 0.3], seed=8)[1]
    loader = ShardLoader(view, 10, "x", "label", seed=6, prefetch=prefetch)
    expected = Sampler(view, 10, seed=6)
    assert len(loader) == len(expected)
    for epoch in range(2):  # each iteration the next epoch
        batches = list(loader)
        assert len(batches) == len(expected)
        for b, batch in enumerate(batches):
            check_xy(batch, columns, expected.batch(epoch, b))
    loader.set_epoch(4)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == (4, 3)
    it.close()
    again = ShardLoader(view, 10, "x", "label", seed=6, prefetch=prefetch)
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(expected) - 3
    for b, batch in enumerate(rest, start=3):
        check_xy(batch, columns, expected.batch(4, b))
    assert again.state_dict()["epoch"] == 5


def test_loader_ranks_are_the_shards(unique):
    ds, columns = unique
    for rank in range(2):
        loader = ShardLoader(ds, 25, "x", "label", seed=1, rank=rank, world_size=2)
        expected = Sampler(ds.shard(rank, 2), 25, seed=1)
        for b, batch in enumerate(loader):
            check_xy(batch, columns, expected.batch(0, b))


def test_loader_errors_reach_the_consumer(unique):
    ds, _ = unique
    ran_on = []

    def broken(batch):
        ran_on.append(threading.current_thread().name)
        raise RuntimeError("augmentation failed")

    with pytest.raises(RuntimeError, match="augmentation failed"):
        list(ShardLoader(ds, 25, "x", "label", transform=broken))
    assert set(ran_on) == {LOADER_THREAD_NAME}  # the transform runs on the loader's prefetch thread
    with pytest.raises(ValueError, match="prefetch"):
        ShardLoader(ds, 25, prefetch=-1)


# ---- batch memory: tensors keep their arrays --------------------------------------------------


@pytest.fixture(scope="module")
def large(tmp_path_factory, tools):
    """Batches of 2 MiB: Dataset.read puts them in reusable batch memory."""
    path, columns = tools.indexed_dataset(tmp_path_factory.mktemp("torch") / "large", 512, (32, 64), seed=5,
                                          shard_size=1 << 22)
    with shardfeed.open(path) as ds:
        yield ds, columns


def test_tensors_are_never_overwritten_while_referenced(large):
    ds, columns = large
    items = ShardDataset(ds, "x", "label")
    kept = []
    loaders = [ShardLoader(ds, 256, "x", "label", seed=s) for s in range(3)]
    for round in range(6):
        for loader in loaders:
            for x, y in loader:  # dropped batches lend their memory to later ones
                if round % 2 == 0:
                    kept.append((x, y))
        x, y = items.__getitems__(list(range(round, 512, 2)))
        kept.append((x, y[:]))  # a view of a tensor keeps the batch too
        del x, y
    assert x_bytes(kept[0][0]) >= 1 << 20
    for x, y in kept:
        check_xy((x, y), columns, y.numpy().astype(np.int64))


def x_bytes(tensor):
    return tensor.element_size() * tensor.nelement()


# ---- DDP ---------------------------------------------------------------------------------------


def _ddp_rank(rank, world_size, path, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ds = shardfeed.open(path)
        items = ShardDataset(ds, "x", "label")
        sampler = ShardSampler(items, 16, seed=21)  # rank and world size from torch.distributed
        loader = DataLoader(items, batch_sampler=sampler, collate_fn=collate)
        threaded = ShardLoader(ds, 16, "x", "label", seed=21)
        result = {"sampler": [], "loader": [], "rank": sampler.rank, "world_size": sampler.world_size}
        for epoch in range(3):
            sampler.set_epoch(epoch)
            threaded.set_epoch(epoch)
            result["sampler"].append([int(v) for _, y in loader for v in y])
            result["loader"].append([int(v) for _, y in threaded for v in y])
            counts = torch.tensor([len(result["sampler"][-1])])
            dist.all_reduce(counts)  # the ranks meet at every epoch's end
            result.setdefault("total", []).append(int(counts))
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.array(result, dtype=object), allow_pickle=True)
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_ranks_get_disjoint_equal_parts_every_epoch(unique, tmp_path):
    import torch.multiprocessing as mp
    ds, columns = unique
    mp.spawn(_ddp_rank, args=(2, ds.path, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [np.load(tmp_path / f"rank{r}.npy", allow_pickle=True).item() for r in range(2)]
    for rank, result in enumerate(results):
        assert (result["rank"], result["world_size"]) == (rank, 2)
        expected = Sampler(ds.shard(rank, 2), 16, seed=21)
        for epoch in range(3):
            order = [int(i) for b in range(len(expected)) for i in expected.batch(epoch, b)]
            assert result["sampler"][epoch] == order
            assert result["loader"][epoch] == order
            assert result["total"][epoch] == 2 * (N // 2)
    for epoch in range(3):
        a, b = (set(r["sampler"][epoch]) for r in results)
        assert len(a) == len(b) == N // 2 and not a & b
    assert results[0]["sampler"][0] != results[0]["sampler"][1]  # a new order every epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_pin_memory_is_pinned_with_an_accelerator_and_a_stated_no_op_without(unique, workers):
    """pin_memory=True: with an accelerator every tensor is pinned; on a CPU-only torch there is
    no pinned memory (Tensor.pin_memory() raises), so DataLoader warns (torch's own warning) and
    does not pin, and ShardLoader does not pin either, silently, saying so in ``pin_memory``.
    The batches are the sampler's either way."""
    ds, columns = unique
    items = ShardDataset(ds, "x", "label")
    accelerator = torch.accelerator.is_available()

    loader = DataLoader(items, batch_sampler=ShardSampler(items, 32, seed=4), collate_fn=collate,
                        num_workers=workers, pin_memory=True)
    if accelerator:
        batches_of_epoch = iter(loader)
    else:  # torch warns when an iteration starts
        with pytest.warns(UserWarning, match="no accelerator"):
            batches_of_epoch = iter(loader)
    expected = Sampler(ds, 32, seed=4)
    batches = 0
    for b, (x, y) in enumerate(batches_of_epoch):
        check_xy((x, y), columns, expected.batch(0, b))
        assert x.is_pinned() == y.is_pinned() == accelerator
        batches += 1
    assert batches == len(expected)
    thread = ShardLoader(ds, 32, "x", "label", seed=4, pin_memory=True, prefetch=workers)
    assert thread.pin_memory == accelerator
    assert ShardLoader(ds, 32, "x", "label").pin_memory is False
    for b, (x, y) in enumerate(thread):
        check_xy((x, y), columns, expected.batch(0, b))
        assert x.is_pinned() == y.is_pinned() == accelerator


def test_a_worker_reads_batches_straight_into_shared_memory(unique, monkeypatch):
    """In a DataLoader worker (get_worker_info() set), a batch is read into one of the worker's
    shared-memory slots, which reach the main process without a copy (tests/test_torch_slots.py);
    batches not released by the main process each have a slot of their own; the main process
    (and a transform) get tensors over the read's arrays, not shared."""
    ds, columns = unique
    items = ShardDataset(ds, "x", "label")
    x, y = items.__getitems__([5, 1, 7])
    assert not x.is_shared() and not y.is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    kept = []
    for positions in ([5, 1, 7], [0, 2], [3, 3, 9, 4]):
        x, y = items.__getitems__(positions)
        assert x.is_shared() and y.is_shared()
        check_xy((x, y), columns, positions)
        kept.append((positions, x, y))
    assert len({x.untyped_storage().data_ptr() for _, x, _ in kept}) == 3
    for positions, x, y in kept:  # none written again
        check_xy((x, y), columns, positions)
    transformed = ShardDataset(ds, "x", "label", transform=lambda batch: batch)
    assert not transformed.__getitems__([1, 2])[0].is_shared()
