"""The one loader factory: trainer and evaluation jobs ask for a loader by config and never
learn which format they read. Both formats yield dict batches: ``image`` uint8 (B, 3, S, S)
channels-first, ``label`` int64 (B,), ``index`` int64 (B,) (position in the epoch's order) and
``valid`` bool (B,); normalise on the device with ``pipelines.data.transforms.normalize_batch``.

Every rank yields the same number of full batches. Training drops the ragged tail
(``drop_last``); evaluation pads it with repeats of the rank's own samples, flagged
``valid=False``: an evaluation job counts ``batch["valid"]`` entries only and so sees every
sample exactly once over all ranks. Both formats resume exactly mid-epoch, also with another
world size (``state_dict()`` / ``load_state_dict()``: the epoch and what is left of its order).

One interface for the trainer, both formats: batches also carry ``key`` (list of str; FFCV: the
.beton row) and ``skipped`` (what the batch could not read: (shard, reason, count, detail));
``len(loader)`` is exactly what the next loop yields, ``batches_per_epoch`` a whole epoch's;
``num_samples``, ``epoch``, ``stats`` / ``samples_seen`` / ``skipped`` / ``skipped_fraction`` /
``summary()``; ``close()`` (also ``with build_loader(...) as loader``); a batch larger than a
rank's share of the data raises ``EmptyEpochError`` (a ValueError) when the loader is built;
``pin_memory=True`` gives page-locked batches on CUDA machines (a no-op without CUDA).

``resize="device"`` (WebDataset, training): workers decode and crop only; batches carry
``crops``/``crop_hw``/``flip`` and the trainer calls
``pipelines.data.device_decode.resize_on_device(batch, image_size, device)``.

FFCV reads local files only: the ``.beton`` is staged from any storage URL into a local cache
file, checked against the manifest's sha256, and reused while the hash matches.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from pipelines import storage
from pipelines.data.epoch_order import EpochCursor, EpochOrder
from pipelines.data.shard_names import shard_url
from pipelines.data.transforms import MAETrainTransform, eval_transform
from pipelines.data.loader import LoaderCounters, StreamingLoader
from pipelines.storage.hashing import sha256_of


@dataclass
class LoaderConfig:
    manifest: str  # DST/{split}/manifest.json written by crossmae-prep (wds or ffcv), or a brace pattern of tars
    batch_size: int = 256  # per rank
    num_workers: int = 8
    seed: int = 0
    image_size: int = 224
    drop_last: bool = True
    block_size: int = 512  # WebDataset, access="stream": samples shuffled together per epoch (~2 blocks per worker)
    access: str = "stream"  # WebDataset: "random" reads each sample at its byte span (one permutation per epoch)
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "crossmae", "ffcv")
    shard_cache_dir: str | None = None  # WebDataset: keep remote shards locally for later epochs
    shard_cache_bytes: int = 0  # its size limit (least recently used shards evicted); 0 = off
    resize: str = "cpu"  # training on WebDataset: "device" leaves the resize to resize_on_device
    decode: str = "cpu"  # training on WebDataset: "gpu" ships JPEG bytes + crop boxes, the device decodes
    pin_memory: bool = False  # GPU trainers: batches in page-locked memory for non_blocking copies
    prefetch_factor: int = 2  # WebDataset: batches each worker keeps ready


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
    if os.path.exists(path) and sha256_of(path) == sha256:
        return path
    with storage.open_read(url) as src, storage.open_write(path) as dst:
        while chunk := src.read(8 << 20):
            dst.write(chunk)
    if sha256_of(path) != sha256:
        os.unlink(path)
        raise storage.StorageError(f"{url}: staged copy does not match the manifest's sha256", url)
    return path


class _FFCVLoader(EpochCursor, LoaderCounters):
    """FFCV's Loader in the common batch format, with the WebDataset path's exact, elastic
    mid-epoch resume and interface (len, batches_per_epoch, counters, close, EmptyEpochError).

    The epoch's global order G is a permutation of the .beton's rows drawn from (seed, epoch)
    alone (`EpochOrder` with the file as one shard and one block: random access is cheap
    here; evaluation: the rows in order). `Partition` cuts what is left of G into this rank's
    batches (one 'worker': FFCV's threads deliver batches in order), and FFCV reads exactly
    those rows in that order (see `_ffcv_loader`; FFCV's own distributed mode would reshuffle
    by world size). Batches are always full (pad repeats: valid=False).
    Batches add ``index`` (position in G, as the WebDataset path), ``row`` (the .beton row:
    the data-prep plan's order), ``key`` (the row as a string: a .beton keeps no sample names),
    ``valid`` and ``skipped`` (always empty: FFCV checked every image when it wrote the file).
    FFCV's augmentation draws from its own RNG: a resumed run sees the same samples, not the
    same crops.
    """

    def __init__(self, path: str, cfg: LoaderConfig, train: bool, rank: int, world_size: int):
        from ffcv.reader import Reader

        self.path, self.cfg, self.train, self.rank, self.world_size = path, cfg, train, rank, world_size
        self.seed, self.num_samples, self.batch_size = cfg.seed, int(Reader(path).num_samples), cfg.batch_size
        self.drop_last, self._readers = cfg.drop_last and train, 1
        self.pin_memory = cfg.pin_memory and torch.cuda.is_available()
        self._reset_counters()
        self._reset_traffic()  # stays empty: the .beton is read from local disk
        self._iterator = None
        self._check_not_empty()

    def __iter__(self):
        """One epoch (or what is left of it: after load_state_dict, or a loop left early)."""
        part, bs = self._begin(), self.batch_size
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
            self.close()
            self._iterator = it = iter(loader)  # the order is read here: later changes do not touch this epoch
            try:
                for i, (image, label) in enumerate(it):
                    # a copy (ToTorchImage gives a channels-last view of FFCV's slot buffers, which
                    # it overwrites a few batches later), into page-locked memory on GPU machines
                    pixels = torch.empty(image.shape, dtype=image.dtype, pin_memory=self.pin_memory).copy_(image)
                    r = rows[i * bs:(i + 1) * bs]
                    batch = dict(image=pixels, label=label.long().reshape(-1),
                                 index=torch.from_numpy(positions[i * bs:(i + 1) * bs]), row=torch.from_numpy(r),
                                 key=[str(int(x)) for x in r], valid=torch.arange(bs) < valid[i], skipped=[])
                    self._count(batch)
                    self.batches_done += 1
                    yield batch
            finally:
                self.close()
        self._end_epoch()

    def close(self) -> None:
        """Stops FFCV's prefetch thread when the consumer stops mid-epoch (idempotent)."""
        it, self._iterator = self._iterator, None
        if it is not None:
            it.close()

    def __enter__(self) -> "_FFCVLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict:
        """As StreamingLoader's: the epoch and the not-yet-consumed intervals of its order."""
        return dict(self._position(), **self._counter_state())

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self._load_position(state)
        self._reset_counters(state)


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


def build_loader(cfg: LoaderConfig, train: bool = True, rank: int = 0, world_size: int = 1, transform=None):
    """A loader for the format the manifest names: ``webdataset`` (streaming, exact resume; also a
    brace pattern of tars) or ``ffcv`` (staged locally). ``transform``: a per-sample training
    transform other than MAETrainTransform(image_size, resize, decode) (WebDataset only)."""
    fmt = "webdataset"
    if cfg.manifest.endswith(".json"):
        try:
            manifest = json.loads(storage.read_bytes(cfg.manifest))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{cfg.manifest}: not JSON ({e})") from None
        fmt = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if fmt == "webdataset":
        if not train:
            transform = EvalTransform(cfg.image_size)
        elif transform is None:
            resize = "device" if cfg.decode == "gpu" else cfg.resize
            transform = MAETrainTransform(cfg.image_size, resize=resize, decode=cfg.decode)
        return StreamingLoader.from_manifest(
            cfg.manifest, batch_size=cfg.batch_size, transform=transform, rank=rank, world_size=world_size,
            num_workers=cfg.num_workers, seed=cfg.seed, block_size=cfg.block_size,
            drop_last=cfg.drop_last if train else False, prefetch_factor=cfg.prefetch_factor,
            cache_dir=cfg.shard_cache_dir, cache_bytes=cfg.shard_cache_bytes, pin_memory=cfg.pin_memory,
            access=cfg.access if train else "stream")
    if fmt == "ffcv":
        if train and (cfg.resize != "cpu" or cfg.decode != "cpu" or transform is not None):
            raise ValueError("resize='device', decode='gpu' and other transforms need the WebDataset format "
                             "(FFCV decodes, crops and resizes in its own CPU pipeline)")
        try:
            (shard,) = manifest["shards"]
            name, sha256 = shard["name"], str(shard["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{cfg.manifest}: malformed FFCV shard list, expected one .beton "
                             f"({type(e).__name__}: {e})") from None
        url = shard_url(cfg.manifest, name)  # refuses names that leave the dataset's folder
        return _FFCVLoader(stage_local(url, sha256, cfg.cache_dir), cfg, train, rank, world_size)
    raise ValueError(f"{cfg.manifest}: unknown dataset format {fmt!r} (expected webdataset or ffcv)")
