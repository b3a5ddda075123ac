"""decode="gpu" (pipelines/data/device_decode.py, pipelines/data/prefetch.py) on a CPU device: the code path
a GPU runs, with libjpeg-turbo (torchvision's CPU decode_jpeg) in place of nvJPEG. The nvJPEG
pixel bound cannot be measured here (no GPU): benchmarks/loader_gpu.py --device cuda does."""
import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data.transforms import EncodedCrop, encode_sample
from pipelines.data.device_decode import batch_to_device, decode_jpeg_batch
from pipelines.data.jpeg import device_decodable
from pipelines.data.prefetch import DevicePrefetcher
from pipelines.data.transforms import (MAETrainTransform, collate_samples, mae_train, normalize_batch, pack_crops,
                                  sample_box_flip)
from pipelines.data.loader import StreamingLoader
from tests.pipelines.test_transforms import photo

SIZES = [(460, 400), (150, 120), (300, 500), (900, 700), (40, 30)]


def gpu_batch(datas, seed, size=224):
    t = MAETrainTransform(size, decode="gpu")
    return collate_samples([t(d, seed + i) for i, d in enumerate(datas)])


def progressive(w=300, h=200):
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo(w, h))).save(buf, "JPEG", quality=90, progressive=True)
    return buf.getvalue()


def corrupt_scan(w=200, h=160):
    """Valid header, frame and end marker, a bad marker inside the entropy-coded data: passes
    the worker's checks, every decoder refuses it."""
    good = photo(w, h, seed=3)
    sos = good.index(b"\xff\xda")
    return good[:sos + 200] + b"\xff\xc4\x00\x03\x00" + good[sos + 205:]


def test_worker_ships_baseline_jpegs_as_bytes_with_the_cpu_paths_boxes_and_flips():
    datas = [photo(w, h, seed=w) for w, h in SIZES] + [photo(300, 200, mode="L")]
    for seed in range(40):
        for d in datas:
            s = encode_sample(d, seed)
            assert isinstance(s, EncodedCrop) and s.pixels is None and s.jpeg is d
            _, box, flip = mae_train(d, seed, dct_scale=False, return_params=True)
            assert (s.box, s.flip) == (box, flip)
            h, w = Image.open(io.BytesIO(d)).size[::-1]
            assert (s.box, s.flip) == sample_box_flip(h, w, np.random.default_rng(seed))  # the CPU path's draws


def test_cpu_device_pixels_equal_the_cpu_path():
    """Measured bound (CPU twin): 0 grey levels vs mae_train(dct_scale=False) -- torchvision's CPU
    decode_jpeg and simplejpeg are the same libjpeg-turbo settings, the resize is the same
    kernel; matmul (the GPU's method) <= 1 level, mean < 0.3; vs the DCT-scaled default path
    the mean stays within its documented 1.4-2.4/255 (the DCT downscale is another filter)."""
    datas = [photo(w, h, seed=w) for w, h in SIZES] + [photo(300, 200, mode="L")]
    means, dct_means = [], []
    for seed in (0, 11):
        batch = gpu_batch(datas, seed)
        exact, bad = decode_jpeg_batch(batch, 224, "cpu")
        fast, _ = decode_jpeg_batch(batch, 224, "cpu", method="matmul")
        assert exact.shape == (6, 3, 224, 224) and exact.dtype == torch.uint8 and not bad
        for i, d in enumerate(datas):
            assert torch.equal(exact[i], mae_train(d, seed + i, dct_scale=False))
            assert (fast[i].int() - exact[i].int()).abs().max() <= 1
            means.append((fast[i].float() - exact[i].float()).abs().mean().item())
            dct_means.append((exact[i].float() - mae_train(d, seed + i).float()).abs().mean().item())
    assert np.mean(means) < 0.3 and np.mean(dct_means) < 3.0, (means, dct_means)


