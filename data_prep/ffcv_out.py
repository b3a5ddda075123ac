"""FFCV output: one ``{split}.beton`` per split (an RGB image field + an int label field),
written locally, then uploaded through the storage layer, with the same manifest schema as
the WebDataset output (``format: ffcv``, the .beton as the one shard).

FFCV stores decoded-and-re-encoded (or raw) pixels, so originals are not kept here; images
are checked first so rejects are counted, never written. Samples go in the plan's shuffled
order. A .beton is one file: multi-machine workers are a WebDataset feature.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines import storage

from .images import check_image
from .plan import make_plan, plan_digest
from .sources import SourceListing, read_item


@dataclass(frozen=True)
class FFCVOptions:
    write_mode: str = "smart"  # FFCV's: raw | jpg | smart | proportion
    max_resolution: int = 512  # longer side stored
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # for write_mode=proportion


class _Checked:
    """Indexable dataset FFCV's writer pulls from (in worker processes): decoded RGB + label."""

    def __init__(self, items, validate):
        self.items, self.validate = items, validate

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        checked = check_image(read_item(item), self.validate)
        img = Image.open(io.BytesIO(checked.data)).convert("RGB")
        return np.asarray(img), int(item.label)


def ffcv_plan(listing: SourceListing, seed: int, validate: str, ffcv_opts: FFCVOptions):
    """(the one shuffled 'shard', options, digest) of a split's .beton."""
    (shard,) = make_plan([it.size for it in listing.items], listing.split, seed, shard_samples=len(listing.items))
    options = dict(seed=seed, validate=validate, format="ffcv", **ffcv_opts.__dict__)
    return shard, options, plan_digest([it.key for it in listing.items], [shard], options)


def write_ffcv_split(listing: SourceListing, dst: str, seed: int, validate: str, ffcv_opts: FFCVOptions,
                     processes: int = 1) -> dict:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    t0 = time.time()
    split_url = storage.join(dst, listing.split)
    name = f"{listing.split}.beton"
    shard, options, digest = ffcv_plan(listing, seed, validate, ffcv_opts)
    ordered = [listing.items[i] for i in shard.items]
    rejects, converted, keep = list(listing.rejects), [], []
    for i, item in enumerate(ordered):
        try:
            checked = check_image(read_item(item), validate)
        except OSError as e:
            rejects.append(dict(key=item.key, path=item.location, reason=f"unreadable: {e}"))
            continue
        if checked.status == "rejected":
            rejects.append(dict(key=item.key, path=item.location, reason=checked.reason))
            continue
        if checked.status == "converted":
            converted.append(dict(key=item.key, path=item.location, reason=checked.reason))
        keep.append(i)
    with tempfile.TemporaryDirectory(prefix="crossmae-ffcv-") as tmp:
        path = os.path.join(tmp, name)
        fields = dict(image=RGBImageField(write_mode=ffcv_opts.write_mode, max_resolution=ffcv_opts.max_resolution,
                                          jpeg_quality=ffcv_opts.jpeg_quality,
                                          compress_probability=ffcv_opts.compress_probability),
                      label=IntField())
        writer = DatasetWriter(path, fields, num_workers=max(1, processes))
        writer.from_indexed_dataset(_Checked(ordered, validate), indices=keep, chunksize=64)
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        size = os.path.getsize(path)
        with open(path, "rb") as f, storage.open_write(storage.join(split_url, name)) as out:
            while chunk := f.read(8 << 20):
                out.write(chunk)
    return dict(name=name, num_samples=len(keep), bytes=size, sha256=sha.hexdigest(), plan_digest=digest,
                options=options, rejects=rejects, converted=converted, seconds=round(time.time() - t0, 3))
