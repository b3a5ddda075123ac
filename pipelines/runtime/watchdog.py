"""A rank that stops answering is named, and nothing of the job outlives its launcher.

A rank frozen by SIGSTOP, a debugger, a wedged device or a lost node leaves its peers blocked
inside a collective: nothing is printed until the collective timeout (DeepSpeed's default: 10
min), and a stopped rank ignores every signal but SIGKILL. Three parts, set up by
``pipelines.runtime.launch.init_distributed``:

- :func:`collective_timeout` / :func:`nccl_error_handling`: the process group's timeout
  (``run.collective_timeout_s``), and NCCL told to end the process when it expires.
- :class:`Watchdog`: every rank increments its heartbeat counter in the job's c10d TCPStore
  (the one ``env://`` rendezvoused on) from a thread of its own, and a checker thread reads all
  counters. A peer whose counter has not moved for ``run.heartbeat_timeout_s`` while this
  rank's own did is named on stderr (rank, host, pid), killed when it runs on this machine,
  and this rank leaves with :data:`LOST_PEER_EXIT` at once: os._exit, because the main thread
  may sit in a collective that nothing else interrupts.
- :func:`die_with_launcher`: PR_SET_PDEATHSIG(SIGKILL), so a rank whose launcher died goes
  too, even when stopped.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

# EX_TEMPFAIL (sysexits.h): the job may be retried; --resume auto continues from the newest checkpoint
LOST_PEER_EXIT = 75
_DONE = 10**15  # added to a rank's counter when it finishes cleanly: its peers stop watching it
_LEARN_POLL_S = 0.05  # how often a rank looks for rank 0's identity until it has it (at most timeout_s)


COLLECTIVE_TIMEOUT_S = 1800.0  # run.collective_timeout_s's default
HEARTBEAT_TIMEOUT_S = 90.0  # run.heartbeat_timeout_s's default (0 = off)
plain_process = False  # set by init_distributed when it made this process a world of one itself


def collective_timeout(seconds: float) -> timedelta:
    """The timeout for the process group, and for every group created later without one:
    torch's new_group() defaults to ITS default (gloo 30 min, NCCL 10 min), not the world's, and
    DeepSpeed builds its data-parallel groups that way, so ZeRO's gradient all-reduce ignored
    the world's timeout (a rank blocked there with a stopped peer outlived a 10 s timeout)."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=float(seconds))
    distributed_c10d.default_pg_timeout = timeout  # read by _get_default_timeout() at each new_group()
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def check_timeouts(collective_s: float, heartbeat_s: float) -> None:
    """ValueError (the trainers' one-line exit 2) for timeouts that cannot work."""
    if not collective_s > 0:
        raise ValueError(f"run.collective_timeout_s must be > 0, got {collective_s:g}")
    if not heartbeat_s >= 0:
        raise ValueError(f"run.heartbeat_timeout_s must be >= 0 (0 = off), got {heartbeat_s:g}")


def program_name() -> str:
    """crossmae-pretrain / crossmae-finetune, for the watchdog's line (``-m pipelines.X`` or the
    console script)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name if spec is not None else os.path.basename(sys.argv[0] if sys.argv else "")
    if name.startswith("pipelines."):
        return "crossmae-" + name.split(".", 1)[1]
    return name if name.startswith("crossmae") else "crossmae"


def nccl_error_handling() -> str | None:
    """Before an NCCL process group exists: make a collective timeout end the process. Returns
    a warning when the user's environment turned that off.

    TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (torch's documented default, set explicitly so an older
    torch behaves the same; a value the environment already has is kept): NCCL's watchdog
    thread raises on a timed-out collective and tears the process down. TORCH_NCCL_BLOCKING_WAIT stays off: it
    makes every wait() block the CPU, which torch's docs name a performance cost, and the
    heartbeat watchdog below names a frozen peer long before the collective timeout anyway."""
    value = os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if value in ("0", "2") and os.environ.get("TORCH_NCCL_BLOCKING_WAIT", "0") in ("0", ""):
        return (f"TORCH_NCCL_ASYNC_ERROR_HANDLING={value} without TORCH_NCCL_BLOCKING_WAIT=1: a timed-out "
                "collective will not end this rank (the heartbeat watchdog still names a frozen peer)")
    return None


def die_with_launcher() -> None:
    """SIGKILL this process when its parent (torchrun's agent, DeepSpeed's launch.py, slurmstepd)
    dies. SIGKILL, not SIGTERM: a stopped process acts on no other signal until it is continued. Linux only; for
    launched ranks only (a plain process under nohup must outlive its shell)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        print(f"watchdog: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); this rank may outlive "
              "its launcher", file=sys.stderr)
    elif os.getppid() != parent:  # the launcher died before the prctl: nobody would send the signal
        os.kill(os.getpid(), signal.SIGKILL)


