"""One factory, two formats, one batch format."""
import json
import os

import pytest
import torch

from data_prep.cli import main as prep
from pipelines import storage
from pipelines.loaders import LoaderConfig, build_loader, stage_local
from tests.data_prep.fixtures import make_image_folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    make_image_folder(root / "src", ("ant", "bee"), per_class=20)
    return root / "src"


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
