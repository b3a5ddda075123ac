"""Streaming WebDataset loader with equal batches per rank and exact, elastic mid-epoch resume.

Reads standard WebDataset tars (``{key}.jpg`` + ``{key}.cls``) listed in a data-prep manifest,
from local paths or S3 through the storage layer (streaming GETs that retry and resume at the
byte they stopped; no ``pipe:`` subprocesses), with webdataset's own tar iterator and
key grouping. Who reads what, and the resume state, come from ``pipelines.data.epoch_order``.

    with StreamingLoader.from_manifest("s3://b/in1k/train/manifest.json", batch_size=256,
                                       rank=rank, world_size=world, num_workers=8, seed=0,
                                       transform=MAETrainTransform(224)) as loader:
        len(loader)                  # exactly the batches the next loop yields on this rank
        for batch in loader:         # one epoch: batch["image"] uint8 (B,3,224,224), ["label"]
            ...                      # ["index"] epoch positions, ["valid"] False for pad repeats
        state = loader.state_dict()  # save with the checkpoint; load_state_dict() after restart

Workers start once and serve every epoch: each runs on into the next epoch while the trainer
still consumes the current one, so no epoch boundary waits for workers to start and refill
(benchmarks/epoch_boundary.py). ``close()`` (or leaving the ``with``) stops them at once;
loaders still open at interpreter exit are closed then.

Augmentation randomness is seeded per sample from (seed, epoch, position in the epoch's
order), so a resumed run reproduces the same crops. Corrupt samples (undecodable image, bad
label, a shard shorter than its manifest says) are replaced by another sample of the same
batch, so batch sizes never change; each batch lists them in ``batch["skipped"]`` as
(shard URL, reason, count, detail), the loader counts them per reason in ``loader.stats`` and
per shard in ``loader.skipped_by_shard``, and says each damaged shard once on stderr.

``batch["valid"]`` (bool, B) is False for entries that are not a new sample: pad repeats
(``drop_last=False``: every rank yields the same number of full batches) and substitutes for
corrupt samples. Training may use every entry; evaluation counts ``valid`` ones only, which
over all ranks of an epoch are every (readable) sample exactly once. With a transform built
with ``resize="device"`` batches carry ``crops``/``crop_hw``/``flip`` instead of ``image``:
resize them with ``pipelines.data.device_decode.resize_on_device``.
"""
from __future__ import annotations

import atexit
import functools
import os
import signal
import threading
import time
import weakref
from collections import Counter
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.data.epoch_order import EpochCursor, EpochOrder, Partition
from pipelines.data.loader_counters import LoaderCounters
from pipelines.data.sample_rng import SampleRng
from pipelines.storage import traffic
from pipelines.data.shard_cache import ShardCache, ShardList, ShardReader, SpanReader, Unreadable, is_remote
from pipelines.data.transforms import collate_samples

_ShardCursor = ShardReader  # the name tests/reliability/test_fuzz.py reads shards through


ACCESS = ("stream", "random")  # how workers read shards: forward, block by block; or each sample at its byte span


class Skipped(NamedTuple):
    """Samples of one shard a batch could not use: ``reason`` is the ``loader.stats`` key
    ("missing" for a shard shorter than its manifest says, else the error's type name)."""
    url: str
    reason: str
    count: int
    detail: str


class _Missing(NamedTuple):
    url: str
    detail: str
    reason: str = "missing"


