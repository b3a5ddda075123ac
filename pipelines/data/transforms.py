"""Decode + augmentation for the training and evaluation loaders: raw JPEG bytes in, a uint8
(3, size, size) channels-first tensor out (or float32 normalised with ImageNet mean/std).

The MAE pretraining augmentation is torchvision's RandomResizedCrop(size, scale=(0.2, 1.0),
ratio=(3/4, 4/3), bicubic) + RandomHorizontalFlip(0.5), reproduced in distribution by
`sample_crop` (same algorithm) and made fast by working in this order:

1. read the size from the JPEG header (simplejpeg, ~2 us) and sample the crop box there;
2. decode only the crop's rows and MCU columns with libjpeg-turbo (pipelines.data.crop_decode),
   at a reduced DCT scale 1/2, 1/4 or 1/8 when the crop still has >= `size` pixels each way at
   that scale (skips most IDCT work); progressive/CMYK/odd JPEGs: full decode, counted;
3. resize ONLY the crop, with torch's uint8 antialiased bicubic kernel: the AVX2 port of
   Pillow-SIMD's resampler that torchvision itself uses on tensors, so the result is the
   reference's to within rounding (mean abs error 0.01/255 vs PIL bicubic on the same box,
   tests/pipelines/test_transforms.py). One core, 300x320 crop -> 224: 257 us, vs 1,700 us for
   PIL's bicubic, 176 us for cv2 INTER_CUBIC (no antialiasing: mean error 1.1/255, worst image
   1.9, max 15) and 838 us for cv2 INTER_AREA at a non-integer factor;
4. flip and turn HWC into CHW in one pass into the output buffer (cv2.flip + cv2.split into
   the output planes: 15 us, vs 54 us for a numpy strided copy and 116 us for torch's copy_).

Everything random comes from the numpy Generator (or int seed) passed in per call, so a
sample's augmentation is a pure function of (bytes, seed): what exact resume needs. Loader
workers should call `torch.set_num_threads(1)` (interpolate would otherwise fan out).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info
from PIL import Image

from pipelines.data import crop_decode
from pipelines.data.jpeg import DecodeError, decode_rgb, device_decodable, image_size

try:  # opencv ships with the ffcv extra; without it a numpy copy costs ~40 us more per image
    import cv2

    cv2.setNumThreads(1)
except ImportError:  # pragma: no cover - exercised only where opencv is missing
    cv2 = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAE_SCALE = (0.2, 1.0)
MAE_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_PCT = 0.875  # 224 -> resize shorter side to 256, center crop 224
_tls = threading.local()
try:  # interpolate with out=: lets the resize write into a reused buffer (see _scratch)
    _AA_OUT = torch.ops.aten._upsample_bicubic2d_aa.out
except (AttributeError, RuntimeError):  # pragma: no cover
    _AA_OUT = None


def _rng(rng) -> np.random.Generator:
    # default_rng(seed) costs ~10 us: negligible next to a ~1 ms decode, and per-sample seeds
    # make every augmentation reproducible independently of worker count and order.
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_crop(height: int, width: int, rng, scale=MAE_SCALE, ratio=MAE_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, same algorithm (10
    attempts of uniform area fraction x log-uniform aspect ratio, then the central-crop
    fallback), drawing from a numpy Generator instead of torch's global RNG."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _scratch(name: str, shape: tuple, make) -> object:
    """A per-thread buffer reused while its shape stays the same. Why: on this machine a
    freshly allocated 150 KB torch output costs ~225 us of page faults when first read (the
    allocator hands it back to the OS each time); reused, interpolate takes 186 us instead of
    266 us and the copy out 5 us instead of 230 us (one core, 300x320 crop -> 224)."""
    buf = getattr(_tls, name, None)
    if buf is None or tuple(buf.shape) != shape:
        buf = make(shape)
        setattr(_tls, name, buf)
    return buf


def _resize(hwc: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """HWC uint8 -> HWC uint8, torchvision's antialiased bicubic (torch's AVX2 uint8 kernel).
    The crop is copied to a dense array first: 9 us, vs ~35 us for torch's own strided copy.
    Returns a view of a per-thread scratch buffer: copy it out before the next call."""
    t = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)[None]  # channels_last view
    res = _scratch("resize", (out_h, out_w, 3), lambda s: torch.empty(s, dtype=torch.uint8))
    if _AA_OUT is not None:
        _AA_OUT(t, [out_h, out_w], False, None, None, out=res.permute(2, 0, 1)[None])
    else:  # pragma: no cover - older/newer torch without the out= overload
        res.copy_(F.interpolate(t, size=(out_h, out_w), mode="bicubic", antialias=True)[0].permute(1, 2, 0))
    return res.numpy()


def _to_chw(hwc: np.ndarray, out: torch.Tensor, flip: bool) -> torch.Tensor:
    """Copy (optionally mirrored) HWC into the (3, H, W) contiguous uint8 tensor `out`."""
    o = out.numpy()
    if cv2 is not None:
        src = cv2.flip(hwc, 1, _scratch("flip", hwc.shape, lambda s: np.empty(s, np.uint8))) if flip else hwc
        cv2.split(src, [o[0], o[1], o[2]])  # writes into the output planes
    else:
        np.copyto(o, hwc.transpose(2, 0, 1)[:, :, ::-1] if flip else hwc.transpose(2, 0, 1))
    return out


def _finish(out: torch.Tensor, normalize: bool) -> torch.Tensor:
    return normalize_batch(out[None], "cpu")[0] if normalize else out


def sample_box_flip(height: int, width: int, rng, scale=MAE_SCALE, ratio=MAE_RATIO,
                    flip_p: float = 0.5) -> tuple[tuple[int, int, int, int], bool]:
    """The random draws of one training sample, in their fixed order: the crop box (full-image
    pixels) then the flip. Every path (CPU resize, resize="device", decode="gpu") draws exactly
    these, so all of them crop the very same boxes for the same seed."""
    box = sample_crop(height, width, rng, scale, ratio)
    return box, bool(rng.random() < flip_p)


def decode_box(data: bytes, height: int, width: int, box, size: int = 224,
               dct_scale: bool = True) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(crop, box actually cropped): decode only `box` of `data` (height x width, from its
    header) on the CPU, HWC uint8, not flipped (pipelines.data.crop_decode: the box's rows and
    MCU columns). With dct_scale, decoded at 1/k scale when the crop keeps >= `size` pixels
    each way, the box snapped to that grid (each edge moves <= k/2 full-res px; flooring the
    start and ceiling the end instead measured mean abs error 6.1/255 vs 2.4 snapped, on a
    sharp 9-px checker). Pixels and box are those of the full decode + slice, bit for bit
    (tests/pipelines/test_crop_decode.py); progressive, CMYK and odd JPEGs take that full
    decode, counted in crop_decode.FALLBACKS and said once per reason on stderr."""
    region = crop_decode.decode_crop(data, box, (size, size) if dct_scale else None, (height, width))
    return region.pixels, region.full_res_box(height, width)


