"""The README's main-job command, shortened: real digits -> shards -> 2-process DeepSpeed
pretraining -> consolidated checkpoint -> timm export that loads strictly."""
import json

import timm
import torch

from pipelines.demo import main


def test_demo_runs_end_to_end(tmp_path):
    assert main(["--out", str(tmp_path / "demo"), "--steps", "20"]) == 0
    summary = json.loads((tmp_path / "demo/demo.json").read_text())
    assert summary["steps"] == 20
    manifest = json.loads((tmp_path / "demo/store/train/manifest.json").read_text())
    assert manifest["num_samples"] == 1500 and manifest["classes"] == [str(i) for i in range(10)]
    cfg = json.loads((tmp_path / "demo/export/config.json").read_text())
    vit = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "demo/export/model.safetensors")))
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 64)
