"""Real 2-process DeepSpeed (ZeRO-2, gloo, CPU) pretraining runs on tiny shards: the loss falls,
checkpoints save and consolidate, and a run killed... stopped at a checkpoint and resumed
equals an uninterrupted one (same sample keys per step, same parameters)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_prep.cli import main as prep
from pipelines.runtime.launch import free_port
from tests.data_prep.fixtures import make_image_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    make_image_folder(root / "src", ("a", "b", "c", "d"), per_class=32)
    assert prep(["folder", str(root / "src"), str(root / "wds"), "--shard-samples", "16"]) == 0
    return str(root / "wds/train/manifest.json")


ARGS = ("model.preset=crossmae_vit_micro_patch4_dec64d2b", "data.image_size=32", "data.num_workers=1",
        "deepspeed.micro_batch=8", "optim.lr=2e-3", "optim.warmup_epochs=0", "optim.epochs=4", "run.log_every=1",
        "run.log_keys=true", "run.recon_every=0")


def launch(manifest, out, *overrides, nproc=2, launcher="torchrun", env_extra=None, expect=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **(env_extra or {}),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "pipelines.pretrain"]
    elif launcher == "deepspeed":
        cmd = [str(pathlib.Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
               "--master_port", str(free_port()), "--module", "pipelines.pretrain"]
    else:  # one plain process
        cmd = [sys.executable, "-m", "pipelines.pretrain"]
    cmd += [*ARGS, f"data.train={manifest}", "deepspeed.zero_stage=2", f"run.output={out}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != expect:  # show the first error of any rank, not only the launcher's summary
        lines = [ln for ln in proc.stderr.splitlines() if "Warning" not in ln]
        first = next((i for i, ln in enumerate(lines) if "Traceback" in ln or "error" in ln.lower()), 0)
        pytest.fail(f"exit {proc.returncode}, expected {expect}:\n" + "\n".join(lines[first:first + 60]))
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


def records(out):
    return [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_observability_and_a_skipped_non_finite_step(manifest, tmp_path):
    """Rank 0 writes metrics.jsonl, TensorBoard scalars, reconstruction PNGs and version.json;
    an injected NaN loss (rank 0, step 3) is skipped on every rank and counted, and the run goes on."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "obs"
    proc = launch(manifest, out, "run.max_steps=6", "run.save_every=6", "run.log_every=2", "run.recon_every=3",
                  "run.recon_images=4", env_extra={"CROSSMAE_FAULT_NONFINITE": "3:1"})
    assert "step 3: non-finite loss on 1 rank(s); micro-batch skipped (1 in a row, 1 in total)" in proc.stderr
    recs = records(out)
    assert [r["step"] for r in recs] == [2, 4, 6]
    for r in recs:
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["images_per_s"] > 0 and r["peak_memory_gb"] > 0
        assert r["images_per_s_per_rank"] == pytest.approx(r["images_per_s"] / 2, rel=0.01)
        assert 0 <= r["data_wait_share"] <= r["data_wait_share_max"] <= 1 and r["mfu"] is None  # no GPU peak
        assert r["skipped_samples"] == 0 and r["skipped_samples_rank0"] == {}
    assert [r["skipped_nonfinite"] for r in recs] == [0, 1, 1]
    steps = keys_by_step(out)
    assert sorted(steps) == list(range(6)) and all(len(v) == 2 for v in steps.values())
    seen = [k for v in steps.values() for keys in v.values() for k in keys]
    assert len(seen) == len(set(seen)) == 6 * 2 * 8, "the skipped batch is not trained on, and nothing repeats"

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in recs])
    assert "recon" in acc.Tags()["images"]
    sizes = set()
    for step in (3, 6):
        with Image.open(out / "recon" / f"step{step:08d}.png") as im:
            assert im.width >= 4 * 96 and im.height >= 4 * 96 and im.mode == "RGB"  # cells upscaled, 4 rows
            sizes.add(im.size)
    assert len(sizes) == 1
    a, b = (np.asarray(Image.open(out / "recon" / f"step{s:08d}.png")).astype(int) for s in (3, 6))
    assert (a != b).any(), "reconstructions (and the step in the title) change as the model trains"
    version = json.loads((out / "version.json").read_text())
    assert version["world_size"] == 2 and version["deepspeed"] and version["precision"] == "fp32"


