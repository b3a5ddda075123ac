"""Decode only what a RandomResizedCrop box needs: its rows and MCU columns, at the DCT scale the
crop allows (the C extension `_crop_decode`, libjpeg-turbo's jpeg_skip_scanlines and
jpeg_crop_scanline). The pixels and the box are those of today's path (pipelines.data.transforms'
decode_rgb + decode_box: full decode at 1/k, then slice), bit for bit; only the work differs.

    r = decode_crop(jpeg, (top, left, h, w), min_size=224, image_hw=(H, W))
    r.pixels    # (h', w', 3) uint8 RGB: the box of the 1/r.scale image
    r.box       # (top', left', h', w') of r.pixels in 1/r.scale-image pixels
    r.full_res_box(H, W)   # the same box in full-image pixels (what the resize reference crops)
    r.fallback  # None, or why the full decode ran ("progressive: ...", "CMYK", ...)

A JPEG with restart markers that tile its MCU grid (`crossmae-prep --jpeg-restarts` writes them;
add_restarts below) is first cut, without decoding, into a smaller JPEG of just the cells around
the box, so the Huffman pass over the rows above the box and the columns beside it goes too.

Progressive, arithmetic-coded, CMYK/YCCK, 12-bit, truncated (no end marker) and otherwise odd
JPEGs, non-JPEG bytes, and every image when the extension was not built, take today's full
decode instead; each is counted in `FALLBACKS` (reason -> images, this process) and named in
`Region.fallback`, so a loader can count them per batch. Bytes that today's path cannot decode
raise its DecodeError here too.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipelines.data.jpeg import decode_rgb, image_size

try:
    from pipelines.data import _crop_decode
    EXTENSION_ERROR = None
except ImportError as e:  # not built (no libjpeg headers at install time): full decode, counted
    _crop_decode, EXTENSION_ERROR = None, str(e)

FALLBACKS: Counter = Counter()  # reason -> images this process decoded in full instead
_SAID: dict[str, int] = {}  # reason -> the pid that said it on stderr
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"


class Region(NamedTuple):
    pixels: np.ndarray  # (h, w, 3) uint8 RGB
    box: tuple[int, int, int, int]  # (top, left, h, w) of pixels in the 1/scale image
    scale: int  # k: the image was decoded at 1/k, k in (1, 2, 4, 8)
    fallback: str | None  # None: partial decode; else why the full decode ran

    def full_res_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The box in full-image pixels, as today's decode_box returns it (edges clipped)."""
        y0, x0, h, w = self.box
        k = self.scale
        return y0 * k, x0 * k, min(height, (y0 + h) * k) - y0 * k, min(width, (x0 + w) * k) - x0 * k


def dct_scale(height: int, width: int, box, min_size) -> int:
    """k in (1, 2, 4, 8): the largest power of two at which the whole image stays >= the size
    the box needs so that its resize keeps >= min_size pixels each way. The rule of today's
    decode_rgb (power-of-two factors only: 5/8 etc. are slower than the full decode)."""
    if min_size is None:
        return 1
    _, _, h, w = box
    need_h, need_w = height * min_size[0] // h, width * min_size[1] // w
    k = 1
    while k < 8 and height // (2 * k) >= need_h and width // (2 * k) >= need_w:
        k *= 2
    return k


