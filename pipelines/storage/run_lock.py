"""One run directory, one trainer: an exclusive lock on ``run.output`` and on ``run.store``,
taken by global rank 0 before the trainer writes anything in them, refreshed by a heartbeat
thread and released when the trainer ends (also after an error or a stop signal).

    <run.output>/run.lock   JSON: program, host, pid, pid_start, started, token; its mtime is the heartbeat
    <run.store>/run.lock    the same JSON plus "heartbeat" (the holder's clock, seconds), rewritten each beat

A lock whose holder is gone is taken over, with a line saying so. Gone means:
- the holder ran on this host and its pid is no longer running, or the pid now names a process
  that started at another time (a recycled pid);
- the holder ran on another host (a shared filesystem, or a fresh node reading the store after a
  preemption): its heartbeat is older than ``run.lock_lease_s`` (default 180 s, one beat every
  lease / 6 = 30 s). A younger heartbeat is watched until it moves (the holder lives: refused)
  or ages past the lease (taken over), so a requeued job waits at most one lease. Hosts' clocks
  must agree to well within the lease (NTP keeps them within a second).

Creating the local lock is atomic (``os.link`` of a complete file fails when the name exists, also
on NFS); taking over a stale one happens under an ``flock`` on ``.run.lock.guard``, so two
newcomers cannot both replace it. S3 has no create-if-absent here, so the store lock is written,
then read back after ``SETTLE_S``: of two trainers racing for it, the one that wrote first reads
the other's token and backs off; both win only if one of them took longer than SETTLE_S between
its read and its write (one request, milliseconds).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid

from pipelines import storage

LOCK = "run.lock"
GUARD = ".run.lock.guard"
LEASE_S = 180.0
SETTLE_S = 1.0
PROGRAM = "crossmae-pretrain"


class RunLockError(Exception):
    """The run directory or store is held by a live trainer, or cannot be locked (one line)."""


def say(message: str) -> None:
    print(f"{PROGRAM}: {message}", file=sys.stderr, flush=True)


def _utc(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def process_start(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), or None when no such process runs."""
    import psutil  # a DeepSpeed dependency

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # another user's process: it runs, its start time is unknown
        return 0.0


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