def decode_crop(data: bytes, rng, size: int = 224, scale=MAE_SCALE, ratio=MAE_RATIO, flip_p: float = 0.5,
                dct_scale: bool = True) -> tuple[np.ndarray, tuple[int, int, int, int], bool]:
    """The random part of mae_train: (crop, box, flip). `crop` is an HWC uint8 view of the
    decoded image (at 1/k scale when the DCT scaling applies, not yet flipped); `box` is
    (top, left, h, w) in full-image pixels. Same random draws as mae_train, so both paths
    crop the very same boxes."""
    rng = _rng(rng)
    H, W = image_size(data)
    box, flip = sample_box_flip(H, W, rng, scale, ratio, flip_p)
    crop, box = decode_box(data, H, W, box, size, dct_scale)
    return crop, box, flip


def mae_train(data: bytes, rng, size: int = 224, scale=MAE_SCALE, ratio=MAE_RATIO, flip_p: float = 0.5,
              dct_scale: bool = True, normalize: bool = False, out: torch.Tensor | None = None,
              return_params: bool = False):
    """MAE pretraining augmentation of one JPEG: RandomResizedCrop(size, scale, ratio,
    bicubic) then horizontal flip with probability flip_p. `rng`: a numpy Generator or an int
    seed (same bytes + same seed -> same tensor). Returns uint8 (3, size, size) contiguous,
    written into `out` if given (e.g. a row of the batch buffer: no stack copy), or float32
    normalised if `normalize`. return_params adds ((top, left, h, w), flipped): the box
    actually cropped, in full-image pixels. `dct_scale=False` forces a full-resolution decode
    (the reference's exact input). With it on, crops >= 2x `size` each way are decoded at
    1/2-1/8 scale and the box snapped to that grid; measured vs torchvision bicubic on the
    snapped box, mean abs error 1.4/255 on grainy photo-like images, 2.4 on a sharp checker
    texture (the DCT's downscale is a different filter), tests/pipelines/test_transforms.py."""
    crop, box, flip = decode_crop(data, rng, size, scale, ratio, flip_p, dct_scale)
    res = _resize(crop, size, size)
    if out is None:
        out = torch.empty(3, size, size, dtype=torch.uint8)
    _to_chw(res, out, flip)
    result = _finish(out, normalize)
    return (result, box, flip) if return_params else result