def snap_box(box, k: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The full-image box on the 1/k grid (each edge rounded to the nearest 1/k pixel, moving
    it <= k/2 full-res px), as today's decode_box cuts it; the scaled image is ceil(H / k)."""
    if k == 1:
        return tuple(box)
    top, left, h, w = box
    y0, x0 = round(top / k), round(left / k)
    y1, x1 = min(-(-height // k), round((top + h) / k)), min(-(-width // k), round((left + w) / k))
    return y0, x0, y1 - y0, x1 - x0


def decode_crop(data: bytes, box, min_size=None, image_hw: tuple[int, int] | None = None) -> Region:
    """The `box` (top, left, h, w; full-image pixels) of a JPEG, decoded at 1/k scale where the
    crop keeps >= `min_size` (int or (h, w); None: full resolution) pixels each way. `image_hw`:
    (height, width) from the header, if the caller has it (else read here).

    Measured (benchmarks/crop_decode.py --images 1000 --rounds 5, one core of this 2-core shared
    machine, 2026-12-02; 500x375 etc. q90 photo-like JPEGs, 73.7 KB; seeded RandomResizedCrop(224,
    (0.2, 1)) boxes): 1,041 us/img vs 1,267 for today's crop path (full decode + slice), 1.22x,
    and 1,032 for a bare full decode; with the resize + flip, 611 vs 488 img/s (1.25x). At twice
    those sizes (1000x750, 80% of crops at 1/2 scale) 1.24x. Pixels identical to today's on
    every image, so the error vs torchvision's resized_crop is today's (0.187/255; 1.43 at 2x).
    Why not more: the rows above the box must still be Huffman-decoded (the stream has no index),
    and that is ~60% of a full decode here (skipping all rows but the last: 584 of 960 us).
    """
    if isinstance(min_size, int):
        min_size = (min_size, min_size)
    if image_hw is None:
        image_hw = image_size(data)
    height, width = image_hw
    k = dct_scale(height, width, box, min_size)
    y0, x0, h, w = snap_box(box, k, height, width)
    if _crop_decode is None:
        reason = "extension missing"
    elif data[:2] != _JPEG_START:
        reason = "not a JPEG"
    elif data[-2:] != _JPEG_END:  # truncated (or trailing bytes): today's path decides
        reason = "no end marker"
    elif height * width > Image.MAX_IMAGE_PIXELS:
        reason = "too large"  # today's decode_rgb refuses it (DecodeError)
    elif h <= 0 or w <= 0:
        reason = "empty box"
    else:
        pixels = np.empty((h, w, 3), np.uint8)
        reason = _crop_decode.decode_into(data, pixels, height, width, k, y0, x0, h, w)
        if reason is None:
            return Region(pixels, (y0, x0, h, w), k, None)
    return _full_decode(data, height, width, box, min_size, reason)


# crossmae-prep --jpeg-restarts: restart cells about this wide (full-res px). 2026-12-03, one core, 300 photo
# JPEGs, per-image best of 6 interleaved: 16 / 32 / 64 px gave 971 / 963 / 1,012 us per partial decode of a
# RandomResizedCrop box (1,240 without restarts, 1,419 for a full decode) at 0.984 / 0.968 / 0.960x the bytes.
RESTART_CELL_PX = 32


def add_restarts(data: bytes, cell_px: int = RESTART_CELL_PX) -> bytes | str:
    """The JPEG rewritten losslessly with restart markers that cut it into cells about `cell_px`
    wide and one MCU row high (the C extension: the DCT coefficients copied as jpegtran does, so
    every decoder gives the same pixels; baseline, optimized Huffman tables, every APPn/COM
    segment kept), or why not ("CMYK", "arithmetic", "corrupt: ...", "extension missing"): the
    caller keeps the original bytes and counts the reason. With such restarts decode_crop cuts a
    JPEG of just the box's cells and decodes that: no Huffman pass over the rest.

    Measured (2026-12-03, one core, 1,000 photo JPEGs of ~73 KB, benchmarks/crop_decode.py):
    ~3.8 ms CPU per image to transcode; the files come out 0.968x the bytes (optimized tables
    outweigh the ~2 bytes per restart marker); decode_crop of a RandomResizedCrop box 1,051 vs
    1,211 us without restarts (1,299 for a full decode); with the resize 1,540 vs 1,788 us
    (BENCHMARKS.md "--jpeg-restarts" has the loader's rows)."""
    if _crop_decode is None:
        return "extension missing"
    if data[:2] != _JPEG_START:
        return "not a JPEG"
    return _crop_decode.transcode_restarts(data, cell_px)


def restart_cells(data: bytes) -> tuple[int, int, int, int] | None:
    """(rows, cols, cell_h, cell_w): the grid of restart cells decode_crop can cut `data` at
    (full-res px per cell), or None (no restarts that tile the MCU grid, progressive, ...)."""
    return None if _crop_decode is None else _crop_decode.restart_cells(data)


def cut_box(data: bytes, box) -> tuple[bytes, tuple[int, int, int, int]] | None:
    """For decode="gpu": the JPEG of just the restart cells that hold `box` (top, left, h, w;
    full-res px) plus 2 px each side, and the box in it; None when `data` has no restart cells or
    the box needs all of them. Cut without decoding (~10-20 us), so the device decodes and the
    host copies about the box's share of the image instead of all of it; its pixels in the box
    are the whole JPEG's (tests/pipelines/test_jpeg_restarts.py, on libjpeg-turbo)."""
    if _crop_decode is None:
        return None
    top, left, h, w = box
    cut = _crop_decode.cut_box(data, top, left, h, w)
    if cut is None:
        return None
    jpeg, oy, ox = cut
    return jpeg, (top - oy, left - ox, h, w)


def cut_counts() -> dict[str, int]:
    """decode_crop's partial decodes in this process by path: "cut" (a JPEG of the box's restart
    cells), "whole" (the whole JPEG: no usable restarts, or the box needs every cell), "cut_failed"
    (the cut's decode failed, so the whole JPEG's ran: the result is unchanged)."""
    return {"cut": 0, "whole": 0, "cut_failed": 0} if _crop_decode is None else _crop_decode.cut_counts()


def _full_decode(data: bytes, height: int, width: int, box, min_size, reason: str) -> Region:
    """Today's path (decode_rgb at 1/k, then decode_box's slice), counted under `reason` once it
    decoded: bytes that raise DecodeError here are the loader's skipped samples, not fallbacks.
    Each reason is said on stderr once per process (the first image), not once per image."""
    _, _, h, w = box
    img = decode_rgb(data, (height * min_size[0] // h, width * min_size[1] // w) if min_size else None)
    k = round(height / img.shape[0])  # decode_rgb may decode at full size anyway (PIL's path)
    y0, x0, sh, sw = snap_box(box, k, height, width)
    key = reason.split(":", 1)[0]
    FALLBACKS[key] += 1
    if _SAID.get(key) != os.getpid():  # a forked worker says it again: its own stderr line
        _SAID[key] = os.getpid()
        if key == "extension missing":
            print(f"crop_decode: warning: the C extension is not built ({EXTENSION_ERROR}); every image is decoded "
                  "in full (rebuild with `pip install -e .` where libjpeg62-turbo-dev is installed)",
                  file=sys.stderr, flush=True)
        else:
            print(f"crop_decode: {reason}: decoded in full instead of the crop box (counted in "
                  f"crop_decode.FALLBACKS[{key!r}]; said once per process)", file=sys.stderr, flush=True)
    return Region(img[y0:y0 + sh, x0:x0 + sw], (y0, x0, sh, sw), k, reason)
