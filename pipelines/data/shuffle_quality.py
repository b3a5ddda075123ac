"""How far an epoch's batches are from uniformly random draws: pure arithmetic on what the
batches hold (numpy only; no I/O, no loader).

Input: one epoch as three integer arrays of shape (steps, ranks, batch) (or (steps, batch) for
one rank): the source shard, the position inside that shard and the class of every sample of
each rank's batch at each step (ranks step in lockstep). Any order can be written so: this
project's loader, a true random permutation, webdataset's buffer shuffle, Mosaic's shuffles
(benchmarks/shuffle_quality.py builds them all from one manifest).

Two measures, per window of the epoch (its deciles and its last 1%, where buffer shuffles
drain), each against what a uniformly random order gives:

``class_ratio``  the mean, over the window's batches, of the batch's Pearson chi-square
    divergence from the dataset's class distribution, n * sum_c (q_c - p_c)^2 / p_c (q: the
    batch's class frequencies, p: the dataset's), divided by its exact expectation for a batch
    drawn uniformly at random without replacement, (K - 1)(N - n)/(N - 1) (K classes, N samples).
    A random order scores 1.00; a batch of one class scores n = 256 times that. With equal
    classes it is 1 + (n - 1)/(K - 1) * (r - 1), r: how many times more often two samples of
    the batch share a class than in a random draw (the excess same-class pairs that inflate
    gradient variance); 1.1 is r = 1.39. Why not total variation or KL: a batch of 256 leaves
    most of 1000 classes empty (774 on average), so TV is 0.77 for a random batch and 0.999 for
    a one-class batch, only 1.3x apart; 1.1x of random on TV admits a batch of 149 equal classes
    instead of random's 226 (chi-square ratio 1.46). KL(q || p) (1.53 nats at random) has no
    closed-form expectation, and KL(p || q) is infinite for every batch that misses a class.
``z_shard``, ``z_position``  Spearman's correlation of the step with each sample's shard index
    (as listed in the manifest) and with its position in the shard, over the window's samples,
    times sqrt(m - 1) (m samples). For a uniformly random order it has mean 0 and variance 1
    exactly, whatever the values (the permutation distribution of a correlation), so
    |z| < Z99 = 2.576 in 99% of windows, and below `z_limit` (3.50 for 11 windows x 2 measures)
    in all windows of 99% of epochs; the raw correlation would shrink with the window, z does
    not. Any reader that streams shards one after another scores |z| >> 1 here.

``class_ratio_sd``: how much a random order's class_ratio varies in the window (the target
    1.1 is meaningful where this is small: 0.006 for 56 batches of 256 over 1000 classes).
``shards_per_batch`` (no target): mean number of distinct shards in a batch.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

Z99 = 2.5758  # two-sided 99% quantile of N(0, 1): a random order's |z| stays below it in 99% of windows


def z_limit(tests: int, level: float = 0.99) -> float:
    """The |z| a uniformly random order stays below in all ``tests`` (window, measure) pairs of
    an epoch with probability ``level`` (Sidak; overlapping windows make it conservative). A
    bound per window (Z99) would fail a truly random order in 1 - 0.99^22 = 20% of epochs."""
    return NormalDist().inv_cdf(1 - (1 - level ** (1 / tests)) / 2)


def _as_epoch(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: expected integers of shape (steps, ranks, batch) or (steps, batch), "
                         f"got {a.dtype} {a.shape}")
    return a.astype(np.int64, copy=False)


def class_chi2(labels: np.ndarray, class_counts) -> np.ndarray:
    """Per batch (rows of ``labels``, shape (batches, n)): n * sum_c (q_c - p_c)^2 / p_c.
    Computed as sum_c O_c^2 / (n p_c) - n over the classes present (O_c: the batch's count)."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.asarray(class_counts, dtype=np.float64)
    batches, n = labels.shape
    if labels.size and (labels.min() < 0 or labels.max() >= len(counts) or np.any(counts[labels] <= 0)):
        raise ValueError("labels name a class the dataset has no sample of (class_counts is 0 or too short)")
    p = counts / counts.sum()
    key = np.arange(batches, dtype=np.int64)[:, None] * len(counts) + labels
    cells, observed = np.unique(key, return_counts=True)
    batch, cls = np.divmod(cells, len(counts))
    return np.bincount(batch, weights=observed.astype(np.float64) ** 2 / (n * p[cls]), minlength=batches) - n


def class_chi2_expected(n: int, class_counts) -> float:
    """E[class_chi2] of a batch of ``n`` drawn uniformly without replacement from the dataset:
    sum_c Var(O_c) / (n p_c) with hypergeometric Var(O_c) = n p_c (1 - p_c)(N - n)/(N - 1)."""
    counts = np.asarray(class_counts, dtype=np.int64)
    k, total = int((counts > 0).sum()), int(counts.sum())
    if not 0 < n <= total:
        raise ValueError(f"batch of {n} from a dataset of {total} samples")
    return (k - 1) * (total - n) / max(1, total - 1)


def class_chi2_sd(n: int, class_counts) -> float:
    """Standard deviation of class_chi2 for a random batch of ``n`` (multinomial: exact with
    replacement, within O(n/N) without): sqrt(2(K-1) + (sum_c 1/p_c - K^2 - 2K + 2)/n)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    k = len(p)
    return math.sqrt(max(0.0, 2 * (k - 1) + (float((1 / p).sum()) - k * k - 2 * k + 2) / n))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts - 1) / 2.0)[inverse]


def spearman(x, y) -> float:
    """Spearman's rho (ties get their average rank); nan when either side is constant."""
    rx, ry = _average_ranks(np.ravel(x)), _average_ranks(np.ravel(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / den if den else float("nan")


def windows(steps: int, parts: int = 10, end_fraction: float = 0.01) -> list[tuple[str, int, int]]:
    """(name, first step, stop step): ``parts`` equal parts of the epoch, then its last
    ``end_fraction`` (at least 2 steps, so a correlation with the step is defined)."""
    if steps < 2:
        raise ValueError(f"an epoch of {steps} step(s): the measures need at least 2")
    edges = np.round(np.linspace(0, steps, parts + 1)).astype(int)
    out = [(f"{100 * i // parts}-{100 * (i + 1) // parts}%", int(a), int(b))
           for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])) if b - a >= 2]
    tail = max(2, math.ceil(steps * end_fraction))
    return out + [(f"last {100 * end_fraction:g}%", steps - tail, steps)]


