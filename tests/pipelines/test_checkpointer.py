"""The trainer's Checkpointer without DeepSpeed: a stand-in engine writes checkpoint files, the
mirror uploads them to a real store (a local directory, or the SeaweedFS fixture frozen with
SIGSTOP to play a hung S3 endpoint)."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from pipelines.checkpoints import store as ckpt
from pipelines.checkpoints.integrity import verify_checkpoint
from pipelines.storage import s3
from pipelines import storage
from pipelines.checkpoints.checkpointer import Checkpointer
from pipelines.train.config import RunSection


class FilesEngine:
    """What Checkpointer needs of a DeepSpeed engine: save_checkpoint writes a tag directory (a
    256 KiB torch file per rank) and, on rank 0, DeepSpeed's ``latest`` record."""

    def __init__(self, rank: int = 0):
        self.rank = rank

    def save_checkpoint(self, root, tag, client_state):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        torch.save({"exp_avg": torch.randn(64 << 10)},
                   os.path.join(root, tag, f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"))
        with open(os.path.join(root, tag, "client_state.json"), "w") as f:
            json.dump(client_state, f)
        if self.rank == 0:
            with open(os.path.join(root, "latest"), "w") as f:
                f.write(tag)


def run_section(output, store, **extra) -> RunSection:
    run = RunSection(output=str(output), store=store, keep_last=2)
    for key, value in extra.items():  # upload_wait_s / close_wait_s: read with getattr by the Checkpointer
        setattr(run, key, value)
    return run


def log(output, steps) -> None:
    """What the trainer's Observer appends: one JSON line per log step, TensorBoard events, PNGs."""
    os.makedirs(os.path.join(output, "tensorboard"), exist_ok=True)
    os.makedirs(os.path.join(output, "recon"), exist_ok=True)
    with open(os.path.join(output, "metrics.jsonl"), "a") as f:
        for step in steps:
            f.write(json.dumps(dict(step=step, loss=1.0 / step)) + "\n")
    with open(os.path.join(output, "tensorboard", "events.out.tfevents.1.host.1"), "ab") as f:
        f.write(b"e" * 100 * len(steps))
    with open(os.path.join(output, "recon", f"step{steps[-1]:08d}.png"), "wb") as f:
        f.write(b"\x89PNG" + bytes(steps[-1]))


def metric_steps(output) -> list[int]:
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_history_mirrored_then_restored_into_a_fresh_output(tmp_path, capfd):
    """metrics.jsonl, tensorboard/ and recon/ reach the store at each save; a fresh output resumed
    from it gets them back, without the lines logged after the checkpoint; appending goes on."""
    store, first = str(tmp_path / "store"), tmp_path / "node-a"
    cp = Checkpointer(run_section(first, store), rank=0, world=1)
    log(first, [10, 20])
    cp.save(FilesEngine(), 20, {})
    log(first, [30, 40])
    cp.save(FilesEngine(), 40, {})
    cp.close(wait_s=30)
    log(first, [50])  # logged after the last checkpoint, then the node is lost
    assert cp.failures == 0 and ckpt.latest(store)["tag"] == "step00000040"
    assert storage.read_bytes(os.path.join(store, "metrics.jsonl")).count(b"\n") == 4
    assert os.path.exists(os.path.join(store, "recon", "step00000040.png"))

    fresh = tmp_path / "node-b"
    cp2 = Checkpointer(run_section(fresh, store), rank=0, world=1)
    assert cp2.resume_tag() == "step00000040"
    counts = cp2.restore_history()
    assert metric_steps(fresh) == [10, 20, 30, 40]
    assert sorted(os.listdir(fresh / "recon")) == ["step00000020.png", "step00000040.png"]
    assert (fresh / "tensorboard" / "events.out.tfevents.1.host.1").stat().st_size == 400
    assert counts["downloaded"] == 4
    log(fresh, [50, 60])
    cp2.save(FilesEngine(), 60, {})
    cp2.close(wait_s=30)
    assert [json.loads(x)["step"] for x in storage.read_bytes(os.path.join(store, "metrics.jsonl")).splitlines()] == [
        10, 20, 30, 40, 50, 60]
    # the first node comes back to its old output (history to step 50): the store's reaches further
    cp3 = Checkpointer(run_section(first, store), rank=0, world=1)
    assert cp3.resume_tag() == "step00000060"
    cp3.restore_history()
    assert metric_steps(first) == [10, 20, 30, 40, 50, 60]
    assert "replacing a local copy that reached step 50" in capfd.readouterr().err


def test_resume_in_place_drops_metrics_logged_after_the_checkpoint(tmp_path, capfd):
    """A crash after step 30 was logged, the checkpoint is of step 20: step 30 is logged again."""
    cp = Checkpointer(run_section(tmp_path, None), rank=0, world=1)
    log(tmp_path, [10, 20])
    cp.save(FilesEngine(), 20, {})
    log(tmp_path, [30])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')  # cut by the crash
    cp2 = Checkpointer(run_section(tmp_path, None), rank=0, world=1)
    assert cp2.resume_tag() == "step00000020"
    assert cp2.restore_history(20) == dict(downloaded=0, dropped_lines=1, damaged_lines=1)
    assert metric_steps(tmp_path) == [10, 20]
    assert "dropped 1 line(s) past step 20 and 1 unreadable line(s)" in capfd.readouterr().err
    log(tmp_path, [30])  # a run started over without resuming (--resume none) keeps what is there
    assert Checkpointer(run_section(tmp_path, None), rank=0, world=1).restore_history(0) is None
    assert metric_steps(tmp_path) == [10, 20, 30]


def test_a_shorter_local_metrics_file_never_replaces_the_stored_one(tmp_path, capfd):
    """A node that did not restore the history (a new output, no resume) must not cut it short."""
    store = str(tmp_path / "store")
    log(tmp_path / "a", [10, 20, 30])
    assert "metrics.jsonl" in ckpt.upload_history(str(tmp_path / "a"), store)
    log(tmp_path / "b", [10])
    assert "metrics.jsonl" not in ckpt.upload_history(str(tmp_path / "b"), store)
    log(tmp_path / "c", [40, 50, 60, 70])  # further along, but without the start of the history
    assert "metrics.jsonl" not in ckpt.upload_history(str(tmp_path / "c"), store)
    assert storage.read_bytes(os.path.join(store, "metrics.jsonl")).count(b"\n") == 3
    # a line being written right now (no newline yet) is left for the next mirror
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')
    assert "metrics.jsonl" not in ckpt.upload_history(str(tmp_path / "a"), store)
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('ss": 0.1}\n')
    assert "metrics.jsonl" in ckpt.upload_history(str(tmp_path / "a"), store)
    assert storage.read_bytes(os.path.join(store, "metrics.jsonl")).count(b"\n") == 4


def test_a_save_while_the_store_hangs_returns_within_the_bound(tmp_path, s3_env, s3_bucket, monkeypatch, capfd):
    """SeaweedFS frozen (SIGSTOP) while uploads run: each save waits run.upload_wait_s, says so,
    and returns; the local checkpoints stand (the one uploading is never pruned); once the store
    is back the mirror publishes the newest checkpoint, and the one it skipped is counted."""
    monkeypatch.setattr(s3, "READ_TIMEOUT", 8.0)  # one attempt outlasts the freeze: no retry races
    wait_s = 1.0
    store = f"s3://{s3_bucket}/run"
    cp = Checkpointer(run_section(tmp_path / "out", store, upload_wait_s=wait_s, keep_last=1), rank=0, world=1)
    cp.run.keep_last = 1
    cp.save(FilesEngine(), 1, {})
    assert cp.mirror.wait(30, "test")
    capfd.readouterr()
    os.kill(s3_env.proc.pid, signal.SIGSTOP)
    try:
        cp.save(FilesEngine(), 2, {})  # its upload hangs
        seconds = []
        for step in (3, 4):
            t0 = time.monotonic()
            cp.save(FilesEngine(), step, {})
            seconds.append(time.monotonic() - t0)
        local = sorted(os.listdir(tmp_path / "out" / "checkpoints"))
    finally:
        os.kill(s3_env.proc.pid, signal.SIGCONT)
    err = capfd.readouterr().err
    assert max(seconds) < wait_s + 3, seconds
    assert err.count("waiting up to 1 s for the upload of step00000002") == 2, err
    assert err.count("gave up waiting after 1 s") == 2, err
    assert "checkpoint step00000003 not mirrored" in err and "replaced by step00000004" in err
    # keep_last=1, yet step 2 (uploading) and step 4 (waiting) stay; step 3 (replaced) may go
    assert {"step00000002", "step00000004"} <= set(local) and "step00000001" not in local, local
    cp.close(wait_s=60)
    assert ckpt.latest(store) == {"tag": "step00000004", "step": 4}
    assert cp.failures == 1 and cp.mirror.not_mirrored == ["step00000003"]
    assert "1 checkpoint(s) not mirrored" in capfd.readouterr().err


def test_close_reports_what_did_not_reach_the_store(tmp_path, s3_env, s3_bucket, monkeypatch, capfd):
    """The store stays frozen past close's bound: close returns, one line names the missing tag."""
    monkeypatch.setattr(s3, "READ_TIMEOUT", 5.0)
    store = f"s3://{s3_bucket}/run"
    cp = Checkpointer(run_section(tmp_path / "out", store), rank=0, world=1)
    os.kill(s3_env.proc.pid, signal.SIGSTOP)
    try:
        cp.save(FilesEngine(), 1, {})
        t0 = time.monotonic()
        cp.close(wait_s=1.0)
        seconds = time.monotonic() - t0
    finally:
        os.kill(s3_env.proc.pid, signal.SIGCONT)
    cp.close()  # the trainer closes twice (loop end, finally): one report
    err = capfd.readouterr().err
    assert cp.mirror.wait(30, "test"), "the upload ends once the store is back (not in a later test)"
    assert seconds < 3 and cp.failures == 1 and err.count("checkpoint(s) not mirrored") == 1, err
    last = err.strip().splitlines()[-1]
    assert "1 checkpoint(s) not mirrored to " + store + ": step00000001; newest there from this run: none" in last


def test_two_nodes_publish_the_newest_checkpoint_both_uploaded(tmp_path, monkeypatch, capfd):
    """Two nodes (one rank each) share a store. Node 1 never uploads step 1: rank 0 stops waiting
    for it when step 2 is saved, publishes step 2 once both nodes' receipts are there, counts
    step 1 and removes its orphaned files from the store."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    store = str(tmp_path / "store")
    node0 = Checkpointer(run_section(tmp_path / "n0", store, upload_wait_s=0.5), rank=0, world=2)
    node1 = Checkpointer(run_section(tmp_path / "n1", store, upload_wait_s=0.5), rank=1, world=2)
    node0.save(FilesEngine(0), 1, {})  # node 1 is lost for this checkpoint
    t0 = time.monotonic()
    node0.save(FilesEngine(0), 2, {})
    assert time.monotonic() - t0 < 0.5 + 2
    assert ckpt.latest(store) is None, "nothing is published without node 1's receipt"
    node1.save(FilesEngine(1), 2, {})
    node1.close(wait_s=30)
    node0.close(wait_s=30)
    assert ckpt.latest(store) == {"tag": "step00000002", "step": 2}
    prefix = os.path.join(store, "checkpoints") + "/"
    assert [url[len(prefix):] for url, _ in storage.list_objects(prefix)] == [
        "step00000002/COMPLETE", "step00000002/MANIFEST.0.json", "step00000002/MANIFEST.1.json",
        "step00000002/_nodes/0.json", "step00000002/_nodes/1.json",
        "step00000002/client_state.json", "step00000002/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "step00000002/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert node0.mirror.not_mirrored == ["step00000001"] and node1.failures == 0
    assert "1 node(s) had not uploaded it when step00000002 was saved" in capfd.readouterr().err
    # each node's manifest lists the shard its rank wrote; one fresh node checks both
    manifests = [json.loads(storage.read_bytes(prefix + f"step00000002/MANIFEST.{n}.json")) for n in (0, 1)]
    assert [sorted(m["files"]) for m in manifests] == [
        ["client_state.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        ["client_state.json", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]]
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    fresh = Checkpointer(run_section(tmp_path / "fresh", store), rank=0, world=1)
    assert fresh.resume_tag() == "step00000002" and fresh.fallbacks == []
    storage.write_bytes(prefix + "step00000002/zero_pp_rank_1_mp_rank_00_optim_states.pt", b"cut")
    again = Checkpointer(run_section(tmp_path / "fresh2", store), rank=0, world=1)
    with pytest.raises(storage.StorageError, match=r"checkpoint step00000002 is damaged "
                       r"\(zero_pp_rank_1_mp_rank_00_optim_states.pt: 3 bytes, \d+ when saved\)"):
        again.resume_tag()


def test_a_damaged_local_copy_is_fetched_again_from_the_store(tmp_path, capfd):
    """Flipped bytes in the newest local checkpoint: its sha256 gives it away before loading, it
    moves to checkpoints_damaged/, and the store's whole copy of the same step is fetched instead."""
    store, out = str(tmp_path / "store"), tmp_path / "out"
    cp = Checkpointer(run_section(out, store), rank=0, world=1)
    for step in (10, 20):
        cp.save(FilesEngine(), step, {})
    cp.close(wait_s=30)
    shard = out / "checkpoints/step00000020/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capfd.readouterr()
    again = Checkpointer(run_section(out, store), rank=0, world=1)
    assert again.resume_tag() == "step00000020" and again.fallbacks == []
    err = capfd.readouterr().err
    moved = out / "checkpoints_damaged/step00000020"
    assert (f"checkpoint step00000020 is damaged (zero_pp_rank_0_mp_rank_00_optim_states.pt: its sha256 differs from "
            f"the one recorded at save time (bytes changed on disk or in transit)); moved to {moved}; fetching it "
            f"again from {store}") in err, err
    assert moved.is_dir() and shard.read_bytes() != bytes(data)
    verify_checkpoint(str(out / "checkpoints/step00000020"))


def test_pruning_counts_only_checkpoints_up_to_the_one_saved(tmp_path, capfd):
    """A complete step-90 checkpoint past the run's record (another run's, ignored at resume) is
    neither kept in place of this run's own checkpoints nor deleted."""
    out = tmp_path / "out"
    foreign = Checkpointer(run_section(out, None), rank=0, world=1)
    foreign.save(FilesEngine(), 90, {})
    (out / "checkpoints/latest").write_text("step00000000")  # this run's record: before any checkpoint
    cp = Checkpointer(run_section(out, None), rank=0, world=1)  # keep_last=2
    assert cp.resume_tag() is None and cp.ignored == ["step00000090"]
    assert "ignoring checkpoint(s) step00000090: newer than the run's record" in capfd.readouterr().err
    for step in (10, 20, 30):
        cp.save(FilesEngine(), step, {})
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step00000020", "step00000030", "step00000090"]
