"""Real 2-process DeepSpeed (ZeRO-2, gloo, CPU) pretraining runs on tiny shards: the loss falls,
checkpoints save and consolidate, and a run killed... stopped at a checkpoint and resumed
equals an uninterrupted one (same sample keys per step, same parameters)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from data_prep.cli import main as prep
from pipelines.pretrain import _free_port as free_port
from tests.data_prep.fixtures import make_image_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    make_image_folder(root / "src", ("a", "b", "c", "d"), per_class=32)
    assert prep(["folder", str(root / "src"), str(root / "wds"), "--shard-samples", "16"]) == 0
    return str(root / "wds/train/manifest.json")


def launch(manifest, out, *overrides, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           "-m", "pipelines.pretrain", "model.preset=crossmae_vit_micro_patch4_dec64d2b", f"data.train={manifest}",
           "data.image_size=32", "data.num_workers=1", "deepspeed.micro_batch=8", "deepspeed.zero_stage=2",
           "optim.lr=2e-3", "optim.warmup_epochs=0", "optim.epochs=4", f"run.output={out}", "run.log_every=1",
           "run.log_keys=true", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def keys_by_step(out):
    steps = {}
    for f in pathlib.Path(out).glob("keys-rank*.jsonl"):
        rank = f.stem.split("rank")[1]
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"], {})[(rank, rec["micro"])] = rec["keys"]
    return steps


def consolidated(out, tag):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(pathlib.Path(out) / "checkpoints"), tag=tag)


def test_two_process_run_trains_checkpoints_and_resumes_exactly(manifest, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    launch(manifest, full, "run.max_steps=10", "run.save_every=5")
    launch(manifest, part, "run.max_steps=5", "run.save_every=5")  # stops at its step-5 checkpoint
    proc = launch(manifest, part, "run.max_steps=10", "run.save_every=5")  # --resume auto
    assert "resumed from step00000005 at step 5" in proc.stderr

    losses = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    a, b = keys_by_step(full), keys_by_step(part)
    assert sorted(a) == sorted(b) == list(range(10))
    assert a == b, "the resumed run saw other samples than the uninterrupted one"
    per_step = [k for step in a.values() for keys in step.values() for k in keys]
    assert len(per_step) == 10 * 2 * 8

    sa, sb = consolidated(full, "step00000010"), consolidated(part, "step00000010")
    assert sa.keys() == sb.keys() and any("decoder.feature_fusion" in k for k in sa)
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k
    assert (full / "config.yaml").exists() and json.loads((full / "deepspeed.json").read_text())["derived"]["world_size"] == 2


def test_bad_config_is_one_line_exit_2(capsys):
    from pipelines.pretrain import main

    assert main(["optim.bogus=1", "data.train=x"]) == 2
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["crossmae-pretrain: error: unknown config key optim.bogus",
                   "crossmae-pretrain: error: data.train is not set (a manifest URL or shard pattern)"]


def test_checkpoints_mirror_to_s3_prune_and_resume_from_the_store(manifest, tmp_path, s3_env, s3_bucket):
    from pipelines import storage

    store = f"s3://{s3_bucket}/runs/r1"
    out = tmp_path / "run"
    launch(manifest, out, "run.max_steps=4", "run.save_every=2", "run.keep_last=1", f"run.store={store}")
    assert json.loads(storage.read_bytes(store + "/latest")) == {"tag": "step00000004", "step": 4}
    tags = {u.split("/checkpoints/")[1].split("/")[0] for u, _ in storage.list_objects(store + "/checkpoints/")}
    assert tags == {"step00000004"}, "keep_last=1 prunes the step-2 checkpoint in the store"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step00000004"]
    import shutil

    shutil.rmtree(out)  # a fresh node: nothing local, everything in the store
    proc = launch(manifest, out, "run.max_steps=6", "run.save_every=2", "run.keep_last=1", f"run.store={store}")
    assert "resumed from step00000004 at step 4" in proc.stderr
    assert json.loads(storage.read_bytes(store + "/latest"))["tag"] == "step00000006"
