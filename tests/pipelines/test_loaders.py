"""One factory, two formats, one batch format."""
import itertools
import json
import os

import importlib.util

import pytest
import torch

from data_prep.cli import main as prep
from pipelines import storage
from pipelines.data.factory import LoaderConfig, build_loader, stage_local
from tests.data_prep.fixtures import make_image_folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    make_image_folder(root / "src", ("ant", "bee"), per_class=20)
    return root / "src"


@pytest.fixture(scope="module")
def local(src, tmp_path_factory):
    """The 40 images as local WebDataset shards and as a .beton (when ffcv imports)."""
    out = tmp_path_factory.mktemp("local")
    manifests = {}
    for fmt in ("wds", "ffcv"):
        if fmt == "ffcv" and importlib.util.find_spec("ffcv") is None:
            continue
        assert prep(["folder", str(src), str(out / fmt), "--format", fmt, "--shard-samples", "8"]) == 0
        manifests[fmt] = str(out / fmt / "train/manifest.json")
    return manifests


def cfg_for(local, fmt, tmp_path, **kw):
    if fmt not in local:
        pytest.skip("ffcv is not installed")
    args = dict(manifest=local[fmt], batch_size=8, num_workers=1, image_size=32, seed=3,
                cache_dir=str(tmp_path / "cache"))
    args.update(kw)
    return LoaderConfig(**args)


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
@pytest.mark.parametrize("train", [True, False])
def test_both_formats_give_the_same_batch_format(src, tmp_path, s3_bucket, fmt, train):
    if fmt == "ffcv":
        pytest.importorskip("ffcv")
    dst = f"s3://{s3_bucket}/{fmt}"
    assert prep(["folder", str(src), dst, "--format", fmt, "--shard-samples", "8"]) == 0
    cfg = LoaderConfig(manifest=f"{dst}/train/manifest.json", batch_size=8, num_workers=1, image_size=32,
                       cache_dir=str(tmp_path / "cache"))
    batches = list(build_loader(cfg, train=train))
    assert len(batches) == 5  # 40 samples / 8
    for b in batches:
        assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.uint8
        assert b["label"].shape == (8,) and b["label"].dtype == torch.int64
    labels = torch.cat([b["label"] for b in batches])
    assert sorted(labels.tolist()) == [0] * 20 + [1] * 20


def test_staging_checks_the_hash_and_reuses_the_cache(tmp_path, s3_bucket):
    url = f"s3://{s3_bucket}/blob.bin"
    storage.write_bytes(url, b"x" * 1000)
    import hashlib

    good = hashlib.sha256(b"x" * 1000).hexdigest()
    path = stage_local(url, good, str(tmp_path))
    assert open(path, "rb").read() == b"x" * 1000
    mtime = os.path.getmtime(path)
    assert stage_local(url, good, str(tmp_path)) == path and os.path.getmtime(path) == mtime
    with pytest.raises(storage.StorageError, match="sha256"):
        stage_local(url, "0" * 64, str(tmp_path))


def test_unknown_format_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tfrecord"}))
    with pytest.raises(ValueError, match="unknown dataset format 'tfrecord'"):
        build_loader(LoaderConfig(manifest=str(tmp_path / "manifest.json")))


def test_ffcv_order_depends_on_seed_and_epoch_only(local, tmp_path):
    def rows(world, epochs=1, **kw):  # {position in G: .beton row} per epoch, all ranks
        lds = [build_loader(cfg_for(local, "ffcv", tmp_path, **kw), True, r, world) for r in range(world)]
        return [{g: row for ld in lds for b in ld for g, row in zip(b["index"].tolist(), b["row"].tolist())}
                for _ in range(epochs)]

    first, second = rows(1, epochs=2)
    assert sorted(first) == list(range(40)) and sorted(first.values()) == list(range(40))  # every row once
    assert sorted(second.values()) == list(range(40)) and first != second  # reshuffled per epoch
    two_ranks = rows(2)[0]  # 20 per rank, 2 batches each: positions 0-15 and 20-35
    assert sorted(two_ranks) == list(range(16)) + list(range(20, 36))
    assert all(first[g] == row for g, row in two_ranks.items()), "the order depends on the world size"
    assert rows(1, seed=4)[0] != first


@pytest.mark.parametrize("world,world2", [(1, 1), (2, 2), (2, 1), (1, 3)])
def test_ffcv_resume_mid_epoch_yields_unseen_samples_only(local, tmp_path, world, world2):
    cfg = cfg_for(local, "ffcv", tmp_path, batch_size=4)
    stop, before, states = 2, [], []
    for r in range(world):
        ld = build_loader(cfg, True, r, world)
        before += [g for b in itertools.islice(ld, stop) for g in b["index"].tolist()]
        states.append(ld.state_dict())
    assert all(st == states[0] for st in states) and states[0]["samples_consumed"] == stop * 4 * world
    after = []
    for r in range(world2):
        ld = build_loader(cfg, True, r, world2)
        ld.load_state_dict(json.loads(json.dumps(states[0])))  # as saved with a checkpoint
        for b in ld:
            assert b["image"].shape == (4, 3, 32, 32) and b["valid"].all()
            after += b["index"].tolist()
        assert ld.epoch == 1 and ld.state_dict()["remaining"] == [[0, 40]]
    both = before + after
    assert len(both) == len(set(both)), "a sample was repeated after the restart"
    assert 40 - len(both) < world2 * 4, "more than the ragged tail went unseen"
    if world == world2:  # same shape: exactly the positions of an uninterrupted epoch
        full = [g for r in range(world) for b in build_loader(cfg, True, r, world) for g in b["index"].tolist()]
        assert sorted(full) == sorted(both)


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_evaluation_sees_every_sample_exactly_once_via_valid(local, tmp_path, fmt):
    world = 3  # 40 samples: 14, 13, 13 per rank; batch 8: rank 0 pads 2, ranks 1-2 pad 3
    cfg = cfg_for(local, fmt, tmp_path, num_workers=2)
    seen, labels, counts = [], [], []
    for r in range(world):
        batches = list(build_loader(cfg, train=False, rank=r, world_size=world))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (8, 3, 32, 32) and b["valid"].dtype == torch.bool
            ids = b["key"] if fmt == "wds" else b["row"].tolist()
            seen += [i for i, v in zip(ids, b["valid"].tolist()) if v]
            labels += b["label"][b["valid"]].tolist()
    assert counts == [2, 2, 2]  # equal batches on every rank
    assert len(seen) == 40 and len(set(seen)) == 40
    assert sorted(labels) == [0] * 20 + [1] * 20
    train = [b["valid"].all().item() for b in build_loader(cfg, train=True)]
    assert train == [True] * 5


