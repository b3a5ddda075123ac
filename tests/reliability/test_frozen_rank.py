"""A frozen rank, for real: one rank of a 2-process DeepSpeed run (gloo, CPU) SIGSTOPped in the
middle of training. Its peer names it (rank, host, pid) within the heartbeat bound and exits,
the launcher exits non-zero, and no process of the run is left, also when the launcher itself
is killed; with the heartbeat off, the collective timeout ends the run instead."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from pipelines.runtime.launch import free_port
from tests.pipelines.test_pretrain import ARGS
from tests.reliability import test_process_faults as faults
from tests.reliability.test_process_faults import ENV, ROOT, kill, logged_step

manifest = faults.manifest  # the same 128-image, 8-shard data set (module-scoped fixture)

HEARTBEAT_S = 10
LOST_PEER_EXIT = 75  # pipelines.runtime.watchdog.LOST_PEER_EXIT (EX_TEMPFAIL: retry with --resume auto)
# long enough that no run ends before its rank is stopped; few saves (they are not what is tested)
RUN = ("run.max_steps=400", "run.save_every=200", "deepspeed.zero_stage=2", f"run.heartbeat_timeout_s={HEARTBEAT_S}")
# loader workers exit within 1 s of their rank (pipelines/data/loader.py polls its parent each second)
GRACE_S = 5


def start(manifest: str, out: pathlib.Path, *overrides: str, launcher: str = "torchrun") -> subprocess.Popen:
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "pipelines.pretrain"]
    else:
        cmd = [str(pathlib.Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
               str(free_port()), "--module", "pipelines.pretrain"]
    cmd += [*ARGS, f"data.train={manifest}", *RUN, f"run.output={out}", *overrides]
    with open(f"{out}.log", "ab") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **ENV), stdout=log, stderr=subprocess.STDOUT)


def ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """{rank: process} among the launcher's descendants: those whose RANK their parent lacks
    (loader workers inherit their rank's environment; DeepSpeed's launch.py sits in between)."""
    found = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            rank, parent = p.environ().get("RANK"), p.parent()
            if rank is not None and parent is not None and parent.environ().get("RANK") is None:
                found[int(rank)] = p
        except psutil.Error:
            continue
    return found


def job(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_for_step(proc, out, step, timeout=120):
    deadline = time.monotonic() + timeout
    while logged_step(out) < step:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}:\n{log(out)[-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)


def log(out: pathlib.Path) -> str:
    return pathlib.Path(f"{out}.log").read_text(errors="replace")


def wait_for_line(proc, out, pattern: str, timeout: float) -> float:
    """Seconds until ``pattern`` appears in the run's log (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not re.search(pattern, log(out)):
        assert time.monotonic() - t0 < timeout, f"no line matching {pattern!r} in {timeout} s:\n{log(out)[-3000:]}"
        time.sleep(0.1)
    return time.monotonic() - t0


def stop_rank(proc, out, victim: int) -> tuple[psutil.Process, list[psutil.Process]]:
    """SIGSTOP rank ``victim`` after step 3; returns it and every process of the job."""
    wait_for_step(proc, out, 3)
    found = ranks(proc)
    assert sorted(found) == [0, 1], found
    everything = job(proc)
    assert len(everything) >= 5, everything  # launcher, 2 ranks, 2 loader workers (data.num_workers=1)
    found[victim].send_signal(signal.SIGSTOP)
    return found[victim], everything


