"""No silent wrong inputs: one writer per destination (local and S3 locks, stale locks taken over),
manifests that name shards outside their folder refused by every reader, and errors of the OS
turned into one line naming the file. Real processes, real tars, the real S3 server."""
from __future__ import annotations

import json
import os
import pathlib
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from data_prep.cli import main as prep
from pipelines import storage
from pipelines.data.factory import LoaderConfig, build_loader
from pipelines.data.transforms import MAETrainTransform
from pipelines.data.loader import StreamingLoader
from tests.data_prep.fixtures import make_image_folder
from tests.pipelines.test_pretrain import ARGS

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOCKS = "_crossmae-prep-locks"


def _record(record_property, fault: str, checked: str, trials: int = 1) -> None:
    record_property("fault", fault)
    record_property("trials", trials)
    record_property("checked", checked)
    record_property("result", "pass")  # replaced by the failure if an assert below fails (JUnit outcome)


def _errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("prep-inputs")
    make_image_folder(root / "src", ("a", "b", "c"), per_class=8)
    return root / "src"


class Holder:
    """A real crossmae-prep run that has written its shards and now holds the destination: it
    waits to write --summary-json into a FIFO that nobody reads yet (every run keeps its lock up
    to the summary file)."""

    def __init__(self, src, dst, tmp_path, *extra):
        self.fifo = tmp_path / f"summary-{time.monotonic_ns()}.fifo"
        os.mkfifo(self.fifo)
        self.proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", "folder", str(src), dst,
                                      "--shard-samples", "8", "--summary-json", str(self.fifo), *extra],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in self.proc.stderr], daemon=True).start()
        deadline = time.monotonic() + 120
        while True:  # its split summary line comes right before the summary file
            assert self.proc.poll() is None and time.monotonic() < deadline, "the holder should be waiting"
            try:
                if lines.get(timeout=0.5).startswith("train:"):
                    break
            except queue.Empty:
                pass

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.fifo.unlink()


def _busy_line(lines: list[str], holder: Holder, dst: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"crossmae-prep: error: another crossmae-prep (host {socket.gethostname()}, "
                               f"pid {holder.proc.pid}, started "), lines
    assert f"is writing to {dst}" in lines[0], lines


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_run_on_a_destination_being_written_is_refused_and_a_dead_runs_lock_taken_over(
        where, src, tmp_path, capsys, request, record_property):
    """Two crossmae-prep runs on one destination: the second says who holds it (exit 2); workers of one
    job run together; after the holder is SIGKILLed its lock is taken over with a line saying so."""
    _record(record_property, f"a second crossmae-prep on a {where} destination another one is writing to, then "
                             "SIGKILL of the holder",
            "exit 2 + one line naming host/pid/start of the holder; worker 1 of 2 runs alongside worker 0; "
            "stale lock taken over with one line; finalize + verify ok")
    if where == "s3":
        dst = f"s3://{request.getfixturevalue('s3_bucket')}/in"
    else:
        dst = str(tmp_path / "out")
    holder = Holder(src, dst, tmp_path, "--num-workers", "2", "--worker-index", "0")
    try:
        same_slot = ["folder", str(src), dst, "--shard-samples", "8", "--num-workers", "2"]
        assert prep([*same_slot, "--worker-index", "0"]) == 2
        _busy_line(_errors(capsys), holder, dst)
        (lock_url, _), = storage.list_objects(storage.join(dst, LOCKS, ""))  # the holder's, with who holds it
        held = json.loads(storage.read_bytes(lock_url))
        assert (held["host"], held["pid"], held["worker_index"], held["num_workers"]) == (
            socket.gethostname(), holder.proc.pid, 0, 2)
        assert prep(["finalize", dst]) == 2  # finalize while a worker writes: refused, naming it
        _busy_line(_errors(capsys), holder, dst)
        assert prep([*same_slot, "--worker-index", "1"]) == 0  # the other worker of the same job: disjoint shards
        capsys.readouterr()
    finally:
        holder.kill()
    assert prep([*same_slot, "--worker-index", "0"]) == 0
    taken = [ln for ln in _errors(capsys) if "stale lock" in ln]
    assert taken == [f"crossmae-prep: taking over the stale lock of crossmae-prep (host {socket.gethostname()}, "
                     f"pid {holder.proc.pid}, started {held['started']}, worker 0 of 2) on {dst}: "
                     f"process {holder.proc.pid} is gone"]
    assert prep(["finalize", dst]) == 0 and prep(["verify", dst]) == 0
    assert json.loads(storage.read_bytes(storage.join(dst, "train", "manifest.json")))["num_samples"] == 24
    assert not list(storage.list_objects(storage.join(dst, LOCKS, "")))  # every run removed its lock


