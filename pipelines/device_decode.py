"""decode="gpu": loader workers ship JPEG bytes, the training device decodes, crops, resizes.

Why: decoding is ~2/3 of a loader worker's ~2,500 us per image (BENCHMARKS.md); a worker that
only reads the header and draws the crop box spends ~30-60 us (benchmarks/transforms.py, row
(i)), and nvJPEG (the A100/H100 hardware decoder behind torchvision's batched
``decode_jpeg(device="cuda")``) does the rest beside the training kernels.

API, for the trainer (pipelines/pretrain.py)::

    transform = MAETrainTransform(size, decode="gpu")    # pass to StreamingLoader (resize="device" implied)
    imgs = batch_to_device(batch, size, device, dtype)   # ANY loader batch: "image" uint8 (CPU resize),
                                                         # "crops" (resize="device"), "jpeg" (decode="gpu")
                                                         # -> (B, 3, size, size) `dtype`, ImageNet-normalised
    stream = DevicePrefetcher(batches, lambda b: (b, batch_to_device(b, size, device, dtype)), device,
                              state_source=loader)       # decodes batch i+1 while step i runs
    for batch, imgs in stream: ...                       # batch["key"], batch["label"], batch["valid"]
    state = stream.state_dict()                          # NOT loader.state_dict(): the loader is one
                                                         # batch ahead; this is the state after `batch`
    stream.stats                                         # loader.stats + samples substituted on the device

Worker side (`encode_sample`): the same header read and the same random draws as the CPU path
(`sample_box_flip`), so the boxes and flips are identical for the same seed, and resume by keys
is unchanged. Baseline / extended-sequential 8-bit JPEGs (grey or YCbCr) that end with an
end-of-image marker go to the device as bytes. Everything else -- progressive (nvJPEG decodes
those one by one on its CPU+GPU hybrid path, under a global lock), CMYK/YCCK (Adobe inversion),
12-bit, lossless/arithmetic, truncated, PNG -- is decoded and cropped in the worker exactly as
resize="device" does, so unreadable ones raise `DecodeError` there and are substituted and
counted by the loader as today.

Batch fields (`EncodedCrop.pack`): ``jpeg`` uint8 (total bytes,) back to back (shared memory in
workers, pinnable), ``jpeg_offsets`` int64 (B+1,), ``jpeg_box`` int64 (B, 4) (top, left, h, w in
full-image pixels), ``flip`` bool (B,), ``cpu_crop_hw`` int64 (B, 2): (0, 0) for bytes to decode,
else the (h, w) of an HWC crop the worker already decoded, stored in the entry's byte span.

Device side (`decode_jpeg_batch`): one batched ``torchvision.io.decode_jpeg(list, RGB,
device)``; if it raises (torchvision returns no partial results), each image alone; an image
the device cannot decode is decoded on the host (simplejpeg/PIL, full resolution); if that
fails too it is replaced by another image of the batch, ``valid`` False, label and key copied,
and counted under ``DecodeError`` as the loader does. On a CPU device the same code runs with
libjpeg-turbo: pixels equal to ``mae_train(dct_scale=False)`` (tests/pipelines/test_device_decode.py).
Region / scaled decode: torchvision exposes neither for nvJPEG, so the full image is decoded.
"""
from __future__ import annotations

import sys
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image

from .transforms import (MAE_RATIO, MAE_SCALE, Crop, DecodeError, _rng, batch_buffer, decode_box, decode_rgb,
                         image_size, normalize_batch, resize_on_device, resize_views, sample_box_flip)
from .jpeg_header import frame_header
from .prefetch import DevicePrefetcher  # noqa: F401 - part of this module's API

_DEVICE_SOF = (0xC0, 0xC1)  # baseline, extended sequential Huffman: nvJPEG's batched (hardware) path


