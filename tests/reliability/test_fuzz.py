"""Fuzzing, bounded in time, of what reads untrusted bytes: the shard tar reader
(pipelines/data/tar_reader.py through the loader's _ShardCursor), the manifest reader (ShardList.from_manifest)
and the image decode path (decode_rgb, image_size, mae_train, eval_transform). Every input
either works or raises one of the documented error types; none hangs or eats memory.

Each example runs in a worker process with an address-space limit (1.5 GB above what its
imports take) and a 10 s timeout, so a decompression bomb or a hang shows up as a failure
instead of taking the machine down. Hypothesis is derandomized: the same examples every run.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st

TIMEOUT = 10.0  # seconds per example
HEADROOM = 1536 << 20  # bytes of address space above the worker's imports
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- the worker process
def _seeds() -> dict[str, bytes]:
    """Valid inputs the mutations start from: JPEGs (baseline RGB, progressive, grayscale), a PNG."""
    import numpy as np

    from tests.data_prep.fixtures import jpeg_bytes, synthetic_image

    rng = np.random.default_rng(0)
    img = synthetic_image(rng, 24, 48)
    png, prog = io.BytesIO(), io.BytesIO()
    img.save(png, format="PNG")
    img.save(prog, format="JPEG", progressive=True, quality=80)
    return dict(jpeg=jpeg_bytes(img), progressive=prog.getvalue(), gray=jpeg_bytes(img.convert("L")),
                png=png.getvalue())


def _decode(data: bytes) -> None:
    from pipelines.data.jpeg import decode_rgb, image_size
    from pipelines.data.transforms import eval_transform, mae_train

    h, w = image_size(data)
    assert h > 0 and w > 0
    for img in (decode_rgb(data), decode_rgb(data, (8, 8))):
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype.name == "uint8"
    assert tuple(mae_train(data, 0, 16).shape) == (3, 16, 16)
    assert tuple(eval_transform(data, 16).shape) == (3, 16, 16)


def _tar(data: bytes) -> None:
    """Read every sample the way the loader does: _ShardCursor over one shard file."""
    from pipelines.data.loader import _ShardCursor
    from pipelines.data.shard_cache import ShardList

    with tempfile.NamedTemporaryFile(suffix=".tar") as f:
        f.write(data)
        f.flush()
        cursor = _ShardCursor(ShardList((f.name,), (8,)))
        try:
            for i in range(9):
                sample = cursor.get(0, i)
                if sample is not None:
                    assert isinstance(sample["__key__"], str)
                    assert all(isinstance(v, bytes) for k, v in sample.items() if not k.startswith("__"))
        finally:
            cursor.close()


def _manifest(data: bytes) -> None:
    from pipelines.data.shard_cache import ShardList

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "manifest.json")
        with open(path, "wb") as f:
            f.write(data)
        shards = ShardList.from_manifest(path)
        assert all(isinstance(u, str) for u in shards.urls) and all(isinstance(n, int) for n in shards.counts)


def _allowed() -> dict:
    from pipelines.storage import StorageError
    from pipelines.data.jpeg import DecodeError

    # decode: the loader's contract is DecodeError (it also tolerates any ValueError/OSError).
    # tar: tarfile's own ReadError family, ValueError (webdataset: duplicate member names).
    # manifest: ValueError (incl. JSON / UTF-8 errors), StorageError (unreadable).
    return dict(decode=(DecodeError,), tar=(tarfile.TarError, ValueError), manifest=(ValueError, StorageError))


def _serve(conn, headroom: int) -> None:
    import resource

    import psutil
    import torch

    # imported before the limit: torch maps its libraries (GBs of address space) at import
    import pipelines.data.transforms  # noqa: F401
    import pipelines.data.loader  # noqa: F401

    torch.set_num_threads(1)
    targets, allowed = dict(decode=_decode, tar=_tar, manifest=_manifest), _allowed()
    limit = psutil.Process().memory_info().vms + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while (msg := conn.recv()) is not None:
        target, data = msg
        try:
            targets[target](data)
            conn.send(("ok", ""))
        except BaseException as e:  # noqa: BLE001 - classified and reported to the test
            kind = "allowed" if isinstance(e, allowed[target]) else "unexpected"
            conn.send((kind, f"{type(e).__module__}.{type(e).__qualname__}: {str(e)[:300]}"))


class Worker:
    """One spawned worker process; a call that times out kills it (a hang) and starts another."""

    def __init__(self):
        self.proc = None
        self.calls, self.outcomes = 0, {}

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # not fork: the parent has torch's thread pools
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, HEADROOM), daemon=True)
        self.proc.start()

    def __call__(self, target: str, data: bytes) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send((target, data))
        ready = self.conn.poll(TIMEOUT + (60 if self.calls == 0 else 0))  # the first call waits for imports
        if not ready or not self.proc.is_alive():
            self.stop()
            return ("hang" if not ready else "crash", f"no answer in {TIMEOUT:.0f} s" if not ready else "worker died")
        self.calls += 1
        kind, detail = self.conn.recv()
        self.outcomes[(target, kind)] = self.outcomes.get((target, kind), 0) + 1
        return kind, detail

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(10)
        self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    w.start()
    yield w
    if w.proc is not None and w.proc.is_alive():
        w.conn.send(None)
        w.proc.join(10)
    w.stop()


def check(worker: Worker, target: str, data: bytes) -> None:
    kind, detail = worker(target, data)
    assert kind in ("ok", "allowed"), f"{target}: {kind}: {detail} (input {len(data)} bytes: {data[:64]!r}...)"


# ---------------------------------------------------------------- strategies
SEEDS = _seeds()
MUTATION = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                     st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16))


def mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for kind, pos, chunk in mutations:
        if not b:
            break
        pos %= len(b)
        if kind == "flip":
            b[pos] ^= chunk[0] or 1
        elif kind == "set":
            b[pos:pos + len(chunk)] = chunk
        elif kind == "insert":
            b[pos:pos] = chunk
        elif kind == "delete":
            del b[pos:pos + len(chunk) * 16]
        else:
            del b[pos:]
    return bytes(b)


def mutated(seeds: list[bytes]):
    return st.builds(mutate, st.sampled_from(seeds), st.lists(MUTATION, min_size=1, max_size=6))


def _shard(samples) -> bytes:
    from data_prep.shards import tar_member

    return b"".join(tar_member(f"{key}.{ext}", data) for key, ext, data in samples) + b"\0" * 1024


NAMES = st.one_of(st.sampled_from(["s0", "../../escape", "/abs/path", "a/b/c", "", ".", "x" * 150, "dup"]),
                  st.text(min_size=0, max_size=120))
SHARDS = st.lists(st.tuples(NAMES, st.sampled_from(["jpg", "cls", "json", "JPG", ""]),
                            st.one_of(st.just(SEEDS["jpeg"]), st.binary(max_size=600))), max_size=8).map(_shard)
VALID_SHARD = _shard([(f"s{i}", ext, SEEDS["jpeg"] if ext == "jpg" else b"3") for i in range(4) for ext in ("jpg", "cls")])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
SHARD_ENTRY = st.fixed_dictionaries({}, optional={"name": st.one_of(st.text(max_size=30), JSON),
                                                  "num_samples": st.one_of(st.integers(-5, 1 << 40), JSON),
                                                  "sha256": st.text(max_size=64)})
MANIFEST = st.fixed_dictionaries({}, optional={"format": st.sampled_from(["webdataset", "ffcv", None, 3]),
                                              "shards": st.one_of(st.lists(SHARD_ENTRY, max_size=4), JSON),
                                              "num_samples": JSON})


def _record(record_property, fault: str, worker: Worker, target: str, n: int) -> None:
    """The report's row (RELIABILITY.md): the examples run and what they gave."""
    record_property("fault", fault)
    record_property("trials", n)
    record_property("checked", f"only documented errors ({', '.join(t.__name__ for t in _allowed()[target])}), "
                               f"no hang (> {TIMEOUT:.0f} s), no memory blow-up (> 1.5 GB); outcomes "
                               + ", ".join(f"{k}={v}" for (t, k), v in sorted(worker.outcomes.items()) if t == target))


