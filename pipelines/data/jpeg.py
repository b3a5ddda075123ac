"""The one JPEG marker walk: the start-of-frame header without decoding anything. Used by data
prep (validation, sizes) and by the GPU-decode loader (which frames nvJPEG's batched path takes)."""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image


def frame_header(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(SOF marker, sample precision, components, width, height) of a JPEG, or None when the
    marker walk fails (broken segment, a scan or the end before any frame). Header-only and ~25x
    cheaper than PIL's Image.open: 7 us vs 180 us per 75 KB photo (benchmarks/prep.py)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            if i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return marker, data[i + 4], data[i + 9], width, height
        elif marker in (0xDA, 0xD9):  # scan or end before any frame: broken
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


class DecodeError(ValueError):
    """The bytes are not a decodable image (corrupt, truncated, empty, unknown format). The
    loader catches this one type to skip and count the sample."""


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header only; DecodeError if there is no readable header."""
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return h, w
    except (ValueError, TypeError):
        pass
    try:  # not a (readable) JPEG: PNG etc. -- Image.open reads the header only
        with Image.open(io.BytesIO(data)) as im:
            return im.height, im.width
    except Exception as e:
        raise DecodeError(f"no readable image header: {e}") from None


def decode_rgb(data: bytes, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """HWC uint8 RGB. With min_size=(h, w), libjpeg-turbo may decode at 1/2, 1/4 or 1/8 scale
    as long as the result is at least that large (only power-of-two factors: simplejpeg's 5/8
    etc. are slower than full decode). Non-JPEG, CMYK/YCCK (Adobe inversion is PIL's job)
    and anything libjpeg-turbo rejects go through PIL; if that fails too: DecodeError."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, TypeError):
        h = w = colorspace = None
    if h is not None and h * w > Image.MAX_IMAGE_PIXELS:  # a decompression bomb: refuse before allocating
        raise DecodeError(f"image too large: {w}x{h} pixels (limit {Image.MAX_IMAGE_PIXELS})")
    try:
        if h is not None and colorspace not in ("CMYK", "YCCK"):
            kw = {}
            if min_size is not None:
                k = 1
                while k < 8 and h // (2 * k) >= min_size[0] and w // (2 * k) >= min_size[1]:
                    k *= 2
                if k > 1:  # scaled size is ceil(h / k): ask for exactly that
                    kw = dict(min_height=-(-h // k), min_width=-(-w // k))
            return simplejpeg.decode_jpeg(data, "RGB", **kw)
    except (ValueError, TypeError):
        pass  # strict libjpeg-turbo refused (or not a JPEG): let PIL try
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise DecodeError(f"undecodable image: {e}") from None


_DEVICE_SOF = (0xC0, 0xC1)  # baseline, extended sequential Huffman: nvJPEG's batched (hardware) path


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