class _EpochStream(IterableDataset):
    """One rank's epochs, from (epoch, remaining) on, without end: each DataLoader worker yields
    its contiguous run of each epoch's batches, then ``{"filler": epoch}`` items up to the
    epoch's largest worker share. DataLoader takes items from its workers strictly in turn, so
    with every worker yielding the same count per epoch the turns stay aligned with epochs: the
    rank's batches arrive in `Partition`'s delivery order and no worker runs epochs ahead."""

    def __init__(self, shards, rank: int, world_size: int, readers: int, batch_size: int, drop_last: bool,
                 epoch: int, remaining, transform, seed: int, block_size: int, cache: ShardCache | None = None,
                 access: str = "stream", next_block_size: int | None = None):
        self.shards, self.rank, self.world_size, self.readers = shards, rank, world_size, readers
        self.batch_size, self.drop_last, self.epoch, self.remaining = batch_size, drop_last, epoch, remaining
        self.transform, self.seed, self.block_size, self.cache = transform, seed, block_size, cache
        self.access, self.next_block_size = access, next_block_size or block_size  # the later epochs' block
        self.sample_rng = SampleRng(seed)  # boxes and flips keyed by (seed, epoch, position) alone

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        epoch, remaining, block = self.epoch, self.remaining, self.block_size
        read = self._random_epoch if self.access == "random" else self._epoch
        while True:
            part = Partition(remaining, self.world_size, self.readers, self.batch_size, self.drop_last)
            order = EpochOrder(self.shards.counts, self.seed, epoch, block)
            share = -(-part.batches_per_rank // self.readers)
            for batch in read(part, order, worker):
                yield dict(batch, epoch=epoch)
                share -= 1
            for _ in range(share):
                yield dict(filler=epoch)
            epoch, remaining, block = epoch + 1, ((0, sum(self.shards.counts)),), self.next_block_size

    def _epoch(self, part: Partition, order: EpochOrder, worker: int):
        batches, valid, flat = self._run(part, worker)
        cursor, cache, start = ShardReader(self.shards, self.cache), {}, 0
        before = traffic.snapshot()  # this process's store traffic: each batch carries what it cost
        try:
            for positions, n_valid in zip(batches, valid):
                missing = [g for g in positions if g not in cache]
                if missing:  # read the stream once per block: also this worker's later samples in it
                    blocks = {g // order.block_size for g in missing}
                    window = flat[start:start + len(positions) + 2 * order.block_size]
                    wanted = {g for g in window if g // order.block_size in blocks and g not in cache}
                    for s, g in sorted((order.stream_position(g), g) for g in wanted):
                        shard, index = order.locate(s)
                        sample = cursor.get(shard, index)
                        cache[g] = sample if sample is not None else _Missing(self.shards.urls[shard], cursor.damage)
                start += len(positions)
                store, before = self._store_cost(before, cursor), traffic.snapshot()
                yield dict(self._batch(positions, n_valid, cache, order.epoch), store=store)
        finally:
            cursor.close()

    def _run(self, part: Partition, worker: int):
        """The worker's batches of the epoch (positions of G), their valid counts, and all positions in order."""
        batches = [[g for a, b in batch for g in range(a, b)] for batch in part.worker_batches(self.rank, worker)]
        return batches, part.valid_counts(self.rank, worker), [g for batch in batches for g in batch]

    @staticmethod
    def _store_cost(before, reader) -> dict:
        """This process's store traffic since ``before``, with the shards the reader fetched (then forgotten)."""
        store = dict(traffic.since(before), shards=reader.store_reads)
        reader.store_reads = []
        return store

    def _random_epoch(self, part: Partition, order: EpochOrder, worker: int):
        """access="random": each sample read alone at its byte span (`SpanReader`), in batch order."""
        batches, valid, flat = self._run(part, worker)
        shard_of, index_of = order.samples(flat)
        reader, start = SpanReader(self.shards, self.cache), 0
        before = traffic.snapshot()
        try:
            for positions, n_valid in zip(batches, valid):
                cache = {}
                for j in range(start, start + len(positions)):
                    shard = int(shard_of[j])
                    sample = reader.get(shard, int(index_of[j]))
                    if isinstance(sample, Unreadable):
                        sample = _Missing(self.shards.urls[shard], sample.detail, sample.reason)
                    cache[flat[j]] = sample
                start += len(positions)
                store, before = self._store_cost(before, reader), traffic.snapshot()
                yield dict(self._batch(positions, n_valid, cache, order.epoch), store=store)
        finally:
            reader.close()

    def _batch(self, positions: list[int], n_valid: int, cache, epoch: int) -> dict:
        images, labels, keys = [None] * len(positions), [0] * len(positions), [""] * len(positions)
        valid, bad, why = [i < n_valid for i in range(len(positions))], Counter(), {}
        for i, g in enumerate(positions):
            sample = cache.get(g)  # get: a pad repeat may name a position twice in one batch
            if isinstance(sample, _Missing):
                bad[sample.url, sample.reason] += 1
                why[sample.url, sample.reason] = sample.detail
                continue
            try:
                label = int(sample["cls"])
                rng = self.sample_rng(epoch, g)
                images[i] = self.transform(sample["jpg"], rng)
                labels[i], keys[i] = label, sample["__key__"]
            except (KeyError, ValueError, TypeError, OSError) as e:  # DecodeError is a ValueError
                bad[sample["__url__"], type(e).__name__] += 1
                why[sample["__url__"], type(e).__name__] = f"sample {sample.get('__key__')!r}: {type(e).__name__}: {e}"
        for g in positions:
            cache.pop(g, None)
        good = [i for i, im in enumerate(images) if im is not None]
        if not good:
            raise RuntimeError(f"every sample of a batch at epoch position {positions[0]} is corrupt: "
                               + "; ".join(f"{u}: {d}" for (u, _), d in why.items()))
        for i, im in enumerate(images):  # keep the batch size: substitute a good sample of this batch
            if im is None:
                j = good[i % len(good)]
                images[i], labels[i], keys[i], valid[i] = images[j], labels[j], keys[j], False
        return dict(collate_samples(images), label=torch.tensor(labels, dtype=torch.int64),
                    index=torch.tensor(positions, dtype=torch.int64), valid=torch.tensor(valid), key=keys,
                    skipped=[Skipped(u, r, n, why[u, r]) for (u, r), n in bad.items()])


# --- worker processes: preemption signals vs. shutdown ----------------------------------------
# Launchers (torchrun, Slurm, Kubernetes) send SIGTERM / SIGUSR1 to the whole process tree on
# preemption; a worker that died then would take the trainer down before it saved. So a worker
# outlives those signals while its parent lives and is not shutting down. When the parent is
# shutting down (close(), or interpreter exit after an exception: multiprocessing's exit hook
# then terminates the workers with SIGTERM and joins them), the loader first raises a shared
# flag and the signal ends the worker at once, with exit status 0 (torch reports a worker
# killed by a signal as an error, which would then be the run's last line). No alarm as a
# backstop: the former alarm(60) made every crash wait 60 s at exit and would kill workers under
# a checkpoint save longer than 60 s; a worker whose parent is gone exits within a second.

def _worker_signals(stopping, parent: int, worker_id: int) -> None:
    """worker_init_fn: ``stopping`` is the loader's shared flag, ``parent`` the trainer's pid."""
    def on_stop_signal(signum, frame):
        if stopping.value or os.getppid() != parent:
            os._exit(0)

    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, on_stop_signal)
    # torch's worker watchdog sees a dead parent only between batches; a worker stuck in a
    # retrying S3 read would outlive it by minutes
    threading.Thread(target=_exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


_OPEN_LOADERS: "weakref.WeakSet[StreamingLoader]" = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's and torch's exit hooks, so it runs before them
def _close_open_loaders() -> None:
    for loader in list(_OPEN_LOADERS):
        loader.close()


class StreamingLoader(EpochCursor, LoaderCounters):
    """The rank's loader across epochs; ``state_dict()`` after any batch resumes exactly there."""

    def __init__(self, shards: ShardList, batch_size: int, transform, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, block_size: int = 512, drop_last: bool = True,
                 prefetch_factor: int = 2, cache_dir: str | None = None, cache_bytes: int = 0,
                 pin_memory: bool = False, access: str = "stream"):
        if access not in ACCESS:
            raise ValueError(f"access must be one of {', '.join(ACCESS)}, got {access!r}")
        self.shards, self.batch_size, self._transform, self.access = shards, batch_size, transform, access
        # GPUs: batches in page-locked memory for non_blocking copies (no-op without CUDA)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.block_size, self.drop_last, self.prefetch_factor = seed, block_size, drop_last, prefetch_factor
        self._readers = max(1, num_workers)
        self._reset_counters()
        self._reset_traffic()
        self._stream, self._stopping = None, None
        self.cache = ShardCache(cache_dir, cache_bytes) if cache_dir and cache_bytes > 0 else None
        # the order's block: stream reads ``block_size`` samples shuffled together, random one permutation of the
        # epoch. ``block_size`` is the current epoch's (a resumed state's may differ), _epoch_block the later ones'.
        self._epoch_block = self.num_samples if access == "random" else block_size
        self.block_size = self._epoch_block
        if access == "random":
            self._check_random_access(cache_bytes)
        self._check_not_empty()

    def _check_random_access(self, cache_bytes: int) -> None:
        remote = [u for u in self.shards.urls if is_remote(u)]
        if remote and self.cache is None:
            raise ValueError(f"access='random' reads each sample at its byte offset in a local file, and {remote[0]} "
                             "is remote: give the node a shard cache that holds the data (data.shard_cache_dir and "
                             "data.shard_cache_bytes), or use access='stream'")
        need = sum(size for url, size in zip(self.shards.urls, self.shards.sizes) if is_remote(url))
        if self.cache is not None and remote and self.shards.dataset_bytes is not None and cache_bytes < need:
            raise ValueError(f"access='random' draws every batch from every shard, so the shard cache must hold all "
                             f"of them: {need / 1e9:.3f} GB of shards, cache limit {cache_bytes / 1e9:.3f} GB "
                             "(data.shard_cache_bytes); raise it, or use access='stream'")

    @classmethod
    def from_manifest(cls, manifest_url: str, **kw) -> "StreamingLoader":
        """``manifest_url``: a data-prep manifest, or a brace pattern of any WebDataset tars."""
        return cls(ShardList.from_spec(manifest_url), **kw)

    @property
    def num_samples(self) -> int:
        return sum(self.shards.counts)

    @property
    def dataset_bytes(self) -> int | None:
        return self.shards.dataset_bytes

    @property
    def transform(self):
        return self._transform

    @transform.setter
    def transform(self, transform) -> None:  # running workers hold the old one
        self.close()
        self._transform = transform

    def __iter__(self):
        """One epoch (or what is left of it: after load_state_dict, or a loop left early)."""
        part = self._current if self._stream is not None and self._current is not None else self._begin()
        while self.batches_done < part.batches_per_rank:
            batch = next(self._open())
            if "filler" in batch:  # a worker with fewer batches this epoch than the others
                continue
            epoch = batch.pop("epoch")
            if epoch != self.epoch:
                raise RuntimeError(f"loader workers are in epoch {epoch}, the loader in {self.epoch}")
            self._count(batch)
            self.batches_done += 1
            yield batch
        self._end_epoch()

    def _open(self):
        """The workers' batch stream, started at the current position on first use."""
        if self._stream is None:
            self._stopping = torch.multiprocessing.get_context().RawValue("b", 0)
            ds = _EpochStream(self.shards, self.rank, self.world_size, self._readers, self.batch_size, self.drop_last,
                              self.epoch, self._current.remaining, self._transform, self.seed, self.block_size,
                              self.cache, self.access, self._epoch_block)
            kw = dict(prefetch_factor=self.prefetch_factor, worker_init_fn=functools.partial(
                _worker_signals, self._stopping, os.getpid())) if self.num_workers else {}
            self._stream = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                           pin_memory=self.pin_memory, **kw))
            _OPEN_LOADERS.add(self)
        return self._stream

    def close(self) -> None:
        """Stops the workers now (idempotent). The loader stays usable: the next loop restarts
        them where this one stopped."""
        stream, self._stream = self._stream, None
        _OPEN_LOADERS.discard(self)
        if stream is None:
            return
        self._stopping.value = 1
        shutdown = getattr(stream, "_shutdown_workers", None)  # torch: join, then terminate stragglers
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "StreamingLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

    def _end_epoch(self) -> None:
        super()._end_epoch()
        self.block_size = self._epoch_block  # a resumed state's block held for its own epoch only

    def state_dict(self) -> dict:
        position = self._position()
        block = self.block_size if position["epoch"] == self.epoch else self._epoch_block
        return dict(position, block_size=block, **self._counter_state())

    def load_state_dict(self, state: dict) -> None:
        """The state's epoch keeps the order it was cut with (its block size); the epochs after it
        use this loader's (so a run resumed with another ``access`` or ``block_size`` changes from
        the next epoch on, and never repeats or skips a sample of the current one)."""
        self.close()  # running workers are at another position
        self._load_position(state)
        self.block_size = state["block_size"]
        self._reset_counters(state)
