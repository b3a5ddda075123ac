"""Process faults, for real: `kill -9` of one rank or of the whole 2-process DeepSpeed job at a
seeded random point, a crash in the middle of a checkpoint save or upload, and a data-prep run
killed mid-way on S3. After each, the re-run (`--resume auto`) finishes with exactly the samples
and the parameters of an uninterrupted run, or, for data prep, byte-identical output."""
from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import psutil  # a DeepSpeed dependency
import pytest
import torch

from data_prep.cli import main as prep
from pipelines import storage
from pipelines.runtime.launch import free_port
from tests.data_prep.fixtures import make_image_folder
from tests.pipelines.test_pretrain import ARGS, consolidated

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRIALS = int(os.environ.get("CROSSMAE_FAULT_TRIALS", "1"))  # seeds per kill scenario (RELIABILITY.md runs more)
STEPS, SAVE_EVERY = 12, 2  # 128 samples, 16 per step: 8 steps an epoch, so runs cross an epoch boundary
RUN = (f"run.max_steps={STEPS}", f"run.save_every={SAVE_EVERY}", "run.keep_last=100", "deepspeed.zero_stage=2")
ENV = dict(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))

# Runs pipelines.pretrain and SIGKILLs itself at a chosen point of writing checkpoint CRASH_TAG:
# CRASH_IN=save: while torch.save writes the tag's 2nd file (half of its bytes are on disk);
# CRASH_IN=upload: while the store upload of the tag's 2nd file is in progress (nothing of it visible).
CRASHER = '''
import io, os, runpy, signal, sys
sys.path.insert(0, os.getcwd())  # the repository root, as for `python -m`
import torch
from pipelines import storage
tag, where, seen = os.environ["CRASH_TAG"], os.environ["CRASH_IN"], []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save(obj, f, *args, **kwargs):
    if where == "save" and isinstance(f, (str, os.PathLike)) and f"/{tag}/" in os.fspath(f):
        seen.append(f)
        if len(seen) == 2:
            buf = io.BytesIO()
            _save(obj, buf, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            die()
    return _save(obj, f, *args, **kwargs)

def open_write(url, *args, **kwargs):
    if where == "upload" and f"/checkpoints/{tag}/" in url:
        seen.append(url)
        if len(seen) == 2:
            die()
    return _open_write(url, *args, **kwargs)

_save, torch.save = torch.save, save
_open_write, storage.open_write = storage.open_write, open_write
sys.argv[0] = "pipelines.pretrain"
runpy.run_module("pipelines.pretrain", run_name="__main__", alter_sys=True)
'''


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("process-faults")
    make_image_folder(root / "src", ("a", "b", "c", "d"), per_class=32)
    assert prep(["folder", str(root / "src"), str(root / "wds"), "--shard-samples", "16"]) == 0
    return str(root / "wds/train/manifest.json")


def start(manifest: str, out: pathlib.Path, *overrides: str, nproc: int = 2, script: str | None = None,
          env_extra: dict | None = None) -> subprocess.Popen:
    """The trainer under torchrun (nproc > 0) or as one plain process;
    stdout and stderr go to out.log (appended: a resumed run adds to it)."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port())]
        cmd += [script] if script else ["-m", "pipelines.pretrain"]
    else:
        cmd = [sys.executable, *([script] if script else ["-m", "pipelines.pretrain"])]
    cmd += [*ARGS, f"data.train={manifest}", *RUN, f"run.output={out}", *overrides]
    log = open(f"{out}.log", "ab")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **ENV, **(env_extra or {})), stdout=log,
                                stderr=subprocess.STDOUT)
    finally:
        log.close()


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The job's processes: the launcher and all its descendants (torchrun starts every rank in a
    session of its own, so the launcher's process group does not hold them)."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)  # psutil checks the pid still names the same process
        except psutil.NoSuchProcess:
            pass


def finish(proc: subprocess.Popen, out: pathlib.Path, expect: int | None = 0, timeout: float = 300) -> str:
    """Wait for the job, kill whatever of it is left (ranks or DataLoader workers a dead launcher
    left behind), return its log."""
    procs = tree(proc)
    try:
        rc = proc.wait(timeout)
    finally:
        kill(procs + tree(proc))
    text = pathlib.Path(f"{out}.log").read_text(errors="replace")
    if expect is not None and rc != expect:
        pytest.fail(f"exit {rc}, expected {expect}:\n{text[-4000:]}")
    return text


def run(manifest, out, *overrides, **kw) -> str:
    return finish(start(manifest, out, *overrides, **kw), out)


def logged_step(out: pathlib.Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def wait_for_step(proc: subprocess.Popen, out: pathlib.Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(out) < step:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.01)


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's workers (its direct children carry RANK in their environment)."""
    ranks = {}
    for child in psutil.Process(proc.pid).children():
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            ranks[int(rank)] = child.pid
    return ranks