def gone_on_this_host(holder: dict) -> str | None:
    """Why a holder that ran on this host is gone, or None while it runs."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "the lock names no process"
    start = process_start(pid)
    if start is None:
        return "that process is no longer running"
    if start and holder.get("pid_start") and abs(start - holder["pid_start"]) > 0.5:
        return f"pid {pid} now belongs to another process (started {_utc(start)})"
    return None


def _same_place(output: str, store: str) -> bool:  # as pipelines/checkpoints/checkpointer.py decides it
    return "://" not in store and os.path.realpath(store) == os.path.realpath(output)


class _Lock:
    """What the local and the store lock share: judging a holder, and the acquire loop."""

    key = ""  # run.output / run.store

    def __init__(self, where: str, me: dict, lease_s: float):
        self.where, self.me, self.lease_s = where, me, lease_s
        self.beat_s = lease_s / 6

    def state(self) -> tuple[dict, float] | None:
        """(holder, heartbeat time) of the lock as it is now, or None when there is none."""
        raise NotImplementedError

    def refusal(self, holder: dict, extra: str = "") -> RunLockError:
        return RunLockError(f"{self.key} {self.where} is in use by {PROGRAM} {describe(holder)}{extra} (lock "
                            f"{self.url}); wait for it to end or stop it, or use another {self.key}")

    def judge(self, holder: dict, beat: float) -> str | None:
        """Why ``holder`` is gone (take the lock over), None when the lock changed meanwhile
        (look again); raises RunLockError while the holder lives."""
        if holder.get("host") == socket.gethostname():
            why = gone_on_this_host(holder)
            if why is None:
                raise self.refusal(holder)
            return why
        age = time.time() - beat
        if age > self.lease_s:
            return f"its heartbeat is {age:.0f} s old (run.lock_lease_s={self.lease_s:g})"
        say(f"{self.key} {self.where} is locked by {describe(holder)}, heartbeat {age:.0f} s ago: waiting up to "
            f"{self.lease_s - age:.0f} s to see whether it is alive (run.lock_lease_s={self.lease_s:g})")
        while time.time() - beat <= self.lease_s:
            time.sleep(min(1.0, self.beat_s / 4))
            now = self.state()
            if now is None or now[0].get("token") != holder.get("token"):
                return None  # released or taken by someone else: look again
            if now[1] != beat:
                raise self.refusal(holder, f" (its heartbeat moved {time.time() - now[1]:.0f} s ago)")
        return f"no heartbeat for {self.lease_s:g} s (run.lock_lease_s)"

    def holds(self) -> bool:
        now = self.state()
        return now is not None and now[0].get("token") == self.me["token"]


class LocalLock(_Lock):
    key = "run.output"

    def __init__(self, output: str, me: dict, lease_s: float):
        super().__init__(os.path.abspath(output), me, lease_s)
        self.url = os.path.join(self.where, LOCK)

    def state(self):
        try:
            with open(self.url) as f:
                text = f.read()
            beat = os.stat(self.url).st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:  # not written by this module: judged by its age alone
            holder = {}
        return (holder if isinstance(holder, dict) else {}), beat

    def _create(self) -> bool:
        """Write the whole lock file, then link it into place: the name appears complete or not at all."""
        tmp = os.path.join(self.where, f".{LOCK}.{self.me['token']}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.me, f)
        try:
            os.link(tmp, self.url)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    @contextlib.contextmanager
    def _guard(self):
        fd = os.open(os.path.join(self.where, GUARD), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def acquire(self) -> None:
        os.makedirs(self.where, exist_ok=True)
        while not self._create():
            now = self.state()
            if now is None:
                continue
            holder, beat = now
            why = self.judge(holder, beat)
            if why is None:
                continue
            with self._guard():  # replace exactly the lock judged stale, not one taken meanwhile
                again = self.state()
                if again is None or again[0].get("token") != holder.get("token"):
                    continue
                os.unlink(self.url)
                if not self._create():
                    continue
            say(f"took over the lock {self.url} of {describe(holder)}: {why}")
            return

    def beat(self) -> None:
        os.utime(self.url)

    def release(self) -> None:
        if self.holds():
            os.unlink(self.url)


class StoreLock(_Lock):
    key = "run.store"

    def __init__(self, store: str, me: dict, lease_s: float):
        super().__init__(store, me, lease_s)
        self.url = storage.join(store, LOCK)

    def state(self):
        try:
            holder = json.loads(storage.read_bytes(self.url))
        except storage.StorageNotFoundError:
            return None
        except ValueError:
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        return holder, float(holder.get("heartbeat") or 0.0)

    def beat(self) -> None:
        storage.write_bytes(self.url, json.dumps(dict(self.me, heartbeat=time.time())).encode())

    def acquire(self) -> None:
        while True:
            now = self.state()
            why = self.judge(*now) if now else ""
            if why is None:
                continue
            self.beat()
            time.sleep(SETTLE_S)  # a trainer that wrote after us wins; we judge it in the next pass
            if self.holds():
                if now:
                    say(f"took over the lock {self.url} of {describe(now[0])}: {why}")
                return

    def release(self) -> None:
        if self.holds():
            storage.delete(self.url)


class RunLock:
    """``RunLock(output, store).acquire()`` ... ``release()``: the run directory's lock, then the
    store's, and a daemon thread that refreshes both every lease / 6 seconds."""

    def __init__(self, output: str, store: str | None = None, lease_s: float = LEASE_S):
        me = dict(program=PROGRAM, host=socket.gethostname(), pid=os.getpid(), pid_start=process_start(os.getpid()),
                  started=_utc(), token=uuid.uuid4().hex)
        self.locks: list[_Lock] = [LocalLock(output, me, lease_s)]
        if store and not _same_place(output, store):
            self.locks.append(StoreLock(store, me, lease_s))
        self.held: list[_Lock] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        try:
            for lock in self.locks:
                lock.acquire()
                self.held.append(lock)
        except BaseException:
            self.release()
            raise
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        failing: set[str] = set()
        while not self._stop.wait(self.locks[0].beat_s):
            for lock in self.held:
                try:
                    now = lock.state()
                    if now is None or now[0].get("token") != lock.me["token"]:
                        if lock.url not in failing:
                            failing.add(lock.url)
                            holder = f"{describe(now[0])} holds it now" if now else "it is gone"
                            say(f"warning: lost the lock {lock.url} ({holder}): another trainer may write into "
                                f"{lock.where}; stop one of them")
                        continue
                    lock.beat()
                    failing.discard(lock.url)
                except OSError as e:  # a store outage: a lease older than run.lock_lease_s can be taken over
                    if lock.url not in failing:
                        failing.add(lock.url)
                        say(f"warning: cannot refresh the lock {lock.url}: {e}; after {lock.lease_s:g} s without a "
                            "heartbeat another trainer may take it over")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for lock in reversed(self.held):
            try:
                lock.release()
            except OSError as e:
                say(f"warning: could not release the lock {lock.url}: {e} (the next trainer takes it over)")
        self.held = []

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run(run, rank: int, describe_os_error) -> RunLock | None:
    """Global rank 0 locks ``run.output`` (and ``run.store``); every rank raises the same one-line
    RunLockError when it cannot. ``describe_os_error(e, path)`` words an OSError (a read-only
    or missing parent, a file in the way)."""
    from pipelines.runtime import distributed  # torch: not needed by the lock itself

    lock, message = None, None
    if rank == 0:
        try:
            lock = RunLock(run.output, run.store, float(getattr(run, "lock_lease_s", LEASE_S))).acquire()
        except RunLockError as e:
            message = str(e)
        except storage.StorageError as e:
            message = f"cannot lock run.store {run.store}: {e}"
        except OSError as e:
            message = f"cannot lock run.output: {describe_os_error(e, run.output)}"
    message = distributed.broadcast_object(message, src=0)
    if message:
        raise RunLockError(message)
    return lock