# ---------------------------------------------------------------- the fuzz tests
def test_decoder_refuses_a_size_bomb_quickly(worker, record_property):
    """A small JPEG whose header claims 60000x60000 pixels is refused with DecodeError, fast, in bounded memory."""
    record_property("fault", "JPEG size bomb: 1.6 KB file, SOF header says 60000x60000")
    record_property("trials", 1)
    record_property("checked", "DecodeError within 10 s under a 1.5 GB address-space limit")
    record_property("result", "pass")
    data = bytearray(SEEDS["jpeg"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
    check(worker, "decode", bytes(data))


def fuzz(worker: Worker, target: str, strategy, max_examples: int) -> int:
    """Run `max_examples` hypothesis examples of `strategy` through the target; returns how many ran."""
    worker.outcomes = {k: v for k, v in worker.outcomes.items() if k[0] != target}  # this test's only

    @settings(FUZZ, max_examples=max_examples)
    @given(data=strategy)
    def run(data):
        check(worker, target, data)

    run()
    return sum(v for (t, _), v in worker.outcomes.items() if t == target)


def test_fuzz_image_decode_path(worker, record_property):
    """decode_rgb / image_size / mae_train / eval_transform on mutated JPEGs/PNGs and random bytes."""
    n = fuzz(worker, "decode", st.one_of(mutated(list(SEEDS.values())), st.binary(max_size=1024),
                                         st.binary(max_size=512).map(lambda b: b"\xff\xd8\xff" + b)), 200)
    _record(record_property, "fuzzed image bytes (mutated JPEG/PNG, random, JPEG-prefixed random)", worker,
            "decode", n)
    record_property("result", "pass")


def test_fuzz_shard_tar_reader(worker, record_property):
    """_ShardCursor (pipelines/data/tar_reader.py: 512-byte headers, webdataset's key grouping) on generated
    and mutated shards."""
    n = fuzz(worker, "tar", st.one_of(SHARDS, mutated([VALID_SHARD]), st.binary(max_size=2048)), 200)
    _record(record_property, "fuzzed shard tars (odd member names incl. ../ and /abs, mutated, random)", worker,
            "tar", n)
    record_property("result", "pass")


def test_fuzz_manifest_reader(worker, record_property):
    """ShardList.from_manifest on generated JSON (manifest-shaped and arbitrary) and raw bytes."""
    record_property("fault", "fuzzed manifests (schema-shaped JSON, any JSON, random bytes)")
    record_property("trials", 300)
    record_property("checked", "only ValueError / StorageError, no hang")
    record_property("result", "pass")
    fuzz(worker, "manifest", st.one_of(MANIFEST.map(lambda m: json.dumps(m).encode()),
                                       JSON.map(lambda m: json.dumps(m).encode()), st.binary(max_size=200)), 300)