def complete_tags(out: pathlib.Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if (p / "COMPLETE").exists()) if root.exists() else []


def step_keys(out: pathlib.Path, suffix: str = "") -> dict[int, dict]:
    """{step: {(rank, micro): keys}} from keys-rank*.jsonl; for a step logged twice (a run that
    went on past its last checkpoint, then the resumed run) the last record wins."""
    steps = {}
    for f in sorted(out.glob(f"keys-rank*.jsonl{suffix}")):
        rank = int(f.name.split("rank")[1].split(".")[0])
        for line in f.read_text().splitlines():
            if line.endswith("}"):  # a line cut by the kill is not a record
                rec = json.loads(line)
                steps.setdefault(rec["step"], {})[(rank, rec["micro"])] = rec["keys"]
    return steps


def assert_same_params(a: pathlib.Path, b: pathlib.Path, tag: str) -> None:
    sa, sb = consolidated(a, tag), consolidated(b, tag)
    assert sa.keys() == sb.keys() and len(sa) > 10
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> pathlib.Path:
    """The uninterrupted 2-process run every killed run is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(manifest, out)
    steps = step_keys(out)
    assert sorted(steps) == list(range(STEPS)) and all(len(v) == 2 for v in steps.values())
    for epoch in range(0, STEPS, 8):  # within an epoch no sample repeats
        keys = [k for s in range(epoch, min(STEPS, epoch + 8)) for ks in steps[s].values() for k in ks]
        assert len(keys) == len(set(keys)) == 16 * min(8, STEPS - epoch)
    return out


@pytest.fixture(scope="module")
def reference_plain(manifest, tmp_path_factory) -> pathlib.Path:
    """The uninterrupted run for the one-process crash tests."""
    out = tmp_path_factory.mktemp("reference-plain") / "run"
    run(manifest, out, nproc=0)
    return out


@pytest.fixture(scope="module", params=[(what, seed) for what in ("rank", "job") for seed in range(TRIALS)],
                ids=lambda p: f"kill-{p[0]}-seed{p[1]}")
def killed_and_resumed(request, manifest, reference, tmp_path_factory) -> dict:
    """Start the 2-process run, SIGKILL one rank (or the whole process group) at a seeded random
    point, set the killed run's key logs aside, resume with --resume auto (the default)."""
    what, seed = request.param
    rng = random.Random(seed * 7919 + (what == "job"))
    kill_step, delay = rng.randint(3, STEPS - 2), rng.uniform(0.0, 0.3)
    out = tmp_path_factory.mktemp(f"kill-{what}") / "run"
    proc = start(manifest, out)
    wait_for_step(proc, out, kill_step)
    time.sleep(delay)  # a random point inside the step: compute, collectives, a checkpoint save
    if what == "rank":
        pids = rank_pids(proc)
        assert sorted(pids) == [0, 1], pids
        victim = rng.choice([0, 1])
        os.kill(pids[victim], signal.SIGKILL)
    else:
        victim = "all"
        kill(tree(proc))  # a preempted node: launcher, ranks and loader workers at once
    finish(proc, out, expect=None, timeout=120)  # torchrun tears the other rank down
    assert proc.returncode != 0
    killed_at = logged_step(out)
    tags = complete_tags(out)
    assert tags, "a checkpoint completes every 2 steps, before step 3 starts"
    for f in out.glob("keys-rank*.jsonl"):
        f.rename(f.with_name(f.name + ".killed"))
    log = run(manifest, out)
    return dict(out=out, what=what, seed=seed, victim=victim, kill_step=kill_step, delay=delay, killed_at=killed_at,
                tag=tags[-1], step=int(tags[-1][4:]), log=log)


