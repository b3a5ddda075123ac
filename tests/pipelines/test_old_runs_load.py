"""What users already have on disk keeps working: a run directory, its checkpoint, an export and a
manifest written by the code of 2026-12-01 (commit cb6511b, tests/data/run_2026_12_01: micro
preset, 32 px, 2 steps, ZeRO-0, one process) resume, export, load and stream with today's code."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OLD = ROOT / "tests/data/run_2026_12_01"
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))


def _copy(tmp_path) -> pathlib.Path:
    dst = tmp_path / "old"
    shutil.copytree(OLD, dst)
    return dst


def test_a_run_of_the_previous_version_resumes_with_its_weight_decay_rule(tmp_path):
    old = _copy(tmp_path)
    cmd = [sys.executable, "-m", "pipelines.pretrain", "--config", str(old / "run/config.yaml"),
           f"data.train={old}/wds/train/manifest.json", f"run.output={old}/run", "run.max_steps=4",
           "data.num_workers=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step00000002" in proc.stderr
    assert "earlier weight-decay rule" in proc.stderr
    assert (old / "run/checkpoints/latest").read_text().strip() == "step00000004"
    steps = [json.loads(line)["step"] for line in (old / "run/metrics.jsonl").read_text().splitlines()
             if '"step"' in line and '"loss"' in line]
    assert steps and max(steps) == 4


def test_an_export_of_the_previous_version_loads_strictly_and_verified(tmp_path):
    from crossmae.timm_export import load_timm

    old = _copy(tmp_path)
    vit = load_timm(str(old / "export/step00000002"))
    with torch.no_grad():
        out = vit.forward_features(torch.zeros(1, 3, 32, 32))
    assert torch.isfinite(out).all()


def test_a_checkpoint_of_the_previous_version_exports(tmp_path):
    old = _copy(tmp_path)
    out = tmp_path / "exports"
    proc = subprocess.run([sys.executable, "-m", "pipelines.export", str(old / "run"), str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = json.loads((out / "step00000002/export.json").read_text())
    was = json.loads((old / "export/step00000002/export.json").read_text())
    assert new["weights_sha256"] == was["weights_sha256"]  # the same weights, bit for bit


def test_a_manifest_of_the_previous_version_streams(tmp_path):
    from pipelines.data.factory import LoaderConfig, build_loader

    old = _copy(tmp_path)
    loader = build_loader(LoaderConfig(manifest=str(old / "wds/train/manifest.json"), batch_size=4, num_workers=0,
                                       image_size=32), train=True)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    assert batch["image"].shape == (4, 3, 32, 32) and loader.num_samples == 16