def _identity() -> dict:
    """What names this process and lets a peer on the same machine verify it before a kill:
    boot id + pid namespace (same kernel, same pid numbering) and the start time (pid reuse)."""
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return dict(host=socket.gethostname(), pid=os.getpid(), boot=read("/proc/sys/kernel/random/boot_id"),
                pidns=pidns, start=_start_time(os.getpid()))


def _start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or '' when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return ""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


_STATES = {"T": "stopped (SIGSTOP or a debugger)", "t": "stopped by a debugger", "D": "in uninterruptible sleep "
           "(a wedged device or file system)", "Z": "a zombie (exited)", "R": "running", "S": "sleeping"}


class _Connection:
    """A TCPStore client whose every op ends within ``timeout_s``: TCPStore's own timeout does
    not cover add() (a frozen store holds it forever), so each op runs in a short-lived thread
    and is abandoned on timeout. After any failure the connection is dropped: a reply that
    timed out may still arrive and would answer the next op on that socket."""

    def __init__(self, connect, timeout_s: float):
        self.connect, self.timeout_s, self.store, self.generation = connect, timeout_s, None, 0

    def __call__(self, op: str, *args):
        box, generation = {}, self.generation

        def run():
            try:
                store = self.store or self.connect()
                box["value"] = getattr(store, op)(*args)
                if self.generation == generation:
                    self.store = store
            except Exception as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e

        t = threading.Thread(target=run, name="heartbeat-store-op", daemon=True)
        t.start()
        t.join(self.timeout_s)
        if "value" in box:
            return box["value"]
        self.generation, self.store = self.generation + 1, None
        raise box.get("error") or TimeoutError(f"the store did not answer {op} in {self.timeout_s:g} s")


