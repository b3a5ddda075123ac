"""The epoch order and its partition: exact, elastic resume by arithmetic alone."""
import itertools
import random

import pytest

from pipelines.data.epoch_order import EpochOrder, Partition, total


def positions(batches):
    return [g for batch in batches for a, b in batch for g in range(a, b)]


def run_epoch(remaining, world, workers, batch, stop_after=None, drop_last=True):
    """What every rank's DataLoader delivers, in delivery order, up to ``stop_after`` batches."""
    part = Partition(tuple(remaining), world, workers, batch, drop_last)
    n = part.batches_per_rank if stop_after is None else min(stop_after, part.batches_per_rank)
    delivered = {}
    for r in range(world):
        per_worker = [part.worker_batches(r, w) for w in range(workers)]
        order = []
        for i in range(part.batches_per_rank):  # PyTorch round robin, skipping exhausted workers
            w = i % workers if i < workers * (part.batches_per_rank // workers) else i - workers * (
                part.batches_per_rank // workers)
            order.append(per_worker[w][i // workers if i < workers * (part.batches_per_rank // workers)
                                       else part.batches_per_rank // workers])
        delivered[r] = order[:n]
    return part, n, delivered


def test_global_order_is_a_permutation_of_every_sample_and_depends_on_seed_and_epoch():
    counts = (50, 7, 93, 20)
    order = EpochOrder(counts, seed=3, epoch=0, block_size=16)
    samples = [order.sample(g) for g in range(order.num_samples)]
    assert sorted(samples) == sorted((s, i) for s, n in enumerate(counts) for i in range(n))
    assert samples == [EpochOrder(counts, 3, 0, 16).sample(g) for g in range(170)]
    assert samples != [EpochOrder(counts, 3, 1, 16).sample(g) for g in range(170)]
    assert samples != [EpochOrder(counts, 4, 0, 16).sample(g) for g in range(170)]


def test_every_rank_yields_the_same_number_of_batches_and_no_sample_twice():
    for world, workers, batch in [(1, 1, 8), (3, 2, 8), (4, 3, 5), (7, 1, 16)]:
        part, n, delivered = run_epoch([(0, 1000)], world, workers, batch)
        assert all(len(d) == n == part.batches_per_rank for d in delivered.values())
        seen = [g for d in delivered.values() for g in positions(d)]
        assert len(seen) == len(set(seen)) == n * world * batch
        assert 1000 - len(seen) < world * batch  # drop_last loses less than one batch per rank


def test_pad_mode_yields_every_sample():
    part, n, delivered = run_epoch([(0, 1001)], 4, 2, 16, drop_last=False)
    seen = [g for d in delivered.values() for g in positions(d)]
    assert set(seen) == set(range(1001)) and all(len(d) == n for d in delivered.values())


def test_each_worker_reads_one_contiguous_stretch():
    part = Partition(((0, 10_000),), 4, 3, 32)
    for r, w in itertools.product(range(4), range(3)):
        pos = positions(part.worker_batches(r, w))
        assert pos == list(range(pos[0], pos[0] + len(pos)))


@pytest.mark.parametrize("trial", range(40))
def test_resume_mid_epoch_with_another_world_size_yields_unseen_samples_only(trial):
    rng = random.Random(trial)
    n = rng.randint(200, 3000)
    world, workers, batch = rng.randint(1, 5), rng.randint(1, 4), rng.choice([4, 8, 16])
    part, _, _ = run_epoch([(0, n)], world, workers, batch)
    stop = rng.randint(0, part.batches_per_rank)
    _, _, before = run_epoch([(0, n)], world, workers, batch, stop_after=stop)
    seen_before = [g for d in before.values() for g in positions(d)]
    remaining = part.remaining_after(stop)
    assert total(remaining) == (n - len(seen_before) if stop < part.batches_per_rank else 0)
    # restart elastically: other world size, other workers, same batch size
    world2, workers2 = rng.randint(1, 5), rng.randint(1, 4)
    part2, _, after = run_epoch(remaining, world2, workers2, batch)
    seen_after = [g for d in after.values() for g in positions(d)]
    both = seen_before + seen_after
    assert len(both) == len(set(both)), "a sample was repeated"
    assert set(seen_before) | set(seen_after) | set(g for a, b in part2.remaining_after(part2.batches_per_rank)
                                                     for g in range(a, b)) <= set(range(n))
    missing = set(range(n)) - set(both)
    # only drop_last tails go unseen: the restarted run's (< one batch per rank), or the first
    # run's when it had already finished the epoch
    assert len(missing) < (world2 if stop < part.batches_per_rank else world) * batch
    assert not set(seen_before) & set(g for a, b in remaining for g in range(a, b))


@pytest.mark.parametrize("n,world,workers,batch", [(40, 3, 2, 8), (5, 3, 1, 4), (100, 4, 3, 7), (2, 3, 1, 4)])
def test_valid_counts_mark_pad_repeats_so_every_sample_counts_once(n, world, workers, batch):
    remaining = ((0, n // 2), (n // 2 + 3, n + 3))  # a resumed state: a hole in the middle
    part = Partition(remaining, world, workers, batch, drop_last=False)
    counted = []
    for r in range(world):
        start, stop = part.rank_range(r)
        own = set(positions([[iv] for iv in remaining])[start:stop])
        for w in range(workers):
            for intervals, valid in zip(part.worker_batches(r, w), part.valid_counts(r, w)):
                pos = positions([intervals])
                assert len(pos) == batch  # every batch full
                counted += pos[:valid]
                if own:
                    assert set(pos) <= own  # pads repeat the rank's own samples
    assert sorted(counted) == positions([[iv] for iv in remaining])  # each sample exactly once
    drop = Partition(remaining, world, workers, batch, drop_last=True)
    assert all(v == batch for r in range(world) for w in range(workers) for v in drop.valid_counts(r, w))
