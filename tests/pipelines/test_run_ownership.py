"""A run directory belongs to one run: ``--resume none`` never starts a second run on top of a
first one (unless ``--move-old-run`` sets the old one aside, locally), run.json names the run and
every checkpoint carries its run_id, a checkpoint of another run is refused, and run.output is a
local directory (a URL there is refused before DeepSpeed starts). Real one-process trainer runs."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from tests.pipelines.test_pretrain import ARGS, ROOT, launch, manifest, records  # noqa: F401 (fixture)


def steps(out) -> list[int]:
    return [r["step"] for r in records(out)]


def run_id(out) -> str:
    return json.loads((pathlib.Path(out) / "run.json").read_text())["run_id"]


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def ten_steps(manifest, tmp_path_factory) -> pathlib.Path:
    """A finished 10-step run with checkpoints at steps 5 and 10 (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("ten") / "run"
    launch(manifest, out, "run.max_steps=10", "run.save_every=5", launcher="plain")
    return out


def test_resume_none_on_a_used_run_directory_is_refused_and_changes_nothing(manifest, ten_steps, tmp_path):
    """Before: the new run wrote latest=step 5 into the old run's folder, and the default --resume
    auto then continued the OLD run from step 10 with metrics.jsonl mixing both runs."""
    out = tmp_path / "run"
    shutil.copytree(ten_steps, out)
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = launch(manifest, out, "run.max_steps=5", "run.save_every=5", "--resume", "none", launcher="plain", expect=2)
    assert last_line(proc) == (
        f"crossmae-pretrain: error: --resume none: run.output {out} already holds a run (newest checkpoint "
        f"step00000010), and a new run there would mix with it: continue it with --resume auto, add --move-old-run "
        f"to move it into {out}/previous-<UTC time>/ first, or use another run.output")
    assert "Traceback" not in proc.stderr
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before, "nothing is written"


def test_move_old_run_sets_the_old_run_aside_and_auto_resume_continues_the_new_one(manifest, ten_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ten_steps, out)
    proc = launch(manifest, out, "run.max_steps=5", "run.save_every=5", "--resume", "none", "--move-old-run",
                  launcher="plain")
    aside = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and f"into {aside[0]}/; this run starts at step 0" in proc.stderr
    old = aside[0]
    assert steps(old) == list(range(1, 11)) and (old / "checkpoints/step00000010/COMPLETE").exists()
    assert run_id(old) == run_id(ten_steps) != run_id(out)
    assert steps(out) == [1, 2, 3, 4, 5] and not (out / "checkpoints/step00000010").exists()
    # every checkpoint carries the id of the run that saved it
    state = torch.load(out / "checkpoints/step00000005/mp_rank_00_model_states.pt", weights_only=True)
    assert state["run_id"] == run_id(out)

    proc = launch(manifest, out, "run.max_steps=7", "run.save_every=5", launcher="plain")  # --resume auto
    assert "resumed from step00000005 at step 5" in proc.stderr
    assert steps(out) == list(range(1, 8)), "one run's history, not two"


def test_a_checkpoint_of_another_run_is_refused(manifest, ten_steps, tmp_path):
    """A checkpoint copied in from another run (with DeepSpeed's `latest` record naming it)."""
    out = tmp_path / "run"
    launch(manifest, out, "run.max_steps=5", "run.save_every=5", launcher="plain")
    shutil.copytree(ten_steps / "checkpoints/step00000010", out / "checkpoints/step00000010")
    shutil.copy(ten_steps / "checkpoints/latest", out / "checkpoints/latest")
    proc = launch(manifest, out, "run.max_steps=12", "run.save_every=5", launcher="plain", expect=2)
    assert last_line(proc).startswith(
        f"crossmae-pretrain: error: cannot resume step00000010: it was saved by run {run_id(ten_steps)}, but "
        f"{out}/run.json names run {run_id(out)}: the checkpoint belongs to another run")
    assert "Traceback" not in proc.stderr
    assert steps(out) == [1, 2, 3, 4, 5], "the refused resume logs nothing"


def test_resume_none_on_a_store_that_holds_a_run_is_refused_even_with_move_old_run(manifest, tmp_path, s3_env,
                                                                                   s3_bucket):
    """A store's objects are not moved aside: a new run needs another run.store."""
    from pipelines.checkpoints import store as ckpt
    from pipelines import storage

    store = f"s3://{s3_bucket}/runs/r1"
    launch(manifest, tmp_path / "a", "run.max_steps=5", "run.save_every=5", f"run.store={store}", launcher="plain")
    record = storage.read_bytes(store + "/run.json")
    assert json.loads(record)["run_id"] == run_id(tmp_path / "a")
    for extra in ([], ["--move-old-run"]):  # a fresh node's empty run.output, the used store
        proc = launch(manifest, tmp_path / "b", "run.max_steps=5", "run.save_every=5", f"run.store={store}",
                      "--resume", "none", *extra, launcher="plain", expect=2)
        assert last_line(proc).startswith(f"crossmae-pretrain: error: --resume none: run.store {store} already holds "
                                          "a run (newest checkpoint step00000005)"), proc.stderr[-2000:]
    assert ckpt.latest(store)["tag"] == "step00000005" and storage.read_bytes(store + "/run.json") == record


def test_the_refusal_of_a_changed_model_recommends_what_works(manifest, ten_steps, tmp_path):
    """It used to recommend --resume none, which then mixed two runs in one folder."""
    out = tmp_path / "run"
    shutil.copytree(ten_steps, out)
    proc = launch(manifest, out, "run.max_steps=12", "model.preset=mae_vit_micro_patch4_dec64d2b", launcher="plain",
                  expect=2)
    hint = "or start over in this one with --resume none --move-old-run"
    assert last_line(proc).startswith("crossmae-pretrain: error: cannot resume step00000010") and hint in last_line(proc)
    proc = launch(manifest, out, "run.max_steps=2", "run.save_every=2", "model.preset=mae_vit_micro_patch4_dec64d2b",
                  "--resume", "none", "--move-old-run", launcher="plain")
    assert steps(out) == [1, 2] and json.loads((out / "version.json").read_text())


@pytest.mark.parametrize("output", ["s3://bucket/x", "file:///tmp/x"])
def test_a_url_as_run_output_is_refused_before_deepspeed_starts(manifest, tmp_path, output):
    """Before: run.output=s3://bucket/x wrote into ./s3:/bucket/x while printing "checkpoint s3://bucket/x/..."."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", *ARGS, f"data.train={manifest}",
                           f"run.output={output}", "run.max_steps=2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == (f"crossmae-pretrain: error: run.output={output} is a URL, but run.output is the local run "
                        f"directory (logs, local checkpoints); put the URL in run.store (e.g. run.store={output} "
                        "run.output=/scratch/<run>)")
    assert list(tmp_path.iterdir()) == [], "nothing written where the URL would land as a path"
