"""pipelines.runtime.watchdog through a real c10d TCPStore (and real processes where a rank must stop or
die): a peer whose heartbeat stops is named within the bound, one that finished is not, a slow
store ends nothing, a silent store is named, a stopped peer on this machine is killed, and a
rank whose launcher died goes too."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from pipelines.runtime import watchdog

TIMEOUT, INTERVAL = 2.0, 0.2
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# one rank's watchdog in a process of its own: argv = port, rank, world, timeout
RANK = '''
import os, sys, time
sys.path.insert(0, os.getcwd())
from datetime import timedelta
import torch.distributed as dist
from pipelines.runtime import watchdog
port, rank, world, timeout = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def connect():
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=1), wait_for_workers=False)
store = connect()  # start together, as the trainer's ranks do right after the process group's rendezvous
store.add("started", 1)
while int(store.add("started", 0)) < int(os.environ.get("TOGETHER", "1")):
    time.sleep(0.05)
watchdog.Watchdog(connect, rank, world, timeout, "crossmae-test", interval_s=0.2).start()
print("ready", flush=True)
if os.environ.get("BUSY"):  # the main thread busy for 3 bounds: Python work (a compile) and a save
    import io
    import torch
    deadline = time.monotonic() + 3 * timeout
    while time.monotonic() < deadline:
        sum(i * i for i in range(100_000))
        torch.save(torch.ones(8_000_000), io.BytesIO())
    print("busy done", flush=True)
time.sleep(120)
'''


class Relay:
    """A TCP relay in front of the store that can hold every byte (``pause``): a store that
    does not answer, for as long as the test says."""

    def __init__(self, port: int):
        self.target, self.running = port, threading.Event()
        self.running.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                self.running.wait()
                dst.sendall(data)
        except OSError:
            pass

    def close(self):
        self.running.set()
        self.listener.close()


@pytest.fixture
def store():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    yield master
    del master


def connector(port: int):
    return lambda: dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=INTERVAL * 2),
                                 wait_for_workers=False)


class Exits:
    """The watchdog's exit, recorded instead of ending the test process."""

    def __init__(self):
        self.code, self.at, self.event = None, None, threading.Event()

    def __call__(self, code):
        self.code, self.at = code, time.monotonic()
        self.event.set()


def dogs(port: int, world: int = 2, **kw) -> list[tuple[watchdog.Watchdog, Exits]]:
    out = []
    for rank in range(world):
        exits = Exits()
        dog = watchdog.Watchdog(connector(port), rank, world, TIMEOUT, "crossmae-test", prefix="t", interval_s=INTERVAL,
                                exit=exits, store_host=f"127.0.0.1:{port}", **kw)
        out.append((dog.start(), exits))
    return out


def test_a_peer_whose_heartbeat_stops_is_named_within_the_bound(store, capsys):
    """A rank lost without a word (its node died): the peer's line names it with host and pid."""
    (d0, e0), (d1, e1) = dogs(store.port)
    time.sleep(3 * INTERVAL)
    d1.stop(finished=False)  # its threads end: no heartbeat, no "done"
    lost = time.monotonic()
    assert e0.event.wait(TIMEOUT + 3), "the lost peer was not named"
    d0.stop()
    assert e0.code == watchdog.LOST_PEER_EXIT and not e1.event.is_set()
    assert TIMEOUT - INTERVAL <= e0.at - lost <= TIMEOUT + 4 * INTERVAL + 0.5, e0.at - lost
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == d0.reported
    assert line.startswith(f"crossmae-test: error: watchdog: rank 1 (host {socket.gethostname()}, pid {os.getpid()}) "
                           f"stopped answering: no heartbeat for 2 s (run.heartbeat_timeout_s=2)"), line
    assert "--resume auto" in line


def test_a_peer_that_finished_is_not_reported(store):
    (d0, e0), (d1, _) = dogs(store.port)
    d1.stop(finished=True)
    assert not e0.event.wait(TIMEOUT + 1)
    d0.stop()


