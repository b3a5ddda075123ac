"""JPEGs with restart markers (`crossmae-prep --jpeg-restarts`): the lossless rewrite keeps every
pixel and the metadata, and decode_crop's cut (a smaller JPEG of just the box's restart cells,
built without decoding) gives the full decode's pixels bit for bit, on real JPEGs from Pillow and
libjpeg-turbo; a damaged cut changes nothing the caller gets; prep writes, counts and says it, and
the streaming loader's batches from such shards equal those from the original shards."""
import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.cli import main as prep
from pipelines.data import crop_decode
from pipelines.data.crop_decode import add_restarts, cut_counts, decode_crop, restart_cells
from pipelines.data.jpeg import decode_rgb, frame_header, image_size
from pipelines.data.loader import StreamingLoader
from pipelines.data.transforms import MAETrainTransform
from tests.pipelines.test_crop_decode import CASES, boxes, full_decode_box, photo

pytestmark = pytest.mark.skipif(crop_decode.EXTENSION_ERROR is not None, reason="C extension not built")


def delta(before):
    return {k: v - before[k] for k, v in cut_counts().items()}


def segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of every segment before the scan."""
    out, i = [], 2
    while data[i + 1] != 0xDA:
        n = int.from_bytes(data[i + 2:i + 4], "big")
        out.append((data[i + 1], data[i + 4:i + 2 + n]))
        i += 2 + n
    return out


@pytest.mark.parametrize("case", CASES)
def test_the_rewrite_is_lossless_and_the_cut_gives_the_full_decodes_pixels(case):
    w, h, mode, save = CASES[case]
    data = add_restarts(photo(w, h, seed=w + h, mode=mode, **save))
    assert isinstance(data, bytes), data
    assert np.array_equal(decode_rgb(data), decode_rgb(photo(w, h, seed=w + h, mode=mode, **save)))
    rows, cols, cell_h, cell_w = restart_cells(data)
    assert rows * cell_h >= h > (rows - 1) * cell_h and cols * cell_w >= w > (cols - 1) * cell_w
    assert cols > 1, "one cell per row: the cut would only drop rows"
    before = cut_counts()
    for box in boxes(data, 60):
        for size in (224, 64, None):
            expect, expect_box = full_decode_box(data, h, w, box, size or 224, dct_scale=size is not None)
            got = decode_crop(data, box, size, (h, w))
            assert got.fallback is None and got.full_res_box(h, w) == expect_box, (box, size, got.fallback)
            assert np.array_equal(got.pixels, expect), (box, size)
    d = delta(before)
    assert d["cut_failed"] == 0 and d["cut"] > 0.8 * (d["cut"] + d["whole"]), d  # the whole image: no cut


def test_progressive_jpegs_become_baseline_with_the_same_pixels_and_metadata_is_kept():
    icc = b"\0" * 128 + b"an ICC profile's bytes"
    exif = Image.Exif()
    exif[0x010F] = "a camera"  # Make
    original = photo(400, 300, seed=3, progressive=True, icc_profile=icc, exif=exif.tobytes())
    assert frame_header(original)[0] == 0xC2
    out = add_restarts(original)
    assert frame_header(out)[0] in (0xC0, 0xC1)
    assert np.array_equal(decode_rgb(out), decode_rgb(original))
    kept = [s for s in segments(original) if s[0] == 0xE1 or s[0] == 0xE2]
    assert kept and all(s in segments(out) for s in kept)  # EXIF (APP1) and ICC (APP2) byte for byte
    with Image.open(io.BytesIO(out)) as im:
        assert im.info.get("icc_profile") == icc
    h, w = image_size(out)
    box = (37, 61, 150, 200)
    assert np.array_equal(decode_crop(out, box, None, (h, w)).pixels, decode_rgb(original)[37:187, 61:261])


def test_restarts_from_another_encoder_are_cut_where_they_tile_the_rows():
    """Pillow's restart_marker_rows (libjpeg's restart_in_rows): intervals of whole MCU rows."""
    data = photo(480, 360, seed=5, restart_marker_rows=2)
    rows, cols, cell_h, _ = restart_cells(data)
    assert (cols, cell_h) == (1, 32) and rows == 12
    before = cut_counts()
    for box in boxes(data, 30):
        expect, _ = full_decode_box(data, 360, 480, box, 224, dct_scale=False)
        assert np.array_equal(decode_crop(data, box, None, (360, 480)).pixels, expect)
    assert delta(before)["cut"] > 0
    # intervals that straddle rows (7 blocks of a 30-MCU row) cannot be cut: the whole JPEG's decode, same pixels
    odd = photo(480, 360, seed=5, restart_marker_blocks=7)
    assert restart_cells(odd) is None
    before = cut_counts()
    expect, _ = full_decode_box(odd, 360, 480, (100, 100, 150, 150), 224, dct_scale=False)
    assert np.array_equal(decode_crop(odd, (100, 100, 150, 150), None, (360, 480)).pixels, expect)
    assert delta(before) == {"cut": 0, "whole": 1, "cut_failed": 0}


def test_what_cannot_be_rewritten_is_named():
    assert add_restarts(photo(64, 48, mode="CMYK")) == "CMYK"
    assert add_restarts(b"\x89PNG\r\n") == "not a JPEG"
    assert add_restarts(photo(300, 200)[:3000]).startswith("corrupt")  # cut short


def damage(data: bytes, where: str) -> bytes:
    b = bytearray(data)
    rst = [i for i in range(len(b) - 1) if b[i] == 0xFF and 0xD0 <= b[i + 1] <= 0xD7]
    if where == "restart number":  # a misnumbered marker: the layout is refused, the whole JPEG decoded
        b[rst[len(rst) // 2] + 1] ^= 0x01
    else:  # entropy bytes inside the middle cells: the cut's decode fails
        for i in rst[len(rst) // 2 - 3:len(rst) // 2 + 3]:
            b[i - 40:i - 2] = bytes(38)
    return bytes(b)


@pytest.mark.parametrize("where", ["restart number", "entropy data"])
def test_a_damaged_restart_jpeg_gets_what_the_whole_jpegs_decode_gives(where, monkeypatch, capsys):
    monkeypatch.setattr(crop_decode, "FALLBACKS", crop_decode.Counter())
    monkeypatch.setattr(crop_decode, "_SAID", {})
    data = damage(add_restarts(photo(500, 375, seed=9)), where)
    box = (100, 150, 200, 250)  # holds the damaged middle cells
    before = cut_counts()
    got = decode_crop(data, box, None, (375, 500))
    expect, _ = full_decode_box(data, 375, 500, box, dct_scale=False)  # today's path on the same bytes
    assert np.array_equal(got.pixels, expect)
    assert got.fallback and got.fallback.startswith("corrupt")  # counted and said, as for any damaged JPEG
    assert "crop_decode: corrupt" in capsys.readouterr().err
    assert delta(before) == ({"cut": 0, "whole": 1, "cut_failed": 0} if where == "restart number"
                             else {"cut": 0, "whole": 0, "cut_failed": 1})


@pytest.fixture(scope="module")
def two_preps(tmp_path_factory):
    """The same folder prepared twice, with and without --jpeg-restarts; CMYK and PNG files included."""
    root = tmp_path_factory.mktemp("restarts")
    for c, (w, h) in zip(("ant", "bee", "cow"), ((320, 240), (240, 320), (300, 200))):
        (root / "src" / c).mkdir(parents=True)
        for i in range(10):
            (root / "src" / c / f"{c}_{i}.jpg").write_bytes(photo(w, h, seed=i))
    (root / "src/ant/cmyk.jpg").write_bytes(photo(120, 90, mode="CMYK"))
    Image.new("RGB", (50, 40), (9, 99, 199)).save(root / "src/bee/png.jpg", "PNG")
    return root


def test_prep_writes_counts_and_says_it_and_the_loader_gives_the_same_batches(two_preps, capsys):
    root = two_preps
    assert prep(["folder", str(root / "src"), str(root / "plain"), "--shard-samples", "8"]) == 0
    plain_err = capsys.readouterr().err
    assert prep(["folder", str(root / "src"), str(root / "restarts"), "--shard-samples", "8", "--jpeg-restarts"]) == 0
    err = capsys.readouterr().err
    assert "with restart markers" not in plain_err
    plain = json.loads((root / "plain/train/manifest.json").read_text())
    m = json.loads((root / "restarts/train/manifest.json").read_text())
    assert "restarts" not in plain["options"] and "jpeg_restarts" not in plain  # old plans keep their digest
    assert m["options"]["restarts"] is True and m["plan_digest"] != plain["plan_digest"]
    # the CMYK file is converted to RGB by prep's checks first (as without the flag), so every sample gets them
    r = m["jpeg_restarts"]
    assert r["transcoded"] == m["num_samples"] == plain["num_samples"] == 32 and r["kept"] == {}
    assert r["bytes_after"] < r["bytes_before"]
    assert f"32 with restart markers ({r['bytes_after'] / r['bytes_before']:.3f}x the bytes)" in err
    assert prep(["loader-stats", str(root / "restarts/train/manifest.json"), "--batch", "4"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["jpeg_restarts"] == {"transcoded": 32, "kept": 0}
    assert "loader-stats: decode: 32 samples carry restart markers (--jpeg-restarts)" in out.err

    def batches(manifest, workers):
        with StreamingLoader.from_manifest(str(manifest), batch_size=4, transform=MAETrainTransform(64), rank=0,
                                           world_size=1, num_workers=workers, seed=0) as ld:
            return [b for b in itertools.islice(ld, len(ld))]
    xs = batches(root / "plain/train/manifest.json", 0)
    before = cut_counts()
    ys = batches(root / "restarts/train/manifest.json", 0)  # decoded in this process: its cuts are counted here
    d = delta(before)
    assert len(xs) == len(ys) == 8 and d["cut_failed"] == 0 and d["cut"] > 0.8 * (d["cut"] + d["whole"]), d
    for x, y in zip(xs, ys):
        assert x["key"] == y["key"] and torch.equal(x["image"], y["image"])


def test_kept_samples_are_counted_in_the_manifest_and_said(tmp_path, capsys, monkeypatch):
    """A sample the rewrite refuses keeps its original bytes, counted by reason and said."""
    (tmp_path / "src/ant").mkdir(parents=True)
    for i in range(3):
        (tmp_path / f"src/ant/a{i}.jpg").write_bytes(photo(200, 150, seed=i))
    real = crop_decode._crop_decode.transcode_restarts
    calls = iter(range(10))
    monkeypatch.setattr(crop_decode._crop_decode, "transcode_restarts",
                        lambda data, px: "corrupt: made to fail" if next(calls) == 1 else real(data, px))
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "out"), "--jpeg-restarts"]) == 0
    err = capsys.readouterr().err
    m = json.loads((tmp_path / "out/train/manifest.json").read_text())
    assert m["jpeg_restarts"]["transcoded"] == 2 and m["jpeg_restarts"]["kept"] == {"corrupt": 1}
    assert "2 with restart markers" in err and "1 kept without them (corrupt 1)" in err
    assert prep(["loader-stats", str(tmp_path / "out/train/manifest.json"), "--batch", "1"]) == 0
    assert "2 samples carry restart markers (--jpeg-restarts): a crop decodes only its cells; 1 kept without them " \
           "decode as before" in capsys.readouterr().err


def test_jpeg_restarts_with_ffcv_is_refused_with_one_line(tmp_path, capsys):
    (tmp_path / "src/ant").mkdir(parents=True)
    (tmp_path / "src/ant/a.jpg").write_bytes(photo(64, 48))
    with pytest.raises(SystemExit) as exit_:
        prep(["folder", str(tmp_path / "src"), str(tmp_path / "out"), "--format", "ffcv", "--jpeg-restarts"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jpeg-restarts" in err[0] and "Traceback" not in err[0]


def test_decode_gpu_ships_just_the_boxs_cells_and_the_device_side_gives_the_same_pixels():
    """decode="gpu" on a CPU device (torchvision's libjpeg-turbo in nvJPEG's place): the worker
    sends the cut, the box moved into it; the batch's pixels are the CPU path's on the original."""
    from pipelines.data.device_decode import decode_jpeg_batch
    from pipelines.data.transforms import collate_samples, encode_sample, mae_train
    originals = [photo(w, h, seed=w) for w, h in ((460, 400), (300, 500), (900, 700), (150, 120))]
    datas = [add_restarts(d) for d in originals]
    for seed in (0, 5):
        samples = [encode_sample(d, seed + i) for i, d in enumerate(datas)]
        assert sum(len(s.jpeg) for s in samples) < 0.9 * sum(map(len, datas))  # the cut went, not the whole
        for s, d in zip(samples, originals):
            assert image_size(s.jpeg)[0] >= s.box[0] + s.box[2] and image_size(s.jpeg)[1] >= s.box[1] + s.box[3]
        batch = collate_samples(samples)
        out, bad = decode_jpeg_batch(batch, 224, "cpu")
        assert not bad
        for i, d in enumerate(originals):
            assert torch.equal(out[i], mae_train(d, seed + i, dct_scale=False)), i


def test_damaged_bytes_never_crash_the_cut(monkeypatch):
    """Random damage to a restart JPEG's markers, tables and entropy data (flipped bytes, stray
    markers, cuts): the cells parser, cut_box and decode_crop each return or raise DecodeError;
    the extension never reads outside the bytes (a crash would take the test process down)."""
    monkeypatch.setattr(crop_decode, "_SAID", {})
    from pipelines.data.jpeg import DecodeError
    good = add_restarts(photo(300, 200, seed=1))
    rng = np.random.default_rng(0)
    sos = good.index(b"\xff\xda")
    outcomes = set()
    for trial in range(300):
        b = bytearray(good)
        kind = trial % 4
        if kind == 0:  # header bytes (lengths, sizes, sampling factors, the restart interval)
            for i in rng.integers(2, sos + 12, 3):
                b[i] = int(rng.integers(256))
        elif kind == 1:  # stray or misnumbered markers in the entropy data
            for i in rng.integers(sos + 12, len(b) - 2, 4):
                b[i:i + 2] = bytes([0xFF, int(rng.integers(0xC0, 0x100))])
        elif kind == 2:  # cut short, the end marker put back
            b = b[:int(rng.integers(sos, len(b)))] + b"\xff\xd9"
        else:  # entropy bytes
            for i in rng.integers(sos + 12, len(b) - 2, 20):
                b[i] = int(rng.integers(256))
        data = bytes(b)
        restart_cells(data)
        crop_decode.cut_box(data, (20, 30, 150, 200))
        try:
            r = decode_crop(data, (20, 30, 150, 200), None, (200, 300))
            assert r.pixels.shape == (150, 200, 3)
            outcomes.add("decoded" if r.fallback is None else "fallback")
        except DecodeError:
            outcomes.add("DecodeError")
    assert {"decoded", "fallback", "DecodeError"} <= outcomes, outcomes


def test_a_damaged_jpeg_restarts_record_is_refused_with_one_line(two_preps, tmp_path, capsys):
    root = two_preps
    if not (root / "restarts/train/manifest.json").exists():
        assert prep(["folder", str(root / "src"), str(root / "restarts"), "--shard-samples", "8",
                     "--jpeg-restarts"]) == 0
    m = json.loads((root / "restarts/train/manifest.json").read_text())
    m["jpeg_restarts"] = {"transcoded": "many"}
    bad = root / "restarts/train/damaged.json"
    bad.write_text(json.dumps(m))
    capsys.readouterr()
    assert prep(["loader-stats", str(bad), "--batch", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "malformed jpeg_restarts" in err[0] and "Traceback" not in err[0], err
