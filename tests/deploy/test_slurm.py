"""deploy/slurm/ run as written under a real Slurm 22.05 cluster (tests/deploy/slurm_cluster.py:
2 nodes of 1 CPU, each slurmd in its own network namespace and address), on the S3 test
server: prep.sbatch as a 2-task array, finalize.sbatch, `crossmae-prep verify`;
pretrain.sbatch across both nodes; export_eval.sbatch on its checkpoints; preemption (USR1,
`scontrol requeue`, `scancel`), resumed with exactly the unseen samples (a lost node:
test_slurm_lost_node.py). CPU overrides come only from the sbatch command line and the
environment, as a user's would. The phase timings are printed after the session (pytest -s)
and quoted in deploy/README.md."""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import time

import pytest

from tests.deploy.slurm_jobs import (BIN, EXPORT_CPU, MAX_STEPS, RUN, SAVE_EVERY, SLURM, TIMINGS, TRAIN_IMAGES,
                                     VAL_IMAGES, finished_ok, keys_by_step, logged_steps, output, submit_pretrain,
                                     use_store, wait_for)


def test_prep_array_runs_one_slice_per_node_then_finalize_and_verify_pass(slurm_dataset, slurm_work, monkeypatch):
    dataset, work = slurm_dataset, slurm_work
    tasks = sorted(dataset["tasks"], key=lambda t: int(t["ArrayTaskId"]))
    assert [t["ArrayTaskId"] for t in tasks] == ["0", "1"]
    assert all(finished_ok(t) for t in tasks), [(t["JobState"], t["ExitCode"]) for t in tasks]
    assert {t["NodeList"] for t in tasks} == {"node1", "node2"}, "the two slices ran side by side, one per node"
    written = 0
    for t in tasks:
        log = output(work, f"crossmae-prep-{dataset['prep']}_{t['ArrayTaskId']}.out")
        assert "train:" in log and "Traceback" not in log, log[-2000:]
        (train,) = [s for s in json.loads((work / f"prep-{t['ArrayTaskId']}.json").read_text())["splits"]
                    if s["split"] == "train"]
        assert train["planned_shards"] == TRAIN_IMAGES // 16 and train["written_shards"] == TRAIN_IMAGES // 16 // 2
        written += train["written_samples"]
    assert written == TRAIN_IMAGES, "each image in exactly one worker's slice"
    fin = dataset["fin"]
    assert finished_ok(fin), (fin["JobState"], fin["ExitCode"])
    log = output(work, f"crossmae-finalize-{dataset['final']}.out")
    assert re.search(r"^train: \d+ shards, 0 missing, 0 corrupt", log, re.M), log[-2000:]
    proc = subprocess.run([str(BIN / "crossmae-prep"), "verify", dataset["dst"]], env=dataset["env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from pipelines import storage

    use_store(dataset["env"], monkeypatch)
    for split, n in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        manifest = json.loads(storage.read_bytes(f"{dataset['dst']}/{split}/manifest.json"))
        assert manifest["num_samples"] == n, split



# ---------------------------------------------------------------- pretraining

def test_pretrain_runs_across_two_nodes_to_the_last_checkpoint(slurm_baseline):
    baseline = slurm_baseline
    info, log, out = baseline["info"], baseline["log"], baseline["out"]
    assert finished_ok(info), (info["JobState"], info["ExitCode"], log[-3000:])
    assert info["NodeList"] == "node[1-2]" and info["Restarts"] == "0"
    assert re.search(r"job \d+ start 1: 2 nodes x 1 GPUs, rendezvous node1:\d+", log), log[:2000]
    assert f"crossmae-pretrain: done: step {MAX_STEPS} ({MAX_STEPS} this run)" in log, log[-3000:]
    derived = json.loads((out / "deepspeed.json").read_text())["derived"]
    assert derived["world_size"] == 2 and derived["effective_batch"] == 16
    steps = keys_by_step(out)
    assert sorted(steps) == list(range(MAX_STEPS))
    per_epoch = TRAIN_IMAGES // 16
    for e in range(MAX_STEPS // per_epoch):  # every epoch: each image once, over both ranks
        keys = [k for step in range(e * per_epoch, (e + 1) * per_epoch) for rank in steps[step] for k in rank]
        assert len(keys) == len(set(keys)) == TRAIN_IMAGES, e
    from pipelines.checkpoints.store import complete_tags

    assert complete_tags(str(out)) == [f"step{s:08d}" for s in (MAX_STEPS - SAVE_EVERY, MAX_STEPS)]  # keep_last 2


def test_export_eval_array_exports_and_evaluates_each_checkpoint(slurm_baseline, slurm_dataset, slurm_cluster,
                                                                  slurm_work, monkeypatch):
    baseline, dataset, work = slurm_baseline, slurm_dataset, slurm_work
    exports = baseline["store"].rsplit("/runs/", 1)[0] + "/exports/baseline"
    env = dict(dataset["env"], STORE=baseline["store"], EXPORTS=exports, TRAIN_MANIFEST=f"{dataset['dst']}/train/"
               "manifest.json", VAL_MANIFEST=f"{dataset['dst']}/val/manifest.json")
    t0 = time.monotonic()
    job = slurm_cluster.sbatch([*EXPORT_CPU, "--array=0-2", str(SLURM / "export_eval.sbatch")], env=env, cwd=work)
    tasks = sorted(slurm_cluster.wait_done(job, 300), key=lambda t: int(t["ArrayTaskId"]))
    TIMINGS["export_eval array (3 tasks)"] = time.monotonic() - t0
    logs = [output(work, f"crossmae-export-eval-{job}_{t['ArrayTaskId']}.out") for t in tasks]
    states = [(t["JobState"], t["ExitCode"], lg[-1500:]) for t, lg in zip(tasks, logs)]
    assert all(finished_ok(t) for t in tasks), states
    tags = [f"step{s:08d}" for s in (MAX_STEPS - SAVE_EVERY, MAX_STEPS)]
    for tag, log in zip(tags, logs):
        assert f"export_eval: index {tags.index(tag)} -> {tag}" in log, log[-2000:]
    assert "only 2 complete checkpoint(s); nothing to do" in logs[2]  # an array longer than the run is harmless
    from pipelines import storage

    use_store(env, monkeypatch)
    for tag in tags:
        result = json.loads(storage.read_bytes(f"{exports}/{tag}/eval/knn.json"))
        assert result["step"] == int(tag[4:]) and 0 <= result["metrics"]["top1"] <= 100


# ---------------------------------------------------------------- preemption

def losses(out: pathlib.Path) -> dict[int, float]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {m["step"]: m["loss"] for m in records if "loss" in m}


class Starts:
    """One run's starts under Slurm: interrupt the current one once it trains, time the next."""

    def __init__(self, cluster, job: str, out: pathlib.Path):
        self.cluster, self.job, self.out = cluster, job, out
        self.steps_at_start = 0

    def trained(self, steps: int = 2, timeout: float = 240) -> None:
        """The current start logged `steps` new steps."""
        wait_for(f"job {self.job}: a start trains", lambda: logged_steps(self.out) >= self.steps_at_start + steps,
                 timeout)

    def stop_and_time(self, label: str, act, requeued: bool, restarts: int) -> int:
        """act() stops the current start; returns the steps done when it stopped. TIMINGS gets
        signal -> stopped (off the nodes) and signal -> first step of the next start (requeued)."""
        from pipelines.checkpoints.store import complete_tags

        self.trained()
        had = complete_tags(str(self.out))
        t0 = time.monotonic()
        act()
        saved: list[float] = []

        def off_the_nodes(tasks) -> bool:
            if not saved and complete_tags(str(self.out)) != had:
                saved.append(time.monotonic() - t0)
            return tasks[0]["JobState"] in ("PENDING", "CANCELLED") and bool(saved)
        self.cluster.wait(self.job, off_the_nodes, 120, poll=0.1)
        TIMINGS[f"{label}: signal -> checkpoint COMPLETE"] = saved[0]
        # Slurm ends the job when slurmd's polls for the step's end (backing off) see it gone: 20.8 s
        # measured whenever the processes took over ~10 s to exit (a loaded machine), 6-10 s otherwise
        TIMINGS[f"{label}: signal -> job off the nodes"] = time.monotonic() - t0
        self.steps_at_start = logged_steps(self.out)
        if requeued:
            self.cluster.wait(self.job, lambda ts: (ts[0]["JobState"], ts[0]["Restarts"]) == ("RUNNING", str(restarts)),
                              120, poll=0.1)
            TIMINGS[f"{label}: signal -> requeued job running"] = time.monotonic() - t0
            self.trained(1)
            TIMINGS[f"{label}: signal -> first step after resume"] = time.monotonic() - t0
        return self.steps_at_start


def test_preemption_usr1_requeue_and_scancel_each_save_a_checkpoint_and_resume_exactly(
        slurm_baseline, slurm_dataset, slurm_cluster, slurm_work):
    """The time-limit warning (USR1 to the batch shell: pretrain.sbatch requeues itself),
    `scontrol requeue` and `scancel` (SIGTERM) each stop the run at the end of a step with a
    checkpoint of that step; the requeued starts and a resubmission resume from it. The run
    sees exactly the uninterrupted run's samples, step by step: nothing lost, nothing twice."""
    baseline, dataset, work = slurm_baseline, slurm_dataset, slurm_work
    out = work / "preempted"
    job = submit_pretrain(slurm_cluster, dataset, work, "preempted", *RUN)
    starts = Starts(slurm_cluster, job, out)
    stops = [starts.stop_and_time("USR1 (time limit)", lambda: slurm_cluster.command(
                 "scancel", "--signal=USR1", "--batch", job), requeued=True, restarts=1),
             starts.stop_and_time("scontrol requeue", lambda: slurm_cluster.command("scontrol", "requeue", job),
                                  requeued=True, restarts=2),
             starts.stop_and_time("scancel (SIGTERM)", lambda: slurm_cluster.command("scancel", job),
                                  requeued=False, restarts=2)]
    assert stops == sorted(set(stops)) and stops[-1] < MAX_STEPS, f"every stop before the end: {stops}"
    first = slurm_cluster.job(job)
    assert (first["JobState"], first["Restarts"]) == ("CANCELLED", "2")
    t0 = time.monotonic()
    again = submit_pretrain(slurm_cluster, dataset, work, "preempted", *RUN)  # the same command again
    wait_for("the resubmitted run trains", lambda: logged_steps(out) > stops[-1], 240)
    TIMINGS["scancel (SIGTERM): resubmit -> first step after resume"] = time.monotonic() - t0
    (last,) = slurm_cluster.wait_done(again, 300)
    log = output(work, f"crossmae-pretrain-{job}.out") + output(work, f"crossmae-pretrain-{again}.out")
    assert finished_ok(last), (last["JobState"], last["ExitCode"], log[-3000:])

    # what Slurm recorded for every start: requeued twice, cancelled, then completed
    ends = [(c["JobState"], c["NodeList"]) for c in slurm_cluster.completions() if c["JobId"] in (job, again)]
    assert ends == [("PENDING", "node[1-2]")] * 2 + [("CANCELLED", "node[1-2]"), ("COMPLETED", "node[1-2]")], ends
    assert "USR1: time limit near; requeueing" in log and log.count("DUE TO JOB REQUEUE ***") == 4, log[-4000:]
    for step in stops:
        assert f"stop requested by a signal: checkpoint step{step:08d} saved" in log, (step, log[-4000:])
        assert f"resumed from step{step:08d} at step {step}" in log, (step, log[-4000:])
    for start in (f"{job} start 1", f"{job} start 2", f"{job} start 3", f"{again} start 1"):
        assert f"job {start}: 2 nodes x 1 GPUs" in log, start  # SLURM_RESTART_COUNT + 1

    # exactly the uninterrupted run's samples, each step once, and the same losses
    assert keys_by_step(out) == keys_by_step(baseline["out"]), "a resumed start saw other samples"
    ref, got = losses(baseline["out"]), losses(out)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-6)

