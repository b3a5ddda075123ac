"""Shuffle quality: how far an epoch's batches are from uniformly random draws."""
import numpy as np
import pytest

from data_prep.plan import make_plan
from pipelines.data.shuffle_quality import (Z99, class_chi2, class_chi2_expected, class_chi2_sd, epoch_report,
                                            meets_target, spearman, windows, z_limit)
from pipelines.data.epoch_order import EpochOrder, Partition

CLASSES, SHARDS, PER_SHARD, RANKS, BATCH = 50, 64, 500, 4, 64


def class_sorted_listing(seed=0):
    """Class of every item of a class-sorted source listing (unequal classes, like ImageNet's)."""
    counts = np.random.default_rng(seed).integers(500, 780, CLASSES)
    counts[-1] += SHARDS * PER_SHARD - counts.sum()
    return np.repeat(np.arange(CLASSES), counts), counts


def epoch_arrays(ids, shard_items, labels):
    """(shard, position, class) arrays for sample ids laid out (steps, ranks, batch); a sample id
    indexes the concatenation of the shards' items."""
    sizes = np.array([len(s) for s in shard_items])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    shard = np.searchsorted(offsets, ids, side="right") - 1
    return shard, ids - offsets[shard], labels[np.concatenate(shard_items)][ids]


def lockstep(flat_ids, steps):
    """Rank r reads the r-th contiguous quarter of ``flat_ids``, ``BATCH`` at a time."""
    per_rank = len(flat_ids) // RANKS
    return np.stack([flat_ids[r * per_rank:r * per_rank + steps * BATCH].reshape(steps, BATCH)
                     for r in range(RANKS)], axis=1)


STEPS = SHARDS * PER_SHARD // RANKS // BATCH


def test_chi2_expectation_is_exact_for_random_batches_without_replacement():
    # a small dataset, half of it per batch: the finite-population factor (N - n)/(N - 1) = 0.5
    # matters, and the classes are unequal
    labels = np.repeat(np.arange(5), [10, 20, 40, 60, 70])
    rng = np.random.default_rng(1)
    batches = np.stack([rng.permutation(labels)[:100] for _ in range(4000)])
    expected = class_chi2_expected(100, np.bincount(labels))
    assert expected == pytest.approx(4 * 100 / 199)
    assert class_chi2(batches, np.bincount(labels)).mean() == pytest.approx(expected, rel=0.05)
    with_replacement = np.stack([rng.choice(labels, 100) for _ in range(4000)])
    assert class_chi2(with_replacement, np.bincount(labels)).std() == pytest.approx(
        class_chi2_sd(100, np.bincount(labels)), rel=0.1)


def test_a_batch_of_one_class_scores_n_over_its_share():
    counts = np.array([30, 10, 60])
    chi2 = class_chi2(np.full((1, 8), 1), counts)
    assert chi2[0] == pytest.approx(8 * (1 / 0.1 - 1))  # n * (1/p - 1) with p = 10/100


def test_a_random_permutation_scores_as_a_random_draw_at_every_point_of_the_epoch():
    labels, counts = class_sorted_listing()
    shards = [np.arange(k * PER_SHARD, (k + 1) * PER_SHARD) for k in range(SHARDS)]
    ids = lockstep(np.random.default_rng(2).permutation(SHARDS * PER_SHARD), STEPS)
    report = epoch_report(*epoch_arrays(ids, shards, labels), counts)
    assert [w["window"] for w in report["windows"]][-1] == "last 1%"
    for w in report["windows"]:  # 4 sd of a random order (z: sd 1)
        assert 0 < w["class_ratio_sd"] < 0.1 and abs(w["class_ratio"] - 1) < 4 * w["class_ratio_sd"]
        assert abs(w["z_shard"]) < 4 and abs(w["z_position"]) < 4
    target = meets_target(report)  # its class ratio <= 1.1 needs more batches per window than here
    assert target["z_shard"] and target["z_position"]