@pytest.mark.parametrize("kind", ["cmyk", "progressive", "png", "truncated", "empty", "random", "huge"])
def test_what_the_device_should_not_decode_takes_the_cpu_path_in_the_worker(kind):
    rng = np.random.default_rng(0)
    huge = bytearray(photo(64, 48))  # header claims 30000 x 30000: refused before any decoder allocates
    sof = huge.index(b"\xff\xc0")
    huge[sof + 5:sof + 9] = (30000).to_bytes(2, "big") * 2
    data = dict(cmyk=photo(300, 200, mode="CMYK"), progressive=progressive(), png=photo(200, 150, fmt="PNG"),
                truncated=photo(300, 200)[:3000], empty=b"", random=rng.bytes(700), huge=bytes(huge))[kind]
    try:
        want = mae_train(data, 5)
    except ValueError as e:  # DecodeError: the loader substitutes and counts it by type name
        with pytest.raises(type(e)):
            encode_sample(data, 5)
        return
    s = encode_sample(data, 5)
    assert s.pixels is not None and s.jpeg is None  # decoded + cropped in the worker
    batch = pack_crops([s, encode_sample(photo(200, 180), 6)])  # the loader's call: dispatches to EncodedCrop.pack
    out, bad = decode_jpeg_batch(batch, 224, "cpu")
    assert torch.equal(out[0], want) and not bad  # resize="device"'s crop: mae_train's pixels
    assert not device_decodable(data, "YCbCr")


def test_a_jpeg_no_decoder_reads_is_replaced_in_its_batch_and_counted(capsys):
    datas = [photo(200, 180, seed=i) for i in range(4)]
    datas[1] = corrupt_scan()
    batch = gpu_batch(datas, 0, size=64)
    batch.update(label=torch.arange(4), key=[f"k{i}" for i in range(4)], valid=torch.ones(4, dtype=torch.bool))
    assert batch["cpu_crop_hw"].eq(0).all()  # the worker could not tell: the device finds out
    x = batch_to_device(batch, 64, "cpu")
    assert "'k1': DecodeError" in capsys.readouterr().err  # said, not only counted
    assert batch["corrupt_device"] == {"DecodeError": 1}
    assert batch["valid"].tolist() == [True, False, True, True]
    j = [0, 2, 3][1 % 3]  # the loader's rule: good[i % len(good)]
    assert batch["key"][1] == f"k{j}" and batch["label"][1] == j and torch.equal(x[1], x[j])
    batch = gpu_batch([corrupt_scan()] * 2, 0, size=64)
    with pytest.raises(RuntimeError, match="every sample"):
        batch_to_device(batch, 64, "cpu")


def test_a_jpeg_the_device_refuses_is_decoded_on_the_host():
    """nvJPEG refusing an image libjpeg-turbo reads (the CPU twin's decoder reads everything the
    worker lets through, so the refusal is injected at the decoder boundary)."""
    import pipelines.data.device_decode as dd

    datas = [photo(200, 180, seed=i) for i in range(3)]
    batch = gpu_batch(datas, 0, size=64)
    real = dd._decode_on

    def refuse_second(encoded, device):
        out = real(encoded, device)
        out[1] = None
        return out

    dd._decode_on = refuse_second
    try:
        out, bad = decode_jpeg_batch(batch, 64, "cpu")
    finally:
        dd._decode_on = real
    assert not bad and torch.equal(out[1], mae_train(datas[1], 1, size=64, dct_scale=False))


def test_batch_to_device_takes_all_three_batch_formats():
    datas = [photo(w, h, seed=w) for w, h in SIZES[:3]]
    images = dict(image=torch.stack([mae_train(d, i, size=96, dct_scale=False) for i, d in enumerate(datas)]))
    crops = pack_crops([MAETrainTransform(96, resize="device", dct_scale=False)(d, i) for i, d in enumerate(datas)])
    jpegs = gpu_batch(datas, 0, size=96)
    want = normalize_batch(images["image"], "cpu")
    for batch, atol in ((images, 0), (crops, 0.02), (jpegs, 0)):  # crops: matmul, <= 1 grey level
        x = batch_to_device(batch, 96, "cpu")
        assert x.shape == (3, 3, 96, 96) and x.dtype == torch.float32
        torch.testing.assert_close(x, want, atol=atol, rtol=0)
    assert batch_to_device(jpegs, 96, "cpu", torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="config says"):
        batch_to_device(images, 224, "cpu")
    with pytest.raises(ValueError, match="not a loader batch"):
        batch_to_device(dict(label=torch.zeros(3)), 96, "cpu")


