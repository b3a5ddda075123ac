"""The one loader factory: trainer and evaluation jobs ask for a loader by config and never
learn which format they read. Both formats yield dict batches: ``image`` uint8 (B, 3, S, S)
channels-first, ``label`` int64 (B,), ``index`` int64 (B,) (position in the epoch's order) and
``valid`` bool (B,); normalise on the device with ``pipelines.transforms.normalize_batch``.

Every rank yields the same number of full batches. Training drops the ragged tail
(``drop_last``); evaluation pads it with repeats of the rank's own samples, flagged
``valid=False``: an evaluation job counts ``batch["valid"]`` entries only and so sees every
sample exactly once over all ranks. Both formats resume exactly mid-epoch, also with another
world size (``state_dict()`` / ``load_state_dict()``: the epoch and what is left of its order).

``resize="device"`` (WebDataset, training): workers decode and crop only; batches carry
``crops``/``crop_hw``/``flip`` and the trainer calls
``pipelines.transforms.resize_on_device(batch, image_size, device)``.

FFCV reads local files only: the ``.beton`` is staged from any storage URL into a local cache
file, checked against the manifest's sha256, and reused while the hash matches.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from . import storage
from .epoch_order import EpochOrder, Partition, total
from .transforms import MAETrainTransform, eval_transform
from .wds_loader import StreamingLoader


@dataclass
class LoaderConfig:
    manifest: str  # DST/{split}/manifest.json written by crossmae-prep (wds or ffcv)
    batch_size: int = 256  # per rank
    num_workers: int = 8
    seed: int = 0
    image_size: int = 224
    drop_last: bool = True
    block_size: int = 512  # WebDataset: samples shuffled together per epoch (memory: ~2 blocks per worker)
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "crossmae", "ffcv")
    shard_cache_dir: str | None = None  # WebDataset: keep remote shards locally for later epochs
    shard_cache_bytes: int = 0  # its size limit (least recently used shards evicted); 0 = off
    resize: str = "cpu"  # training on WebDataset: "device" leaves the resize to resize_on_device


class EvalTransform:
    """Picklable: resize the shorter side to size/0.875, center crop (no randomness)."""

    def __init__(self, size: int = 224):
        self.size = size

    def __call__(self, data: bytes, rng=None) -> torch.Tensor:
        return eval_transform(data, self.size)


def stage_local(url: str, sha256: str, cache_dir: str) -> str:
    """A local copy of ``url`` whose sha256 matches, downloaded only when needed (atomic)."""
    if "://" not in url or url.startswith("file://"):
        return url.removeprefix("file://")
    path = os.path.join(cache_dir, sha256[:16] + "-" + url.rsplit("/", 1)[-1])
    if os.path.exists(path) and _sha256(path) == sha256:
        return path
    with storage.open_read(url) as src, storage.open_write(path) as dst:
        while chunk := src.read(8 << 20):
            dst.write(chunk)
    if _sha256(path) != sha256:
        os.unlink(path)
        raise storage.StorageError(f"{url}: staged copy does not match the manifest's sha256", url)
    return path


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _FFCVLoader:
    """FFCV's Loader in the common batch format, with the WebDataset path's exact, elastic
    mid-epoch resume.

    The epoch's global order G is a permutation of the .beton's rows drawn from (seed, epoch)
    alone (`EpochOrder` with the file as one shard and one block: random access is cheap
    here; evaluation: the rows in order). `Partition` cuts what is left of G into this rank's
    batches (one 'worker': FFCV's threads deliver batches in order), and FFCV reads exactly
    those rows in that order (see `_ffcv_loader`; FFCV's own distributed mode would reshuffle
    by world size). Batches are always full (pad repeats: valid=False).
    Batches add ``index`` (position in G, as the WebDataset path), ``row`` (the .beton row:
    the data-prep plan's order) and ``valid``. FFCV's augmentation draws from its own RNG:
    a resumed run sees the same samples, not the same crops.
    """

    def __init__(self, path: str, cfg: LoaderConfig, train: bool, rank: int, world_size: int):
        from ffcv.reader import Reader

        self.path, self.cfg, self.train, self.rank, self.world_size = path, cfg, train, rank, world_size
        self.seed, self.num_samples = cfg.seed, int(Reader(path).num_samples)
        self.drop_last = cfg.drop_last and train
        self.epoch, self.remaining, self.batches_done, self._current = 0, None, 0, None

    def _partition(self) -> Partition:
        remaining = self.remaining if self.remaining is not None else [(0, self.num_samples)]
        return Partition(tuple(tuple(iv) for iv in remaining), self.world_size, 1, self.cfg.batch_size,
                         self.drop_last)

    def __len__(self) -> int:
        return self._partition().batches_per_rank

    def __iter__(self):
        """One epoch (or what is left of it after load_state_dict)."""
        part, bs = self._partition(), self.cfg.batch_size
        self._current, self.batches_done = part, 0
        n = self.num_samples
        order = (EpochOrder((n,), self.seed, self.epoch, block_size=n).block_permutation(0) if self.train
                 else np.arange(n))
        batches = part.worker_batches(self.rank, 0)
        positions = np.concatenate([np.arange(a, b, dtype=np.int64) for batch in batches for a, b in batch] or
                                   [np.zeros(0, np.int64)])
        rows = order[positions].astype(np.int64)
        if len(rows):
            valid = part.valid_counts(self.rank, 0)
            loader = _ffcv_loader(self.path, bs, max(1, self.cfg.num_workers), self.train, self.cfg.image_size)
            loader.traversal_order.indices = rows.astype(np.uint64)
            it = iter(loader)  # the order is read here: later changes do not touch this epoch
            try:
                for i, (image, label) in enumerate(it):
                    self.batches_done += 1
                    # contiguous() copies (ToTorchImage gives a channels-last view of FFCV's
                    # slot buffers, which it overwrites a few batches later)
                    yield dict(image=image.contiguous(), label=label.long().reshape(-1),
                               index=torch.from_numpy(positions[i * bs:(i + 1) * bs]),
                               row=torch.from_numpy(rows[i * bs:(i + 1) * bs]), valid=torch.arange(bs) < valid[i])
            finally:
                it.close()  # stops FFCV's prefetch thread when the consumer stops mid-epoch
        self.epoch, self.remaining, self.batches_done, self._current = self.epoch + 1, None, 0, None

    def state_dict(self) -> dict:
        """As StreamingLoader's: the epoch and the not-yet-consumed intervals of its order."""
        part = self._current
        remaining = part.remaining_after(self.batches_done) if part is not None else (
            self.remaining if self.remaining is not None else [(0, self.num_samples)])
        epoch = self.epoch
        if part is not None and not remaining:  # the epoch's last batch was consumed
            epoch, remaining = epoch + 1, [(0, self.num_samples)]
        return dict(epoch=epoch, seed=self.seed, num_samples=self.num_samples,
                    samples_consumed=self.num_samples - total(remaining), remaining=[list(iv) for iv in remaining])

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"loader state is for {state['num_samples']} samples, the data has {self.num_samples}")
        self.epoch, self.seed = state["epoch"], state.get("seed", self.seed)
        self.remaining = [tuple(iv) for iv in state["remaining"]]
        self._current, self.batches_done = None, 0


@functools.lru_cache(maxsize=8)
def _ffcv_loader(path: str, batch_size: int, num_workers: int, train: bool, image_size: int):
    """One FFCV Loader per process and configuration, reused for every epoch and restart: each
    new Loader compiles its pipeline with numba again (3-8 s here). SEQUENTIAL, not distributed:
    an epoch reads ``loader.traversal_order.indices`` as given (ffcv 1.0.2
    traversal_order/sequential.py), so setting it to the rank's rows is what
    Loader(indices=rows, ...) would do, without the rebuild. Built with every row, which sets
    FFCV's len() (ceil(N / batch), drop_last=False) that caps each epoch's order: a rank never
    has more batches."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    size = (image_size, image_size)
    image = ([RandomResizedCropRGBImageDecoder(size, scale=(0.2, 1.0)), RandomHorizontalFlip()] if train
             else [CenterCropRGBImageDecoder(size, ratio=0.875)])
    return Loader(path, batch_size=batch_size, num_workers=num_workers, order=OrderOption.SEQUENTIAL, distributed=False,
                  drop_last=False, pipelines={"image": image + [ToTensor(), ToTorchImage()],
                                              "label": [IntDecoder(), ToTensor(), Squeeze()]})


def build_loader(cfg: LoaderConfig, train: bool = True, rank: int = 0, world_size: int = 1):
    """A loader for the format the manifest names: ``webdataset`` (streaming, exact resume) or
    ``ffcv`` (staged locally)."""
    manifest = json.loads(storage.read_bytes(cfg.manifest))
    fmt = manifest.get("format")
    if fmt == "webdataset":
        transform = MAETrainTransform(cfg.image_size, resize=cfg.resize) if train else EvalTransform(cfg.image_size)
        return StreamingLoader.from_manifest(
            cfg.manifest, batch_size=cfg.batch_size, transform=transform, rank=rank, world_size=world_size,
            num_workers=cfg.num_workers, seed=cfg.seed, block_size=cfg.block_size,
            drop_last=cfg.drop_last if train else False, cache_dir=cfg.shard_cache_dir,
            cache_bytes=cfg.shard_cache_bytes)
    if fmt == "ffcv":
        if cfg.resize != "cpu" and train:
            raise ValueError("resize='device' needs the WebDataset format (FFCV's decoder resizes on the CPU)")
        shard = manifest["shards"][0]
        url = storage.join(cfg.manifest.rsplit("/", 1)[0], shard["name"])
        return _FFCVLoader(stage_local(url, shard["sha256"], cfg.cache_dir), cfg, train, rank, world_size)
    raise ValueError(f"{cfg.manifest}: unknown dataset format {fmt!r} (expected webdataset or ffcv)")