def assert_all_gone(procs: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
    assert not alive, f"left behind {GRACE_S} s after the launcher: " + ", ".join(
        f"{p.pid} {p.status()} {' '.join(p.cmdline()[:4])}" for p in alive)


@pytest.mark.parametrize("launcher,victim", [("torchrun", 1), ("deepspeed", 0)],
                         ids=["torchrun-rank1", "deepspeed-rank0"])
def test_a_stopped_rank_is_named_by_its_peer_and_the_job_leaves_nothing_behind(manifest, tmp_path, launcher, victim,
                                                                               record_property):
    """SIGSTOP of one rank mid-training: the other rank names it (rank, host, pid) within the heartbeat bound
    and exits, the launcher exits non-zero, and no process of the run is left."""
    where = "the c10d store lives in torchrun's agent" if launcher == "torchrun" else "rank 0 serves the c10d store"
    record_property("fault", f"SIGSTOP of rank {victim} after step 3 of a 2-process ZeRO-2 run under {launcher} "
                             f"({where}); run.heartbeat_timeout_s={HEARTBEAT_S}")
    record_property("trials", 1)
    out = tmp_path / "run"
    proc = start(manifest, out, launcher=launcher)
    everything = []
    try:
        stopped, everything = stop_rank(proc, out, victim)
        pattern = rf"rank {victim} \(host {re.escape(socket.gethostname())}, pid {stopped.pid}, stopped"
        seconds = wait_for_line(proc, out, pattern, timeout=HEARTBEAT_S + 20)
        rc = proc.wait(timeout=30)
        assert_all_gone(everything)
    finally:
        kill(everything + job(proc))
    text = log(out)
    line = next(ln for ln in text.splitlines() if re.search(pattern, ln))
    assert line.startswith("crossmae-pretrain: error: watchdog: ") and "killed with SIGKILL" in line, line
    assert "--resume auto" in line and f"exits ({LOST_PEER_EXIT})" in line
    assert rc != 0
    assert seconds <= HEARTBEAT_S + 10, f"named after {seconds:.1f} s"  # the bound + 2 check intervals + load
    record_property("checked", "the healthy rank's line names the stopped rank's host and pid; time to the line; "
                               "launcher exit status; every process of the job (launcher, ranks, loader workers) "
                               f"gone within {GRACE_S} s of the launcher")
    record_property("result", f"named after {seconds:.1f} s (bound {HEARTBEAT_S} s); launcher exit {rc}; "
                              f"no process left of {len(everything)}")


def test_ranks_whose_launcher_was_killed_go_too_even_a_stopped_one(manifest, tmp_path, record_property):
    """kill -9 of torchrun while one rank is SIGSTOPped: both ranks and their loader workers are gone within
    seconds (PR_SET_PDEATHSIG), not left as orphans."""
    record_property("fault", "SIGSTOP of rank 1, then kill -9 of torchrun (the launcher) of a 2-process run")
    record_property("trials", 1)
    record_property("checked", f"every rank and loader worker gone within {GRACE_S} s of the launcher's death")
    out = tmp_path / "run"
    proc = start(manifest, out)
    everything = []
    try:
        _, everything = stop_rank(proc, out, 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert_all_gone(everything)
    finally:
        kill(everything)
    record_property("result", "pass")


def test_without_the_heartbeat_the_collective_timeout_ends_the_blocked_rank(manifest, tmp_path, record_property):
    """run.heartbeat_timeout_s=0 (off) and run.collective_timeout_s=10: a rank blocked in a collective with a
    stopped peer fails with gloo's timeout error after ~10 s instead of DeepSpeed's 10 minutes."""
    record_property("fault", "SIGSTOP of rank 1 after step 3, heartbeat off, run.collective_timeout_s=10")
    record_property("trials", 1)
    out = tmp_path / "run"
    proc = start(manifest, out, "run.heartbeat_timeout_s=0", "run.collective_timeout_s=10", "run.close_wait_s=5",
                 "run.upload_wait_s=5")
    everything = []
    try:
        _, everything = stop_rank(proc, out, 1)
        seconds = wait_for_line(proc, out, r"crossmae-pretrain: error: .*[Tt]imed out", timeout=40)
    finally:
        kill(everything + job(proc))  # torchrun itself would give the stopped rank 30 s of SIGTERM first
    assert "watchdog" not in log(out)
    assert 8 <= seconds <= 30, f"the collective timed out after {seconds:.1f} s"
    record_property("checked", "rank 0's last line is the collective's timeout error; time to it")
    record_property("result", f"timeout error after {seconds:.1f} s (timeout 10 s)")
