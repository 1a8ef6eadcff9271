"""Epoch orders: the keyed permutation (bijective, deterministic, uniform by chi-square tests, O(1)
memory and vectorised), views (split, subset, head, shard) and the batch sampler with its
resumable positions, checked against plain numpy computations."""

import json
import math
import pickle
import re
import time

import numpy as np
import pytest

import shardfeed
from shardfeed import Permutation, Sampler, Subset
from shardfeed.order import TABLE_MAX, BlockPermutation, epoch_permutation

N = 1000


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("order") / "ds")
    with shardfeed.Writer(path, fields={"id": ("int64", ()), "x": ("float16", (3,))}, shard_size=4096) as w:
        w.extend({"id": np.arange(N), "x": np.arange(3 * N).reshape(N, 3) % 1000})
    with shardfeed.open(path) as dataset:
        yield dataset


def numpy_feistel(n, key, positions):
    """Permutation(n, key) above TABLE_MAX as numpy computed it before the network moved to C
    (ext/permutation.c): the orders of existing runs must not change, so this is the oracle."""
    from shardfeed.order import FEISTEL_ROUNDS
    seeds = np.random.SeedSequence([int(k) for k in key] + [n])
    a = math.isqrt(n - 1) + 1
    b = np.uint64(-(-n // a))
    state = seeds.generate_state(2 * FEISTEL_ROUNDS, np.uint64)
    moduli = [a, int(b)] * (FEISTEL_ROUNDS // 2)
    rounds = [(np.uint64(state[i]), np.uint64(state[FEISTEL_ROUNDS + i] | 1), np.uint64(moduli[i]))
              for i in range(FEISTEL_ROUNDS)]

    def encrypt(x):
        left, right = np.divmod(x, b)
        for add, mul, modulus in rounds:
            h = right + add
            h *= mul
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h >>= np.uint64(32)
            h %= modulus
            h += left
            h %= modulus
            left, right = right, h
        return left * b + right

    out = encrypt(np.asarray(positions).astype(np.uint64))
    todo = np.flatnonzero(out >= np.uint64(n))
    while todo.size:
        again = encrypt(out[todo])
        out[todo] = again
        todo = todo[again >= np.uint64(n)]
    return out.astype(np.int64)


@pytest.mark.parametrize("n", [TABLE_MAX + 1, 100_003, 1 << 20, (1 << 20) + 7, 10**9 + 9, 4294967291, 1 << 32,
                               (1 << 32) + 1, 3 * 10**12 + 1, (1 << 62) + 12345])
def test_feistel_orders_are_numpys(n):
    """The native network gives numpy's elements bit for bit, cycle walking included (sizes far
    from a * b walk often; 3e12 and 2**62 need the full 64-bit products), for several keys; up to
    2**32 positions split by a multiply-shift instead of a division (the largest prime below 2**32,
    2**32 itself and one more are the edges)."""
    rng = np.random.default_rng(n % 1000)
    for key in [(0,), (7, 1), (0x45504F43, 12, 3), (2**63 - 1, 5)]:
        positions = np.concatenate([np.arange(min(n, 5000)), n - 1 - np.arange(min(n, 5000)),
                                    rng.integers(0, n, 20_003)])  # (not a multiple of the C loop's 8 lanes)
        np.testing.assert_array_equal(Permutation(n, key)(positions), numpy_feistel(n, key, positions),
                                      err_msg=f"n={n} key={key}")


def test_feistel_keeps_the_positions_shape():
    perm = Permutation(100_000, (4,))
    positions = np.arange(12, dtype=np.uint32).reshape(3, 4) * 999
    got = perm(positions)
    assert got.shape == (3, 4) and got.dtype == np.int64
    np.testing.assert_array_equal(got.ravel(), numpy_feistel(100_000, (4,), positions.ravel()))
    assert perm(np.array([], dtype=np.int64)).shape == (0,)


def chi2_sf(statistic, dof):
    """Upper tail of the chi-square distribution (Wilson-Hilferty; good for dof >= 10)."""
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi2_uniform(counts):
    """p-value of counts (any shape) under a uniform distribution over the cells."""
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() / counts.size
    return chi2_sf(((counts - expected) ** 2 / expected).sum(), counts.size - 1)


def chi2_independent(table):
    """p-value of a contingency table under independence of rows and columns."""
    table = np.asarray(table, dtype=np.float64)
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    dof = (table.shape[0] - 1) * (table.shape[1] - 1)
    return chi2_sf(((table - expected) ** 2 / expected).sum(), dof)


P_MIN = 1e-4  # fixed keys make these tests deterministic; a structural bias gives p < 1e-10


# ---- the permutation ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 1000, TABLE_MAX, TABLE_MAX + 1, 100_003, 2 ** 18, 3 * 2 ** 17 + 5])
def test_permutation_is_a_bijection(n):
    perm = Permutation(n, (7, 1))
    values = perm(np.arange(n))
    assert values.dtype == np.int64 and values.shape == (n,)
    np.testing.assert_array_equal(np.sort(values), np.arange(n))


def test_permutation_evaluates_any_positions_in_any_order(rng):
    for n in (500, 200_001):
        perm = Permutation(n, (3,))
        full = perm(np.arange(n))
        positions = rng.integers(0, n, 5000)
        np.testing.assert_array_equal(perm(positions), full[positions])
        np.testing.assert_array_equal(perm(positions.astype(np.uint32)), full[positions])
        assert perm(np.empty(0, np.int64)).shape == (0,)


def test_permutation_depends_only_on_n_and_key():
    a, b = Permutation(100_000, (1, 2)), Permutation(100_000, (1, 2))
    positions = np.arange(0, 100_000, 7)
    np.testing.assert_array_equal(a(positions), b(positions))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(a))(positions), a(positions))
    assert not np.array_equal(a(positions), Permutation(100_000, (1, 3))(positions))
    assert not np.array_equal(a(positions[:100]), Permutation(100_001, (1, 2))(positions[:100]))
    # Epoch permutations: a new order every epoch, the same order for the same (seed, epoch).
    e0, e1 = epoch_permutation(5000, 0, 0)(np.arange(5000)), epoch_permutation(5000, 0, 1)(np.arange(5000))
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, epoch_permutation(5000, 0, 0)(np.arange(5000)))


