"""The sample order of an epoch and who reads which part of it: pure arithmetic, no I/O.

Global order G of epoch e (a function of the shard list, seed and epoch, never of the
number of ranks or workers):
  1. the shards are permuted with rng(seed, e) and concatenated into one stream S of N
     samples (each shard in its tar order: shards are globally shuffled by data prep);
  2. S is cut into blocks of ``block_size`` consecutive samples and every block is permuted
     with rng(seed, e, block): G = perm_0(block_0) + perm_1(block_1) + ...

Partition: what is left of the epoch (a list of half-open intervals of G, initially [0, N))
is laid end to end and cut into ``world_size`` contiguous, equal ranges; each rank keeps a
whole number of batches, the same number on every rank (``drop``: the shortest rank's
floor; the dropped tail is not carried to the next epoch, like DistributedSampler), and
cuts them into contiguous runs, one per DataLoader worker. In ``pad`` mode a rank's last
batch is filled up with the rank's own first samples; `valid_counts` says how many leading
entries of each batch are the rank's own (the rest are repeats an evaluation must not count).

Exact resume: after every rank consumed ``n`` batches, the consumed part of G is computable
on any rank from (remaining intervals, world size, workers, batch size, n); the new remaining
intervals are the state. A restart with another world size or worker count cuts that
remainder anew: no sample is repeated or skipped.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import numpy as np

Interval = tuple[int, int]  # [start, stop) positions in G


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


@functools.lru_cache(maxsize=64)
def _cached_permutation(seed: int, epoch: int, block: int, size: int) -> np.ndarray:
    perm = _rng(seed, epoch, 1 + block).permutation(size)
    perm.flags.writeable = False
    return perm


_LARGE_BLOCK = 1 << 16


def _block_permutation(seed: int, epoch: int, block: int, size: int) -> np.ndarray:
    """Cached up to 64 blocks: the loader asks for one block's permutation once per sample it reads.
    Blocks over 65,536 samples (random access: one block is the epoch, 10 MB at ImageNet size) keep
    only the last one, so a worker holds at most two epochs' orders (it runs into the next epoch)."""
    if size <= _LARGE_BLOCK:
        return _cached_permutation(seed, epoch, block, size)
    return _large_permutation(seed, epoch, block, size)


@functools.lru_cache(maxsize=2)
def _large_permutation(seed: int, epoch: int, block: int, size: int) -> np.ndarray:
    return _cached_permutation.__wrapped__(seed, epoch, block, size)