def test_a_store_that_does_not_answer_for_less_than_the_bound_ends_nothing(store):
    """Every op fails for 1.6 s of a 2 s bound (connections dropped and re-made): no one is blamed."""
    relay = Relay(store.port)
    try:
        pairs = dogs(relay.port)
        time.sleep(3 * INTERVAL)
        relay.running.clear()
        time.sleep(0.8 * TIMEOUT)
        relay.running.set()
        assert not any(e.event.wait(TIMEOUT + 1) for _, e in pairs)
        for d, _ in pairs:
            d.stop()
    finally:
        relay.close()


def test_a_store_that_stops_answering_is_named_after_the_bound(store):
    """The store served by rank 0 freezes (rank 0 stopped): rank 1 names the store and rank 0."""
    relay = Relay(store.port)
    try:
        (d0, e0), (d1, e1) = dogs(relay.port)
        time.sleep(3 * INTERVAL)
        relay.running.clear()
        frozen = time.monotonic()
        assert e1.event.wait(TIMEOUT + 4), "the silent store was not named"
        assert e1.at - frozen <= TIMEOUT + 3  # + the op in flight (1 s) and an interval
        assert d1.reported.startswith(f"crossmae-test: error: watchdog: the job's c10d store at 127.0.0.1:{relay.port} "
                                      f"(served by rank 0 (host {socket.gethostname()}, pid {os.getpid()})) has not "
                                      "answered for"), d1.reported
        e0.event.wait(5)
        assert e0.code == e1.code == watchdog.LOST_PEER_EXIT
        for d, _ in ((d0, e0), (d1, e1)):
            d.stop(finished=False)
    finally:
        relay.close()


def test_a_store_that_stops_answering_right_after_the_start_still_names_rank_0(store):
    """Rank 0 (and the store in it) stopped before rank 1's checker ran once (a micro model reaches step 3
    within its first interval): rank 1 still names rank 0's host and pid, learnt when its watchdog started."""
    relay = Relay(store.port)
    try:
        (d0, e0), (d1, e1) = dogs(relay.port)
        relay.running.clear()
        assert e1.event.wait(TIMEOUT + 4), "the silent store was not named"
        assert d1.reported.startswith(f"crossmae-test: error: watchdog: the job's c10d store at 127.0.0.1:{relay.port} "
                                      f"(served by rank 0 (host {socket.gethostname()}, pid {os.getpid()})) has not "
                                      "answered for"), d1.reported
        e0.event.wait(5)
        for d, _ in ((d0, e0), (d1, e1)):
            d.stop(finished=False)
    finally:
        relay.close()


def test_rank_0_is_learnt_soon_when_it_starts_after_its_peer(store):
    """Rank 1's watchdog started first (its peer still loading): it knows rank 0 well within one interval
    of rank 0's start, not at its next check."""
    ((d1, _),) = [(watchdog.Watchdog(connector(store.port), 1, 2, 10.0, "crossmae-test", prefix="t", interval_s=2.0,
                                     exit=Exits()).start(), None)]
    time.sleep(0.3)
    d0 = watchdog.Watchdog(connector(store.port), 0, 2, 10.0, "crossmae-test", prefix="t", interval_s=2.0,
                           exit=Exits()).start()
    try:
        deadline = time.monotonic() + 0.5  # a quarter of the interval
        while 0 not in d1._infos and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d1._infos.get(0, {}).get("pid") == os.getpid(), d1._infos
    finally:
        d0.stop()
        d1.stop()


def spawn_ranks(port: int, ranks: tuple[int, ...], world: int = 2, **env) -> list[subprocess.Popen]:
    """Rank processes of their own, their watchdogs started together."""
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(port), str(rank), str(world), str(TIMEOUT)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, TOGETHER=str(len(ranks)), **env)) for rank in ranks]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return procs


