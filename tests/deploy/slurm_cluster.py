"""A real Slurm cluster for tests: munged, slurmctld and one slurmd per simulated node, each
node in its own network namespace with its own address, joined by a bridge.

    with slurm_cluster(nodes=2) as cluster:     # or the fixture in tests/deploy/conftest.py
        job = cluster.sbatch(["deploy/slurm/prep.sbatch"], env=..., cwd=...)
        (info,) = cluster.wait_done(job, timeout=120)      # scontrol show job: JobState, ExitCode

    root namespace    bridge <id>br 10.213.X.1 (a free /24): slurmctld, the test process, relays
    netns <id>n1..nN  eth0 10.213.X.1I (a veth into the bridge), hostname nodeI (UTS namespace),
                      /etc/hosts naming every node (mount namespace), `slurmd -D -N nodeI`

Debian bookworm's Slurm 22.05 runs two slurmd on one host this way: each listens on port
6818 of its own namespace. Not through `ip netns exec`: it remounts /sys, and slurmd stops
with "No filesystem mounted on /sys/fs/cgroup ... slurmd initialization failed"; nsenter
--net plus unshare --mount --uts keeps the host's /sys. proctrack/linuxproc, task/none: no
cgroup is set up. Everything goes on exit, also after a failure (the namespaces with every
process still in them, the bridge, the daemons, the directory); after a SIGKILLed test
process, the next cluster's start reaps what it left (cluster.json). Measured on 2 shared
cores: up in 2-3 s; a requeued job starts 6 s after it left the nodes (AuthInfo cred_expire=5
+ 1 s; by default 120 s, and up to 60 s more for the scheduler's pass without sched_interval=1).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import ipaddress
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Iterator

from tests.deploy.tcp_relay import TcpRelay

REQUIRED = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "scontrol", "nsenter", "unshare", "ip")
SUBNET_PREFIX = "10.213"  # inside 10/8 (private); a /24 no interface of this machine uses is chosen


def missing_requirements() -> str | None:
    """Why a cluster cannot start here (None: it can)."""
    if os.geteuid() != 0:
        return "not root: network namespaces and slurmd need root"
    absent = [b for b in REQUIRED if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if absent:
        return f"missing {', '.join(absent)} (Debian slurm-wlm munge iproute2 util-linux; `make test` installs them)"
    return None


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _free_subnet() -> str:
    used = {ipaddress.ip_interface(a).network for a in _run("ip", "-o", "addr").stdout.split() if "/" in a
            and a[0].isdigit() and ":" not in a}
    for x in [(os.getpid() + i) % 250 for i in range(250)]:
        net = ipaddress.ip_network(f"{SUBNET_PREFIX}.{x}.0/24")
        if not any(net.overlaps(u) for u in used):
            return f"{SUBNET_PREFIX}.{x}"
    raise RuntimeError(f"no free {SUBNET_PREFIX}.X.0/24 subnet")


@dataclasses.dataclass
class Node:
    name: str
    netns: str
    addr: str
    veth: str  # the root-namespace end of the node's veth pair
    proc: subprocess.Popen | None = None


@dataclasses.dataclass
class SlurmCluster:
    root: pathlib.Path
    ident: str
    bridge: str
    bridge_addr: str
    nodes: list[Node]
    procs: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)
    relays: list[TcpRelay] = dataclasses.field(default_factory=list)

    @property
    def conf(self) -> pathlib.Path:
        return self.root / "slurm.conf"

    def env(self, **extra) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf), **extra)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def command(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    # ------------------------------------------------------------------ jobs

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> str:
        """Submit; returns the job id (an array's base id)."""
        proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=30,
                              env=dict(env or os.environ, SLURM_CONF=str(self.conf)), cwd=cwd)
        if proc.returncode:
            raise RuntimeError(f"sbatch {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job: str) -> list[dict]:
        """`scontrol show job -o JOB` as dicts (one per array task); [] once Slurm forgot it."""
        proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30,
                              env=self.env())
        if proc.returncode:
            return []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines() if line.strip()]

    def job(self, job: str) -> dict:
        (info,) = self.jobs(job)
        return info

    def wait(self, job: str, until, timeout: float, poll: float = 0.25) -> list[dict]:
        """Poll until until(list of task dicts) is true; a TimeoutError shows the last state."""
        deadline = time.monotonic() + timeout
        tasks: list[dict] = []
        while time.monotonic() < deadline:
            tasks = self.jobs(job)
            if tasks and until(tasks):
                return tasks
            time.sleep(poll)
        states = [(t.get("JobId"), t.get("ArrayTaskId"), t.get("JobState"), t.get("Reason")) for t in tasks]
        raise TimeoutError(f"job {job} not done after {timeout:.0f} s: {states}\n{self.log_tail()}")

    def wait_done(self, job: str, timeout: float) -> list[dict]:
        done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        return self.wait(job, lambda ts: all(t["JobState"] in done for t in ts), timeout)

    def completions(self) -> list[dict]:
        """Every start's end as jobcomp/filetxt recorded it (a requeued start reads PENDING)."""
        path = self.root / "jobcomp.txt"
        text = path.read_text() if path.exists() else ""
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line.strip()]

    # ------------------------------------------------------------------ nodes

    def node_pids(self, name: str) -> list[int]:
        out = _run("ip", "netns", "pids", self.node(name).netns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, name: str) -> list[int]:
        """A node dies: SIGKILL to its slurmd and every process in its namespace."""
        pids = self.node_pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def cut_node(self, name: str) -> None:
        """The node's cable is pulled: its veth goes down, its processes live on unreachable."""
        _run("ip", "link", "set", self.node(name).veth, "down")

    def processes(self, name: str, needle: str) -> list[int]:
        """Processes in the node's namespace whose command line holds ``needle``."""
        found = []
        for pid in self.node_pids(name):
            with contextlib.suppress(OSError):
                if needle in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(pid)
        return found

    def revive_node(self, name: str, timeout: float = 30) -> None:
        """The node comes back: its link up, a fresh slurmd (ReturnToService=2 puts it back in
        service when it registers)."""
        n = self.node(name)
        _run("ip", "link", "set", n.veth, "up")
        if n.proc is not None and n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait(10)
        _start_slurmd(self, n)
        _wait_for(f"{name} back in service", lambda: self.node_state(name) == "IDLE", timeout, self)

    def node_state(self, name: str) -> str:
        return dict(re.findall(r"(\w+)=(\S*)", self.command("scontrol", "show", "node", "-o", name)))["State"]

    def relay(self, target: tuple[str, int]) -> tuple[str, int]:
        """An address on the bridge that every node reaches, relayed to a root-namespace service."""
        relay = TcpRelay(self.bridge_addr, target)
        self.relays.append(relay)
        return relay.address

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for path in sorted(self.root.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------ start / stop

    def stop(self) -> None:
        keep = os.environ.get("CROSSMAE_SLURM_LOGS")  # a directory: the daemons' logs are copied there first
        if keep:
            os.makedirs(keep, exist_ok=True)
            for path in [*self.root.glob("*.log"), *self.root.glob("*.out"), self.root / "jobcomp.txt"]:
                with contextlib.suppress(OSError):
                    shutil.copy(path, keep)
        with contextlib.suppress(Exception):
            self.command("scancel", "--user=root", check=False, timeout=10)
        for n in self.nodes:
            with contextlib.suppress(Exception):
                self.kill_node(n.name)
        for p in [n.proc for n in self.nodes] + list(self.procs.values()):
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                with contextlib.suppress(Exception):
                    p.wait(10)
        for relay in self.relays:
            relay.close()
        for n in self.nodes:
            _run("ip", "netns", "del", n.netns, check=False)
            _run("ip", "link", "del", n.veth, check=False)  # gone with the netns unless it was moved
        _run("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _slurm_conf(c: SlurmCluster, ctld_port: int, cpus: int, memory_mb: int) -> str:
    r = c.root
    nodes = "\n".join(f"NodeName={n.name} NodeAddr={n.addr} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN"
                      for n in c.nodes)
    return f"""\
ClusterName=crossmae-test
SlurmctldHost={socket.gethostname()}({c.bridge_addr})
SlurmctldPort={ctld_port}
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={r}/munge/socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/%n/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/%n/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/jobcomp.txt
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=10
SlurmctldTimeout=10
MessageTimeout=5
KillWait=30
MinJobAge=600
{nodes}
PartitionName=test Nodes={",".join(n.name for n in c.nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def _wait_for(what: str, ok, timeout: float, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in cluster.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with status {p.returncode} while waiting for {what}:\n"
                                   f"{cluster.log_tail()}")
        if ok():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s:\n{cluster.log_tail()}")


def _popen(c: SlurmCluster, name: str, cmd: list[str]) -> subprocess.Popen:
    """A daemon in the foreground, its output appended to ROOT/<name>.out; it dies with us."""
    with open(c.root / f"{name}.out", "ab") as log:
        c.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=c.env(), preexec_fn=_die_with_parent)
    return c.procs[name]


def _start_slurmd(c: SlurmCluster, n: Node) -> None:
    """slurmd of node n in its network namespace, with its own hostname and /etc/hosts."""
    script = f"mount --bind {c.root / n.name / 'hosts'} /etc/hosts && hostname {n.name} && " \
             f"exec slurmd -D -N {n.name} -f {c.conf}"
    n.proc = _popen(c, f"slurmd-{n.name}", ["nsenter", f"--net=/run/netns/{n.netns}", "unshare", "--mount", "--uts",
                                            "--propagation", "private", "sh", "-c", script])


def _start(c: SlurmCluster, cpus: int, memory_mb: int) -> None:
    r = c.root
    (r / "munge").mkdir(mode=0o755)
    (r / "state").mkdir()
    _run("mungekey", "--create", f"--keyfile={r}/munge/key")  # this cluster's own key
    os.chmod(r / "munge/key", 0o600)
    _run("ip", "link", "add", c.bridge, "type", "bridge")
    _run("ip", "addr", "add", f"{c.bridge_addr}/24", "dev", c.bridge)
    _run("ip", "link", "set", c.bridge, "up")
    hosts = pathlib.Path("/etc/hosts").read_text().rstrip("\n") + "\n"
    hosts += "".join(f"{n.addr} {n.name}\n" for n in c.nodes)
    for n in c.nodes:
        (r / n.name / "spool").mkdir(parents=True)
        (r / n.name / "hosts").write_text(hosts)
        _run("ip", "netns", "add", n.netns)
        _run("ip", "link", "add", n.veth, "type", "veth", "peer", "name", "eth0", "netns", n.netns)
        _run("ip", "link", "set", n.veth, "master", c.bridge, "up")
        _run("ip", "-n", n.netns, "addr", "add", f"{n.addr}/24", "dev", "eth0")
        _run("ip", "-n", n.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", n.netns, "link", "set", "lo", "up")
    with socket.create_server((c.bridge_addr, 0)) as s:
        ctld_port = s.getsockname()[1]
    c.conf.write_text(_slurm_conf(c, ctld_port, cpus, memory_mb))

    popen = functools.partial(_popen, c)
    popen("munged", ["munged", "--foreground", "--force", f"--key-file={r}/munge/key",
                     f"--socket={r}/munge/socket", f"--pid-file={r}/munge/pid", f"--log-file={r}/munged.log",
                     f"--seed-file={r}/munge/seed"])
    _wait_for("munged", lambda: (r / "munge/socket").exists(), 10, c)
    popen("slurmctld", ["slurmctld", "-D", "-f", str(c.conf)])
    _wait_for("slurmctld", lambda: "UP" in c.command("scontrol", "ping", check=False), 20, c)
    for n in c.nodes:
        _start_slurmd(c, n)

    def idle():
        out = c.command("sinfo", "-h", "-N", "-o", "%N %T", check=False).split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n.name) == "idle" for n in c.nodes)
    _wait_for("slurmd on every node (sinfo: idle)", idle, 30, c)


def _pid_alive(pid: int) -> bool:
    try:  # a zombie (state Z: this container's init does not reap orphans) is dead
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reap_stale() -> list[str]:
    """Remove what a cluster whose test process was SIGKILLed left behind (its namespaces,
    their processes, the bridge, the directory), found through its cluster.json."""
    reaped = []
    for record in pathlib.Path(tempfile.gettempdir()).glob("crossmae-slurm-*/cluster.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            info = json.loads(record.read_text())
            if _pid_alive(info["owner"]):
                continue
            c = SlurmCluster(record.parent, info["ident"], info["bridge"], "",
                             [Node(n["name"], n["netns"], "", n["veth"]) for n in info["nodes"]])
            c.stop()
            reaped.append(str(record.parent))
    return reaped


@contextlib.contextmanager
def slurm_cluster(nodes: int = 2, cpus: int = 1, memory_mb: int = 4000) -> Iterator[SlurmCluster]:
    why = missing_requirements()
    if why:
        raise RuntimeError(f"cannot start a Slurm cluster: {why}")
    reap_stale()
    ident = f"cm{os.getpid() % 0xFFFF:04x}"
    subnet = _free_subnet()
    root = pathlib.Path(tempfile.mkdtemp(prefix="crossmae-slurm-"))
    c = SlurmCluster(root, ident, f"{ident}br", f"{subnet}.1", [
        Node(f"node{i}", f"{ident}n{i}", f"{subnet}.{10 + i}", f"{ident}v{i}") for i in range(1, nodes + 1)])
    (root / "cluster.json").write_text(json.dumps(dict(
        owner=os.getpid(), ident=ident, bridge=c.bridge,
        nodes=[dict(name=n.name, netns=n.netns, veth=n.veth) for n in c.nodes])))
    try:
        _start(c, cpus, memory_mb)
        yield c
    finally:
        c.stop()


if __name__ == "__main__":  # by hand: a cluster until Ctrl-C or SIGTERM (SLURM_CONF printed)
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with slurm_cluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
