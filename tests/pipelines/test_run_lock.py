"""The run lock (pipelines/storage/run_lock.py) between real processes: a live holder is refused by name,
a holder killed with SIGKILL (or whose pid now names another process) is taken over with a line
saying so, a holder on another host is judged by its heartbeat, locally (a shared filesystem)
and in the store (the real S3 server), and of several trainers racing for one lock exactly one
gets it. "Another host" is a holder process whose socket.gethostname() answers another name."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipelines.storage import run_lock
from pipelines import storage

ROOT = pathlib.Path(__file__).resolve().parents[2]
HOLDER = r'''
import socket, sys, time
output, store, host, lease = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if host != "-":
    socket.gethostname = lambda: host
from pipelines.storage import run_lock
try:
    lock = run_lock.RunLock(output, None if store == "-" else store, lease).acquire()
except run_lock.RunLockError as e:
    print("refused:", e, flush=True)
    sys.exit(2)
print("held", flush=True)
time.sleep(float(sys.argv[5]) if len(sys.argv) > 5 else 600)
lock.release()
'''


def holder(tmp_path, output, store=None, host="-", lease=180.0, env=None, hold_s=600) -> subprocess.Popen:
    """A real process that takes the lock and holds it; returns once it holds it (or was refused)."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(output), store or "-", host, str(lease), str(hold_s)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith(("held", "refused")), (line, proc.wait())
    proc.first_line = line
    return proc


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            kill9(p)


def lock_file(out) -> dict:
    return json.loads((pathlib.Path(out) / "run.lock").read_text())


def test_a_lock_held_by_a_live_process_is_refused_naming_it(tmp_path, procs):
    out = tmp_path / "run"
    procs.append(h := holder(tmp_path, out))
    before = lock_file(out)
    with pytest.raises(run_lock.RunLockError) as e:
        run_lock.RunLock(str(out)).acquire()
    msg = str(e.value)
    assert f"run.output {out} is in use by crossmae-pretrain pid {h.pid} on host {socket.gethostname()}" in msg
    assert f"started {before['started']}" in msg and str(out / "run.lock") in msg and "\n" not in msg
    assert lock_file(out) == before, "a refused trainer leaves the holder's lock alone"


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_line(tmp_path, procs, capsys):
    out = tmp_path / "run"
    procs.append(h := holder(tmp_path, out))
    started = lock_file(out)["started"]
    kill9(h)  # SIGKILL: no release, the lock file stays
    assert (out / "run.lock").exists()
    lock = run_lock.RunLock(str(out)).acquire()
    err = capsys.readouterr().err
    assert (f"took over the lock {out / 'run.lock'} of pid {h.pid} on host {socket.gethostname()}, started "
            f"{started}: that process is no longer running") in err
    assert lock_file(out)["pid"] == os.getpid()
    lock.release()
    assert not (out / "run.lock").exists()


def test_a_lock_naming_a_recycled_pid_is_taken_over(tmp_path, procs, capsys):
    """The pid in the lock runs, but it is another process than the one that took the lock."""
    out = tmp_path / "run"
    out.mkdir()
    procs.append(other := subprocess.Popen(["sleep", "600"]))
    real_start = run_lock.process_start(other.pid)
    (out / "run.lock").write_text(json.dumps(dict(program="crossmae-pretrain", host=socket.gethostname(), pid=other.pid,
                                                  pid_start=real_start - 3600, started="then", token="old")))
    lock = run_lock.RunLock(str(out)).acquire()
    assert f"of pid {other.pid} on host {socket.gethostname()}, started then: pid {other.pid} now belongs to another " \
           "process" in capsys.readouterr().err
    assert other.poll() is None, "taking a lock over never signals anyone"
    lock.release()


def test_a_live_holder_on_another_host_is_refused_once_its_heartbeat_moves(tmp_path, procs):
    """A shared run.output written from another host: the lock file's mtime is the heartbeat."""
    out = tmp_path / "run"
    procs.append(h := holder(tmp_path, out, host="other-node", lease=3.0))  # a beat every 0.5 s
    t0 = time.monotonic()
    with pytest.raises(run_lock.RunLockError) as e:
        run_lock.RunLock(str(out), lease_s=3.0).acquire()
    assert time.monotonic() - t0 < 2.5, "a live holder beats every lease / 6 s; no need to wait for the lease"
    assert f"pid {h.pid} on host other-node" in str(e.value) and "its heartbeat moved" in str(e.value)