def test_permutation_checks_positions():
    perm = Permutation(10, (0,))
    with pytest.raises(IndexError, match="position 10 is out of range"):
        perm([1, 10])
    with pytest.raises(IndexError, match="position -1"):
        perm([-1])
    with pytest.raises(TypeError):
        perm([0.5])
    with pytest.raises(ValueError):
        Permutation(-1, (0,))


def test_huge_permutation_needs_no_table_and_is_fast():
    """O(1) memory per epoch for any n, and a batch's positions cost microseconds (vectorised)."""
    n = 10 ** 12 + 39
    perm = epoch_permutation(n, 5, 3)
    assert perm._table is None
    assert len(pickle.dumps(perm)) < 200
    positions = np.arange(10 ** 9, 10 ** 9 + 256, dtype=np.int64)
    values = perm(positions)
    assert values.min() >= 0 and values.max() < n and len(np.unique(values)) == 256
    timings = []
    for k in range(300):
        start = time.perf_counter()
        perm.apply(positions + 256 * k)
        timings.append(time.perf_counter() - start)
    assert np.median(timings) < 2e-3, f"{np.median(timings) * 1e6:.0f} us for a batch of 256 positions"
    # Injective on a large sample of positions (a bijection can't be checked exhaustively here).
    sample = perm(np.arange(5 * 10 ** 11, 5 * 10 ** 11 + 300_000))
    assert len(np.unique(sample)) == len(sample)


def test_permutation_uniformity_position_of_element_small_n():
    """Chi-square on position-of-element counts over many keys (the table regime)."""
    n, keys = 10, 20_000
    counts = np.zeros((n, n))
    for key in range(keys):
        values = Permutation(n, (key,))(np.arange(n))
        counts[values, np.arange(n)] += 1  # element values[j] sits at position j
    assert chi2_uniform(counts) > P_MIN


