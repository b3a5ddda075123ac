"""FFCV output: a real .beton written by FFCV's DatasetWriter and read back by its Loader."""
import json

import numpy as np
import pytest

from data_prep.cli import main
from data_prep.ffcv_out import FFCVOptions, ffcv_plan
from data_prep.sources import list_image_folder
from tests.data_prep.fixtures import make_bad_images, make_image_folder

ffcv = pytest.importorskip("ffcv", reason="FFCV is an optional extra (make setup installs it)")


def test_folder_to_ffcv_reads_back_in_plan_order(tmp_path, s3_bucket):
    src = tmp_path / "src"
    make_image_folder(src, ("cat", "dog", "eel"), per_class=8)
    make_bad_images(src / "eel")
    dst = f"s3://{s3_bucket}/ffcv"
    assert main(["folder", str(src), dst, "--format", "ffcv", "--ffcv-max-resolution", "64", "--seed", "3"]) == 0
    from pipelines import storage

    manifest = json.loads(storage.read_bytes(dst + "/train/manifest.json"))
    assert manifest["format"] == "ffcv" and manifest["num_samples"] == 24 + 3  # 3 converted, 3 rejected
    assert manifest["num_rejected"] == 3 and manifest["num_converted"] == 3
    local = tmp_path / "train.beton"
    local.write_bytes(storage.read_bytes(dst + "/train/train.beton"))
    import hashlib

    assert hashlib.sha256(local.read_bytes()).hexdigest() == manifest["shards"][0]["sha256"]

    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(local), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((32, 32), ratio=1.0)], "label": [IntDecoder()]})
    images, labels = [], []
    for img, lab in loader:
        images.append(np.asarray(img))
        labels.extend(np.asarray(lab).reshape(-1).tolist())
    assert sum(len(b) for b in images) == 27 and images[0].shape[1:] == (32, 32, 3)
    listing = list_image_folder(str(src), "train")
    shard, _, _ = ffcv_plan(listing, 3, "header", FFCVOptions(max_resolution=64))
    rejected = {r["key"] for r in manifest["rejects"]}
    expected = [listing.items[i].label for i in shard.items if listing.items[i].key not in rejected]
    assert labels == expected  # stored in the plan's shuffled order
    assert main(["folder", str(src), dst, "--format", "ffcv", "--ffcv-max-resolution", "64", "--seed", "3"]) == 0
