"""The one JPEG marker walk: the start-of-frame header without decoding anything. Used by data
prep (validation, sizes) and by the GPU-decode loader (which frames nvJPEG's batched path takes)."""
from __future__ import annotations


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
