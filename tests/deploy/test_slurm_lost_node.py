"""A lost node under a real Slurm cluster (tests/deploy/slurm_cluster.py): node 2 loses power
in the middle of pretrain.sbatch; node 1 does not hang, the job is requeued, and the run
resumes on the remaining node with exactly the unseen samples."""
from __future__ import annotations

import time

from tests.deploy.slurm_jobs import (MAX_STEPS, TIMINGS, TRAIN_IMAGES, finished_ok, key_records, keys_by_step,
                                     logged_steps, output, submit_pretrain, wait_for)

HEARTBEAT_S = 10  # run.heartbeat_timeout_s (pipelines/runtime/watchdog.py: checked every 1 s at this timeout)
# node1's trainer names node2 and exits after HEARTBEAT_S + up to 2 checks (10.6-11.9 s measured), before Slurm
# marks node2 DOWN (SlurmdTimeout 10 s + up to one ping cycle: 18-20 s measured). Without the watchdog,
# Slurm's SIGTERM cannot move a rank blocked in a gloo collective: SIGKILL after 30 s, 48 s in all.
LOST_NODE_BOUND_S = HEARTBEAT_S + 8
LOST_SAVE_EVERY = 10


def split_starts(records: list[dict]) -> list[list[dict]]:
    """A keys log appended by several starts: a new start begins where the step goes back."""
    starts: list[list[dict]] = []
    for r in records:
        if not starts or r["step"] <= starts[-1][-1]["step"]:
            starts.append([])
        starts[-1].append(r)
    return starts


def test_a_lost_node_is_named_the_survivor_exits_and_the_run_resumes_on_the_remaining_node(
        slurm_baseline, slurm_dataset, slurm_cluster, slurm_work):
    """Node 2 loses power mid-run (its veth cut, every process in its namespace SIGKILLed: no
    FIN, no RST). Node 1 does not hang: its trainer's watchdog names node2's rank and host and
    exits within the heartbeat bound. Slurm marks node2 DOWN and requeues the job (NODE_FAIL,
    --requeue); it would wait for 2 nodes, so it is resubmitted on the remaining node
    (--nodes=1), which resumes from the newest complete checkpoint with exactly the samples the
    uninterrupted run saw after it."""
    baseline, dataset, work = slurm_baseline, slurm_dataset, slurm_work
    out = work / "lost"
    args = (f"run.max_steps={MAX_STEPS}", f"run.save_every={LOST_SAVE_EVERY}", f"run.heartbeat_timeout_s={HEARTBEAT_S}")
    job = submit_pretrain(slurm_cluster, dataset, work, "lost", *args)
    log_path = work / f"crossmae-pretrain-{job}.out"
    try:
        wait_for("2.5 checkpoints' worth of steps", lambda: logged_steps(out) >= 2 * LOST_SAVE_EVERY + 5, 300)
        before = len(output(work, log_path.name))
        t0 = time.monotonic()
        slurm_cluster.cut_node("node2")
        slurm_cluster.kill_node("node2")
        named = exited = requeued = None
        while time.monotonic() - t0 < 120 and None in (named, exited, requeued):
            now = time.monotonic() - t0
            new = log_path.read_text(errors="replace")[before:]
            if named is None and "node2" in new:
                named = (now, next(line for line in new.splitlines() if "node2" in line))
            if exited is None and not slurm_cluster.processes("node1", "pipelines.pretrain"):
                exited = now
            if requeued is None and slurm_cluster.job(job)["JobState"] in ("PENDING", "FAILED"):
                requeued = now  # PENDING: requeued after NODE_FAIL; FAILED (not requeued) fails below
            time.sleep(0.2)
        TIMINGS["lost node: power-off -> a line names node2"] = named[0] if named else float("nan")
        TIMINGS["lost node: power-off -> node1's trainer gone"] = exited if exited is not None else float("nan")
        TIMINGS["lost node: power-off -> job off node1, requeued"] = requeued if requeued is not None else float("nan")
        print(f"\nlost node: first line naming node2: {named}")
        assert named and exited is not None and requeued is not None, (named, exited, requeued)
        assert "watchdog: rank 1 (host node2, pid " in named[1], named
        assert exited < LOST_NODE_BOUND_S, f"node1's trainer took {exited:.0f} s to exit"
        info = slurm_cluster.job(job)
        assert slurm_cluster.node_state("node2").startswith("DOWN"), slurm_cluster.node_state("node2")
        assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), info
        assert [c["JobState"] for c in slurm_cluster.completions() if c["JobId"] == job] == ["NODE_FAIL"]
        # a requeued job waits for 2 nodes: the operator resubmits it on the one left
        from pipelines.checkpoints.store import complete_tags

        newest = complete_tags(str(out))[-1]
        slurm_cluster.command("scancel", job, check=False)
        t1 = time.monotonic()
        again = submit_pretrain(slurm_cluster, dataset, work, "lost", *args, nodes=1)
        wait_for("the run resumed on node1", lambda: split_starts(key_records(out, 0))[1:], 240)
        TIMINGS["lost node: resubmit on 1 node -> first step"] = time.monotonic() - t1
        (last,) = slurm_cluster.wait_done(again, 300)
    finally:
        slurm_cluster.revive_node("node2")
    log = output(work, log_path.name) + output(work, f"crossmae-pretrain-{again}.out")
    assert finished_ok(last) and last["NodeList"] == "node1", (last["JobState"], last["ExitCode"], log[-3000:])
    s = int(newest[4:])
    assert f"resumed from {newest} at step {s}" in log and "(world size 2 -> 1)" in log, log[-3000:]
    assert "srun: error: Node failure on node2" in log and "(exitcode: 75)" in log  # Slurm's line; the watchdog's exit

    # exactly the unseen samples: before the checkpoint as the uninterrupted run, after it the
    # rest of that epoch (on 1 rank, 8 per step), then whole epochs
    a, b = split_starts(key_records(out, 0))
    a1 = key_records(out, 1)
    ref = keys_by_step(baseline["out"])
    assert {r["step"]: [r["keys"], q["keys"]] for r, q in zip(a, a1) if r["step"] < s} == \
        {step: keys for step, keys in ref.items() if step < s}
    per_epoch = TRAIN_IMAGES // 16
    epoch_end = (s // per_epoch + 1) * per_epoch
    unseen = [k for step in range(s, epoch_end) for rank in ref[step] for k in rank]
    n = len(unseen) // 8
    assert [r["step"] for r in b] == list(range(s, MAX_STEPS))
    rest = [k for r in b[:n] for k in r["keys"]]
    assert sorted(rest) == sorted(unseen), "the resumed rank read other samples than the unseen ones"
    seen = [k for step in range(s - s % per_epoch, s) for rank in ref[step] for k in rank] + rest
    assert len(seen) == len(set(seen)) == TRAIN_IMAGES, "the interrupted epoch: each image exactly once"
    full = TRAIN_IMAGES // 8
    for i in range(n, len(b) - full + 1, full):
        epoch = [k for r in b[i:i + full] for k in r["keys"]]
        assert sorted(epoch) == sorted(set(epoch)) and len(epoch) == TRAIN_IMAGES