class Watchdog:
    """Heartbeats of every rank in the job's store; a stale peer ends this rank.

    ``connect()`` makes a TCPStore client; the heartbeat and the checker thread each hold one of
    their own, so a slow store op never holds up the process group's client or the other
    thread. ``interval_s`` defaults to a tenth of the timeout, at most 5 s: a stopped rank is
    named within ``timeout_s`` + two intervals. A slow store does not end the job: failed or
    slow ops are retried each interval on a new connection, a peer is judged only while this
    rank's own heartbeats reach the store, and only a store that answers nothing for
    ``timeout_s`` counts as lost (it lives in torchrun's agent, or in rank 0 under other
    launchers)."""

    def __init__(self, connect, rank: int, world: int, timeout_s: float, prog: str = "crossmae",
                 prefix: str = "crossmae/watchdog", interval_s: float | None = None, exit=os._exit,
                 store_host: str = "", store_owner: str = "rank 0"):
        self.connect, self.rank, self.world, self.timeout_s, self.prog = connect, rank, world, float(timeout_s), prog
        self.interval_s = interval_s or min(5.0, max(0.2, self.timeout_s / 10))
        self.op_timeout_s = max(1.0, 2 * self.interval_s)  # a slower op counts as failed and is retried
        self.prefix, self.exit, self.store_host, self.store_owner = prefix, exit, store_host, store_owner
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._infos: dict[int, dict] = {}
        self.reported: str | None = None  # the line, once said (tests)

    def _beat_key(self, rank: int) -> str:
        return f"{self.prefix}/beat/{rank}"

    def _info_key(self, rank: int) -> str:
        return f"{self.prefix}/info/{rank}"

    def start(self) -> Watchdog:
        beat = _Connection(self.connect, self.op_timeout_s)
        try:
            beat("set", self._info_key(self.rank), json.dumps(_identity()))
            beat("add", self._beat_key(self.rank), 1)
        except Exception as e:  # noqa: BLE001 - a slow store at start: the threads retry
            self._say(f"watchdog: the store did not take this rank's first heartbeat ({type(e).__name__}: {e}); "
                      "retrying")
        self._learn_rank_0(beat)
        check = _Connection(self.connect, self.op_timeout_s)
        for target, store, name in ((self._beat, beat, "heartbeat"), (self._check, check, "heartbeat-check")):
            t = threading.Thread(target=target, args=(store,), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, finished: bool = True) -> None:
        """End the threads; ``finished``: tell the peers this rank is done, not lost."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2 * self.interval_s + 1)
        if finished:
            try:
                _Connection(self.connect, self.op_timeout_s)("add", self._beat_key(self.rank), _DONE)
            except Exception:  # noqa: BLE001 - the peers are finishing too
                pass

    def _beat(self, store: _Connection) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                store("add", self._beat_key(self.rank), 1)
            except Exception:  # noqa: BLE001 - slow or failed: the checker sees our own count stand still
                pass

    def _learn_rank_0(self, store: _Connection) -> bool:
        """Rank 0's identity, read while the store answers: if rank 0 stops, the store in it goes
        with it, and only what was read before can name it. True once known."""
        if self.rank == 0 or 0 in self._infos:
            return True
        try:
            if store("check", [self._info_key(0)]):
                self._infos[0] = json.loads(store("get", self._info_key(0)))
        except Exception:  # noqa: BLE001 - retried by the checker
            pass
        return 0 in self._infos

    def _check(self, store: _Connection) -> None:
        keys = [self._beat_key(r) for r in range(self.world)]
        started = time.monotonic()
        last_value: list[int] = [0] * self.world
        last_change = [started] * self.world
        last_ok = started
        registered = [False] * self.world  # a peer's key exists (multi_get would wait for a missing one)
        while True:
            asleep = time.monotonic()
            # until rank 0 is known, look for it often: a micro model can reach its first steps (and a
            # SIGSTOP of rank 0, whose store then answers nothing) within the first interval
            if not self._learn_rank_0(store) and time.monotonic() - started < self.timeout_s:
                if self._stop.wait(min(self.interval_s, _LEARN_POLL_S)):
                    return
                continue
            if self._stop.wait(self.interval_s):
                return
            now = time.monotonic()
            if now - asleep > max(3 * self.interval_s, self.timeout_s / 2):
                # this process was itself stopped or starved: what it missed says nothing of the peers
                last_change = [now] * self.world
                last_ok = now
            try:
                waiting = [r for r in range(self.world) if not registered[r]]
                if waiting and store("check", [keys[r] for r in waiting]):  # all there: one op
                    waiting = []
                    registered = [True] * self.world
                for r in waiting:
                    registered[r] = store("check", [keys[r]])
                if registered[0]:  # names rank 0 if it (and the store in it) goes
                    self._learn_rank_0(store)
                ready = [r for r in range(self.world) if registered[r]]
                values = store("multi_get", [keys[r] for r in ready]) if ready else []
            except Exception:  # noqa: BLE001 - slow store: judged only when it answers nothing for long
                if time.monotonic() - last_ok > self.timeout_s:
                    self._store_lost(time.monotonic() - last_ok)
                    return
                continue
            now = last_ok = time.monotonic()
            for r, v in zip(ready, values):
                if int(v) != last_value[r]:
                    last_value[r], last_change[r] = int(v), now
            if now - last_change[self.rank] > self.timeout_s / 2:
                # our own heartbeats are not reaching the store (slow store): judge no one meanwhile
                last_change = [now if r != self.rank else last_change[r] for r in range(self.world)]
                continue
            stale = [r for r in range(self.world) if r != self.rank and last_value[r] < _DONE
                     and now - last_change[r] > self.timeout_s]
            if stale:
                self._peer_lost(stale, max(now - last_change[r] for r in stale), store)
                return

    def _info(self, rank: int, store: _Connection | None) -> dict:
        if rank not in self._infos and store is not None:
            try:
                if store("check", [self._info_key(rank)]):
                    self._infos[rank] = json.loads(store("get", self._info_key(rank)))
            except Exception:  # noqa: BLE001 - the line is said without host and pid then
                pass
        return self._infos.get(rank, {})

    def _describe(self, rank: int, store: _Connection | None) -> str:
        """'rank 1 (host h, pid 12, stopped (SIGSTOP ...), killed with SIGKILL)'. A peer on this
        machine that is verifiably the same process gets SIGKILL, the only signal a stopped
        process obeys, so the launcher need not wait out its SIGTERM grace (torchrun and
        DeepSpeed's launch.py: 30 s) before the job is gone."""
        info = self._info(rank, store)
        if not info:
            return f"rank {rank} (host and pid unknown: it never registered)"
        parts = [f"host {info['host']}", f"pid {info['pid']}"]
        me, pid = _identity(), int(info["pid"])
        if (info.get("boot"), info.get("pidns")) == (me["boot"], me["pidns"]) and info.get("start") \
                and pid != me["pid"] and _start_time(pid) == info["start"]:
            parts.append(_STATES.get(_state(pid), _state(pid)))
            try:
                os.kill(pid, signal.SIGKILL)
                parts.append("killed with SIGKILL")
            except OSError as e:
                parts.append(f"could not be killed: {e.strerror}")
        return f"rank {rank} ({', '.join(parts)})"

    def _peer_lost(self, stale: list[int], age: float, store: _Connection) -> None:
        named = "; ".join(self._describe(r, store) for r in stale[:8])
        if len(stale) > 8:
            named += f"; and {len(stale) - 8} more ranks"
        self._end(f"{named} stopped answering: no heartbeat for {age:.0f} s (run.heartbeat_timeout_s="
                  f"{self.timeout_s:g}); rank {self.rank} exits ({LOST_PEER_EXIT}) instead of waiting in a collective "
                  "that cannot finish; run again with --resume auto to continue from the newest checkpoint")

    def _store_lost(self, age: float) -> None:
        owner = self.store_owner
        if owner == "rank 0" and self.rank != 0 and self._infos.get(0):
            owner = self._describe(0, None)
        self._end(f"the job's c10d store at {self.store_host} (served by {owner}) has not answered for "
                  f"{age:.0f} s (run.heartbeat_timeout_s={self.timeout_s:g}): its process stopped or its host was "
                  f"lost, so rank {self.rank} exits ({LOST_PEER_EXIT}); run again with --resume auto to continue "
                  "from the newest checkpoint")

    def _say(self, line: str) -> None:
        print(f"{self.prog}: {line}", file=sys.stderr, flush=True)

    def _end(self, line: str) -> None:
        self.reported = f"{self.prog}: error: watchdog: {line}"
        print(self.reported, file=sys.stderr, flush=True)
        sys.stdout.flush()
        self.exit(LOST_PEER_EXIT)


def start(rank: int, world: int, timeout_s: float, prog: str) -> Watchdog | None:
    """The watchdog of a launched rank, on its own connection to the store at MASTER_ADDR:
    MASTER_PORT; None for a world of one or ``timeout_s`` 0 (off)."""
    if world < 2 or not timeout_s:
        return None
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    interval = min(5.0, max(0.2, timeout_s / 10))

    def connect():  # connecting gives up after an interval; each op is bounded by Watchdog.op_timeout_s
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=max(1.0, interval)),
                             wait_for_workers=False)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    dog = Watchdog(connect, rank, world, timeout_s, prog, prefix=f"crossmae/watchdog/{attempt}", interval_s=interval,
                   store_host=f"{host}:{port}", store_owner=f"torchrun's agent on {host}" if agent else "rank 0")
    return dog.start()