def eval_transform(data: bytes, size: int = 224, crop_pct: float = EVAL_CROP_PCT, normalize: bool = False,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Resize the shorter side to int(size / crop_pct) (256 for 224, bicubic, antialiased)
    then center crop `size`, as torchvision's Resize(256) + CenterCrop(224). Same layout as
    mae_train. Full-resolution decode: evaluation numbers should not depend on DCT scaling."""
    img = decode_rgb(data)
    H, W = img.shape[:2]
    short = int(size / crop_pct)
    if H <= W:  # torchvision: shorter side -> short, longer -> int(short * long / shorter)
        nh, nw = short, int(short * W / H)
    else:
        nh, nw = int(short * H / W), short
    res = _resize(img, nh, nw) if (nh, nw) != (H, W) else img
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    if out is None:
        out = torch.empty(3, size, size, dtype=torch.uint8)
    _to_chw(np.ascontiguousarray(res[top:top + size, left:left + size]), out, False)
    return _finish(out, normalize)


@dataclass
class Crop:
    """What a worker hands over for resizing on the device: the HWC uint8 crop (a view of the
    decoded image, not flipped yet) and whether to mirror it."""

    pixels: np.ndarray
    flip: bool


class MAETrainTransform:
    """Picklable callable for loader workers: t(data, seed) -> uint8 (3, size, size).

    ``resize="device"``: the worker only decodes (at reduced DCT scale where the crop allows)
    and crops, returning a `Crop`; the loader packs a batch's crops with `pack_crops` and the
    trainer resizes and flips them on its device with `resize_on_device`. Same boxes, same
    filter (to rounding), ~1/3 less CPU per image (BENCHMARKS.md).

    ``decode="gpu"`` (implies resize on the device): the worker only reads the JPEG header and
    draws the box and flip; the batch carries the JPEG bytes and the trainer decodes them there
    (`pipelines.data.device_decode`: nvJPEG on CUDA, libjpeg-turbo on a CPU device)."""

    def __init__(self, size: int = 224, scale=MAE_SCALE, ratio=MAE_RATIO, flip_p: float = 0.5,
                 dct_scale: bool = True, normalize: bool = False, resize: str | None = None, decode: str = "cpu"):
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be 'cpu' or 'gpu', not {decode!r}")
        if resize is None:
            resize = "device" if decode == "gpu" else "cpu"
        if resize not in ("cpu", "device"):
            raise ValueError(f"resize must be 'cpu' or 'device', not {resize!r}")
        if decode == "gpu" and resize != "device":
            raise ValueError("decode='gpu' resizes on the device: resize must be 'device'")
        self.size, self.resize, self.decode = size, resize, decode
        self.kw = dict(size=size, scale=scale, ratio=ratio, flip_p=flip_p, dct_scale=dct_scale)
        if resize == "cpu":
            self.kw["normalize"] = normalize

    def __call__(self, data: bytes, rng) -> torch.Tensor | Crop:
        if self.decode == "gpu":
            from pipelines.data.transforms import encode_sample  # the worker's half of decode="gpu"

            return encode_sample(data, rng, **self.kw)
        if self.resize == "device":
            crop, _, flip = decode_crop(data, rng, **self.kw)
            return Crop(crop, flip)
        return mae_train(data, rng, **self.kw)


def collate_samples(samples: list) -> dict:
    """The pixel fields of a loader batch from its transform's outputs (one type per batch):
    tensors -> ``image`` (B, 3, S, S) in a shared-memory buffer; `Crop` -> `pack_crops`'s
    fields; `device_decode.EncodedCrop` -> its packed JPEGs. For the loader's batch assembly."""
    first = samples[0]
    if isinstance(first, Crop):
        return pack_crops(samples)
    return dict(image=torch.stack(samples, out=batch_buffer((len(samples), *first.shape), first.dtype)))


def collate(samples):
    """Stack a list of images, or of tuples (image, label, ...) whose other fields become
    tensors (numbers) or lists (anything else). uint8 stays uint8: 4x less to copy and ship
    to the device than float32; normalise there with `normalize_batch`."""
    if isinstance(samples[0], torch.Tensor):
        return torch.stack(samples)
    cols = list(zip(*samples))
    batch = [torch.stack(cols[0])]
    for col in cols[1:]:
        batch.append(torch.tensor(col) if isinstance(col[0], (int, float, np.integer, np.floating)) else list(col))
    return tuple(batch)


_NORM_CACHE: dict = {}


def normalize_batch(batch: torch.Tensor, device="cpu", dtype=torch.float32, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> `dtype` on `device`, (x / 255 - mean) / std. The uint8 batch is
    moved first (pin it for a non-blocking copy), so the 4x larger float never crosses PCIe."""
    device = torch.device(device)
    key = (device, dtype, tuple(mean), tuple(std))
    if key not in _NORM_CACHE:  # one fused multiply-add: x * (1 / (255 std)) - mean / std
        s = torch.tensor(std, dtype=torch.float32)
        m = torch.tensor(mean, dtype=torch.float32)
        _NORM_CACHE[key] = ((1 / (255 * s)).view(3, 1, 1).to(device, dtype), (-m / s).view(3, 1, 1).to(device, dtype))
    scale, shift = _NORM_CACHE[key]
    x = batch.to(device, non_blocking=batch.is_pinned()).to(dtype)
    return torch.addcmul(shift, x, scale)


# --- resizing on the device -------------------------------------------------------------
# The CPU's largest cost after the decode is the resize (~250 us of ~1,200 per image here,
# benchmarks/transforms.py). With resize="device" the workers ship the crops instead, and the
# device resizes the whole batch in two batched matmuls: antialiased bicubic is separable and
# linear, out = Wy @ crop @ Wx^T, with per-image weight matrices built exactly as torch's
# (Pillow's) antialiased bicubic builds its taps. So the filter is the CPU path's own (same
# boxes, same taps; differences are rounding), the canvas padding gets weight 0, upscaling small
# crops works the same, and mirroring is free (reverse Wx's rows).

def batch_buffer(shape: tuple, dtype=torch.uint8) -> torch.Tensor:
    """An empty batch tensor; inside a DataLoader worker it is allocated in shared memory, as
    torch's default_collate does, so sending it to the main process passes a handle instead of
    copying every byte into a fresh shared segment."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    return elem.new(elem._typed_storage()._new_shared(math.prod(shape), device="cpu")).view(shape)


def pack_crops(crops: list[Crop]) -> dict:
    """A batch of crops, back to back: ``crops`` uint8 (sum of h*w*3,) (each crop HWC,
    contiguous), ``crop_hw`` int64 (B, 2), ``flip`` bool (B,). Flat rather than a padded
    (B, Hmax, Wmax, 3) canvas: measured 304 vs 532 KiB per image on 460x400 photos, and every
    byte shipped costs the worker a page fault and a copy into shared memory (a fresh padded
    canvas cost more CPU than the resize it saves); the device pads. A batch of
    `device_decode.EncodedCrop` (a Crop subclass: the loader sends every Crop here) is packed
    by its own `pack` instead."""
    pack = getattr(type(crops[0]), "pack", None)
    if pack is not None:
        return pack(crops)
    hw = [c.pixels.shape[:2] for c in crops]
    sizes = [h * w * 3 for h, w in hw]
    flat = batch_buffer((sum(sizes),))
    out, off = flat.numpy(), 0
    for c, n in zip(crops, sizes):
        out[off:off + n].reshape(c.pixels.shape)[...] = c.pixels  # the one copy of each crop
        off += n
    return dict(crops=flat, crop_hw=torch.tensor(hw, dtype=torch.int64),
                flip=torch.tensor([c.flip for c in crops], dtype=torch.bool))


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
        cut = crop_decode.cut_box(data, box)  # restart cells (crossmae-prep --jpeg-restarts): just the box's
        return EncodedCrop(None, flip, data, box) if cut is None else EncodedCrop(None, flip, *cut)
    crop, box = decode_box(data, H, W, box, size, dct_scale)
    return EncodedCrop(np.ascontiguousarray(crop), flip, None, box)