@dataclass(frozen=True)
class EpochOrder:
    """Maps positions of G to (shard index, sample index inside the shard)."""

    shard_counts: tuple[int, ...]
    seed: int
    epoch: int
    block_size: int = 1024

    def __post_init__(self):
        order = _rng(self.seed, self.epoch).permutation(len(self.shard_counts))
        object.__setattr__(self, "shard_order", tuple(int(i) for i in order))
        starts = np.concatenate([[0], np.cumsum([self.shard_counts[i] for i in order])])
        object.__setattr__(self, "_starts", tuple(int(s) for s in starts))

    @property
    def num_samples(self) -> int:
        return self._starts[-1]

    def block_permutation(self, block: int) -> np.ndarray:
        start = block * self.block_size
        return _block_permutation(self.seed, self.epoch, block, min(self.block_size, self.num_samples - start))

    def stream_position(self, g: int) -> int:
        """Position in the shard stream S of the sample at position g of G."""
        block, offset = divmod(g, self.block_size)
        return block * self.block_size + int(self.block_permutation(block)[offset])

    def locate(self, s: int) -> tuple[int, int]:
        """(shard index in the manifest, sample index in that shard) of stream position s."""
        k = bisect.bisect_right(self._starts, s) - 1
        return self.shard_order[k], s - self._starts[k]

    def sample(self, g: int) -> tuple[int, int]:
        return self.locate(self.stream_position(g))

    def samples(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """`sample` of many positions of G at once: (shard indices, sample indices in the shard)."""
        g = np.asarray(positions, dtype=np.int64)
        s = np.empty_like(g)
        blocks = g // self.block_size
        for block in np.unique(blocks):
            at = blocks == block
            s[at] = block * self.block_size + self.block_permutation(int(block))[g[at] - block * self.block_size]
        starts = np.asarray(self._starts, dtype=np.int64)
        k = np.searchsorted(starts, s, "right") - 1
        return np.asarray(self.shard_order, dtype=np.int64)[k], s - starts[k]


def total(intervals: list[Interval]) -> int:
    return sum(b - a for a, b in intervals)


def cut(intervals: list[Interval], start: int, stop: int) -> list[Interval]:
    """The part [start, stop) of the intervals laid end to end, as intervals of G."""
    out, pos = [], 0
    for a, b in intervals:
        lo, hi = max(a, a + start - pos), min(b, a + stop - pos)
        if lo < hi:
            out.append((lo, hi))
        pos += b - a
        if pos >= stop:
            break
    return out


def subtract(intervals: list[Interval], taken: list[Interval]) -> list[Interval]:
    """intervals minus taken (both sorted, taken inside intervals)."""
    out, taken = [], sorted(taken)
    for a, b in intervals:
        cur = a
        for ta, tb in taken:
            if tb <= cur or ta >= b:
                continue
            if ta > cur:
                out.append((cur, ta))
            cur = max(cur, tb)
        if cur < b:
            out.append((cur, b))
    return out


@dataclass(frozen=True)
class Partition:
    """Who reads what of the remaining intervals, for one world size / worker count / batch size.

    Rank r owns a contiguous range of the remainder; its N batches are cut into ``num_workers``
    contiguous runs (worker w: q_w = N // nw (+1 for w < N % nw) batches), so every worker
    streams one contiguous stretch of shards. PyTorch's DataLoader delivers worker batches
    round-robin (skipping exhausted workers), so the rank's i-th delivered batch is batch
    i // nw of worker i % nw while every worker has batches, then the extra ones in worker order.
    """

    remaining: tuple[Interval, ...]
    world_size: int
    num_workers: int
    batch_size: int
    drop_last: bool = True  # False: pad short ranks by repeating their own first samples

    @property
    def rank_lengths(self) -> list[int]:
        n, w = total(list(self.remaining)), self.world_size
        return [n // w + (1 if r < n % w else 0) for r in range(w)]

    @property
    def batches_per_rank(self) -> int:
        lengths = self.rank_lengths
        if self.drop_last:
            return min(lengths) // self.batch_size
        return -(-max(lengths) // self.batch_size)

    def worker_quota(self, worker: int) -> int:
        n, nw = self.batches_per_rank, self.num_workers
        return n // nw + (1 if worker < n % nw else 0)

    def rank_range(self, rank: int) -> tuple[int, int]:
        lengths = self.rank_lengths
        start = sum(lengths[:rank])
        return start, start + lengths[rank]

    def _batch(self, rank: int, index: int) -> list[Interval]:
        """The G intervals of the rank's batch number ``index`` (in worker-chunk order)."""
        start, stop = self.rank_range(rank)
        rem = list(self.remaining)
        lo, hi = start + index * self.batch_size, start + (index + 1) * self.batch_size
        batch = cut(rem, lo, min(hi, stop))
        short = (hi - lo) - total(batch)
        own = (start, stop - start) if stop > start else (0, total(rem))  # a rank with nothing pads from G
        while short > 0:  # pad mode: cycle through the rank's first samples
            pad = cut(rem, own[0], own[0] + min(short, own[1]))
            if not pad:
                break
            batch, short = batch + pad, short - total(pad)
        return batch

    def worker_batches(self, rank: int, worker: int) -> list[list[Interval]]:
        """The batches worker ``worker`` of ``rank`` yields, in order (one contiguous run)."""
        first = sum(self.worker_quota(v) for v in range(worker))
        return [self._batch(rank, first + j) for j in range(self.worker_quota(worker))]

    def valid_counts(self, rank: int, worker: int) -> list[int]:
        """Per batch of `worker_batches(rank, worker)`: how many leading samples are the rank's own;
        the others are pad repeats (``drop_last=False`` only: with drop every sample is valid)."""
        start, stop = self.rank_range(rank)
        first = sum(self.worker_quota(v) for v in range(worker))
        return [min(self.batch_size, max(0, stop - start - (first + j) * self.batch_size))
                for j in range(self.worker_quota(worker))]

    def delivered_per_worker(self, batches_done: int) -> list[int]:
        """How many batches each worker has delivered after the rank delivered ``batches_done``."""
        nw = self.num_workers
        q_min = self.batches_per_rank // nw
        full = min(batches_done, nw * q_min)
        counts = [full // nw + (1 if w < full % nw else 0) for w in range(nw)]
        for w in range(batches_done - full):  # the extra batches, in worker order
            counts[w] += 1
        return counts

    def consumed(self, batches_done: int) -> list[Interval]:
        """The part of G consumed once every rank has delivered ``batches_done`` batches."""
        taken = []
        for r in range(self.world_size):
            first = 0
            for w, done in enumerate(self.delivered_per_worker(batches_done)):
                for j in range(done):
                    taken += self._batch(r, first + j)
                first += self.worker_quota(w)
        return merge(taken)

    def remaining_after(self, batches_done: int) -> list[Interval]:
        """The state to checkpoint. At the end of the epoch (all batches done) it is empty:
        samples dropped by ``drop_last`` are not carried over."""
        if batches_done >= self.batches_per_rank:
            return []
        return subtract(list(self.remaining), self.consumed(batches_done))


def merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class EmptyEpochError(ValueError):
    """A whole epoch would give this rank no batch: the batch is larger than the rank's share of
    the samples (with drop_last). An error at once, never an endless loop of empty epochs."""


class EpochCursor:
    """Where one rank is in the sequence of epochs, shared by both loaders: the epoch, what is
    left of its order (``remaining``; None = all of it), the partition being read and how many of
    its batches were delivered. Subclasses set ``num_samples``, ``world_size``, ``batch_size``,
    ``drop_last``, ``seed`` and ``_readers`` (DataLoader workers, or 1) before ``_check_not_empty``."""

    epoch, remaining, batches_done, _current = 0, None, 0, None

    def _partition(self, remaining=None) -> Partition:
        remaining = remaining if remaining is not None else (
            self.remaining if self.remaining is not None else [(0, self.num_samples)])
        return Partition(tuple(tuple(iv) for iv in remaining), self.world_size, self._readers, self.batch_size,
                         self.drop_last)

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields in a whole epoch (the same on every rank)."""
        return self._partition([(0, self.num_samples)]).batches_per_rank

    def __len__(self) -> int:
        """Exactly how many batches the next ``for batch in loader`` yields on this rank: a whole
        epoch, or what is left of the current one (after load_state_dict or a loop left early)."""
        part = self._current or self._partition()
        return part.batches_per_rank - self.batches_done

    def _check_not_empty(self) -> None:
        if self.batches_per_epoch == 0:
            per_rank = self.num_samples // self.world_size
            raise EmptyEpochError(
                f"an epoch gives no batch: {self.num_samples} samples over {self.world_size} rank(s) are "
                f"{per_rank} per rank, fewer than one batch of {self.batch_size} (the short batch is dropped); "
                f"lower the batch size to <= {per_rank} or use fewer ranks or more samples")

    def _begin(self) -> Partition:
        """The partition the next batches come from. A loop left mid-epoch continues where it
        stopped: the rest of the epoch, cut anew (as a restart from state_dict() would)."""
        self._check_not_empty()
        if self._current is not None and self.batches_done:
            rest = self._current.remaining_after(self.batches_done)
            if not rest:  # the last batch was delivered but the loop never came back to end the epoch
                self._end_epoch()
            else:
                self.remaining = rest
        if self._current is None or self.batches_done:
            self._current, self.batches_done = self._partition(), 0
        return self._current

    def _end_epoch(self) -> None:
        self.epoch, self.remaining, self.batches_done, self._current = self.epoch + 1, None, 0, None

    def _position(self) -> dict:
        """The resume state: the epoch and the not-yet-consumed intervals of its order."""
        part = self._current
        remaining = part.remaining_after(self.batches_done) if part is not None else (
            self.remaining if self.remaining is not None else [(0, self.num_samples)])
        epoch = self.epoch
        if part is not None and not remaining:  # the epoch's last batch was consumed
            epoch, remaining = epoch + 1, [(0, self.num_samples)]
        return dict(epoch=epoch, seed=self.seed, num_samples=self.num_samples,
                    samples_consumed=self.num_samples - total(remaining), remaining=[list(iv) for iv in remaining])

    def _load_position(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"loader state is for {state['num_samples']} samples, the data has {self.num_samples}")
        self.epoch, self.seed = state["epoch"], state.get("seed", self.seed)
        self.remaining = [tuple(iv) for iv in state["remaining"]]
        self._current, self.batches_done = None, 0
