import io

import numpy as np
import pytest
from PIL import Image

from data_prep.images import check_image


def _jpeg(mode="RGB", size=(64, 48), quality=90, fmt="JPEG"):
    rng = np.random.default_rng(0)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _is_rgb_jpeg(data):
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.format == "JPEG" and img.mode == "RGB"


@pytest.mark.parametrize("validate", ["header", "decode"])
def test_valid_rgb_jpeg_keeps_its_original_bytes(validate):
    data = _jpeg()
    out = check_image(data, validate)
    assert out.status == "ok" and out.data is data


@pytest.mark.parametrize("mode,fmt,reason", [("CMYK", "JPEG", "CMYK JPEG"), ("L", "JPEG", "L JPEG"),
                                             ("RGB", "PNG", "PNG image"), ("RGBA", "PNG", "PNG image")])
def test_non_rgb_or_non_jpeg_images_are_converted_to_rgb_jpeg(mode, fmt, reason):
    out = check_image(_jpeg(mode, fmt=fmt), "header")
    assert out.status == "converted" and reason in out.reason
    assert _is_rgb_jpeg(out.data)


@pytest.mark.parametrize("validate", ["header", "decode"])
def test_broken_inputs_are_rejected_with_a_reason(validate):
    good = _jpeg(size=(200, 150))
    cases = {
        b"": "empty file",
        good[: len(good) // 2]: "truncated",
        b"\x00garbage" * 50: "not a readable image",
        b"\xff\xd8\xff\xe0" + b"\x00" * 30: "not a readable image",
    }
    for data, reason in cases.items():
        out = check_image(data, validate)
        assert out.status == "rejected" and out.data is None and reason in out.reason, (reason, out)


def test_decode_validation_catches_missing_pixel_data_that_the_header_check_lets_through():
    data = _jpeg(size=(256, 256))
    no_scan = data[: data.find(b"\xff\xda")] + b"\xff\xd9"  # headers and end marker, no image data
    assert check_image(no_scan, "header").status == "ok"  # header mode: fast, trusts the structure
    out = check_image(no_scan, "decode")
    assert out.status == "rejected" and "corrupt image data" in out.reason


def test_max_size_resizes_longer_side_and_reencodes():
    out = check_image(_jpeg(size=(300, 120)), "header", max_size=100, quality=80)
    assert out.status == "resized"
    assert Image.open(io.BytesIO(out.data)).size == (100, 40)
    small = _jpeg(size=(80, 60))
    assert check_image(small, "header", max_size=100).data is small


def test_a_conversion_that_is_also_resized_stays_listed_as_a_conversion():
    out = check_image(_jpeg(mode="CMYK", size=(200, 100)), max_size=50)
    assert out.status == "converted" and out.resized and "CMYK" in out.reason and "200x100 -> 50x25" in out.reason
    assert _is_rgb_jpeg(out.data) and Image.open(io.BytesIO(out.data)).size == (50, 25)
    small = check_image(_jpeg(mode="CMYK", size=(40, 20)), max_size=50)
    assert small.status == "converted" and not small.resized
    assert check_image(_jpeg(size=(200, 100)), max_size=50).resized