@pytest.mark.parametrize("n", [TABLE_MAX + 1, 100_003, 2 ** 20, 10 ** 9 + 7])
def test_permutation_uniformity_over_keys_feistel(n):
    """The Feistel regime, over 4000 keys: the element at each of a few positions is uniform over
    20 bins, and the elements at two adjacent positions are jointly uniform (10 x 10 bins)."""
    keys, bins = 4000, 20
    positions = np.array([0, 1, n // 2, n - 1])
    values = np.array([Permutation(n, (key, 99))(positions) for key in range(keys)])
    binned = values * bins // n
    for column in range(len(positions)):
        assert chi2_uniform(np.bincount(binned[:, column], minlength=bins)) > P_MIN, positions[column]
    pairs = np.zeros((10, 10))
    np.add.at(pairs, (values[:, 0] * 10 // n, values[:, 1] * 10 // n), 1)
    assert chi2_uniform(pairs) > P_MIN


@pytest.mark.parametrize("n", [TABLE_MAX + 1, 100_003, 2 ** 20, 2 ** 20 + 1, 3 * 2 ** 18])
def test_permutation_uniformity_single_key(n):
    """One permutation: no dependence between position and element (residues mod 16 and 7, high
    bins) and none between successive elements."""
    values = Permutation(n, (12345,))(np.arange(n))
    positions = np.arange(n)
    for name, f in (("mod 16", lambda v: v % 16), ("mod 7", lambda v: v % 7), ("high bins", lambda v: v * 16 // n)):
        table = np.zeros((16, 16))
        np.add.at(table, (f(values), f(positions)), 1)
        table = table[table.sum(1) > 0][:, table.sum(0) > 0]
        assert chi2_independent(table) > P_MIN, name
    successive = np.zeros((16, 16))
    np.add.at(successive, ((values[1:] - values[:-1]) % 16, values[:-1] % 16), 1)
    assert chi2_independent(successive) > P_MIN


def test_uniformity_tests_catch_a_biased_permutation():
    """The same statistics reject a 'shuffle' that only rotates (uniform marginals, no mixing)."""
    n, keys = 100_003, 4000
    offsets = np.random.default_rng(0).integers(0, n, keys)
    values = (offsets[:, None] + np.array([0, 1])) % n
    pairs = np.zeros((10, 10))
    np.add.at(pairs, (values[:, 0] * 10 // n, values[:, 1] * 10 // n), 1)
    assert chi2_uniform(np.bincount(values[:, 0] * 20 // n, minlength=20)) > P_MIN  # marginals look fine
    assert chi2_uniform(pairs) < 1e-10
    rotated = (np.arange(n) + 17) % n
    table = np.zeros((16, 16))
    np.add.at(table, (rotated % 16, np.arange(n) % 16), 1)
    assert chi2_independent(table) < 1e-10


# ---- views ----------------------------------------------------------------------------------


def test_split_fractions_are_disjoint_deterministic_and_cover_everything(ds):
    parts = ds.split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    assert list(parts) == ["train", "val", "test"]
    assert [len(p) for p in parts.values()] == [800, 100, 100]
    ids = [p.indices() for p in parts.values()]
    np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(N))
    again = ds.split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    for name in parts:
        np.testing.assert_array_equal(again[name].indices(), parts[name].indices())
    other = ds.split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=4)
    assert not np.array_equal(other["val"].indices(), parts["val"].indices())
    # The parts are pseudo-random samples, not ranges: the validation part spans the dataset.
    assert parts["val"].indices().min() < 100 and parts["val"].indices().max() > 900
    # Reading a view reads the dataset's samples.
    np.testing.assert_array_equal(parts["val"].read([0, 5])["id"], ids[1][[0, 5]])
    assert parts["val"][5]["id"] == ids[1][5]
    np.testing.assert_array_equal(parts["val"][2:6]["id"], ids[1][2:6])


def test_split_counts_lists_rounding_and_no_shuffle(ds):
    first, second = ds.split([300, 200], seed=1)
    assert (len(first), len(second)) == (300, 200)
    assert not set(first.indices()) & set(second.indices())
    sizes = [len(p) for p in ds.split([1 / 3, 1 / 3, 1 / 3])]
    assert sizes == [334, 333, 333]  # the leftover goes to the largest remainder
    assert [len(p) for p in ds.split([0.25, 0.5])] == [250, 500]  # less than everything: the rest unused
    head, tail = ds.split([0.9, 0.1], shuffle=False)
    np.testing.assert_array_equal(head.indices(), np.arange(900))
    np.testing.assert_array_equal(tail.indices(), np.arange(900, 1000))
    for bad in ([0.8, 0.3], [600, 500], [-1, 2], [0.5, 300], [True, 1]):
        with pytest.raises((ValueError, TypeError)):
            ds.split(bad)
    with pytest.raises(ValueError, match="seed"):
        ds.split([0.5, 0.5], seed=-1)


def test_subset_head_and_views_of_views(ds):
    sub = ds.subset([5, -1, 7, 5])
    np.testing.assert_array_equal(sub.indices(), [5, N - 1, 7, 5])
    np.testing.assert_array_equal(sub.read(np.arange(4))["id"], [5, N - 1, 7, 5])
    mask = np.zeros(N, bool)
    mask[[3, 9]] = True
    np.testing.assert_array_equal(ds.subset(mask).indices(), [3, 9])
    with pytest.raises(IndexError):
        ds.subset([N])
    with pytest.raises(TypeError):
        ds.subset([1.5])
    np.testing.assert_array_equal(ds.head(10).indices(), np.arange(10))
    assert len(ds.head(10 ** 6)) == N
    train = ds.split({"train": 0.5, "rest": 0.5}, seed=2)["train"]
    np.testing.assert_array_equal(train.head(7).indices(), train.indices()[:7])
    np.testing.assert_array_equal(train.subset([3, 1]).indices(), train.indices()[[3, 1]])
    inner = train.split([0.5, 0.5], seed=9)
    np.testing.assert_array_equal(np.sort(np.concatenate([p.indices() for p in inner])), np.sort(train.indices()))
    restored = pickle.loads(pickle.dumps(inner[0]))
    np.testing.assert_array_equal(restored.indices(), inner[0].indices())
    assert isinstance(restored, Subset) and "Subset" in repr(restored)


def test_shards_are_disjoint_equal_and_change_every_epoch(ds):
    view = ds.head(998)
    world = 4
    shards = [view.shard(rank, world) for rank in range(world)]
    assert [len(s) for s in shards] == [249] * world
    for epoch in range(3):
        parts = [s.epoch_indices(epoch, 0, len(s), seed=5) for s in shards]
        together = np.concatenate(parts)
        assert len(np.unique(together)) == len(together) == 996  # disjoint; two samples left over
        order = view.epoch_indices(epoch, 0, len(view), seed=5)
        for rank in range(world):  # rank r takes positions r, r + 4, ... of the epoch's order
            np.testing.assert_array_equal(parts[rank], order[rank:996:world])
    assert not np.array_equal(shards[0].epoch_indices(0, 0, 249, seed=5), shards[0].epoch_indices(1, 0, 249, seed=5))
    # Without shuffling a shard is the interleaved storage-order part; read() reads that.
    np.testing.assert_array_equal(shards[1].epoch_indices(0, 0, 5, shuffle=False), [1, 5, 9, 13, 17])
    np.testing.assert_array_equal(shards[1].indices()[:3], [1, 5, 9])
    np.testing.assert_array_equal(shards[1].read([0, 1])["id"], [1, 5])
    # A shard of a shard is a shard of the parent.
    nested = view.shard(1, 2).shard(1, 2)
    assert (nested.rank, nested.world_size, len(nested)) == (3, 4, 249)
    np.testing.assert_array_equal(nested.epoch_indices(2, 0, 249, seed=5), shards[3].epoch_indices(2, 0, 249, seed=5))
    for bad in ((4, 4), (-1, 4), (0, 0)):
        with pytest.raises(ValueError):
            view.shard(*bad)
    with pytest.raises(ValueError, match="shard"):
        shards[0].split([0.5, 0.5])


# ---- the sampler ------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_sampler_epochs_visit_every_sample_once(ds, drop_remainder):
    view = ds.split({"a": 0.7, "b": 0.3}, seed=1)["a"]
    sampler = Sampler(view, 64, seed=11, drop_remainder=drop_remainder)
    assert len(sampler) == (700 // 64 if drop_remainder else math.ceil(700 / 64))
    orders = []
    for epoch in range(3):
        batches = [sampler.batch(epoch, b) for b in range(len(sampler))]
        assert all(len(b) == 64 for b in batches[:-1])
        order = np.concatenate(batches)
        if drop_remainder:
            assert len(order) == 640 and len(np.unique(order)) == 640 and set(order) <= set(view.indices())
        else:
            np.testing.assert_array_equal(np.sort(order), np.sort(view.indices()))
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(np.concatenate([Sampler(view, 64, seed=11).batch(1, b) for b in range(3)]),
                                  np.concatenate([Sampler(view, 64, seed=11).batch(1, b) for b in range(3)]))
    plain = Sampler(view, 64, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([plain.batch(2, b) for b in range(len(plain))]), view.indices())
    with pytest.raises(IndexError):
        sampler.batch(0, len(sampler))


def test_sampler_positions_are_small_json_and_checked(ds):
    sampler = Sampler(ds, 100, seed=2)
    position = sampler.position(23)
    assert (position["epoch"], position["batch"]) == (2, 3)
    assert json.loads(json.dumps(position)) == position and len(json.dumps(position)) < 200
    assert sampler.step_of(position) == 23 == sampler.step_of((2, 3)) == sampler.step_of(23)
    np.testing.assert_array_equal(sampler.indices(23), sampler.batch(2, 3))
    with pytest.raises(ValueError, match="batches_per_epoch"):
        Sampler(ds, 50, seed=2).step_of(position)
    with pytest.raises(ValueError, match="seed"):
        Sampler(ds, 100, seed=3).step_of(position)
    with pytest.raises(ValueError, match="out of range"):
        sampler.step_of((0, 10))
    restored = pickle.loads(pickle.dumps(sampler))
    np.testing.assert_array_equal(restored.indices(23), sampler.indices(23))


def test_sampler_blocks_give_the_epoch_order(tmp_path):
    """The sampler computes orders 8192 positions at a time: batches across block boundaries, in
    any order of access, equal the epoch order computed in one piece; the indices are read-only."""
    n = 20_000
    path = str(tmp_path / "ids")
    with shardfeed.Writer(path, fields={"id": ("int64", ())}) as w:
        w.extend({"id": np.arange(n)})
    with shardfeed.open(path) as dataset:
        view = dataset.split([0.9, 0.1], seed=4)[0]
        for shuffle in (True, False):
            sampler = Sampler(view, 300, seed=6, shuffle=shuffle)
            for epoch in (0, 3):
                whole = view.epoch_indices(epoch, 0, len(view), seed=6, shuffle=shuffle)
                order = list(range(len(sampler)))
                np.random.default_rng(epoch).shuffle(order)
                for b in order:
                    batch = sampler.batch(epoch, b)
                    assert not batch.flags.writeable
                    np.testing.assert_array_equal(batch, whole[b * 300:(b + 1) * 300])


# ---- block shuffles ---------------------------------------------------------------------------


def assert_block_order(order, n, block):
    """order visits [0, n) once, as the blocks [b * block, (b + 1) * block) (the last one short),
    each whole, ascending and contiguous; returns the block numbers in order of visit."""
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    starts = np.flatnonzero(order % block == 0)
    blocks = order[starts] // block
    lengths = np.diff(np.append(starts, n))
    np.testing.assert_array_equal(lengths, np.minimum(block, n - blocks * block))
    steps = np.diff(order)
    inside = np.ones(len(steps), bool)
    inside[starts[1:] - 1] = False  # the step into the next block
    np.testing.assert_array_equal(steps[inside], 1)
    return blocks


@pytest.mark.parametrize("n, block", [(0, 4), (1, 4), (3, 4), (4, 4), (1000, 7), (1000, 8), (1000, 1000),
                                      (1000, 5000), (TABLE_MAX * 3 + 5, 3), (10 ** 6 + 17, 64)])
def test_block_shuffle_visits_every_sample_once_in_whole_blocks(n, block):
    order = epoch_permutation(n, 3, 1, block).apply(np.arange(n, dtype=np.int64))
    blocks = assert_block_order(order, n, block)
    assert len(blocks) == -(-n // block)
    again = epoch_permutation(n, 3, 1, block).apply(np.arange(n, dtype=np.int64))
    np.testing.assert_array_equal(again, order)  # a pure function of (seed, epoch)
    if len(blocks) > 20:
        assert not np.array_equal(epoch_permutation(n, 3, 2, block).apply(np.arange(n)), order)  # epoch
        assert not np.array_equal(epoch_permutation(n, 4, 1, block).apply(np.arange(n)), order)  # seed
        assert not np.array_equal(np.sort(blocks), blocks)  # shuffled, not storage order
    positions = np.random.default_rng(n).integers(0, max(n, 1), 100) if n else np.zeros(0, np.int64)
    np.testing.assert_array_equal(epoch_permutation(n, 3, 1, block).apply(positions), order[positions])


def test_block_size_one_is_the_plain_shuffle():
    plain = epoch_permutation(5000, 9, 2)
    np.testing.assert_array_equal(epoch_permutation(5000, 9, 2, 1).apply(np.arange(5000)), plain(np.arange(5000)))
    blocked = epoch_permutation(5000, 9, 2, 10)
    assert isinstance(blocked, BlockPermutation) and len(blocked) == 5000 and "block=10" in repr(blocked)
    restored = pickle.loads(pickle.dumps(blocked))
    np.testing.assert_array_equal(restored.apply(np.arange(5000)), blocked.apply(np.arange(5000)))


@pytest.mark.parametrize("n, block", [(60, 6), (64, 6)], ids=["full-blocks", "short-last-block"])
def test_block_shuffle_uniformity_block_positions(n, block):
    """Chi-square on the slot of every block over 20,000 epochs: uniform, also for the short block."""
    epochs = 20_000
    count = -(-n // block)
    counts = np.zeros((count, count))
    for epoch in range(epochs):
        blocks = epoch_permutation(n, 1, epoch, block).apply(np.arange(0, n, dtype=np.int64))
        visited = np.unique(blocks // block, return_index=True)  # block -> first position
        first = visited[1]
        slots = np.argsort(np.argsort(first))
        counts[visited[0], slots] += 1
    assert chi2_uniform(counts) > P_MIN


def test_block_shuffle_uniformity_feistel_regime():
    """More than 65,536 full blocks (a Feistel permutation of block numbers): the blocks at a few
    slots, over 4000 epochs, are uniform over 20 bins, and so is the short block's slot."""
    block, full = 3, TABLE_MAX + 11
    n = full * block + 2
    keys, bins = 4000, 20
    slots = np.array([0, 1, full // 2, full])
    firsts, short_slots = [], []
    for epoch in range(keys):
        perm = epoch_permutation(n, 5, epoch, block)
        firsts.append(perm.apply(slots * block) // block)
        short_slots.append(perm._short_at // block)
    binned = np.array(firsts) * bins // (full + 1)
    for column in range(len(slots)):
        assert chi2_uniform(np.bincount(binned[:, column], minlength=bins)) > P_MIN, slots[column]
    assert chi2_uniform(np.bincount(np.array(short_slots) * bins // (full + 1), minlength=bins)) > P_MIN


def test_sampler_and_batches_with_shuffle_block(ds):
    sampler = Sampler(ds, 64, seed=7, shuffle_block=10)
    assert "shuffle_block=10" in repr(sampler)
    for epoch in range(2):
        order = np.concatenate([sampler.batch(epoch, b) for b in range(len(sampler))])
        assert_block_order(order, N, 10)
        np.testing.assert_array_equal(order, ds.head(N).epoch_indices(epoch, 0, N, seed=7, shuffle_block=10))
    gen = ds.batches(64, inputs="id", seed=7, shuffle_block=10, epochs=1, prefetch=2)
    ids = np.concatenate([x[0] for x in gen])
    np.testing.assert_array_equal(ids, np.concatenate([sampler.batch(0, b) for b in range(len(sampler))]))
    position = sampler.position(5)
    assert position["shuffle_block"] == 10
    assert Sampler(ds, 64, seed=7, shuffle_block=10).step_of(position) == 5
    with pytest.raises(ValueError, match="shuffle_block"):
        Sampler(ds, 64, seed=7).step_of(position)
    restored = pickle.loads(pickle.dumps(sampler))
    np.testing.assert_array_equal(restored.indices(17), sampler.indices(17))
    # Without shuffle the block size changes nothing; on a shard, the parts stay disjoint and equal.
    np.testing.assert_array_equal(Sampler(ds, 64, shuffle=False, shuffle_block=10).batch(0, 1), np.arange(64, 128))
    parts = [ds.shard(rank, 3).epoch_indices(0, 0, N // 3, seed=1, shuffle_block=10) for rank in range(3)]
    together = np.concatenate(parts)
    assert len(np.unique(together)) == len(together) == 3 * (N // 3)


@pytest.mark.parametrize("bad", [0, -1, 2.0, "8", True, None])
def test_bad_shuffle_block(ds, bad):
    message = f"shuffle_block must be an int >= 1, got {bad!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        Sampler(ds, 10, shuffle_block=bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        ds.batches(10, shuffle_block=bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        ds.head(10).epoch_indices(0, 0, 10, shuffle_block=bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        BlockPermutation(10, bad, (1,))
