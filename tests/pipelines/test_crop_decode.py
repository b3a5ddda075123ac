"""The partial decode of a crop box (pipelines/data/crop_decode.py + its C extension) against
the loader's path before it (`full_decode_box` below: full decode at 1/k, then slice) and against
torchvision's resized_crop, on real JPEGs written by Pillow from photo-like content. The loader's
transforms.decode_box is decode_crop, so tests/pipelines/test_transforms.py holds it to the bound."""
import io
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from pipelines.data import crop_decode
from pipelines.data.crop_decode import decode_crop
from pipelines.data.jpeg import DecodeError, decode_rgb, image_size
from pipelines.data.transforms import _resize, decode_box, sample_box_flip


def full_decode_box(data: bytes, H: int, W: int, box, size: int = 224, dct_scale: bool = True):
    """The reference: the loader's decode_box before the partial decode (commit e344cc6)."""
    top, left, h, w = box
    img = decode_rgb(data, (H * size // h, W * size // w) if dct_scale else None)
    if img.shape[0] != H:
        k = round(H / img.shape[0])
        y0, x0 = round(top / k), round(left / k)
        y1, x1 = min(img.shape[0], round((top + h) / k)), min(img.shape[1], round((left + w) / k))
        return img[y0:y1, x0:x1], (y0 * k, x0 * k, min(H, y1 * k) - y0 * k, min(W, x1 * k) - x0 * k)
    return img[top:top + h, left:left + w], (top, left, h, w)


def photo(w: int, h: int, seed: int = 0, mode: str = "RGB", **save) -> bytes:
    """Colour waves, a sharp-edged blob, a fine texture and sensor grain: compresses like a
    photo (~70 KB at 500x375 q90) and has detail at every scale for the resize to get wrong."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.005, 0.05, (3, 2))
    img = np.stack([np.sin(xs * f[c, 0] + ys * f[c, 1] + c) for c in range(3)], -1) * 70 + 128
    img += 40 * (((xs - w * 0.6) ** 2 + (ys - h * 0.4) ** 2) < (min(h, w) / 4) ** 2)[..., None]
    img += 12 * np.sin(xs * 0.9)[..., None] * np.sin(ys * 0.7)[..., None]
    img += rng.normal(0, 10, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).convert(mode).save(buf, "JPEG", **{"quality": 90, **save})
    return buf.getvalue()


def boxes(data: bytes, n: int = 40):
    """n RandomResizedCrop(0.2-1) boxes as the loader draws them, then the edge cases: the
    whole image, a corner strip at the bottom right, a sliver at the top left."""
    H, W = image_size(data)
    out = [sample_box_flip(H, W, np.random.default_rng(i))[0] for i in range(n)]
    return out + [(0, 0, H, W), (H - min(H, 37), W - min(W, 50), min(H, 37), min(W, 50)), (0, 0, 17, 9)]


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch):
    monkeypatch.setattr(crop_decode, "FALLBACKS", Counter())
    monkeypatch.setattr(crop_decode, "_SAID", {})


def test_the_install_builds_the_extension_where_libjpeg_headers_exist():
    if not os.path.exists("/usr/include/jpeglib.h"):
        pytest.skip("no /usr/include/jpeglib.h (Debian libjpeg62-turbo-dev): the install skips the extension")
    assert crop_decode.EXTENSION_ERROR is None, f"`pip install -e .` did not build it: {crop_decode.EXTENSION_ERROR}"


needs_extension = pytest.mark.skipif(crop_decode.EXTENSION_ERROR is not None, reason="C extension not built")

# 4:2:0 (Pillow's default), 4:2:2, 4:4:4, sizes that are not multiples of the MCU, grayscale,
# and a large photo whose crops decode at 1/2 and 1/4.
CASES = {"500x375 4:2:0": (500, 375, "RGB", {}), "375x500 4:4:4": (375, 500, "RGB", {"subsampling": 0}),
         "497x333 4:2:2": (497, 333, "RGB", {"subsampling": 1}), "263x201 4:2:0": (263, 201, "RGB", {}),
         "333x497 4:4:4": (333, 497, "RGB", {"subsampling": 0}), "500x375 grayscale": (500, 375, "L", {}),
         "1200x900 4:2:0": (1200, 900, "RGB", {})}


@needs_extension
@pytest.mark.parametrize("case", CASES)
def test_partial_decode_gives_todays_pixels_and_box_exactly(case):
    w, h, mode, save = CASES[case]
    data = photo(w, h, seed=w + h, mode=mode, **save)
    scales = Counter()
    for box in boxes(data):
        for size in (224, 64, None):  # None: full resolution (today's dct_scale=False)
            expect, expect_box = full_decode_box(data, h, w, box, size or 224, dct_scale=size is not None)
            got = decode_crop(data, box, size, (h, w))
            assert got.fallback is None, got.fallback
            assert got.full_res_box(h, w) == expect_box, (box, size)
            assert got.pixels.shape == expect.shape and np.array_equal(got.pixels, expect), (box, size)
            scales[got.scale] += 1
    if w >= 1000:
        assert scales[2] and scales[4], f"the DCT-scaled partial decode was not exercised: {scales}"
    assert not crop_decode.FALLBACKS


def test_resized_crops_are_no_further_from_torchvision_than_todays_path():
    """The bound the loader keeps: partial decode + the same resize vs torchvision's
    resized_crop (bicubic, antialias) on the full-resolution decode, same boxes."""
    errors = {"today": [], "partial": []}
    for case in ("500x375 4:2:0", "375x500 4:4:4", "1200x900 4:2:0"):
        w, h, mode, save = CASES[case]
        data = photo(w, h, seed=7, mode=mode, **save)
        full = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
        for box in boxes(data, 10)[:10]:
            ref = TF.resized_crop(full, *box, [224, 224], TF.InterpolationMode.BICUBIC, antialias=True)
            ref = ref.permute(1, 2, 0).numpy().astype(np.int16)
            today, _ = full_decode_box(data, h, w, box, 224)
            errors["today"].append(np.abs(_resize(today, 224, 224).astype(np.int16) - ref).mean())
            partial = decode_crop(data, box, 224, (h, w)).pixels
            errors["partial"].append(np.abs(_resize(partial, 224, 224).astype(np.int16) - ref).mean())
    today, partial = np.mean(errors["today"]), np.mean(errors["partial"])
    assert partial <= today, (partial, today)
    assert partial < 2.0, errors["partial"]  # DCT-scaled 1200x900 crops included; full-res ones ~0.2


def test_progressive_and_cmyk_jpegs_take_the_full_decode_are_counted_and_said_once(capsys):
    for mode, save, reason in (("RGB", {"progressive": True}, "progressive"), ("CMYK", {}, "CMYK")):
        data = photo(320, 240, mode=mode, **save)
        for box in boxes(data, 5):
            got = decode_crop(data, box, 224, (240, 320))
            expect, expect_box = full_decode_box(data, 240, 320, box, 224)
            if crop_decode.EXTENSION_ERROR is None:
                assert got.fallback.split(":")[0] == reason
            assert np.array_equal(got.pixels, expect) and got.full_res_box(240, 320) == expect_box
            assert decode_box(data, 240, 320, box, 224)[1] == expect_box  # the loader's hook: the same
    err = capsys.readouterr().err.splitlines()
    if crop_decode.EXTENSION_ERROR is None:
        assert crop_decode.FALLBACKS == {"progressive": 16, "CMYK": 16}
        assert len(err) == 2 and "progressive" in err[0] and "CMYK" in err[1], err
    else:
        assert len(err) == 1 and "C extension is not built" in err[0]


@needs_extension
def test_a_12_bit_jpeg_fails_as_today_and_is_a_skip_not_a_fallback():
    data = bytearray(photo(64, 48))
    sof = data.index(b"\xff\xc0")
    data[sof + 4] = 12  # sample precision: libjpeg-turbo 2.1 (8-bit) and PIL refuse it
    with pytest.raises(DecodeError):
        full_decode_box(bytes(data), 48, 64, (0, 0, 48, 64))
    with pytest.raises(DecodeError):
        decode_crop(bytes(data), (0, 0, 48, 64), 224, (48, 64))
    assert not crop_decode.FALLBACKS  # the loader counts it once, as a skipped sample


@needs_extension
@pytest.mark.parametrize("damage", ["truncated", "garbled, end marker kept", "png"])
def test_damaged_or_foreign_bytes_get_todays_result(damage):
    good = photo(300, 200)
    data = {"truncated": good[: len(good) * 3 // 5],  # the box above the cut would decode: refused
            "garbled, end marker kept": good[:700] + np.random.default_rng(0).integers(
                0, 256, len(good) - 702, dtype=np.uint8).tobytes() + b"\xff\xd9"}.get(damage)
    if damage == "png":
        buf = io.BytesIO()
        Image.open(io.BytesIO(good)).save(buf, "PNG")
        data = buf.getvalue()
    box = (0, 0, 60, 80)
    try:
        expect = full_decode_box(data, 200, 300, box, 224)[0]
    except DecodeError:
        with pytest.raises(DecodeError):
            decode_crop(data, box, 224, (200, 300))
        assert not crop_decode.FALLBACKS  # a skipped sample, not a fallback
    else:
        assert np.array_equal(decode_crop(data, box, 224, (200, 300)).pixels, expect)
        reason = {"truncated": "no end marker", "garbled, end marker kept": "corrupt", "png": "not a JPEG"}[damage]
        assert crop_decode.FALLBACKS == {reason: 1}


def test_without_the_extension_every_image_is_decoded_in_full_counted_and_said_once(monkeypatch, capsys):
    monkeypatch.setattr(crop_decode, "_crop_decode", None)
    monkeypatch.setattr(crop_decode, "EXTENSION_ERROR", "No module named 'pipelines.data._crop_decode'")
    data = photo(500, 375)
    for box in boxes(data, 3):
        got = decode_crop(data, box, 224)  # the size from the header
        assert got.fallback == "extension missing"
        assert np.array_equal(got.pixels, full_decode_box(data, 375, 500, box, 224)[0])
    assert crop_decode.FALLBACKS == {"extension missing": 6}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "C extension is not built" in err[0] and "pip install -e ." in err[0]


@needs_extension
def test_decode_into_checks_its_box_and_buffer():
    data = photo(100, 80)
    from pipelines.data._crop_decode import decode_into

    assert decode_into(data, np.empty((10, 10, 3), np.uint8), 80, 100, 1, 75, 0, 10, 10) == "box outside the image"
    assert decode_into(data, np.empty((10, 10, 3), np.uint8), 81, 100, 1, 0, 0, 10, 10) == "size mismatch"
    with pytest.raises(ValueError, match="needs 300"):
        decode_into(data, np.empty((10, 9, 3), np.uint8), 80, 100, 1, 0, 0, 10, 10)
    with pytest.raises(ValueError, match="bad scale"):
        decode_into(data, np.empty((10, 10, 3), np.uint8), 80, 100, 3, 0, 0, 10, 10)