def write_shards(root, samples, per_shard=12):
    """WebDataset tars ({key}.jpg + {key}.cls) holding exactly `samples` [(key, bytes, label)]."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(samples), per_shard):
        with tarfile.open(root / f"train-{s // per_shard:06d}.tar", "w") as tar:
            for key, data, label in samples[s:s + per_shard]:
                for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return f"{root}/train-{{000000..{(len(samples) - 1) // per_shard:06d}}}.tar"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(1)
    samples = [(f"s{i:03d}", photo(int(rng.integers(40, 90)), int(rng.integers(40, 90)), seed=i), i % 5)
               for i in range(60)]
    bad = {7: photo(60, 50, mode="CMYK"), 13: progressive(70, 60), 20: photo(50, 40, fmt="PNG"),
           26: photo(60, 60)[:900], 33: b"garbage", 41: corrupt_scan(), 50: photo(64, 48, mode="L")}
    for i, d in bad.items():
        samples[i] = (samples[i][0], d, samples[i][2])
    return write_shards(tmp_path_factory.mktemp("gpu-wds"), samples)


def loader(pattern, decode, workers):
    return StreamingLoader.from_manifest(pattern, batch_size=8, num_workers=workers, block_size=16, seed=3,
                                         transform=MAETrainTransform(32, decode=decode, dct_scale=False))


def run(ld, n=None, background=False, state=None):
    """(keys, images, valid) of n batches through a DevicePrefetcher, and the prefetcher."""
    if state is not None:
        ld.load_state_dict(state)
    stream = DevicePrefetcher(iter(ld), lambda b: (b, batch_to_device(b, 32, "cpu")), "cpu", state_source=ld,
                              background=background)
    got = list(itertools.islice(stream, n))
    return [k for b, _ in got for k in b["key"]], torch.cat([x for _, x in got]), \
        [v for b, _ in got for v in b["valid"].tolist()], stream


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_replaced_and_counted_as_the_cpu_path_does(shards, workers):
    cpu = loader(shards, "cpu", workers)
    cpu_batches = list(cpu)
    keys, x, valid, stream = run(loader(shards, "gpu", workers))
    assert keys == [k for b in cpu_batches for k in b["key"]]
    assert valid == [v for b in cpu_batches for v in b["valid"].tolist()]
    assert stream.stats == cpu.stats and stream.stats["DecodeError"] == 3  # truncated, garbage, bad scan
    assert sum(not v for v in valid) >= 3
    want = torch.cat([normalize_batch(b["image"], "cpu") for b in cpu_batches])
    torch.testing.assert_close(x, want, atol=0, rtol=0)  # libjpeg-turbo on both sides, full-res decode


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetched_run_resumes_exactly_from_the_prefetchers_state(shards, workers):
    """Resume by keys: the samples before + after the restart are the uninterrupted epoch's,
    each with the very same pixels (per-sample seeds); the loader's own state, one batch ahead
    of the trainer under a prefetcher, would lose a batch."""
    def by_index(ld, n=None, state=None):
        if state is not None:
            ld.load_state_dict(state)
        stream = DevicePrefetcher(iter(ld), lambda b: (b, batch_to_device(b, 32, "cpu")), "cpu", state_source=ld,
                                  background=True)
        got = list(itertools.islice(stream, n))
        return {int(i): (k, img) for b, x in got for i, k, img in zip(b["index"], b["key"], x)}, stream

    full, _ = by_index(loader(shards, "gpu", workers))
    ld = loader(shards, "gpu", workers)
    before, stream = by_index(ld, 3)
    state = stream.state_dict()
    assert ld.state_dict()["samples_consumed"] == state["samples_consumed"] + 8  # the loader is one batch ahead
    stream.close()
    after, _ = by_index(loader(shards, "gpu", workers), state=state)
    assert not before.keys() & after.keys() and {**before, **after}.keys() == full.keys() and len(full) == 56
    for i, (key, img) in {**before, **after}.items():
        assert key == full[i][0] and torch.equal(img, full[i][1])


def test_prefetcher_hands_out_results_in_order_and_raises_a_failed_batch_in_its_place():
    def fn(b):
        if b == 2:
            raise ValueError("bad batch 2")
        return torch.full((2,), b)

    for background in (False, True):
        with DevicePrefetcher(iter(range(5)), fn, "cpu", background=background) as stream:
            assert [int(next(stream)[0]) for _ in range(2)] == [0, 1]
            with pytest.raises(ValueError, match="bad batch 2"):
                next(stream)
        assert [int(t[0]) for t in DevicePrefetcher(iter([3, 4]), fn, "cpu", background=background)] == [3, 4]