def window_stats(shard, position, label, class_counts, start: int, stop: int) -> dict:
    """The measures over steps [start, stop) of one epoch (arrays as in the module docstring)."""
    shard, position, label = (_as_epoch(n, a)[start:stop] for n, a in
                              (("shard", shard), ("position", position), ("label", label)))
    steps, ranks, n = label.shape
    chi2 = class_chi2(label.reshape(-1, n), class_counts)
    step = np.broadcast_to(np.arange(steps)[:, None, None], label.shape)
    m = label.size
    keys = np.arange(steps * ranks, dtype=np.int64)[:, None] * (int(shard.max()) + 1) + shard.reshape(-1, n)
    distinct = np.unique(keys).size / (steps * ranks)
    expected = class_chi2_expected(n, class_counts)
    return dict(class_ratio=float(chi2.mean()) / expected,
                # what a random order's class_ratio varies by in this window (its batches' mean)
                class_ratio_sd=class_chi2_sd(n, class_counts) / expected / math.sqrt(len(chi2)),
                z_shard=spearman(step, shard) * math.sqrt(m - 1),
                z_position=spearman(step, position) * math.sqrt(m - 1),
                shards_per_batch=float(distinct))


def epoch_report(shard, position, label, class_counts, parts: int = 10, end_fraction: float = 0.01) -> dict:
    """Every window's measures and the worst of each over the epoch."""
    shapes = {np.shape(shard), np.shape(position), np.shape(label)}
    if len(shapes) != 1:
        raise ValueError(f"shard, position and label differ in shape: {sorted(shapes)}")
    label3 = _as_epoch("label", label)
    rows = [dict(window=name, steps=[a, b], **window_stats(shard, position, label, class_counts, a, b))
            for name, a, b in windows(label3.shape[0], parts, end_fraction)]
    worst = dict(class_ratio=float(np.max([r["class_ratio"] for r in rows])),  # np.max: nan (undefined) wins
                 z_shard=float(np.max([abs(r["z_shard"]) for r in rows])),
                 z_position=float(np.max([abs(r["z_position"]) for r in rows])))
    return dict(steps=label3.shape[0], ranks=label3.shape[1], batch=label3.shape[2], windows=rows, worst=worst)


def meets_target(report: dict, slack: float = 1.1) -> dict:
    """Within ``slack`` of a uniformly random order in every window: class_ratio <= slack (the
    random expectation is 1) and |z| <= slack * z_limit (the random order's 99% band over all
    windows of the epoch)."""
    w, limit = report["worst"], slack * z_limit(2 * len(report["windows"]))
    return dict(class_ratio=w["class_ratio"] <= slack, z_shard=w["z_shard"] <= limit,
                z_position=w["z_position"] <= limit)
