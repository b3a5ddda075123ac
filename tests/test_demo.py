"""The README's main-job command, shortened: real digits -> shards -> 2-process DeepSpeed
pretraining -> every checkpoint exported (timm) -> k-NN report; locally and on S3."""
import json

from crossmae.timm_export import load_timm
import torch

from pipelines import storage
from pipelines.demo import main


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)  # as users run it (tests/conftest.py sets it)
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--steps", "12"]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["steps"] == 12 and summary["last_loss"] < summary["first_loss"]
    assert 0 <= summary["data_wait_share"] < 1 and summary["images_per_s"] > 0
    assert sorted(summary["knn_top1_by_step"], key=int) == ["0", "4", "8", "12"]
    assert all(10 < v <= 100 for v in summary["knn_top1_by_step"].values()), "far above chance (10%) already"
    manifest = json.loads((out / "store/train/manifest.json").read_text())
    assert manifest["num_samples"] == 1500 and manifest["classes"] == [str(i) for i in range(10)]
    export = out / "store/exports/step00000012"
    vit = load_timm(str(export))  # strict, with the export's pretrained_cfg
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 64)
    assert json.loads((out / "store/run/latest").read_text())["tag"] == "step00000012"
    assert [p.name for p in sorted((out / "run/recon").glob("*.png"))] == [f"step{s:08d}.png" for s in (4, 8, 12)]
    assert {p.name for p in (out / "report").iterdir()} == {"report.md", "report.csv", "report.png"}


def test_demo_against_object_storage(tmp_path, s3_env, s3_bucket):
    store = f"s3://{s3_bucket}/demo"
    assert main(["--out", str(tmp_path / "demo"), "--store", store, "--steps", "8"]) == 0
    summary = json.loads((tmp_path / "demo/demo.json").read_text())
    assert summary["store"] == store and sorted(summary["knn_top1_by_step"], key=int) == ["0", "4", "6", "8"]
    keys = {u[len(store) + 1:] for u, _ in storage.list_objects(store + "/")}
    assert {"train/manifest.json", "val/manifest.json", "run/latest", "run/config.yaml",
            "exports/step00000008/model.safetensors", "exports/step00000008/export.json",
            "exports/step00000008/eval/knn.json"} <= keys
    assert not any(k.startswith("run/checkpoints/step00000002/") for k in keys), "the store keeps the last 3 checkpoints"
