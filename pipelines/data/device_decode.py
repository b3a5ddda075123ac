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

import torch

import torch.nn.functional as F

from pipelines.data.jpeg import DecodeError, decode_rgb
from pipelines.data.transforms import (normalize_batch)


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


def _aa_bicubic_weights(n: torch.Tensor, n_max: int, size: int) -> torch.Tensor:
    """(B, size, n_max) float32: row i of image b holds the taps of output pixel i resizing
    n[b] input pixels to `size` -- aten's `_compute_indices_min_size_weights_aa` (Keys cubic
    a = -0.5, support 2 x the downscale factor, taps inside the image, normalised), with 0
    beyond n[b] (the canvas padding)."""
    n = n.to(torch.float32)[:, None, None]
    scale = n / size
    stretch = scale.clamp(min=1.0)  # antialias: widen the kernel when downscaling only
    support = 2.0 * stretch
    center = scale * (torch.arange(size, device=n.device, dtype=torch.float32)[None, :, None] + 0.5)
    j = torch.arange(n_max, device=n.device, dtype=torch.float32)[None, None, :]
    lo, hi = (center - support + 0.5).floor().clamp(min=0), torch.minimum((center + support + 0.5).floor(), n)
    inside = (j >= lo) & (j < hi)
    x = ((j - center + 0.5) / stretch).abs()
    a = -0.5
    w = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    torch.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, torch.zeros_like(x)))
    w = w * inside
    return w / w.sum(-1, keepdim=True)


def resize_on_device(batch: dict, size: int, device="cpu", dtype=torch.float32, normalize: bool = True,
                     method: str = "matmul") -> torch.Tensor:
    """Resize (antialiased bicubic) and mirror a ``resize="device"`` batch on `device`:
    (B, 3, size, size), normalised `dtype` (as `normalize_batch`) or, with normalize=False,
    uint8 -- the same images `mae_train` makes on the CPU, to rounding.

    method="matmul": batched pairs of matmuls, float32 (about 2 x B x H x W x size x 3 FLOPs,
    ~100 GFLOP for 256 ImageNet crops; TF32 if the caller enabled it: errors stay below half a
    grey level). method="interpolate": torch's antialiased bicubic per image (one kernel launch
    each; the reference, and fastest on a CPU).
    """
    device = torch.device(device)
    flat = batch["crops"].to(device, non_blocking=batch["crops"].is_pinned())
    hw_list = batch["crop_hw"].tolist()  # sizes from the host copy: no device sync
    views, off = [], 0
    for h, w in hw_list:
        views.append(flat[off:off + h * w * 3].view(h, w, 3))
        off += h * w * 3
    out = resize_views(views, batch["flip"], size, device, method)
    return normalize_batch(out, device, dtype) if normalize else out


# Padded canvases are cut into chunks of at most this many float32 elements (256 MiB): one
# 4000x3000 photo in a batch of 256 would otherwise pad every crop to it (37 GB). Crops are
# grouped by area first, so a chunk pads little.
CANVAS_ELEMENTS = 1 << 26


def resize_views(views: list[torch.Tensor], flip: torch.Tensor, size: int, device="cpu",
                 method: str = "matmul") -> torch.Tensor:
    """uint8 (B, 3, size, size) on `device`: each HWC uint8 view (any strides, on `device`)
    resized with antialiased bicubic and mirrored where `flip` (bool (B,), host) says."""
    device = torch.device(device)
    B = len(views)
    flips = flip.tolist()
    out = torch.empty(B, 3, size, size, dtype=torch.uint8, device=device)
    if method == "interpolate":
        for i, v in enumerate(views):
            x = v.contiguous().permute(2, 0, 1)[None]  # channels_last, as mae_train's own resize
            x = x if device.type == "cpu" else x.float()  # the uint8 kernel is CPU-only
            r = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0]
            r = r if r.dtype == torch.uint8 else r.round_().clamp_(0, 255)
            out[i] = r.flip(-1) if flips[i] else r
        return out
    if method != "matmul":
        raise ValueError(f"method must be 'matmul' or 'interpolate', not {method!r}")
    order = sorted(range(B), key=lambda i: views[i].shape[0] * views[i].shape[1])
    chunk, H, W = [], 0, 0
    for i in order + [None]:
        if i is not None:
            h, w = views[i].shape[:2]
            if not chunk or (len(chunk) + 1) * max(H, h) * max(W, w) * 3 <= CANVAS_ELEMENTS:
                chunk, H, W = chunk + [i], max(H, h), max(W, w)
                continue
        idx = torch.tensor(chunk, device=device)
        out.index_copy_(0, idx, _resize_matmul([views[j] for j in chunk], [flips[j] for j in chunk], size, device))
        if i is not None:
            chunk, (H, W) = [i], views[i].shape[:2]
    return out


def _resize_matmul(views: list[torch.Tensor], flips: list[bool], size: int, device: torch.device) -> torch.Tensor:
    """One padded canvas, two batched matmuls: out = Wy @ crop @ Wx^T per image."""
    B, H, W = len(views), max(v.shape[0] for v in views), max(v.shape[1] for v in views)
    canvas = torch.zeros(B, H, W, 3, dtype=torch.float32, device=device)  # pad with finite zeros
    for i, v in enumerate(views):  # B small copies (+ uint8 -> float), launched back to back
        canvas[i, :v.shape[0], :v.shape[1]] = v
    hw = torch.tensor([tuple(v.shape[:2]) for v in views], dtype=torch.int64).to(device, non_blocking=True)
    flip = torch.tensor(flips, dtype=torch.bool).to(device, non_blocking=True)
    wy = _aa_bicubic_weights(hw[:, 0], H, size)
    wx = _aa_bicubic_weights(hw[:, 1], W, size)
    wx = torch.where(flip[:, None, None], wx.flip(1), wx)  # mirrored output = reversed columns
    t = torch.bmm(wy, canvas.view(B, H, W * 3)).view(B, size, W, 3)  # rows: (B,S,W,3)
    t = t.permute(0, 2, 1, 3).reshape(B, W, size * 3)  # columns next: (B,W,S*3), one copy
    out = torch.bmm(wx, t).view(B, size, size, 3).permute(0, 3, 2, 1)  # (B,S_x,S_y,3) -> (B,3,S_y,S_x)
    return out.round_().clamp_(0, 255).to(torch.uint8)