def test_a_lock_of_another_machine_is_taken_over_only_once_its_heartbeat_stops(src, tmp_path, capsys,
                                                                                record_property):
    """A lock whose holder runs elsewhere (its pid means nothing here) is live while its heartbeat is
    fresh and stale after CROSSMAE_PREP_LOCK_STALE_S (120 s) without one."""
    _record(record_property, "the lock object of a crossmae-prep on another host, heartbeat fresh / 10 min old",
            "fresh: exit 2 naming that host; old: taken over with one line, run completes")
    dst = str(tmp_path / "out")
    holder = Holder(src, dst, tmp_path)
    (lock_url, _), = storage.list_objects(storage.join(dst, LOCKS, ""))
    record = json.loads(storage.read_bytes(lock_url))
    holder.kill()  # what is left is its lock object: now make it another machine's
    record.update(host="node-17", boot_id="another-boot", heartbeat=time.time())
    storage.write_bytes(lock_url, json.dumps(record).encode())
    assert prep(["folder", str(src), dst, "--shard-samples", "8"]) == 2
    (line,) = _errors(capsys)
    assert line.startswith("crossmae-prep: error: another crossmae-prep (host node-17, pid ") and dst in line
    record.update(heartbeat=time.time() - 600)
    storage.write_bytes(lock_url, json.dumps(record).encode())
    assert prep(["folder", str(src), dst, "--shard-samples", "8"]) == 0
    (taken,) = [ln for ln in _errors(capsys) if "stale lock" in ln]
    assert "host node-17" in taken and "no heartbeat for 600 s" in taken


# ---------------------------------------------------------------- shard names leaving the dataset's folder
def _hostile_names(outside_tar: pathlib.Path, bucket: str = "other-bucket") -> list[str]:
    """Shard names that leave the manifest's folder; the first three reach a real tar outside it."""
    return [f"file://{outside_tar}", str(outside_tar), f"../../{outside_tar.parent.name}/{outside_tar.name}",
            f"s3://{bucket}/train-000000.tar", "pipe:cat /etc/passwd", "%2e%2e/%2e%2e/x/train-000000.tar",
            "train/../../x.tar", ""]


