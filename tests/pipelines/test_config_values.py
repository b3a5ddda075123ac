"""crossmae-pretrain refuses nonsense values before anything starts: one stderr line naming the
key, exit 2. NaN / inf in any float key, non-positive learning rates, betas outside [0, 1), a
negative weight decay, a min_lr above the peak lr, a warm-up as long as the run, and the
integer keys that would crash later or silently do nothing."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from pipelines import pretrain
from pipelines.runtime.config_loader import ConfigError, load
from pipelines.train.config import OptimSection, PretrainConfig, RunSection

ROOT = pathlib.Path(__file__).resolve().parents[2]

BAD = [
    (["optim.lr=nan"], "optim.lr"), (["optim.lr=.inf"], "optim.lr"), (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1e-3"], "optim.lr"), (["optim.blr=0"], "optim.blr"), (["optim.blr=-1.5e-4"], "optim.blr"),
    (["optim.blr=nan"], "optim.blr"), (["optim.blr=-.inf"], "optim.blr"),
    (["optim.min_lr=1e-3"], "optim.min_lr"),  # the default blr at batch 64 on one process peaks at 1.25e-5
    (["optim.lr=1e-4", "optim.min_lr=2e-4"], "optim.min_lr"), (["optim.min_lr=-1e-6"], "optim.min_lr"),
    (["optim.min_lr=nan"], "optim.min_lr"),
    (["optim.weight_decay=-0.05"], "optim.weight_decay"), (["optim.weight_decay=nan"], "optim.weight_decay"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas"), (["optim.betas=[-0.1, 0.95]"], "optim.betas"),
    (["optim.betas=[0.9, nan]"], "optim.betas"), (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.betas=[0.9, 0.95, 0.99]"], "optim.betas"),
    (["optim.epochs=0"], "optim.epochs"), (["optim.warmup_epochs=800"], "optim.warmup_epochs"),
    (["optim.epochs=10", "optim.warmup_epochs=11"], "optim.warmup_epochs"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs"),
    (["optim.gradient_clipping=-1"], "optim.gradient_clipping"),
    (["optim.gradient_clipping=nan"], "optim.gradient_clipping"),
    (["model.mask_ratio=nan"], "model.mask_ratio"), (["model.mask_ratio=1.0"], "model.mask_ratio"),
    (["model.mask_ratio=-0.1"], "model.mask_ratio"), (["model.pred_ratio=0.9"], "model.pred_ratio"),
    (["model.pred_ratio=0"], "model.pred_ratio"), (["model.pred_ratio=.nan"], "model.pred_ratio"),
    (["data.image_size=230"], "data.image_size"), (["data.block_size=0"], "data.block_size"),
    (["data.shard_cache_bytes=-1"], "data.shard_cache_bytes"),
    (["data.max_skipped_fraction=nan"], "data.max_skipped_fraction"),
    (["deepspeed.micro_batch=0"], "deepspeed.micro_batch"), (["run.seed=-1"], "run.seed"),
    (["run.seed=4294967296"], "run.seed"), (["run.keep_every=-1"], "run.keep_every"),
    (["run.recon_images=0"], "run.recon_images"), (["run.max_nonfinite=0"], "run.max_nonfinite"),
    (["run.peak_tflops=0"], "run.peak_tflops"), (["run.peak_tflops=nan"], "run.peak_tflops"),
    (["run.upload_wait_s=.inf"], "run.upload_wait_s"), (["run.close_wait_s=-1"], "run.close_wait_s"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_nonsense_value_is_one_line_naming_the_key_exit_2_before_training(overrides, key, tmp_path, capsys,
                                                                           monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError(f"{overrides} reached the trainer")

    monkeypatch.setattr(pretrain, "train", train)  # a sentinel: main must refuse before it
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    assert pretrain.main([f"data.train={tmp_path}/train-{{000000..000003}}.tar", f"run.output={out}", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crossmae-pretrain: error: "), lines
    assert key in lines[0], lines[0]
    assert "Traceback" not in lines[0] and not out.exists()


@pytest.mark.parametrize("overrides,key", [(["optim.lr=nan"], "optim.lr"),
                                           (["optim.min_lr=1e-4", "optim.blr=1.5e-4"], "optim.min_lr"),
                                           (["optim.weight_decay=-0.05"], "optim.weight_decay")])
def test_the_real_cli_refuses_before_deepspeed_starts(overrides, key, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", f"data.train={tmp_path}/t-{{0..3}}.tar",
                           f"run.output={out}", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crossmae-pretrain: error: ") and key in lines[0], proc.stderr
    assert not out.exists()  # nothing written: no run directory, no DeepSpeed process group


def test_min_lr_is_checked_against_the_peak_lr_of_the_world_size(monkeypatch):
    """blr scaling makes the peak depend on the world size: 1.5e-4 x 64 / 256 x 1/3 = 1.25e-5 per
    rank. validate() takes the launcher's WORLD_SIZE; derived() checks again with the job's."""
    cfg = load(PretrainConfig, None, ["optim.min_lr=2e-5"])
    with pytest.raises(ConfigError, match=r"optim.min_lr=2e-05 is above the peak lr 1.25e-05 .*world size 1"):
        cfg.validate(world_size=1)
    cfg.validate(world_size=2)  # peak 2.5e-5
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg.validate()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="optim.min_lr"):
        cfg.validate()
    assert cfg.schedule(10_000, 2).lr == pytest.approx(2.5e-5)
    with pytest.raises(ConfigError, match="optim.min_lr=2e-05 is above the peak lr"):
        cfg.schedule(10_000, 1)
    load(PretrainConfig, None, ["optim.lr=1e-4", "optim.min_lr=1e-4"]).validate()  # equal: a constant lr


def test_configs_built_in_python_are_swept_for_non_finite_floats():
    with pytest.raises(ConfigError, match=r"optim.lr must be a finite number, got nan"):
        PretrainConfig(optim=OptimSection(lr=float("nan"))).validate()
    with pytest.raises(ConfigError, match=r"optim.betas must be a finite number"):
        PretrainConfig(optim=OptimSection(betas=(0.9, float("inf")))).validate()
    with pytest.raises(ConfigError, match=r"run.close_wait_s must be a finite number"):
        PretrainConfig(run=RunSection(close_wait_s=float("inf"))).validate()


def test_the_recipe_and_the_shipped_configs_validate():
    PretrainConfig().validate(world_size=1)
    for path in sorted((ROOT / "deploy/configs").glob("crossmae_*.yaml")):
        load(PretrainConfig, str(path), ["data.train=s3://b/train/manifest.json"]).validate(world_size=1)


def test_the_largest_seed_masks_without_overflow():
    """torch seeds are uint64: (seed, step, micro, rank) mixed into a seed overflowed it from run.seed
    = 278,960 on, at the first step; the mix is taken mod 2**64 (smaller values unchanged)."""
    from pipelines.train.step import masking_noise

    cpu = torch.device("cpu")
    a = masking_noise(2**32 - 1, 250_000, 3, 7, 2, 16, cpu)
    assert a.shape == (2, 16) and not torch.equal(a, masking_noise(2**32 - 2, 250_000, 3, 7, 2, 16, cpu))
    expected = torch.rand(2, 16, generator=torch.Generator().manual_seed(((5 * 1_000_003 + 9) * 1009 + 1) * 65537))
    assert torch.equal(masking_noise(5, 9, 1, 0, 2, 16, cpu), expected)  # unchanged for the seeds that worked
