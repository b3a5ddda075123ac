"""The trainer on the paths a new user or a GPU takes: every collective on the backend's device,
a crash ends the process at once with the real error last, bad runs refused before anything is
written, and the lines a short run and a finished run print."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.pipelines.test_pretrain import ARGS, ROOT, launch, manifest, records  # noqa: F401 (fixture)


def test_every_collective_takes_its_tensor_on_the_backends_device(manifest, tmp_path):
    """NCCL refuses CPU tensors; gloo accepts them, so CPU runs never saw the crash at step 1.
    CROSSMAE_CHECK_COLLECTIVES=meta makes this 2-process gloo run refuse, as NCCL would, any
    collective the project issues directly or with a tensor not on the collective device
    (the trainer before pipelines/runtime/distributed.py failed here at its first step)."""
    out = tmp_path / "meta"
    launch(manifest, out, "run.max_steps=3", "run.save_every=3", "run.log_every=1",
           env_extra={"CROSSMAE_CHECK_COLLECTIVES": "meta"})
    assert [r["step"] for r in records(out)] == [1, 2, 3]


def test_a_crash_ends_the_process_at_once_with_the_real_error_last(manifest, tmp_path):
    """An exception at step 2, with 2 loader workers running: before, the process waited 60 s
    at exit and its last line was `DataLoader worker ... killed by signal: Alarm clock`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CROSSMAE_FAULT_RAISE="2")
    cmd = [sys.executable, "-m", "pipelines.pretrain", *ARGS, f"data.train={manifest}",
           f"run.output={tmp_path / 'crash'}", "data.num_workers=2", "run.max_steps=10"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    t_exit = time.monotonic() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert lines[-1] == "crossmae-pretrain: error: RuntimeError: injected failure at step 2 (CROSSMAE_FAULT_RAISE)"
    assert "Alarm clock" not in proc.stderr
    # the whole run (DeepSpeed start included) takes ~10-20 s here; the old exit alone took 60 s
    assert t_exit < 50, f"{t_exit:.1f} s"


def test_a_batch_larger_than_the_data_is_refused_before_training(manifest, tmp_path):
    """Before: 2,000 per micro batch on 128 images spun through empty epochs forever."""
    out = tmp_path / "big"
    proc = launch(manifest, out, "deepspeed.micro_batch=2000", launcher="plain", expect=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("crossmae-pretrain: error: ") and "128 samples over 1 rank(s)" in last and "2000" in last
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_a_resume_with_another_model_is_refused_and_changes_nothing(manifest, tmp_path):
    out = tmp_path / "run"
    launch(manifest, out, "run.max_steps=2", "run.save_every=2", launcher="plain")
    before = (out / "config.yaml").read_text()
    proc = launch(manifest, out, "run.max_steps=4", "model.preset=mae_vit_micro_patch4_dec64d2b",
                  launcher="plain", expect=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("crossmae-pretrain: error: cannot resume step00000002")
    assert "model.preset: 'crossmae_vit_micro_patch4_dec64d2b' -> 'mae_vit_micro_patch4_dec64d2b'" in last
    assert "Traceback" not in proc.stderr
    assert (out / "config.yaml").read_text() == before, "config.yaml must not be rewritten by a refused resume"


def test_short_run_note_and_end_of_run_summary(manifest, tmp_path):
    out = tmp_path / "short"
    proc = launch(manifest, out, "run.max_steps=2", "run.save_every=2", "optim.warmup_epochs=2",
                  launcher="plain")
    assert "crossmae-pretrain: note: the run stops at step 2, inside the 32-step warm-up" in proc.stderr
    done = [ln for ln in proc.stderr.splitlines() if ln.startswith("crossmae-pretrain: done:")]
    assert len(done) == 1 and "step 2 (2 this run), final loss" in done[0] and "img/s" in done[0]
    assert str(out / "checkpoints" / "step00000002") in done[0]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["decode"] == "cpu" and json.loads((out / "deepspeed.json").read_text())["derived"]["warmup_steps"] == 32


def test_pretraining_on_ffcv_data_trains_and_resumes(tmp_path):
    """data.train may be an FFCV manifest (crossmae-prep --format ffcv): staged locally, trained
    on, and resumed from its checkpoint at the same rows."""
    pytest.importorskip("ffcv", reason="FFCV is an optional extra (make setup installs it)")
    from data_prep.cli import main as prep
    from tests.data_prep.fixtures import make_image_folder

    make_image_folder(tmp_path / "src", ("a", "b"), per_class=24)
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "ffcv"), "--format", "ffcv",
                 "--ffcv-max-resolution", "48"]) == 0
    manifest = str(tmp_path / "ffcv/train/manifest.json")
    out = tmp_path / "run"
    launch(manifest, out, "run.max_steps=2", "run.save_every=2", "data.num_workers=1", "run.recon_every=2",
           launcher="plain")  # the grid's fixed batch comes from the FFCV data too
    proc = launch(manifest, out, "run.max_steps=4", "run.save_every=2", "data.num_workers=1", launcher="plain")
    assert "resumed from step00000002 at step 2" in proc.stderr
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in records(out))


def test_damaged_shards_are_said_counted_and_bounded(manifest, tmp_path):
    """A truncated shard: one warning line per damaged shard, the end summary counts the
    replaced samples, and above data.max_skipped_fraction the run stops with one line."""
    import pathlib
    import shutil

    data = tmp_path / "data"
    shutil.copytree(pathlib.Path(manifest).parent, data)
    tar = sorted(data.glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])  # most of its 16 samples gone
    damaged = str(data / "manifest.json")
    ok = launch(damaged, tmp_path / "lenient", "run.max_steps=16", "run.save_every=16", "data.max_skipped_fraction=0.5",
                "run.log_every=5",
                launcher="plain")
    warnings = [ln for ln in ok.stderr.splitlines() if tar.name in ln]
    assert len(warnings) == 1, ok.stderr[-3000:]
    done = [ln for ln in ok.stderr.splitlines() if ln.startswith("crossmae-pretrain: done:")][0]
    assert "samples damaged and replaced" in done
    strict = launch(damaged, tmp_path / "strict", "run.max_steps=16", "run.save_every=16", launcher="plain", expect=2)
    last = strict.stderr.strip().splitlines()[-1]
    assert last.startswith("crossmae-pretrain: error: ") and "data.max_skipped_fraction=0.01" in last


def test_resuming_on_fewer_ranks_keeps_the_lr_curve_and_says_what_changed(manifest, tmp_path):
    """2 ranks -> 1 rank without grad_accum: the effective batch halves. The lr schedule is kept
    in samples, so the first resumed step has the lr the 2-rank run had at that sample count
    (the per-step schedule jumped: 0.00053 -> 0.00091 in the report), and the change is printed."""
    two, part = tmp_path / "two", tmp_path / "part"
    launch(manifest, two, "run.max_steps=5", "run.save_every=5")
    launch(manifest, part, "run.max_steps=3", "run.save_every=3")
    proc = launch(manifest, part, "run.max_steps=5", "run.save_every=5", nproc=1)
    assert "resume: effective batch 16 -> 8 (world size 2 -> 1)" in proc.stderr
    assert "resume: the schedule continues in samples: 48 of 512 seen" in proc.stderr
    lr_two = {r["step"]: r["lr"] for r in records(two)}
    lr_one = {r["step"]: r["lr"] for r in records(part)}
    assert lr_one[4] == pytest.approx(lr_two[4])  # both at sample 48
    assert lr_one[5] > lr_two[5]  # 1 rank moves through the curve at half the samples per step