@pytest.fixture
def dataset(src, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """(DST of a real 3-shard dataset, a copy of its first shard outside it)."""
    assert prep(["folder", str(src), str(tmp_path / "wds"), "--shard-samples", "8"]) == 0
    outside = tmp_path / "elsewhere" / "train-000000.tar"
    outside.parent.mkdir()
    shutil.copy(tmp_path / "wds" / "train" / "train-000000.tar", outside)
    return tmp_path / "wds", outside


def _with_first_shard(manifest: dict, name: str, fmt: str | None = None) -> bytes:
    m = json.loads(json.dumps(manifest))
    m["shards"][0]["name"] = name
    if fmt:
        m["format"], m["shards"] = fmt, m["shards"][:1]
    return json.dumps(m).encode()


def _refusal(e: BaseException, manifest_url: str, name: str) -> None:
    msg = str(e)
    assert "\n" not in msg and msg.startswith(f"{manifest_url}: shard {name!r} "), msg
    assert "relative to its folder" in msg, msg


def test_the_loaders_refuse_a_manifest_naming_a_shard_outside_its_folder(dataset, record_property):
    """StreamingLoader and build_loader (trainer and evaluation; WebDataset and FFCV manifests) refuse
    file://, absolute, '..', other-bucket, pipe: and %-escaped names in one line, before any read."""
    dst, outside = dataset
    names = _hostile_names(outside)
    _record(record_property, f"manifest naming a shard outside its folder ({len(names)} forms: file://, absolute, "
                             "'..', s3://other-bucket, pipe:, %2e%2e, empty)",
            "StreamingLoader.from_manifest, build_loader train/eval, FFCV manifest: one-line ValueError naming "
            "manifest and shard", trials=4 * len(names))
    manifest = json.loads((dst / "train" / "manifest.json").read_text())
    evil = dst / "train" / "evil.json"
    for name in names:
        evil.write_bytes(_with_first_shard(manifest, name))
        with pytest.raises(ValueError) as e:
            StreamingLoader.from_manifest(str(evil), batch_size=4, transform=MAETrainTransform(32))
        _refusal(e.value, str(evil), name)
        for train in (True, False):
            with pytest.raises(ValueError) as e:
                build_loader(LoaderConfig(manifest=str(evil), batch_size=4, num_workers=0, image_size=32), train=train)
            _refusal(e.value, str(evil), name)
        evil.write_bytes(_with_first_shard(manifest, name, fmt="ffcv"))
        with pytest.raises(ValueError) as e:
            build_loader(LoaderConfig(manifest=str(evil), batch_size=4, num_workers=0, image_size=32,
                                      cache_dir=str(dst / "ffcv-cache")), train=False)
        _refusal(e.value, str(evil), name)


def test_crossmae_prep_verify_and_finalize_refuse_shards_outside_the_folder(dataset, capsys, record_property):
    """verify (manifest.json) and finalize (_plan.json) of a local dataset: exit 2, one line naming the file
    and the shard; the tar outside is never read."""
    dst, outside = dataset
    names = _hostile_names(outside)
    _record(record_property, "manifest.json / _plan.json naming a shard outside the split's folder (local)",
            "crossmae-prep verify and finalize: exit 2, one line naming manifest and shard", trials=2 * len(names))
    split = dst / "train"
    manifest, plan = (json.loads((split / n).read_text()) for n in ("manifest.json", "_plan.json"))
    for name in names:
        (split / "manifest.json").write_bytes(_with_first_shard(manifest, name))
        assert prep(["verify", str(dst)]) == 2
        (line,) = _errors(capsys)
        assert line.startswith(f"crossmae-prep: error: {split / 'manifest.json'}: shard {name!r} "), line
        (split / "_plan.json").write_bytes(_with_first_shard(plan, name))
        assert prep(["finalize", str(dst)]) == 2
        (line,) = _errors(capsys)
        assert line.startswith(f"crossmae-prep: error: {split / '_plan.json'}: shard {name!r} "), line


def test_an_s3_manifest_naming_shards_outside_its_folder_is_refused(src, tmp_path, s3_bucket, capsys,
                                                                     record_property):
    """The same rule for a manifest on S3: the loader and crossmae-prep verify refuse it."""
    dst = f"s3://{s3_bucket}/wds"
    assert prep(["folder", str(src), dst, "--shard-samples", "8"]) == 0
    capsys.readouterr()
    url = f"{dst}/train/manifest.json"
    manifest = json.loads(storage.read_bytes(url))
    names = [f"s3://{s3_bucket}/elsewhere/train-000000.tar", "../../elsewhere/train-000000.tar",
             f"file://{tmp_path}/x.tar", "/train-000000.tar"]
    _record(record_property, "an s3:// manifest naming shards in another prefix/bucket, '..', file://, absolute",
            "StreamingLoader.from_manifest one-line ValueError; crossmae-prep verify exit 2 one line",
            trials=2 * len(names))
    for name in names:
        storage.write_bytes(url, _with_first_shard(manifest, name))
        with pytest.raises(ValueError) as e:
            StreamingLoader.from_manifest(url, batch_size=4, transform=MAETrainTransform(32))
        _refusal(e.value, url, name)
        assert prep(["verify", dst]) == 2
        (line,) = _errors(capsys)
        assert line.startswith(f"crossmae-prep: error: {url}: shard {name!r} "), line


def test_the_trainer_refuses_a_file_url_shard_in_one_line_not_a_worker_traceback(dataset, tmp_path,
                                                                                 record_property):
    """crossmae-pretrain on a manifest whose shard is file:///...: exit 2, the refusal as the last line."""
    _record(record_property, "crossmae-pretrain on a manifest naming a shard file:///<a tar outside the dataset>",
            "exit 2, last stderr line names manifest and shard, no traceback")
    dst, outside = dataset
    manifest = json.loads((dst / "train" / "manifest.json").read_text())
    evil = dst / "train" / "evil.json"
    evil.write_bytes(_with_first_shard(manifest, f"file://{outside}"))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", *ARGS, f"data.train={evil}",
                           f"run.output={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crossmae-pretrain: error: {evil}: shard 'file://{outside}' "), last