@dataclass
class EncodedCrop(Crop):
    """One decode="gpu" sample: `jpeg` bytes to decode on the device (pixels None), or, for
    what the device should not decode, `pixels` already decoded and cropped by the worker."""

    jpeg: bytes | None = None
    box: tuple[int, int, int, int] = (0, 0, 0, 0)

    @staticmethod
    def pack(samples: list["EncodedCrop"]) -> dict:
        """The batch fields (module docstring): one flat uint8 buffer, written once."""
        spans = [len(s.jpeg) if s.pixels is None else s.pixels.size for s in samples]
        offsets = np.zeros(len(samples) + 1, np.int64)
        np.cumsum(spans, out=offsets[1:])
        flat = batch_buffer((int(offsets[-1]),))
        out = flat.numpy()
        for s, a, b in zip(samples, offsets[:-1], offsets[1:]):
            src = np.frombuffer(s.jpeg, np.uint8) if s.pixels is None else s.pixels.reshape(-1)
            out[a:b] = src  # the one copy of each sample's bytes
        return dict(jpeg=flat, jpeg_offsets=torch.from_numpy(offsets),
                    jpeg_box=torch.tensor([s.box for s in samples], dtype=torch.int64).view(-1, 4),
                    flip=torch.tensor([s.flip for s in samples], dtype=torch.bool),
                    cpu_crop_hw=torch.tensor([(0, 0) if s.pixels is None else s.pixels.shape[:2] for s in samples],
                                             dtype=torch.int64).view(-1, 2))


def start_of_frame(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, sample precision, components), None if broken: the frame type matters here
    (C2 = progressive)."""
    frame = frame_header(data)
    return None if frame is None else frame[:3]


def device_decodable(data: bytes, colorspace: str | None) -> bool:
    """True for what the batched nvJPEG path decodes like libjpeg-turbo: an 8-bit baseline or
    extended-sequential JPEG, grey or YCbCr, that ends with an end-of-image marker (0xFFD9 cannot
    occur in entropy-coded data, so a marker in the last 4 KiB means it was not cut short;
    data_prep's check)."""
    if colorspace not in ("YCbCr", "Gray") or b"\xff\xd9" not in data[-4096:]:
        return False
    frame = start_of_frame(data)
    return frame is not None and frame[0] in _DEVICE_SOF and frame[1] == 8 and frame[2] in (1, 3)


def encode_sample(data: bytes, rng, size: int = 224, scale=MAE_SCALE, ratio=MAE_RATIO, flip_p: float = 0.5,
                  dct_scale: bool = True) -> EncodedCrop:
    """The worker's half of decode="gpu": header, box and flip (the CPU path's draws), then the
    bytes as they are, or -- for what the device should not decode -- the CPU path's crop."""
    rng = _rng(rng)
    try:
        H, W, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, TypeError):
        (H, W), colorspace = image_size(data), None  # not a readable JPEG: PIL's header or DecodeError
    box, flip = sample_box_flip(H, W, rng, scale, ratio, flip_p)
    if H * W > Image.MAX_IMAGE_PIXELS:  # decode_rgb's refusal, before any device allocates it
        raise DecodeError(f"image too large: {W}x{H} pixels (limit {Image.MAX_IMAGE_PIXELS})")
    if device_decodable(data, colorspace):
        return EncodedCrop(None, flip, data, box)
    crop, box = decode_box(data, H, W, box, size, dct_scale)
    return EncodedCrop(np.ascontiguousarray(crop), flip, None, box)


