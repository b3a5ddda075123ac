"""Check, repair or re-encode one stored image before it goes into a shard.

Default is to keep the ORIGINAL bytes of every valid RGB JPEG (no re-encode: bit-exact
data, and about 20x faster than decoding, see BENCHMARKS.md). What is not a valid RGB JPEG
is either converted to one (PNG or other formats saved as .JPEG, CMYK and grayscale JPEGs:
all occur in real ImageNet) or rejected with a reason; nothing is dropped silently.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from pipelines.data.jpeg import frame_header

Image.MAX_IMAGE_PIXELS = 200_000_000  # ImageNet's largest is ~10^7 px; refuse decompression bombs beyond
CONVERT_QUALITY = 95  # re-encode quality for conversions (near-lossless at ~3x PNG->JPEG size reduction)


@dataclass(frozen=True)
class Checked:
    data: bytes | None  # JPEG bytes to store, None if rejected
    status: str  # "ok" | "converted" | "resized" | "rejected"
    reason: str = ""
    resized: bool = False  # re-encoded smaller for max_size (status "resized", or "converted" when also not RGB JPEG)


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(components, width, height) from a JPEG's start-of-frame marker, None if the marker walk
    fails (pipelines/data/jpeg.py)."""
    if data[:2] != b"\xff\xd8":
        return None
    frame = frame_header(data)
    return None if frame is None else frame[2:]


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def check_image(data: bytes, validate: str = "header", max_size: int | None = None,
                quality: int = 90) -> Checked:
    """``validate='header'`` parses the header and checks the end-of-image marker (no pixel
    decode); ``'decode'`` decodes every pixel. ``max_size`` re-encodes images whose longer side
    exceeds it, resized to that side, at ``quality``."""
    if not data:
        return Checked(None, "rejected", "empty file")
    if validate == "header":  # fast path: a 3-component JPEG (PIL mode RGB) that ends properly
        frame = jpeg_frame(data)
        if (frame and frame[0] == 3 and 0 < frame[1] * frame[2] <= Image.MAX_IMAGE_PIXELS
                and not (max_size and max(frame[1:]) > max_size) and b"\xff\xd9" in data[-4096:]):
            return Checked(data, "ok")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, mode, size = img.format, img.mode, img.size
    except Exception as e:  # PIL raises many types for garbage
        return Checked(None, "rejected", f"not a readable image: {type(e).__name__}")
    is_rgb_jpeg = fmt == "JPEG" and mode == "RGB"
    # 0xFFD9 cannot occur inside entropy-coded data (0xFF is stuffed), so an end-of-image marker
    # in the last 4 KiB means the file was not cut short; tolerates trailing padding/junk.
    if is_rgb_jpeg and b"\xff\xd9" not in data[-4096:]:
        return Checked(None, "rejected", "truncated JPEG (no end-of-image marker)")
    needs_pixels = validate == "decode" or not is_rgb_jpeg or (max_size and max(size) > max_size)
    if not needs_pixels:
        return Checked(data, "ok")
    try:
        img.load()
    except Exception as e:
        return Checked(None, "rejected", f"corrupt image data: {type(e).__name__}: {str(e)[:80]}")
    what = f"{mode} JPEG" if fmt == "JPEG" else f"{fmt} image"
    if max_size and max(size) > max_size:
        scale = max_size / max(size)
        img = img.convert("RGB").resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))),
                                        Image.Resampling.BICUBIC)
        resize = f"{size[0]}x{size[1]} -> {img.size[0]}x{img.size[1]}"
        if is_rgb_jpeg:
            return Checked(_encode(img, quality), "resized", resize, resized=True)
        return Checked(_encode(img, quality), "converted", f"{what} converted to RGB JPEG, {resize}", resized=True)
    if is_rgb_jpeg:
        return Checked(data, "ok")
    return Checked(_encode(img, CONVERT_QUALITY), "converted", f"{what} converted to RGB JPEG")
