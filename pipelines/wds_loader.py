"""Streaming WebDataset loader with equal batches per rank and exact, elastic mid-epoch resume.

Reads standard WebDataset tars (``{key}.jpg`` + ``{key}.cls``) listed in a data-prep manifest,
from local paths or S3 through the storage layer (streaming GETs that retry and resume at the
byte they stopped; no ``pipe:`` subprocesses), with webdataset's own tar iterator and
key grouping. Who reads what, and the resume state, come from ``pipelines.epoch_order``.

    loader = StreamingLoader.from_manifest("s3://b/in1k/train/manifest.json", batch_size=256,
                                           rank=rank, world_size=world, num_workers=8, seed=0,
                                           transform=MAETrainTransform(224))
    for batch in loader:             # one epoch: batch["image"] uint8 (B,3,224,224), ["label"]
        ...                          # ["index"] epoch positions, ["valid"] False for pad repeats
    state = loader.state_dict()      # save with the checkpoint; load_state_dict() after restart

Augmentation randomness is seeded per sample from (seed, epoch, position in the epoch's
order), so a resumed run reproduces the same crops. Corrupt samples (undecodable image, bad
label, a shard shorter than its manifest says) are replaced by another sample of the same
batch, so batch sizes never change, and counted in ``loader.stats``.

``batch["valid"]`` (bool, B) is False for entries that are not a new sample: pad repeats
(``drop_last=False``: every rank yields the same number of full batches) and substitutes for
corrupt samples. Training may use every entry; evaluation counts ``valid`` ones only, which
over all ranks of an epoch are every (readable) sample exactly once. With a transform built
with ``resize="device"`` batches carry ``crops``/``crop_hw``/``flip`` instead of ``image``:
resize them with ``pipelines.transforms.resize_on_device``.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
from braceexpand import braceexpand
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from . import storage
from .epoch_order import EpochOrder, Partition, total
from .shard_cache import ShardCache
from .transforms import Crop, batch_buffer, pack_crops


@dataclass(frozen=True)
class ShardList:
    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @classmethod
    def from_manifest(cls, manifest_url: str) -> "ShardList":
        try:
            m = json.loads(storage.read_bytes(manifest_url))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{manifest_url}: not JSON ({e})") from None
        fmt = m.get("format") if isinstance(m, dict) else type(m).__name__
        if fmt != "webdataset":
            raise ValueError(f"{manifest_url}: not a WebDataset manifest (format={fmt!r})")
        try:
            shards = [(str(s["name"]), int(s["num_samples"])) for s in m["shards"]]
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{manifest_url}: malformed shard list ({type(e).__name__}: {e})") from None
        for name, n in shards:
            if n < 0 or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"{manifest_url}: bad shard entry {name!r} ({n} samples)")
        base = manifest_url.rsplit("/", 1)[0]
        return cls(tuple(storage.join(base, n) for n, _ in shards), tuple(n for _, n in shards))

    @classmethod
    def from_pattern(cls, pattern: str) -> "ShardList":
        """Any WebDataset shards named by a brace pattern (``s3://b/train-{000000..000099}.tar``).
        Without a manifest the sample counts are unknown: each shard is streamed once to count
        its samples (write a manifest with crossmae-prep to skip this)."""
        urls = tuple(braceexpand(pattern))
        counts = []
        for url in urls:
            with storage.open_read(url) as f:
                counts.append(sum(1 for _ in group_by_keys(dict(m, __url__=url) for m in tar_file_iterator(f))))
        return cls(urls, tuple(counts))

    @classmethod
    def from_spec(cls, spec: str) -> "ShardList":
        """A manifest URL (``.../manifest.json``) or a brace pattern of tar URLs."""
        return cls.from_manifest(spec) if spec.endswith(".json") else cls.from_pattern(spec)


class _ShardCursor:
    """Reads samples of one epoch's shard stream forward, skipping (not decoding) what it passes."""

    def __init__(self, shards: ShardList, cache: ShardCache | None = None):
        self.shards, self.shard, self.next_index, self.samples, self.file = shards, None, 0, None, None
        self.cache = cache

    def _open(self, shard: int) -> None:
        self.close()
        url = self.shards.urls[shard]
        self.file = self.cache.open(url) if self.cache else storage.open_read(url)
        self.samples = group_by_keys(dict(f, __url__=url) for f in tar_file_iterator(self.file))
        self.shard, self.next_index = shard, 0

    def get(self, shard: int, index: int) -> dict | None:
        if shard != self.shard or index < self.next_index:
            self._open(shard)
        sample = None
        while self.next_index <= index:
            try:
                sample = next(self.samples, None)
            except (tarfile.TarError, ValueError):  # truncated / damaged tar: the rest of the shard is unreadable
                sample = None
            self.next_index += 1
            if sample is None:  # shard shorter than the manifest says
                self.next_index = self.shards.counts[shard] + 1
                return None
        return sample

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = None


class _EpochStream(IterableDataset):
    """One rank's part of one epoch; each DataLoader worker yields its contiguous run of batches."""

    def __init__(self, shards, partition: Partition, order: EpochOrder, rank: int, transform, seed: int,
                 cache: ShardCache | None = None):
        self.shards, self.partition, self.order, self.rank = shards, partition, order, rank
        self.transform, self.seed, self.cache = transform, seed, cache

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        batches = [[g for a, b in batch for g in range(a, b)] for batch in self.partition.worker_batches(self.rank, worker)]
        valid = self.partition.valid_counts(self.rank, worker)
        flat = [g for batch in batches for g in batch]
        cursor, cache, start = _ShardCursor(self.shards, self.cache), {}, 0
        try:
            for positions, n_valid in zip(batches, valid):
                missing = [g for g in positions if g not in cache]
                if missing:  # read the stream once per block: also this worker's later samples in it
                    blocks = {g // self.order.block_size for g in missing}
                    window = flat[start:start + len(positions) + 2 * self.order.block_size]
                    self._fetch({g for g in window if g // self.order.block_size in blocks and g not in cache},
                                cursor, cache)
                start += len(positions)
                yield self._batch(positions, n_valid, cache)
        finally:
            cursor.close()

    def _fetch(self, positions, cursor, cache) -> None:
        for s, g in sorted((self.order.stream_position(g), g) for g in positions):
            cache[g] = cursor.get(*self.order.locate(s))

    def _batch(self, positions: list[int], n_valid: int, cache) -> dict:
        images, labels, keys, bad = [None] * len(positions), [0] * len(positions), [""] * len(positions), Counter()
        valid = [i < n_valid for i in range(len(positions))]
        for i, g in enumerate(positions):
            sample = cache.get(g)  # get: a pad repeat may name a position twice in one batch
            if sample is None:
                bad["missing"] += 1
                continue
            try:
                label = int(sample["cls"])
                rng = np.random.default_rng([self.seed, self.order.epoch, g])
                images[i] = self.transform(sample["jpg"], rng)
                labels[i], keys[i] = label, sample["__key__"]
            except (KeyError, ValueError, TypeError, OSError) as e:  # DecodeError is a ValueError
                bad[type(e).__name__] += 1
        for g in positions:
            cache.pop(g, None)
        good = [i for i, im in enumerate(images) if im is not None]
        if not good:
            raise RuntimeError(f"every sample of a batch at epoch position {positions[0]} is corrupt")
        for i, im in enumerate(images):  # keep the batch size: substitute a good sample of this batch
            if im is None:
                j = good[i % len(good)]
                images[i], labels[i], keys[i], valid[i] = images[j], labels[j], keys[j], False
        if isinstance(images[0], Crop):
            pixels = pack_crops(images)
        else:
            pixels = dict(image=torch.stack(images, out=batch_buffer((len(images), *images[0].shape), images[0].dtype)))
        return dict(pixels, label=torch.tensor(labels, dtype=torch.int64),
                    index=torch.tensor(positions, dtype=torch.int64), valid=torch.tensor(valid), key=keys,
                    corrupt=dict(bad))


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers outlive SIGTERM / SIGUSR1 by 60 s: launchers (torchrun, Slurm, Kubernetes)
    signal the whole process tree on preemption, and the trainer must get to save its checkpoint
    first (a worker killed at once takes the trainer down with it). Not ignored for good: at
    interpreter exit multiprocessing terminates leftover workers with SIGTERM and waits for them."""
    import signal

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda *_: signal.alarm(60))  # SIGALRM's default action ends the worker


class StreamingLoader:
    """The rank's loader across epochs; ``state_dict()`` after any batch resumes exactly there."""

    def __init__(self, shards: ShardList, batch_size: int, transform, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, block_size: int = 512, drop_last: bool = True,
                 prefetch_factor: int = 2, cache_dir: str | None = None, cache_bytes: int = 0,
                 pin_memory: bool = False):
        self.shards, self.batch_size, self.transform = shards, batch_size, transform
        self.pin_memory = pin_memory  # GPUs: batches in page-locked memory for non_blocking copies
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.block_size, self.drop_last, self.prefetch_factor = seed, block_size, drop_last, prefetch_factor
        self.epoch, self.remaining, self.batches_done = 0, None, 0
        self.stats: Counter = Counter()
        self.cache = ShardCache(cache_dir, cache_bytes) if cache_dir and cache_bytes > 0 else None

    @classmethod
    def from_manifest(cls, manifest_url: str, **kw) -> "StreamingLoader":
        """``manifest_url``: a data-prep manifest, or a brace pattern of any WebDataset tars."""
        return cls(ShardList.from_spec(manifest_url), **kw)

    @property
    def num_samples(self) -> int:
        return sum(self.shards.counts)

    def _partition(self) -> Partition:
        remaining = self.remaining if self.remaining is not None else [(0, self.num_samples)]
        return Partition(tuple(tuple(iv) for iv in remaining), self.world_size, max(1, self.num_workers),
                         self.batch_size, self.drop_last)

    def __len__(self) -> int:
        return self._partition().batches_per_rank

    def __iter__(self):
        """One epoch (or what is left of it after load_state_dict)."""
        part = self._partition()
        self._current, self.batches_done = part, 0
        order = EpochOrder(self.shards.counts, self.seed, self.epoch, self.block_size)
        ds = _EpochStream(self.shards, part, order, self.rank, self.transform, self.seed, self.cache)
        kw = dict(prefetch_factor=self.prefetch_factor, persistent_workers=False) if self.num_workers else {}
        for batch in DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                worker_init_fn=_ignore_stop_signals if self.num_workers else None, **kw):
            self.stats.update(batch.pop("corrupt"))
            self.stats["samples"] += len(batch["label"])
            self.batches_done += 1
            yield batch
        self.epoch, self.remaining, self.batches_done, self._current = self.epoch + 1, None, 0, None

    def state_dict(self) -> dict:
        part = getattr(self, "_current", None)
        remaining = part.remaining_after(self.batches_done) if part is not None else (
            self.remaining if self.remaining is not None else [(0, self.num_samples)])
        epoch = self.epoch
        if part is not None and not remaining:  # the epoch's last batch was consumed
            epoch, remaining = epoch + 1, [(0, self.num_samples)]
        return dict(epoch=epoch, seed=self.seed, block_size=self.block_size, num_samples=self.num_samples,
                    samples_consumed=self.num_samples - total(remaining), remaining=[list(iv) for iv in remaining],
                    stats=dict(self.stats))

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"loader state is for {state['num_samples']} samples, the data has {self.num_samples}")
        self.epoch, self.seed, self.block_size = state["epoch"], state["seed"], state["block_size"]
        self.remaining = [tuple(iv) for iv in state["remaining"]]
        self.stats = Counter(state.get("stats", {}))
        self._current, self.batches_done = None, 0