def _decode_on(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """CHW uint8 RGB on `device` per encoded image; None where the device's decoder fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image IO in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad image fails the whole batched call: retry one by one
            out = []
            for e in encoded:
                try:
                    out.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def _skip(batch: dict, i: int, bad: Counter, why: str) -> None:
    """Count a sample no decoder could read, and say so on stderr (the loader's words)."""
    bad["DecodeError"] += 1
    key = batch["key"][i] if "key" in batch else f"#{i}"
    print(f"crossmae loader: warning: sample {key!r}: DecodeError: {why}; replaced by another sample of its "
          f"batch (counted as 'DecodeError' in the prefetcher's stats)", file=sys.stderr, flush=True)


def decode_jpeg_batch(batch: dict, size: int, device="cpu", method: str | None = None) -> tuple[torch.Tensor, Counter]:
    """A decode="gpu" batch -> (uint8 (B, 3, size, size) on `device`, Counter of substitutions).
    Entries no decoder can read are replaced by another entry of the batch (in place in `batch`:
    ``valid`` False, ``label``/``key`` copied), as the loader replaces corrupt samples."""
    device = torch.device(device)
    method = method or ("interpolate" if device.type == "cpu" else "matmul")
    flat, offsets = batch["jpeg"], batch["jpeg_offsets"].tolist()
    boxes, cpu_hw = batch["jpeg_box"].tolist(), batch["cpu_crop_hw"].tolist()
    B = len(boxes)
    on_device = [i for i in range(B) if cpu_hw[i] == [0, 0]]
    images = dict(zip(on_device, _decode_on([flat[offsets[i]:offsets[i + 1]] for i in on_device], device)
                      if on_device else []))
    views, bad = [None] * B, Counter()
    for i in range(B):
        a, b = offsets[i], offsets[i + 1]
        if i not in images:  # the worker decoded and cropped it
            h, w = cpu_hw[i]
            views[i] = flat[a:b].view(h, w, 3).to(device, non_blocking=flat.is_pinned())
            continue
        img = images[i]
        if img is None:  # the device's decoder refused it: the host's, at full resolution
            try:
                img = torch.from_numpy(decode_rgb(flat[a:b].numpy().tobytes())).permute(2, 0, 1).to(device)
            except DecodeError as e:
                _skip(batch, i, bad, f"{e} (the device's decoder refused it too)")
                continue
        top, left, h, w = boxes[i]
        if img.shape[1] < top + h or img.shape[2] < left + w:
            _skip(batch, i, bad, f"decoded {tuple(img.shape[1:])}, smaller than its header's box {boxes[i]}")
            continue
        views[i] = img[:, top:top + h, left:left + w].permute(1, 2, 0)
    good = [i for i, v in enumerate(views) if v is not None]
    if not good:
        raise RuntimeError(f"every sample of a batch is corrupt (keys {batch.get('key', [])[:3]}...)")
    for i in range(B):
        if views[i] is None:  # the loader's rule: a good sample of the same batch takes its place
            j = good[i % len(good)]
            views[i] = views[j]
            batch["flip"][i] = batch["flip"][j]
            if "valid" in batch:
                batch["valid"][i] = False
            if "label" in batch:
                batch["label"][i] = batch["label"][j]
            if "key" in batch:
                batch["key"][i] = batch["key"][j]
    return resize_views(views, batch["flip"], size, device, method), bad


def batch_to_device(batch: dict, cfg_image_size: int, device, dtype=torch.float32) -> torch.Tensor:
    """Any loader batch -> float (B, 3, S, S) `dtype` on `device`, ImageNet-normalised:
    ``image`` (uint8, CPU resize), ``crops`` (resize="device") or ``jpeg`` (decode="gpu").
    Device-side substitutions are recorded in ``batch["corrupt_device"]`` (a Counter)."""
    if "jpeg" in batch:
        u8, bad = decode_jpeg_batch(batch, cfg_image_size, device)
        batch["corrupt_device"] = bad
        return normalize_batch(u8, device, dtype)
    if "crops" in batch:
        return resize_on_device(batch, cfg_image_size, device, dtype)
    if "image" in batch:
        if batch["image"].shape[-1] != cfg_image_size:
            raise ValueError(f"batch images are {batch['image'].shape[-1]} px, the config says {cfg_image_size}")
        return normalize_batch(batch["image"], device, dtype)
    raise ValueError(f"not a loader batch: fields {sorted(batch)}")
