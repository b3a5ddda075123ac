"""The one loader factory: trainer and evaluation jobs ask for a loader by config and never
learn which format they read. Both formats yield dict batches: ``image`` uint8 (B, 3, S, S)
channels-first, ``label`` int64 (B,); normalise on the device with
``pipelines.transforms.normalize_batch``.

FFCV reads local files only: the ``.beton`` is staged from any storage URL into a local cache
file, checked against the manifest's sha256, and reused while the hash matches.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
import torch

from . import storage
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
    """FFCV's Loader wrapped to the common batch format. Resume is per epoch (FFCV has no
    mid-epoch state); the epoch's order is seeded by (seed, epoch)."""

    def __init__(self, path: str, cfg: LoaderConfig, train: bool, rank: int, world_size: int):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

        size = (cfg.image_size, cfg.image_size)
        image = ([RandomResizedCropRGBImageDecoder(size, scale=(0.2, 1.0)), RandomHorizontalFlip()] if train
                 else [CenterCropRGBImageDecoder(size, ratio=0.875)])
        self.epoch = 0
        self._make = lambda: Loader(
            path, batch_size=cfg.batch_size, num_workers=max(1, cfg.num_workers),
            order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, distributed=world_size > 1,
            seed=cfg.seed + self.epoch, drop_last=cfg.drop_last and train,
            pipelines={"image": image + [ToTensor(), ToTorchImage()], "label": [IntDecoder(), ToTensor(), Squeeze()]})

    def __iter__(self):
        for image, label in self._make():
            yield dict(image=image.contiguous(), label=label.long().reshape(-1))
        self.epoch += 1

    def __len__(self) -> int:
        return len(self._make())

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch)

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]


def build_loader(cfg: LoaderConfig, train: bool = True, rank: int = 0, world_size: int = 1):
    """A loader for the format the manifest names: ``webdataset`` (streaming, exact resume) or
    ``ffcv`` (staged locally)."""
    manifest = json.loads(storage.read_bytes(cfg.manifest))
    fmt = manifest.get("format")
    if fmt == "webdataset":
        transform = MAETrainTransform(cfg.image_size) if train else EvalTransform(cfg.image_size)
        return StreamingLoader.from_manifest(
            cfg.manifest, batch_size=cfg.batch_size, transform=transform, rank=rank, world_size=world_size,
            num_workers=cfg.num_workers, seed=cfg.seed, block_size=cfg.block_size,
            drop_last=cfg.drop_last if train else False, cache_dir=cfg.shard_cache_dir,
            cache_bytes=cfg.shard_cache_bytes)
    if fmt == "ffcv":
        shard = manifest["shards"][0]
        url = storage.join(cfg.manifest.rsplit("/", 1)[0], shard["name"])
        return _FFCVLoader(stage_local(url, shard["sha256"], cfg.cache_dir), cfg, train, rank, world_size)
    raise ValueError(f"{cfg.manifest}: unknown dataset format {fmt!r} (expected webdataset or ffcv)")
