"""Faults on a real network path: boto3 -> FaultProxy (tests/reliability/fault_proxy.py) -> SeaweedFS.

Every test drives the project's own code (crossmae-prep, the streaming loader, checkpoint
mirroring, export) through injected resets, truncated bodies, 503 SlowDown, 500 InternalError
and delays, then checks the result with a fault-free boto3 client straight to the server.
Each records fault / trials / checked / result for RELIABILITY.md (python -m tests.reliability.report).
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest
import torch

from data_prep.cli import main as prep
from pipelines.checkpoints import store as ckpt
from pipelines.storage import s3
from pipelines import storage
from pipelines.data.transforms import MAETrainTransform
from pipelines.data.loader import StreamingLoader
from tests.data_prep.fixtures import make_image_folder

MB = 1 << 20
NAMES = {"reset": "reset", "truncate": "truncated body", "internal": "500 InternalError", "slowdown": "503 SlowDown",
         "delay": "delay", "hang": "hang (never answered)"}
# A mix seen on flaky links, per request; SlowDown is rarer: botocore backs off 1 s (base) for it.
MIX = dict(reset=0.08, truncate=0.08, internal=0.06, slowdown=0.02, delay=0.04, delay_s=0.1)


def describe(rates: dict, scope: str = "every request") -> str:
    return ", ".join(f"{NAMES[k]} {v:.0%}" for k, v in rates.items() if k in NAMES and v) + f" of {scope}"


def injected(proxy) -> str:
    return ", ".join(f"{n} {NAMES[k]}" for k, n in sorted(proxy.injected.items())) or "none"


def objects(server, bucket: str, prefix: str) -> dict[str, bytes]:
    """{name under prefix: bytes}, read straight from the server (no proxy, no pipelines code)."""
    c, out = server.client(), {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", ()):
            out[o["Key"][len(prefix):]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def report(record_property, fault: str, trials: int, checked: str, result: str) -> None:
    for name, value in dict(fault=fault, trials=trials, checked=checked, result=result).items():
        record_property(name, value)


# ---------------------------------------------------------------------------------- data prep
def test_sharding_through_faults_writes_the_same_objects(tmp_path, s3_env, s3_bucket, faulty_s3_env, record_property):
    """crossmae-prep to S3 through faults: manifest and shards byte-identical to a fault-free run."""
    make_image_folder(tmp_path / "src", per_class=40)  # 120 JPEGs -> 12 shards
    args = [str(tmp_path / "src"), "--shard-samples", "10", "--seed", "3", "--processes", "2"]
    assert prep(["folder", args[0], f"s3://{s3_bucket}/clean", *args[1:]]) == 0
    proxy = faulty_s3_env(**MIX, seed=11, max_faults=40)
    assert prep(["folder", args[0], f"s3://{s3_bucket}/faulty", *args[1:]]) == 0
    clean, faulty = objects(s3_env, s3_bucket, "clean/"), objects(s3_env, s3_bucket, "faulty/")
    assert sorted(clean) == sorted(faulty) and len([n for n in clean if n.endswith(".tar")]) == 12
    manifests = [json.loads(d.pop("train/manifest.json")) for d in (clean, faulty)]
    for m in manifests:
        m.pop("created")  # the only field that may differ: a timestamp
    assert manifests[0] == manifests[1] and manifests[0]["num_samples"] == 120
    assert clean == faulty, [n for n in clean if clean[n] != faulty[n]]
    assert proxy.total_faults >= 10 and len(proxy.injected) >= 4, proxy.injected
    report(record_property, "crossmae-prep folder -> S3: " + describe(MIX), proxy.total_faults,
           f"{len(clean) + 1} objects (12 shards, manifest, plan, part records) vs a fault-free run",
           f"byte-identical (manifest equal but for its timestamp); injected {injected(proxy)} "
           f"in {sum(proxy.requests.values())} requests")


# ---------------------------------------------------------------------------------- streaming
@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty-wds")
    keys = make_image_folder(root / "src", ("ant", "bee", "cow"), per_class=50)
    assert prep(["folder", str(root / "src"), str(root / "out"), "--shard-samples", "16"]) == 0
    return root / "out" / "train", sorted(keys)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_an_epoch_through_faults_yields_every_sample_once(local_shards, s3_bucket, faulty_s3_env,
                                                                   num_workers, record_property):
    """StreamingLoader over S3 through faults: every sample exactly once, the same pixels as from disk."""
    split, keys = local_shards
    for p in sorted(split.glob("*.*")):  # shards and manifest (not _parts/)
        storage.write_bytes(f"s3://{s3_bucket}/wds/train/{p.name}", p.read_bytes())
    kw = dict(batch_size=8, transform=MAETrainTransform(32), num_workers=num_workers, block_size=32, seed=5,
              drop_last=False)
    reference = {k: img for b in StreamingLoader.from_manifest(str(split / "manifest.json"), **kw)
                 for k, img, v in zip(b["key"], b["image"], b["valid"]) if v}
    rates = dict(reset=0.25, truncate=0.25, internal=0.05, delay=0.05, delay_s=0.1)
    proxy = faulty_s3_env(**rates, seed=21 + num_workers, max_faults=40)
    loader = StreamingLoader.from_manifest(f"s3://{s3_bucket}/wds/train/manifest.json", **kw)
    seen = [(k, img) for b in loader for k, img, v in zip(b["key"], b["image"], b["valid"]) if v]
    assert sorted(k for k, _ in seen) == keys, "a sample was lost or repeated"
    assert all(torch.equal(img, reference[k]) for k, img in seen), "a sample's pixels differ from the disk copy"
    assert not {k: n for k, n in loader.stats.items() if k != "samples"}, loader.stats  # nothing substituted
    assert proxy.injected["reset"] + proxy.injected["truncate"] >= 3, proxy.injected
    report(record_property, f"StreamingLoader epoch from S3, {num_workers} workers: " + describe(rates),
           proxy.total_faults, f"keys of the {len(keys)} valid samples, their pixels vs the local shards",
           f"each sample exactly once, identical pixels; injected {injected(proxy)} "
           f"in {sum(proxy.requests.values())} requests")


# ---------------------------------------------------------------------------------- checkpoints
def checkpoint_dir(root, tag: str, seed: int, sizes=(12 * MB, 3 * MB, 3 * MB)) -> list[str]:
    """A DeepSpeed-like checkpoint directory of random bytes; returns its file names."""
    rng, d = np.random.default_rng(seed), root / tag
    d.mkdir(parents=True)
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    for name, size in zip(names, sizes):
        (d / name).write_bytes(rng.bytes(size))
    return ckpt.files(str(d))


def latest_direct(server, bucket: str) -> dict:
    return json.loads(server.client().get_object(Bucket=bucket, Key="run/latest")["Body"].read())


def test_checkpoint_mirror_through_faults_completes(tmp_path, s3_env, s3_bucket, faulty_s3_env, monkeypatch,
                                                    record_property):
    """Checkpoint upload (single PUT and multipart), publish and download through faults: same bytes."""
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 8 * MB)  # the 12 MB file goes up in 3 parts
    monkeypatch.setattr(s3, "PART_SIZE", 5 * MB)
    store, local = f"s3://{s3_bucket}/run", tmp_path / "local"
    names = checkpoint_dir(local, "step00000001", 1)
    ckpt.upload(str(local), "step00000001", store)
    ckpt.publish(store, "step00000001", 1, names)
    names = checkpoint_dir(local, "step00000002", 2)
    proxy = faulty_s3_env(**MIX, seed=31, max_faults=30)
    ckpt.upload(str(local), "step00000002", store)
    ckpt.publish(store, "step00000002", 2, names)
    assert ckpt.latest(store) == {"tag": "step00000002", "step": 2}
    ckpt.download(store, "step00000002", str(tmp_path / "node2"))
    stored = objects(s3_env, s3_bucket, "run/checkpoints/step00000002/")
    for name in names:
        assert stored[name] == (local / "step00000002" / name).read_bytes(), name
        assert (tmp_path / "node2/step00000002" / name).read_bytes() == stored[name], name
    assert latest_direct(s3_env, s3_bucket)["tag"] == "step00000002" and stored["COMPLETE"] == b"2"
    assert proxy.total_faults >= 4, proxy.injected
    report(record_property, "checkpoint upload + publish + download (18 MB, multipart): " + describe(MIX),
           proxy.total_faults, "stored and downloaded bytes of every file, COMPLETE, latest",
           f"completed, all bytes equal; injected {injected(proxy)} in {sum(proxy.requests.values())} requests")


@pytest.mark.parametrize("kind,attempts", [("internal", None), ("slowdown", 3)])
def test_checkpoint_upload_beyond_the_retry_budget_fails_cleanly(tmp_path, s3_env, s3_bucket, faulty_s3_env,
                                                                 monkeypatch, kind, attempts, record_property):
    """Every PUT refused: one StorageError after exactly the attempt budget; latest keeps the old tag."""
    if attempts:  # SlowDown backs off from 1 s: 8 attempts would take ~45 s; the budget is the same code
        monkeypatch.setattr(s3, "REQUEST_ATTEMPTS", attempts)
    attempts = s3.REQUEST_ATTEMPTS
    store, local = f"s3://{s3_bucket}/run", tmp_path / "local"
    names = checkpoint_dir(local, "step00000001", 1, sizes=(2 * MB, MB, MB))
    ckpt.upload(str(local), "step00000001", store)
    ckpt.publish(store, "step00000001", 1, names)
    names = checkpoint_dir(local, "step00000002", 2, sizes=(2 * MB, MB, MB))
    proxy = faulty_s3_env(**{kind: 1.0}, only=lambda r: r.method == "PUT", max_faults=100)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        ckpt.upload(str(local), "step00000002", store)
        ckpt.publish(store, "step00000002", 2, names)
    seconds = time.monotonic() - t0
    msg = str(err.value)
    assert "\n" not in msg and f"{store}/checkpoints/step00000002/{names[0]}" in msg
    assert ("SlowDown" if kind == "slowdown" else "InternalError") in msg, msg
    assert proxy.attempts("PUT", f"/checkpoints/step00000002/{names[0]}") == attempts
    assert proxy.requests["PUT"] == attempts, "the upload stopped at the first file that could not be written"
    # What a resuming job sees, straight from the server: the previous checkpoint, nothing of the new one.
    assert latest_direct(s3_env, s3_bucket) == {"tag": "step00000001", "step": 1}
    assert objects(s3_env, s3_bucket, "run/checkpoints/step00000002/") == {}
    assert not s3_env.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    report(record_property, f"checkpoint upload: {NAMES[kind]} on every PUT", proxy.total_faults,
           f"error after the attempt budget ({attempts}/request), latest, COMPLETE, leftover objects",
           f"StorageError after {attempts} attempts ({seconds:.1f} s): '{msg[:90]}...'; "
           "latest still names the previous tag, no object of the new tag")


def test_publish_that_cannot_write_latest_leaves_the_previous_pointer(tmp_path, s3_env, s3_bucket, faulty_s3_env,
                                                                      record_property):
    """The last step of publish (the latest pointer) always reset: the old pointer stays valid."""
    store, local = f"s3://{s3_bucket}/run", tmp_path / "local"
    names = checkpoint_dir(local, "step00000001", 1, sizes=(MB, MB, MB))
    ckpt.upload(str(local), "step00000001", store)
    ckpt.publish(store, "step00000001", 1, names)
    names = checkpoint_dir(local, "step00000002", 2, sizes=(MB, MB, MB))
    ckpt.upload(str(local), "step00000002", store)
    # "internal": the PUT never reaches the server (a reset after the server acted would write it)
    proxy = faulty_s3_env(internal=1.0, only=lambda r: r.method == "PUT" and r.path.endswith("/run/latest"))
    with pytest.raises(storage.StorageError, match="InternalError"):
        ckpt.publish(store, "step00000002", 2, names)
    assert proxy.attempts("PUT", "/run/latest") == s3.REQUEST_ATTEMPTS
    assert latest_direct(s3_env, s3_bucket) == {"tag": "step00000001", "step": 1}
    assert ckpt.latest(store) == {"tag": "step00000001", "step": 1}
    report(record_property, "publish: 500 InternalError on every PUT of the latest pointer", proxy.total_faults,
           "latest after the failure (COMPLETE of the new tag is already written)",
           f"StorageError after {s3.REQUEST_ATTEMPTS} attempts; latest still names the previous complete tag")


def test_a_request_to_a_hung_store_ends_within_its_time_budget(s3_bucket, faulty_s3_env, monkeypatch,
                                                                 record_property):
    """Every PUT held unanswered (a frozen server): the write fails within the retry budget."""
    monkeypatch.setattr(s3, "READ_TIMEOUT", 0.5)  # production: 30 s per attempt, 120 s budget
    monkeypatch.setattr(s3, "RETRY_BUDGET_S", 1.5)
    proxy = faulty_s3_env(hang=1.0, only=lambda r: r.method == "PUT", max_faults=100)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match="ReadTimeout") as err:
        storage.write_bytes(f"s3://{s3_bucket}/hung", b"x")
    seconds = time.monotonic() - t0
    attempts = proxy.attempts("PUT", "/hung")
    # budget + one attempt + one backoff (50 ms base, full jitter) + slack for a loaded box
    assert seconds < 1.5 + 0.5 + 1.0, seconds
    assert 2 <= attempts < s3.REQUEST_ATTEMPTS, attempts
    report(record_property, "one PUT: never answered (hung store), read timeout 0.5 s, budget 1.5 s", attempts,
           "time until the error, attempts made", f"StorageError after {seconds:.1f} s and {attempts} attempts "
           f"(not {s3.REQUEST_ATTEMPTS}): '{str(err.value)[:70]}...'")


def test_checkpoint_saves_go_on_while_the_store_hangs(tmp_path, s3_env, s3_bucket, faulty_s3_env, monkeypatch,
                                                       capfd, record_property):
    """Store hung for 3 saves: each save returns after run.upload_wait_s; then the mirror catches up."""
    import threading

    from pipelines.checkpoints.checkpointer import Checkpointer
    from pipelines.train.config import RunSection
    from tests.pipelines.test_checkpointer import FilesEngine

    monkeypatch.setattr(s3, "READ_TIMEOUT", 1.0)
    hung = threading.Event()
    hung.set()
    proxy = faulty_s3_env(hang=1.0, only=lambda r: hung.is_set(), max_faults=1000)
    run = RunSection(output=str(tmp_path / "out"), store=f"s3://{s3_bucket}/run", keep_last=2)
    run.upload_wait_s = 1.0
    cp, seconds = Checkpointer(run, rank=0, world=1), []
    for step in (1, 2, 3):
        t0 = time.monotonic()
        cp.save(FilesEngine(), step, {})
        seconds.append(time.monotonic() - t0)
        deadline = time.monotonic() + 30
        while not proxy.injected["hang"] and time.monotonic() < deadline:  # the upload thread's client
            time.sleep(0.05)  # takes a while to build on a loaded box: saves 2 and 3 meet a hung store
    hung.clear()  # the store answers again
    cp.close(wait_s=60)
    err = capfd.readouterr().err
    assert max(seconds) < 1.0 + 3, seconds
    assert err.count("gave up waiting after 1 s") == 2, err
    assert latest_direct(s3_env, s3_bucket) == {"tag": "step00000003", "step": 3}
    assert cp.mirror.not_mirrored == ["step00000002"] and cp.failures == 1, "replaced while waiting: counted"
    assert proxy.injected["hang"] >= 1
    report(record_property, "checkpoint saves (Checkpointer) while every request hangs, then the store is back",
           proxy.total_faults, "time per save, stderr, latest after the store is back, failures",
           f"saves took {max(seconds):.1f} s at most (bound 1 s + save), said on stderr; the newest "
           "checkpoint was published once the store answered; the one replaced while waiting is counted")


# ---------------------------------------------------------------------------------- export
def check_export(server, bucket: str, prefix: str) -> dict | None:
    """The commit-marker invariant: export.json, where present, names files that exist with its hashes."""
    c = server.client()
    try:
        record = json.loads(c.get_object(Bucket=bucket, Key=prefix + "export.json")["Body"].read())
    except c.exceptions.NoSuchKey:
        return None
    for name, meta in record["files"].items():
        data = c.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
        assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], name
    return record


@pytest.fixture(scope="module")
def model():
    from crossmae import create_model

    torch.manual_seed(0)
    return create_model("crossmae_vit_micro_patch4_dec64d2b")


def test_export_through_faults_completes(s3_env, s3_bucket, faulty_s3_env, model, record_property):
    """export_model to S3 through faults, 3 exports: every export.json names files that hash as recorded."""
    from pipelines.checkpoints.export import export_model

    rates = dict(reset=0.2, internal=0.15, slowdown=0.05, delay=0.1, delay_s=0.1)
    proxy = faulty_s3_env(**rates, seed=41, max_faults=20)
    for i in range(3):
        export_model(model, f"s3://{s3_bucket}/exports/x{i}", dict(source="test", tag=f"x{i}"), full=True)
    for i in range(3):
        record = check_export(s3_env, s3_bucket, f"exports/x{i}/")
        assert record and sorted(record["files"]) == ["config.json", "full.safetensors", "model.safetensors"]
    assert proxy.total_faults >= 3, proxy.injected
    report(record_property, "export_model -> S3 (3 exports): " + describe(rates), proxy.total_faults,
           "export.json present; every file it names exists with the recorded sha256 and size",
           f"all 3 complete and consistent; injected {injected(proxy)} in {sum(proxy.requests.values())} requests")


@pytest.mark.parametrize("kind,target", [("internal", "config.json"), ("internal", "export.json"),
                                         ("reset", "export.json")])
def test_export_beyond_the_retry_budget_leaves_no_false_commit_marker(s3_env, s3_bucket, faulty_s3_env, model, kind,
                                                                      target, record_property):
    """Every PUT of one export file fails: StorageError, and no export.json naming missing or stale files."""
    from pipelines.checkpoints.export import export_model

    out, prefix = f"s3://{s3_bucket}/exports/x", "exports/x/"
    export_model(model, out, dict(source="test", tag="old"))  # a complete earlier export is being redone
    proxy = faulty_s3_env(**{kind: 1.0}, only=lambda r: r.method == "PUT" and r.path.endswith("/" + target))
    with pytest.raises(storage.StorageError):
        export_model(model, out, dict(source="test", tag="new"), full=True)
    assert proxy.attempts("PUT", "/" + target) == s3.REQUEST_ATTEMPTS
    record = check_export(s3_env, s3_bucket, prefix)
    if kind == "internal":  # the marker never reached the server: the export reads as incomplete
        assert record is None
    else:  # reset after the server stored it: the marker is the new, complete one
        assert record is not None and record["tag"] == "new" and "full.safetensors" in record["files"]
    report(record_property, f"export: {NAMES[kind]} on every PUT of {target}", proxy.total_faults,
           "export.json after the failure: absent, or naming files that exist with its hashes",
           "StorageError; " + ("no export.json (incomplete, redone next run)" if record is None else
                               "export.json complete and consistent (the server had stored it)"))


# ---------------------------------------------------------------------------------- storage layer
@pytest.mark.parametrize("kind,case", [("reset", "missing"), ("reset", "eof"), ("truncate", "eof")])
def test_a_broken_error_answer_is_retried(s3_bucket, faulty_s3_env, kind, case, record_property):
    """An error answer (404 of a missing object, 416 past the end) whose body breaks: still understood."""
    url, data = f"s3://{s3_bucket}/obj", os.urandom(1000)
    if case == "missing":  # what prep's _json (resume records) and checkpoints.latest do
        hit = lambda r: r.method == "GET" and r.path.split("?")[0].endswith("/absent")
        proxy = faulty_s3_env(**{kind: 1.0}, max_faults=2, only=hit)
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(url.replace("obj", "absent"))
    else:  # a read that starts at the end (a download resumed after its last byte): one GET past the end, 416
        storage.write_bytes(url, data)
        hit = lambda r: r.method == "GET" and r.headers.get("range") == "bytes=1000-"
        proxy = faulty_s3_env(**{kind: 1.0}, max_faults=2, only=hit)
        with storage.open_read(url) as f:  # a read through the end sends no GET past it: the size is known
            assert f.read(4096) == data and f.read(4096) == b""
        assert proxy.total_faults == 0 and proxy.requests["GET"] == 1, (proxy.requests, proxy.injected)
        with storage.open_read(url, start=len(data)) as f:
            assert f.read(4096) == b""
    # a broken error answer (reset or cut short) is retried: 2 faults, then the real answer
    assert proxy.injected[kind] == proxy.total_faults == 2, proxy.injected
    status = "404 NoSuchKey of a missing object" if case == "missing" else "416 of the read past the end"
    report(record_property, f"{NAMES[kind]} of a {status}", proxy.total_faults,
           "storage.read_bytes raises FileNotFoundError" if case == "missing" else
           "storage.open_read(start=size): b'' (end of data)", "retried, understood")


def test_retries_still_work_after_an_outage(s3_bucket, faulty_s3_env, monkeypatch, record_property):
    """13 writes fail outright (an outage), then one transient 500: still retried, the write succeeds."""
    # botocore's standard retries share a quota per client: 500 tokens, 14 per retry of an error,
    # 1 back per success. 13 writes x 3 retries x 14 = 546 tokens; 4 attempts keep the test short.
    monkeypatch.setattr(s3, "REQUEST_ATTEMPTS", 4)
    proxy = faulty_s3_env(internal=1.0, max_faults=1000, only=lambda r: "/outage-" in r.path)
    for i in range(13):
        with pytest.raises(storage.StorageError, match="InternalError"):
            storage.write_bytes(f"s3://{s3_bucket}/outage-{i}", b"x")
    outage = proxy.requests["PUT"]
    # service is back, with the odd transient error: exactly one more 500, on the next write
    proxy.faults.only, proxy.faults.max_faults = (lambda r: r.method == "PUT"), proxy.total_faults + 1
    storage.write_bytes(f"s3://{s3_bucket}/after", b"y")
    assert proxy.attempts("PUT", "/after") == 2 and storage.read_bytes(f"s3://{s3_bucket}/after") == b"y"
    assert outage == 13 * 4, "every write of the outage had its full attempt budget"
    report(record_property, "outage: 500 on every PUT of 13 writes, then one transient 500", proxy.total_faults,
           "attempts per write during the outage; the first write after it (botocore's per-client retry quota)",
           "every write got its 4 attempts; the one after the outage was retried and written")