def test_shard_order_reading_of_class_sorted_shards_scores_far_from_random():
    labels, counts = class_sorted_listing()
    shards = [np.arange(k * PER_SHARD, (k + 1) * PER_SHARD) for k in range(SHARDS)]
    report = epoch_report(*epoch_arrays(lockstep(np.arange(SHARDS * PER_SHARD), STEPS), shards, labels), counts)
    for w in report["windows"]:
        assert w["class_ratio"] > 10 and w["shards_per_batch"] < 2
    # pooled over ranks: each rank's shard index climbs with the step (in its last two steps every
    # rank is inside one shard, so the end window is left out of this)
    assert all(w["z_shard"] > 3 * Z99 for w in report["windows"][:10])
    assert not any(meets_target(report).values())


def test_the_measures_are_deterministic_and_blind_to_the_order_inside_a_batch():
    labels, counts = class_sorted_listing()
    shards = [np.arange(k * PER_SHARD, (k + 1) * PER_SHARD) for k in range(SHARDS)]
    ids = lockstep(np.random.default_rng(3).permutation(SHARDS * PER_SHARD), STEPS)
    first = epoch_report(*epoch_arrays(ids, shards, labels), counts)
    assert epoch_report(*epoch_arrays(ids.copy(), shards, labels), counts) == first
    shuffled = np.random.default_rng(4).permuted(ids, axis=2)
    again = epoch_report(*epoch_arrays(shuffled, shards, labels), counts)
    for a, b in zip(first["windows"], again["windows"]):
        assert a["steps"] == b["steps"]
        for k in ("class_ratio", "z_shard", "z_position", "shards_per_batch"):
            assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9)


def test_the_loader_order_is_a_random_draw_by_class_only_on_prep_shuffled_shards():
    """This project's loader reads shards one after another: its batches mix classes like random
    draws because crossmae-prep shuffles samples across shards, and not on class-sorted shards."""
    labels, counts = class_sorted_listing()
    prep = [np.asarray(s.items) for s in make_plan([1] * len(labels), "train", 0, shard_samples=PER_SHARD)]
    naive = [np.arange(k * PER_SHARD, (k + 1) * PER_SHARD) for k in range(SHARDS)]
    for shards, random_like in ((prep, True), (naive, False)):
        sizes = tuple(len(s) for s in shards)
        order, offsets = EpochOrder(sizes, seed=0, epoch=0, block_size=512), np.concatenate([[0], np.cumsum(sizes)])
        part = Partition(((0, order.num_samples),), RANKS, 1, BATCH)
        ids = np.stack([[[offsets[s] + i for s, i in (order.sample(g) for a, b in batch for g in range(a, b))]
                         for batch in part.worker_batches(r, 0)] for r in range(RANKS)], axis=1)
        report = epoch_report(*epoch_arrays(ids, shards, labels), counts)
        deciles = [w["class_ratio"] for w in report["windows"][:10]]  # >= 48 batches each: sd of the mean ~0.03
        assert (max(deciles) < 1.15) if random_like else (min(deciles) > 5), deciles
        assert report["worst"]["z_shard"] > 2 * Z99  # whole shards at a time, either way


def test_the_z_limit_holds_a_random_order_in_99_percent_of_epochs():
    assert z_limit(1) == pytest.approx(Z99, abs=1e-3)
    z = np.abs(np.random.default_rng(5).standard_normal((20000, 22))).max(axis=1)
    assert np.mean(z > z_limit(22)) == pytest.approx(0.01, abs=0.003)


def test_windows_cover_the_epoch_and_its_end():
    parts = windows(625)
    assert parts[0][1:] == (0, 62) and parts[9][2] == 625 and parts[-1] == ("last 1%", 618, 625)
    assert sum(b - a for _, a, b in parts[:10]) == 625
    with pytest.raises(ValueError, match="at least 2"):
        windows(1)


def test_mismatched_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="differ in shape"):
        epoch_report(np.zeros((4, 2, 8), int), np.zeros((4, 2, 8), int), np.zeros((4, 2, 7), int), [1, 1])
    with pytest.raises(ValueError, match="no sample of"):
        class_chi2(np.full((1, 4), 2), [5, 5])
    assert np.isnan(spearman([1, 2, 3], [7, 7, 7]))