def test_too_many_non_finite_losses_stop_the_run_with_one_line(manifest, tmp_path):
    proc = launch(manifest, tmp_path / "nan", "run.max_steps=4", "run.save_every=1", "run.max_nonfinite=3",
                  launcher="plain", env_extra={"CROSSMAE_FAULT_NONFINITE": "2:10"}, expect=3)
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("crossmae-pretrain: error: 3 non-finite losses in a row at step 2 (run.max_nonfinite=3); "
                    "last checkpoint: step00000002")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_resumes_exactly(manifest, tmp_path, stage):
    full, part = tmp_path / "full", tmp_path / "part"
    launch(manifest, full, "run.max_steps=6", "run.save_every=3", f"deepspeed.zero_stage={stage}")
    launch(manifest, part, "run.max_steps=3", "run.save_every=3", f"deepspeed.zero_stage={stage}")
    proc = launch(manifest, part, "run.max_steps=6", "run.save_every=3", f"deepspeed.zero_stage={stage}")
    assert "resumed from step00000003 at step 3" in proc.stderr
    assert keys_by_step(full) == keys_by_step(part)
    sa, sb = consolidated(full, "step00000006"), consolidated(part, "step00000006")
    assert sa.keys() == sb.keys() and len(sa) > 10
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k
    assert json.loads((full / "deepspeed.json").read_text())["zero_optimization"]["stage"] == stage


def test_deepspeed_launcher_bf16(manifest, tmp_path):
    """`deepspeed --num_gpus 2 --module pipelines.pretrain` (it appends --local_rank) with bf16."""
    out = tmp_path / "ds"
    launch(manifest, out, "run.max_steps=3", "run.save_every=3", "deepspeed.precision=bf16",
           "deepspeed.zero_stage=1", launcher="deepspeed")
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert [r["step"] for r in records(out)] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records(out))
    assert consolidated(out, "step00000003")


def test_failed_mirror_is_reported_and_the_local_checkpoint_kept(manifest, tmp_path):
    """The store takes the run's config but not the checkpoint (its checkpoints/ is a file):
    the failure is one line, counted, the local checkpoint stays, the run exits 1."""
    out, store = tmp_path / "nomirror", tmp_path / "store"
    store.mkdir()
    (store / "checkpoints").write_text("not a directory")
    proc = launch(manifest, out, "run.max_steps=2", "run.save_every=2", f"run.store={store}", expect=1)
    assert f"checkpoint step00000002 not mirrored to {store}" in proc.stderr
    assert "crossmae-pretrain: error: 1 checkpoint(s) were not mirrored" in proc.stderr
    assert (out / "checkpoints" / "step00000002" / "COMPLETE").exists() and not (store / "latest").exists()
    assert (store / "config.yaml").exists()


def test_a_store_in_a_missing_bucket_fails_at_start_in_one_line(manifest, tmp_path, s3_env):
    proc = launch(manifest, tmp_path / "nobucket", "run.max_steps=2", "run.store=s3://no-such-bucket-xyz/run",
                  launcher="plain", expect=2)
    last = proc.stderr.strip().splitlines()[-1]  # the run lock is the first thing written to the store
    assert last.startswith("crossmae-pretrain: error: ") and "s3://no-such-bucket-xyz/run" in last
    assert "bucket does not exist" in last
    assert "Traceback" not in proc.stderr


def test_resize_on_the_device_trains_like_the_cpu_path(manifest, tmp_path):
    """data.resize=device: workers ship crops, the trainer resizes them on its device; same samples,
    same crops (to rounding), so the first steps' losses agree closely with the CPU path's."""
    runs = {}
    for mode in ("cpu", "device"):
        launch(manifest, tmp_path / mode, "run.max_steps=3", "run.save_every=3", f"data.resize={mode}", launcher="plain")
        runs[mode] = records(tmp_path / mode)
    assert keys_by_step(tmp_path / "cpu") == keys_by_step(tmp_path / "device")
    for a, b in zip(runs["cpu"], runs["device"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=2e-3)


def test_random_access_trains_on_one_permutation_of_the_epoch(manifest, tmp_path):
    """data.access=random: the same loop, batches drawn from the whole epoch; a bad value is one line."""
    launch(manifest, tmp_path / "random", "run.max_steps=3", "run.save_every=3", "data.access=random",
           launcher="plain")
    keys = [k for step in keys_by_step(tmp_path / "random").values() for ks in step.values() for k in ks]
    assert len(keys) == len(set(keys)) > 0 and len(records(tmp_path / "random")) == 3
    proc = launch(manifest, tmp_path / "bad", "data.access=shuffle", launcher="plain", expect=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("crossmae-pretrain: error: ") and "data.access" in last and "Traceback" not in proc.stderr


def test_sigterm_saves_a_checkpoint_and_resume_continues(manifest, tmp_path):
    """Preemption: SIGTERM to the launcher (torchrun forwards it to every rank) -> every rank
    stops at the end of the same step, a checkpoint of that step is saved, resume continues."""
    import signal
    import time

    out = tmp_path / "preempt"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pipelines.pretrain", *ARGS, f"data.train={manifest}", "deepspeed.zero_stage=2", f"run.output={out}", "run.max_steps=500",
           "run.save_every=500"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "metrics.jsonl").exists() or \
                len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "stopped by a signal at step" in err, err[-3000:]
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert len(tags) == 1, tags
    step = int(tags[0][4:])
    assert 3 <= step < 500
    resumed = launch(manifest, out, f"run.max_steps={step + 2}", "run.save_every=500")
    assert f"resumed from {tags[0]} at step {step}" in resumed.stderr
    assert records(out)[-1]["step"] == step + 2