def test_device_resize_option_ships_crops(local, tmp_path):
    from pipelines.data.device_decode import resize_on_device

    cfg = cfg_for(local, "wds", tmp_path, resize="device", num_workers=0)
    on_cpu = list(build_loader(cfg_for(local, "wds", tmp_path, num_workers=0)))
    on_device = list(build_loader(cfg))
    assert len(on_device) == len(on_cpu) == 5
    for a, b in zip(on_cpu, on_device):
        assert "image" not in b and b["crops"].dtype == torch.uint8 and b["crops"].dim() == 1
        assert b["crop_hw"].shape == (8, 2) and b["flip"].dtype == torch.bool and b["key"] == a["key"]
        x = resize_on_device(b, 32, "cpu", normalize=False)
        assert x.shape == (8, 3, 32, 32) and (x.int() - a["image"].int()).abs().max() <= 1
    if "ffcv" in local:
        with pytest.raises(ValueError, match="WebDataset"):
            build_loader(cfg_for(local, "ffcv", tmp_path, resize="device"))


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_the_factory_gives_the_trainer_one_interface_for_both_formats(local, tmp_path, fmt):
    """What crossmae-pretrain uses: batches with image/key/valid, len and batches_per_epoch,
    counters, state_dict/load_state_dict (a few steps, a restart, the rest), close(), and an
    EmptyEpochError for a batch larger than a rank's share."""
    from pipelines.data.epoch_order import EmptyEpochError

    workers = 2 if fmt == "wds" else 1  # FFCV: the configuration the resume tests compiled (numba, ~20 s each)
    cfg = cfg_for(local, fmt, tmp_path, batch_size=4, num_workers=workers, image_size=32, resize="cpu",
                  pin_memory=True)
    with build_loader(cfg, train=True, rank=1, world_size=2) as ld:
        assert (ld.num_samples, ld.epoch, ld.batches_per_epoch, len(ld)) == (40, 0, 5, 5)
        it = iter(ld)
        first = [next(it) for _ in range(2)]
        for b in first:
            assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.uint8
            assert b["image"].is_contiguous() and len(b["key"]) == 4 and b["valid"].all() and b["skipped"] == []
        state = json.loads(json.dumps(ld.state_dict()))  # as saved with a checkpoint
        assert state["samples_consumed"] == 2 * 4 * 2 and ld.samples_seen == 8 and ld.stats["samples"] == 8
    assert ld.skipped == 0 and ld.skipped_fraction == 0 and "8 samples seen, 0 skipped" in ld.summary()
    resumed = build_loader(cfg, train=True, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert len(resumed) == 3 and resumed.samples_seen == 8
    rest = list(resumed)
    assert len(rest) == 3 and resumed.epoch == 1 and len(resumed) == 5
    uninterrupted = list(build_loader(cfg, train=True, rank=1, world_size=2))
    assert [b["key"] for b in first + rest] == [b["key"] for b in uninterrupted]
    assert [b["index"].tolist() for b in first + rest] == [b["index"].tolist() for b in uninterrupted]
    resumed.close()
    with pytest.raises(EmptyEpochError, match="40 samples over 2 rank"):
        build_loader(cfg_for(local, fmt, tmp_path, batch_size=21), train=True, rank=0, world_size=2)


def test_the_factory_takes_the_trainers_transform_options_and_shard_patterns(local, tmp_path):
    import glob

    from pipelines.data.transforms import MAETrainTransform

    base = os.path.dirname(local["wds"])
    n = len(glob.glob(os.path.join(base, "*.tar")))
    pattern = os.path.join(base, f"train-{{000000..{n - 1:06d}}}.tar")
    by_manifest = next(iter(build_loader(cfg_for(local, "wds", tmp_path, num_workers=0))))
    by_pattern = build_loader(cfg_for(local, "wds", tmp_path, num_workers=0, manifest=pattern))
    assert by_pattern.num_samples == 40 and next(iter(by_pattern))["key"] == by_manifest["key"]
    gpu = next(iter(build_loader(cfg_for(local, "wds", tmp_path, num_workers=0, decode="gpu"))))
    assert "image" not in gpu and gpu["jpeg"].dtype == torch.uint8 and gpu["jpeg_box"].shape == (8, 4)
    own = build_loader(cfg_for(local, "wds", tmp_path, num_workers=0), transform=MAETrainTransform(16))
    assert next(iter(own))["image"].shape == (8, 3, 16, 16)
    with pytest.raises(ValueError, match="not JSON"):
        (tmp_path / "bad.json").write_text("{")
        build_loader(cfg_for(local, "wds", tmp_path, manifest=str(tmp_path / "bad.json")))
    if "ffcv" in local:
        with pytest.raises(ValueError, match="WebDataset"):
            build_loader(cfg_for(local, "ffcv", tmp_path, decode="gpu"))