def test_a_stopped_peer_on_this_machine_is_named_as_stopped_and_killed(store):
    """SIGSTOP of a rank process: its peer says so and SIGKILLs it (a stopped process obeys nothing else)."""
    (child,) = spawn_ranks(store.port, (1,))
    try:
        ((d0, e0),) = [(watchdog.Watchdog(connector(store.port), 0, 2, TIMEOUT, "crossmae-test", interval_s=INTERVAL,
                                          exit=(e := Exits())).start(), e)]
        time.sleep(3 * INTERVAL)
        child.send_signal(signal.SIGSTOP)
        assert e0.event.wait(TIMEOUT + 3)
        d0.stop()
        assert child.wait(5) == -signal.SIGKILL
        assert d0.reported.startswith(f"crossmae-test: error: watchdog: rank 1 (host {socket.gethostname()}, pid "
                                      f"{child.pid}, stopped (SIGSTOP or a debugger), killed with SIGKILL) stopped "
                                      "answering"), d0.reported
    finally:
        child.kill()
        child.wait()


def test_a_rank_busy_computing_and_saving_keeps_its_heartbeat(store):
    """The main thread of a rank busy for 3x the bound (Python loops, torch.save of 32 MB, as in a long compile
    or checkpoint): its heartbeat thread goes on, so its peer names no one."""
    (child,) = spawn_ranks(store.port, (1,), BUSY="1")
    try:
        dog = watchdog.Watchdog(connector(store.port), 0, 2, TIMEOUT, "crossmae-test", interval_s=INTERVAL,
                                exit=(exits := Exits())).start()
        assert child.stdout.readline().strip() == "busy done", child.stderr.read()
        assert not exits.event.is_set(), dog.reported
        dog.stop()
    finally:
        child.kill()
        child.wait()


def test_ranks_paused_together_and_resumed_blame_no_one(store):
    """A whole machine paused (VM suspend; here both rank processes SIGSTOPped for 2x the bound) and
    resumed: each checker sees that it was paused itself and judges no one."""
    children = spawn_ranks(store.port, (0, 1))
    try:
        time.sleep(3 * INTERVAL)
        for c in children:
            c.send_signal(signal.SIGSTOP)
        time.sleep(2 * TIMEOUT)
        for c in children:
            c.send_signal(signal.SIGCONT)
        time.sleep(TIMEOUT)
        assert [c.poll() for c in children] == [None, None], [c.stderr.read() for c in children if c.poll() is not None]
    finally:
        for c in children:
            c.kill()
            c.wait()


# a launcher (argv[1]: the code of its rank) whose rank calls die_with_launcher, then sleeps
LAUNCHER = '''
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(rank.pid, flush=True)
time.sleep(120)
'''
LAUNCHED = '''
import os, sys, time
sys.path.insert(0, os.getcwd())
from pipelines.runtime import watchdog
watchdog.die_with_launcher()
open(os.environ["READY"], "w").close()
time.sleep(120)
'''


def test_a_rank_whose_launcher_died_is_killed_even_when_stopped(tmp_path):
    ready = tmp_path / "ready"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, LAUNCHED], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ, READY=str(ready)))
    pid = int(launcher.stdout.readline())
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(pid, signal.SIGSTOP)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and watchdog._state(pid) != "Z":
            assert time.monotonic() < deadline, f"rank {pid} outlived its launcher: state {watchdog._state(pid)}"
            time.sleep(0.05)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("collective,heartbeat,message", [
    (0, 90, "run.collective_timeout_s must be > 0, got 0"),
    (1800, -1, "run.heartbeat_timeout_s must be >= 0 (0 = off), got -1")])
def test_timeouts_that_cannot_work_are_refused(collective, heartbeat, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        watchdog.check_timeouts(collective, heartbeat)


def test_the_lost_peer_exit_status_is_the_documented_one():
    assert watchdog.LOST_PEER_EXIT == 75  # README, tests/reliability/test_frozen_rank.py


def test_nccl_is_told_to_end_a_timed_out_rank(monkeypatch):
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    assert watchdog.nccl_error_handling() is None and os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # the user's choice is kept, and said
    assert "will not end this rank" in watchdog.nccl_error_handling()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"
