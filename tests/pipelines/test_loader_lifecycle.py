"""Loader worker processes: a crash ends the trainer at once with its own error, preemption
signals do not kill workers before the trainer saves, workers die with their parent, and one
set of workers serves every epoch."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from data_prep.cli import main as prep
from pipelines.data.transforms import MAETrainTransform
from pipelines.data.loader import StreamingLoader
from tests.data_prep.fixtures import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    make_image_folder(root / "src", ("ant", "bee"), per_class=16)
    assert prep(["folder", str(root / "src"), str(root / "out"), "--shard-samples", "8"]) == 0
    return str(root / "out/train/manifest.json")


def children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry))
    return out


def alive(pids) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(pid)
        except OSError:
            pass
    return out


def trainer(body: str, manifest: str, **kw) -> subprocess.Popen:
    """A process that builds a 2-worker StreamingLoader and runs ``body`` (a stand-in trainer)."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        from pipelines.data.transforms import MAETrainTransform
        from pipelines.data.loader import StreamingLoader
        loader = StreamingLoader.from_manifest(sys.argv[1], batch_size=4, transform=MAETrainTransform(32),
                                               num_workers=2, block_size=8)
    """) + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, manifest], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT, **kw)


def test_an_exception_in_the_trainer_ends_the_process_at_once_with_its_own_error(manifest):
    proc = trainer("""
        def batches():  # as the trainer: the stream outlives the exception (the traceback holds it)
            while True:
                yield from loader

        stream = batches()
        for step in range(100):
            batch = next(stream)
            if step == 2:
                print(time.time(), flush=True)
                raise RuntimeError("step 2 failed: the real error")
    """, manifest)
    try:
        out, err = proc.communicate(timeout=45)  # the old loader took 60 s (workers' SIGTERM -> alarm(60))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running 45 s after the exception; stderr: {err[-2000:]}")
    seconds = time.time() - float(out.split()[0])
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == "RuntimeError: step 2 failed: the real error", err[-2000:]
    assert "Alarm clock" not in err and "killed by signal" not in err
    assert seconds < 15, f"{seconds:.1f} s from the exception to the exit"
    print(f"exit {seconds:.2f} s after the exception")


def test_preemption_signal_to_the_process_group_leaves_workers_serving_until_the_trainer_ends(manifest):
    proc = trainer("""
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(a[0]))  # as the trainer's _StopRequest
        n = 0
        for epoch in range(3):
            for batch in loader:
                n += 1
                if n == 2:
                    print("ready", flush=True)
                    while not stop:
                        time.sleep(0.05)
                    time.sleep(1.5)  # the trainer saves a checkpoint; the workers must still serve after it
        print("batches", n, flush=True)
        loader.close()
    """, manifest, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    workers = children(proc.pid)
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun / Slurm: the whole process tree
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert out.split() == ["batches", "24"]  # 32 samples / 4 per batch x 3 epochs, all after the signal
    assert time.monotonic() - t0 < 15 and "killed by signal" not in err
    assert not alive(workers)


def test_workers_exit_when_the_trainer_is_killed(manifest):
    proc = trainer("""
        it = iter(loader)
        next(it)
        print("ready", flush=True)
        time.sleep(120)
    """, manifest)
    assert proc.stdout.readline().strip() == "ready"
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.kill()  # kill -9: no exit hook runs in the trainer
    proc.wait()
    deadline = time.monotonic() + 15
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(workers), "loader workers outlived their killed parent"


def test_one_set_of_workers_serves_every_epoch_and_close_stops_them(manifest):
    ld = StreamingLoader.from_manifest(manifest, batch_size=4, transform=MAETrainTransform(32), num_workers=2,
                                       block_size=8)
    before = children(os.getpid())
    per_epoch = []
    for _ in range(3):
        seen = set()
        for _ in ld:
            seen |= children(os.getpid()) - before
        per_epoch.append(seen)
    assert len(per_epoch[0]) == 2 and per_epoch[0] == per_epoch[1] == per_epoch[2], per_epoch
    assert alive(per_epoch[0]), "workers stay up between epochs"
    ld.close()
    ld.close()  # idempotent
    assert not alive(per_epoch[0])
    with ld:  # usable again after close(), and as a context manager
        assert len(list(ld)) == 8
    assert not (children(os.getpid()) - before)
