"""One writer per destination: two ``crossmae-prep`` runs that would write the same shards do not
run together (a second run deleted the first one's in-progress files, which then failed with a
misleading "no such file").

Each run that writes (imagenet, folder, finalize) puts a lock object with its holder (host,
pid, start time, command, splits, worker slot) under ``DST/_crossmae-prep-locks/``, a local file
or an S3 object alike, through the storage layer, then lists the others. Runs conflict when
their splits overlap, except workers of one multi-machine job (same --num-workers, different
--worker-index: disjoint shards). A conflicting live lock: the newcomer removes its own and stops
(`DestinationBusy`, exit 2). Every run writes its lock before it looks, so of two runs starting
together at least one sees the other: never both write (at worst both stop; run one again).

Stale locks are taken over with a line saying so: on the same machine (host, boot and pid
namespace) a holder whose pid is gone or belongs to a newer process; elsewhere a holder whose
heartbeat (rewritten every HEARTBEAT_S) is older than STALE_S.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.parse
import uuid

from pipelines import storage

from .errors import UsageError

LOCK_DIR = "_crossmae-prep-locks"
HEARTBEAT_S = float(os.environ.get("CROSSMAE_PREP_LOCK_HEARTBEAT_S", "20"))
STALE_S = float(os.environ.get("CROSSMAE_PREP_LOCK_STALE_S", "120"))  # 6 missed heartbeats; NTP skew is ms


class DestinationBusy(UsageError):
    """Another live crossmae-prep holds a conflicting lock on the destination (exit 2)."""


def _local_path(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


def _machine() -> dict:
    """Where pids mean the same process: host name, boot and pid namespace."""
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = None
    return dict(host=socket.gethostname(), boot_id=_read("/proc/sys/kernel/random/boot_id"), pid_ns=pid_ns)


def _holder_gone(rec: dict, now: float) -> str | None:
    """Why the lock's holder is dead (the lock is stale), or None while it may be alive."""
    here = _machine()
    if all(rec.get(k) == here[k] for k in ("host", "boot_id", "pid_ns")) and here["boot_id"]:
        pid = int(rec.get("pid", -1))
        start = _proc_start(pid)
        if start is None:
            return f"process {pid} is gone"
        if rec.get("proc_start") not in (None, start):
            return f"process {pid} is gone (the pid now belongs to another process)"
        return None
    if rec.get("host") == here["host"] and rec.get("boot_id") not in (None, here["boot_id"]):
        return "the machine rebooted since"
    beat = float(rec.get("heartbeat", 0))
    if now - beat > STALE_S:
        return f"no heartbeat for {now - beat:.0f} s (over {STALE_S:.0f} s)"
    return None


def _conflicts(a: dict, b: dict) -> bool:
    sa, sb = set(a.get("splits") or ["*"]), set(b.get("splits") or ["*"])
    if not ("*" in sa or "*" in sb or sa & sb):
        return False
    same_job = (a.get("role") == b.get("role") == "write" and a.get("num_workers") == b.get("num_workers")
                and a.get("worker_index") != b.get("worker_index"))
    return not same_job


def describe_holder(rec: dict) -> str:
    workers = rec.get("num_workers")
    return (f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, started {rec.get('started', '?')}"
            + (f", worker {rec.get('worker_index')} of {workers}" if isinstance(workers, int) and workers > 1 else ""))


class DestinationLock:
    """``with DestinationLock(dst, "write", ["train"], num_workers, worker_index): ...``"""

    def __init__(self, dst: str, role: str, splits: list[str] | None, num_workers: int = 1, worker_index: int = 0,
                 command: str = ""):
        self.dst, self.folder = dst, storage.join(dst, LOCK_DIR)
        now = time.time()
        self.record = dict(tool="crossmae-prep", role=role, splits=sorted(splits) if splits else ["*"],
                           num_workers=num_workers, worker_index=worker_index, command=command, pid=os.getpid(),
                           proc_start=_proc_start(os.getpid()), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           heartbeat=now, **_machine())
        name = f"{self.record['host']}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.url, self._stop, self._thread, self._made = storage.join(self.folder, name), threading.Event(), None, []

    def _put(self) -> None:
        self.record["heartbeat"] = time.time()
        storage.write_bytes(self.url, json.dumps(self.record, indent=1, sort_keys=True).encode())

    def acquire(self) -> None:
        local = not self.dst.startswith("s3://")
        if local:  # folders this run creates are removed again when it leaves them empty
            self._made = [_local_path(p) for p in (self.dst, self.folder) if not os.path.exists(_local_path(p))]
        self._put()  # first mine, then look: of two runs starting together at least one sees the other
        try:
            self._check_others()
        except BaseException:  # busy, or the listing failed: leave no lock behind
            self.release()
            raise
        self._thread = threading.Thread(target=self._beat, name="crossmae-prep-lock", daemon=True)
        self._thread.start()

    def _check_others(self) -> None:
        for url, _ in storage.list_objects(storage.join(self.folder, "")):
            if url.rstrip("/").rsplit("/", 1)[-1] == self.url.rsplit("/", 1)[-1] or not url.endswith(".json"):
                continue
            try:
                other = json.loads(storage.read_bytes(url))
            except FileNotFoundError:  # released while we listed
                continue
            except ValueError:
                other = None
            if not isinstance(other, dict):
                other = None
            if other is not None and not _conflicts(self.record, other):
                continue
            try:
                gone = "its lock object is damaged (not JSON)" if other is None else _holder_gone(other, time.time())
            except (TypeError, ValueError, AttributeError) as e:
                gone, other = f"its lock object is damaged ({type(e).__name__}: {e})", {}
            if gone is None:
                raise DestinationBusy(f"another crossmae-prep ({describe_holder(other)}) is writing to {self.dst}: "
                                      f"wait for it to finish or stop it (its lock: {url})")
            print(f"crossmae-prep: taking over the stale lock of crossmae-prep "
                  f"({describe_holder(other or {})}) on {self.dst}: {gone}", file=sys.stderr, flush=True)
            storage.delete(url)

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._put()
            except OSError as e:  # the run goes on; after STALE_S another run may take the lock over
                if not warned:
                    print(f"crossmae-prep: warning: cannot refresh the lock {self.url}: {e}", file=sys.stderr)
                    warned = True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            storage.delete(self.url)
        except OSError as e:  # never hides the run's own outcome; a later run takes the lock over once stale
            print(f"crossmae-prep: warning: cannot remove the lock {self.url}: {e}", file=sys.stderr)
        for path in reversed(self._made):
            try:
                os.rmdir(path)  # only when empty
            except OSError:
                pass
        self._made = []

    def __enter__(self) -> DestinationLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