def _record(record_property, k: dict, checked: str, result: str = "pass") -> None:
    record_property("fault", f"kill -9 of {'rank ' + str(k['victim']) if k['what'] == 'rank' else 'the whole job'} "
                             f"after step {k['killed_at']} (seed {k['seed']}: step {k['kill_step']} + "
                             f"{k['delay']:.2f} s), 2-process ZeRO-2 run; resumed from {k['tag']}")
    record_property("trials", 1)
    record_property("checked", checked)
    record_property("result", result)


def test_killed_run_resumes_with_the_same_samples_and_parameters(killed_and_resumed, reference, record_property):
    """After kill -9 (one rank or the job) and --resume auto: steps after the last complete checkpoint see
    exactly the uninterrupted run's samples, and the final parameters match it (atol 1e-6)."""
    k = killed_and_resumed
    _record(record_property, k, "resume picks the newest COMPLETE tag; resumed steps' sample keys == the "
                                "uninterrupted run's; no sample twice per epoch; consolidated params atol 1e-6")
    assert f"resumed from {k['tag']} at step {k['step']}" in k["log"]
    ref, resumed = step_keys(reference), step_keys(k["out"])
    assert sorted(resumed) == list(range(k["step"], STEPS)), "the resumed run redoes exactly the unsaved steps"
    assert resumed == {s: ref[s] for s in resumed}
    assert_same_params(reference, k["out"], f"step{STEPS:08d}")


def test_killed_run_keeps_its_key_log_up_to_the_checkpoint(killed_and_resumed, reference, record_property):
    """The keys the killed run logged up to its last checkpoint + the resumed run's == one uninterrupted run."""
    k = killed_and_resumed
    _record(record_property, k, "killed run's key log (steps <= checkpoint) + resumed run's == uninterrupted run's",
            "pass")
    ref, before = step_keys(reference), step_keys(k["out"], ".killed")
    union = {s: before.get(s) for s in range(k["step"])} | step_keys(k["out"])
    assert union == ref