def test_a_dead_holder_on_another_host_is_taken_over_after_its_lease(tmp_path, procs, capsys):
    out = tmp_path / "run"
    procs.append(h := holder(tmp_path, out, host="other-node", lease=3.0))
    kill9(h)
    t0 = time.monotonic()
    lock = run_lock.RunLock(str(out), lease_s=3.0).acquire()
    waited = time.monotonic() - t0
    err = capsys.readouterr().err
    assert "is locked by pid" in err and "waiting up to" in err
    assert f"took over the lock {out / 'run.lock'} of pid {h.pid} on host other-node" in err
    assert 1.0 < waited < 5.0, waited  # what was left of the 3 s lease, not at once and not forever
    lock.release()
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.lock").write_text(json.dumps(dict(host="other-node", pid=1, started="long ago", token="t")))
    os.utime(old / "run.lock", (time.time() - 600, time.time() - 600))
    t0 = time.monotonic()
    run_lock.RunLock(str(old), lease_s=180.0).acquire().release()
    assert time.monotonic() - t0 < 2.0 and "its heartbeat is 600 s old" in capsys.readouterr().err


def test_of_trainers_racing_for_one_lock_exactly_one_gets_it(tmp_path, procs):
    out = tmp_path / "run"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    racers = [subprocess.Popen([sys.executable, str(script), str(out), "-", "-", "180", "600"], cwd=ROOT,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    procs.extend(racers)
    lines = [p.stdout.readline() for p in racers]
    assert sum(ln.startswith("held") for ln in lines) == 1, lines
    assert sum(ln.startswith("refused") for ln in lines) == 3, lines


def test_the_store_lease_refuses_a_live_holder_and_is_taken_over_after_a_preemption(tmp_path, procs, s3_env,
                                                                                    s3_bucket, capsys):
    """A fresh node (its own empty run.output) and the run.store on S3: the lock object's heartbeat
    tells a live trainer on another host from a preempted one."""
    store = f"s3://{s3_bucket}/runs/lease"
    env = s3_env.env()
    procs.append(h := holder(tmp_path, tmp_path / "node1", store, host="other-node", lease=3.0, env=env))
    held = json.loads(storage.read_bytes(store + "/run.lock"))
    assert held["pid"] == h.pid and held["host"] == "other-node" and held["heartbeat"] > time.time() - 3
    with pytest.raises(run_lock.RunLockError) as e:
        run_lock.RunLock(str(tmp_path / "node2"), store, lease_s=3.0).acquire()
    assert f"run.store {store} is in use by crossmae-pretrain pid {h.pid} on host other-node" in str(e.value)
    assert not (tmp_path / "node2" / "run.lock").exists(), "the local lock is released when the store's is refused"
    kill9(h)  # preempted: the node is gone, its lease stays in the store
    capsys.readouterr()
    t0 = time.monotonic()
    lock = run_lock.RunLock(str(tmp_path / "node2"), store, lease_s=3.0).acquire()
    assert time.monotonic() - t0 < 6.0
    err = capsys.readouterr().err
    assert f"took over the lock {store}/run.lock of pid {h.pid} on host other-node" in err
    assert json.loads(storage.read_bytes(store + "/run.lock"))["pid"] == os.getpid()
    lock.release()
    assert not storage.exists(store + "/run.lock")


def test_a_store_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path, procs, s3_env, s3_bucket,
                                                                              capsys):
    store = f"s3://{s3_bucket}/runs/same-host"
    procs.append(h := holder(tmp_path, tmp_path / "a", store, env=s3_env.env()))
    kill9(h)
    t0 = time.monotonic()
    run_lock.RunLock(str(tmp_path / "b"), store).acquire().release()
    assert time.monotonic() - t0 < 4.0, "same host: the pid tells, no lease to wait for"
    assert f"of pid {h.pid} on host {socket.gethostname()}" in capsys.readouterr().err


def test_of_nodes_racing_for_one_store_lock_exactly_one_gets_it(tmp_path, procs, s3_env, s3_bucket):
    """Each on its own node (own run.output, another host name), one run.store: written, then read back
    (a 6 s lease: the losers see the winner's heartbeat move within a second)."""
    store = f"s3://{s3_bucket}/runs/race"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    racers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"node{i}"), store, f"node{i}", "6", "600"],
                               cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
              for i in range(3)]
    procs.extend(racers)
    lines = [p.stdout.readline() for p in racers]
    assert sum(ln.startswith("held") for ln in lines) == 1, lines
    winner = json.loads(storage.read_bytes(store + "/run.lock"))
    assert [ln.startswith("held") for ln in lines].index(True) == int(winner["host"][4:])