# ---------------------------------------------------------------- errors of the OS: one line naming the file
def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_shard_that_exceeds_the_file_size_limit_is_one_line_naming_it(src, tmp_path, record_property):
    """Writing a shard fails in the OS (RLIMIT_FSIZE 64 KB: EFBIG, as a full disk gives ENOSPC): one line
    names the shard and the cause in plain words, exit 1, no traceback."""
    _record(record_property, "file size limit 64 KB while crossmae-prep writes a ~100 KB shard (EFBIG)",
            "exit 1, one stderr line naming the shard file and 'file too large', no traceback")
    dst = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "data_prep.cli", "folder", str(src), str(dst)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(64 << 10))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == [f"crossmae-prep: error: {dst / 'train' / 'train-000000.tar'}: file too large (the file "
                     "system's or this process's file size limit)"], lines
    assert not list((dst / "train").glob("*.tar")) and not (dst / LOCKS).exists()


def test_a_damaged_plan_is_one_line_naming_it(src, tmp_path, capsys, record_property):
    """finalize on a _plan.json cut short (a disk that filled up, a bad copy): one line naming the file."""
    _record(record_property, "_plan.json truncated to half its bytes, then crossmae-prep finalize",
            "exit 1, one stderr line naming _plan.json")
    dst = tmp_path / "out"
    assert prep(["folder", str(src), str(dst), "--shard-samples", "8", "--num-workers", "2",
                 "--worker-index", "0"]) == 0
    plan = dst / "train" / "_plan.json"
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    capsys.readouterr()
    assert prep(["finalize", str(dst)]) == 1
    (line,) = _errors(capsys)
    assert line.startswith(f"crossmae-prep: error: {plan}: damaged, not JSON ("), line


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def test_a_writer_process_killed_by_the_os_ends_the_run_with_one_line_not_a_hang(tmp_path, record_property):
    """--processes 2 and both SIGKILLed while writing a shard (as the OOM killer does): multiprocessing.Pool
    waited forever for their shards; now the run ends at once with one line and resumes when run again."""
    _record(record_property, "SIGKILL of the 2 shard-writing processes of crossmae-prep --processes 2 mid-shard",
            "exit 1 within 60 s, one stderr line naming the split and the cause; the re-run completes")
    make_image_folder(tmp_path / "src", ("a", "b"), per_class=200, seed=2)
    split = tmp_path / "out" / "train"
    cmd = [sys.executable, "-m", "data_prep.cli", "folder", str(tmp_path / "src"), str(tmp_path / "out"),
           "--shard-samples", "50", "--processes", "2", "--validate", "decode", "--max-size", "24"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (split.is_dir() and any(n.startswith(".train-") and n.endswith(storage.TMP_SUFFIX)
                                      for n in os.listdir(split))):  # a shard half written
        assert proc.poll() is None and time.monotonic() < deadline, "the kill should land while a shard is written"
        time.sleep(0.002)
    for child in _children(proc.pid):
        os.kill(child, signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("crossmae-prep hung after its writer processes were killed")
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"crossmae-prep: error: a crossmae-prep process writing shards of {split} died"), lines
    assert prep(cmd[3:]) == 0
    assert json.loads((split / "manifest.json").read_text())["num_samples"] == 400