def crash_script(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "crash_at.py"
    path.write_text(CRASHER)
    return str(path)


def test_crash_while_saving_leaves_the_previous_checkpoint_selected(manifest, reference_plain, tmp_path,
                                                                    record_property):
    """SIGKILL half-way through writing checkpoint step 6: no COMPLETE, so resume picks step 4 and the run
    ends equal to an uninterrupted one."""
    record_property("fault", "SIGKILL while torch.save writes the 2nd file of checkpoint step 6 (half on disk)")
    record_property("trials", 1)
    record_property("checked", "tag 6 has no COMPLETE; resume picks step 4; final params == uninterrupted (atol 1e-6)")
    out = tmp_path / "run"
    proc = start(manifest, out, nproc=0, script=crash_script(tmp_path),
                 env_extra=dict(CRASH_TAG="step00000006", CRASH_IN="save"))
    finish(proc, out, expect=-signal.SIGKILL)
    assert complete_tags(out) == ["step00000002", "step00000004"]
    partial = out / "checkpoints/step00000006"
    assert len(list(partial.iterdir())) == 2 and not (partial / "COMPLETE").exists()
    log = run(manifest, out, nproc=0)
    assert "resumed from step00000004 at step 4" in log
    assert (partial / "COMPLETE").exists()
    assert_same_params(reference_plain, out, f"step{STEPS:08d}")
    record_property("result", "pass")


def test_crash_while_uploading_leaves_the_store_on_the_previous_checkpoint(manifest, reference_plain, tmp_path,
                                                                           s3_bucket, record_property):
    """SIGKILL during the store upload of checkpoint step 6: `latest` still names step 4, a fresh node
    resumes from the store at step 4 and the run ends equal to an uninterrupted one."""
    from pipelines.checkpoints import store as ckpt

    record_property("fault", "SIGKILL while uploading checkpoint step 6 to S3 (run.store, async upload)")
    record_property("trials", 1)
    record_property("checked", "store latest == step 4, tag 6 not COMPLETE there; fresh node resumes from the store "
                               "at step 4; final params == uninterrupted (atol 1e-6)")
    store, out = f"s3://{s3_bucket}/runs/r1", tmp_path / "run"
    proc = start(manifest, out, f"run.store={store}", nproc=0, script=crash_script(tmp_path),
                 env_extra=dict(CRASH_TAG="step00000006", CRASH_IN="upload"))
    finish(proc, out, expect=-signal.SIGKILL)
    assert ckpt.latest(store) == {"tag": "step00000004", "step": 4}
    assert not storage.exists(f"{store}/checkpoints/step00000006/COMPLETE")
    os.rename(out, tmp_path / "first-node")  # a fresh node: nothing local, only the store
    log = run(manifest, out, f"run.store={store}", nproc=0)
    assert "resumed from step00000004 at step 4" in log
    assert ckpt.latest(store)["tag"] == f"step{STEPS:08d}"
    assert_same_params(reference_plain, out, f"step{STEPS:08d}")
    record_property("result", "pass")


def test_prep_to_s3_killed_mid_run_gives_identical_output(tmp_path, s3_bucket, s3_env, record_property):
    """crossmae-prep to s3:// SIGKILLed after a few shards, then re-run: the same bytes as a clean run,
    no stray or partial objects, and a manifest that names only complete shards."""
    record_property("fault", "SIGKILL of crossmae-prep writing to S3 after >= 3 finished shards (of 30)")
    record_property("trials", 1)
    record_property("checked", "re-run output byte-identical to a clean run; only manifest/_plan/_parts/shards listed; "
                               "no multipart uploads left; manifest sizes + sha256 match the objects")
    make_image_folder(tmp_path / "src", ("a", "b", "c", "d"), per_class=60)
    args = ["folder", str(tmp_path / "src"), None, "--shard-samples", "8"]
    assert prep([a or str(tmp_path / "ref") for a in args]) == 0
    dst = f"s3://{s3_bucket}/x"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", *[a or dst for a in args]], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(storage.list_objects(dst + "/train/_parts/"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the kill should land mid-run"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(storage.list_objects(dst + "/train/_parts/")))
    assert 3 <= done < 30 and not storage.exists(dst + "/train/manifest.json")
    assert prep([a or dst for a in args]) == 0

    ref = tmp_path / "ref/train"
    manifest = json.loads(storage.read_bytes(dst + "/train/manifest.json"))
    names = [s["name"] for s in manifest["shards"]]
    listed = {u.removeprefix(dst + "/train/"): n for u, n in storage.list_objects(dst + "/")}
    assert set(listed) == {"manifest.json", "_plan.json", *names, *(f"_parts/{n}.json" for n in names)}
    assert sorted(names) == sorted(p.name for p in ref.glob("*.tar")) and len(names) == 30
    for s in manifest["shards"]:
        data = storage.read_bytes(f"{dst}/train/{s['name']}")
        assert data == (ref / s["name"]).read_bytes() and len(data) == s["bytes"] == listed[s["name"]]
    assert not s3_env.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    clean = json.loads((ref / "manifest.json").read_text())
    for m in (manifest, clean):
        m.pop("created")
    assert manifest == clean
    record_property("result", "pass")
