"""The manifest's sample index (crossmae-prep writes the byte offset of every N-th sample of each
shard): a streaming reader that starts mid-shard reads from the indexed sample at or before its
first one, with a ranged GET from S3, instead of from the shard's start. Same samples, same
batches, fewer bytes; a wrong index is found and read around, said on stderr; a damaged one is
refused; `crossmae-prep verify` checks it against the samples."""
import itertools
import json
import random

import pytest
import torch

from data_prep.cli import main as prep
from pipelines import storage
from pipelines.data.loader import StreamingLoader
from pipelines.data.shard_cache import ShardCache, ShardList, ShardReader
from pipelines.data.tar_reader import sample_spans
from pipelines.data.transforms import MAETrainTransform
from tests.data_prep.fixtures import make_image_folder
from tests.reliability.fault_proxy import FaultProxy

EVERY, SHARD = 4, 16
WORLD, WORKERS, BATCH, BLOCK = 2, 2, 4, 8  # blocks of half a shard: readers start and stop inside shards


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """crossmae-prep shards with an index every 4 samples, plus the same manifest without one."""
    root = tmp_path_factory.mktemp("index")
    make_image_folder(root / "src", ("ant", "bee", "cow"), per_class=32)
    assert prep(["folder", str(root / "src"), str(root / "out"), "--shard-samples", str(SHARD),
                 "--sample-index-every", str(EVERY)]) == 0
    train = root / "out/train"
    m = json.loads((train / "manifest.json").read_text())
    del m["sample_index_every"]
    for s in m["shards"]:
        del s["sample_index"]
    (train / "noindex.json").write_text(json.dumps(m))
    return train


def edited(train, name, edit):
    m = json.loads((train / "manifest.json").read_text())
    edit(m)
    (train / name).write_text(json.dumps(m))
    return train / name


def test_prep_writes_the_byte_offset_of_every_nth_sample(split, tmp_path):
    m = json.loads((split / "manifest.json").read_text())
    assert m["sample_index_every"] == EVERY and m["num_shards"] == 6
    for s in m["shards"]:
        with open(split / s["name"], "rb") as f:
            starts = [a for a, _ in sample_spans(f, s["name"])[0]]
        assert len(starts) == s["num_samples"] and s["sample_index"] == starts[::EVERY]
    # the default: every 64th sample; 0: no index
    make_image_folder(tmp_path / "src", ("ant",), per_class=70)
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "d"), "--shard-samples", "70"]) == 0
    (s,) = (d := json.loads((tmp_path / "d/train/manifest.json").read_text()))["shards"]
    with open(tmp_path / "d/train" / s["name"], "rb") as f:
        starts = [a for a, _ in sample_spans(f, s["name"])[0]]
    assert d["sample_index_every"] == 64 and s["sample_index"] == [0, starts[64]]
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "e"), "--shard-samples", "70",
                 "--sample-index-every", "0"]) == 0
    e = json.loads((tmp_path / "e/train/manifest.json").read_text())
    assert "sample_index_every" not in e and "sample_index" not in e["shards"][0]
    assert e["shards"][0]["sha256"] == s["sha256"], "the index changes the manifest, never the shards"


@pytest.fixture
def remote(split, s3_bucket, s3_env, monkeypatch):
    """The split on S3 behind a counting proxy: (base URL, proxy)."""
    base = f"s3://{s3_bucket}/index/train"
    for p in split.iterdir():
        if p.is_file():
            storage.write_bytes(f"{base}/{p.name}", p.read_bytes())
    with FaultProxy(s3_env.endpoint_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield base, proxy


@pytest.mark.parametrize("where", ["local", "s3", "s3 through the shard cache"])
def test_a_reader_starting_anywhere_in_a_shard_reads_the_samples_it_reads_without_the_index(split, remote, where,
                                                                                             tmp_path):
    base = str(split) if where == "local" else remote[0]
    indexed = ShardList.from_manifest(f"{base}/manifest.json")
    plain = ShardList.from_manifest(f"{base}/noindex.json")
    assert indexed.index_every == EVERY and plain.index_every == 0 and indexed.urls == plain.urls
    cache = ShardCache(str(tmp_path / "cache"), 1 << 30) if "cache" in where else None  # a seek in the copy
    a, b = ShardReader(indexed, cache), ShardReader(plain)
    wanted = [(k, i) for k in range(len(indexed.urls)) for i in range(indexed.counts[k])]
    random.Random(0).shuffle(wanted)
    for k, i in wanted[:40] + [(0, SHARD - 1), (0, 0), (1, 5), (1, 6), (1, 4)]:
        x, y = a.get(k, i), b.get(k, i)
        assert x["__key__"] == y["__key__"] and x["jpg"] == y["jpg"] and x["cls"] == y["cls"], (k, i)
    assert a.index_misses == set()
    a.close(), b.close()


def run_rank(manifest, rank, epochs=1):
    """One rank's batches of ``epochs`` epochs (no cache) and its loader."""
    with StreamingLoader.from_manifest(str(manifest), batch_size=BATCH, transform=MAETrainTransform(16), rank=rank,
                                       world_size=WORLD, num_workers=WORKERS, block_size=BLOCK, seed=0) as ld:
        batches = [b for _ in range(epochs) for b in itertools.islice(ld, len(ld))]
    return batches, ld


def same_batches(xs, ys):
    assert len(xs) == len(ys) > 0
    for x, y in zip(xs, ys):
        assert x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])


def shard_gets(proxy):
    return [e for e in proxy.events if e.method == "GET" and e.path.split("?")[0].endswith(".tar")]


def test_streaming_from_s3_starts_mid_shard_at_the_index_same_batches_fewer_bytes(split, remote, capsys):
    base, proxy = remote
    m = json.loads((split / "manifest.json").read_text())
    offsets = {s["name"]: set(s["sample_index"]) for s in m["shards"]}
    plain, with_index = [], []
    for rank in range(WORLD):
        proxy.events.clear()
        plain.append(run_rank(f"{base}/noindex.json", rank))
        assert all(e.range in (None, "bytes=0-") for e in shard_gets(proxy)), "without the index: from the start"
        proxy.events.clear()
        with_index.append(run_rank(f"{base}/manifest.json", rank))
        gets = shard_gets(proxy)
        starts = [int(e.range[len("bytes="):].split("-")[0]) if e.range else 0 for e in gets]
        names = [e.path.split("?")[0].rsplit("/", 1)[-1] for e in gets]
        assert all(s in offsets[n] for s, n in zip(starts, names)), "server side: every GET starts at an indexed sample"
        assert any(s > 0 for s in starts), "some reader starts mid-shard"
        same_batches(with_index[-1][0], plain[-1][0])
    read = [sum(ld.traffic[0]["bytes"] for _, ld in runs) for runs in (plain, with_index)]
    gets = [sum(ld.traffic[0]["gets"] for _, ld in runs) for runs in (plain, with_index)]
    assert gets[0] == gets[1] and read[1] < read[0], (gets, read)
    # loader-stats predicts the bytes the loader reads, index or not (exactly here: shards smaller than
    # the reader's 1 MiB read-ahead are read from the start offset to their end)
    for name, nbytes in zip(("noindex.json", "manifest.json"), read):
        assert prep(["loader-stats", str(split / name), "--world", str(WORLD), "--workers", str(WORKERS),
                     "--batch", str(BATCH), "--block-size", str(BLOCK), "--epochs", "1"]) == 0
        out = capsys.readouterr()
        r = json.loads(out.out)
        assert nbytes / r["dataset_bytes"] == pytest.approx(r["no_cache"]["bytes_per_dataset_per_epoch"], abs=0.002)
        assert r["sample_index_every"] == (EVERY if name == "manifest.json" else 0)
        assert ("sample index, every 4 samples" if r["sample_index_every"] else "no sample index") in out.err


def test_an_index_that_misses_its_samples_is_read_around_and_said_on_stderr(split, capfd):
    """Offsets that point one block into a sample: the header there fails its checksum, so the
    reader reads the shard from its start instead, once per process, and says so."""
    def shift(m):
        s = m["shards"][1]
        s["sample_index"] = [0] + [o + 512 for o in s["sample_index"][1:]]
    wrong = edited(split, "wrong.json", shift)
    shards = ShardList.from_manifest(str(wrong))
    reader, ref = ShardReader(shards), ShardReader(ShardList.from_manifest(str(split / "noindex.json")))
    for i in (9, 13, 2, 15):
        assert reader.get(1, i)["__key__"] == ref.get(1, i)["__key__"]
    assert reader.index_misses == {1}
    err = capfd.readouterr().err
    assert err.count("sample_index") == 1 and shards.urls[1] in err and "from its start" in err
    same_batches(run_rank(wrong, 0)[0], run_rank(split / "noindex.json", 0)[0])


@pytest.mark.parametrize("edit,why", [
    (lambda m: m["shards"][0].update(sample_index=[0, 5, 3, 9]), "rising"),
    (lambda m: m["shards"][0].update(sample_index=[0, 512]), "want 4"),
    (lambda m: m["shards"][0].update(sample_index=[7, 600, 900, 1200]), "from 0"),
    (lambda m: m["shards"][0].update(sample_index="0,512"), "bad sample_index"),
    (lambda m: m.update(sample_index_every=-4), "bad sample_index_every"),
    (lambda m: m["shards"][0].update(sample_index=[0, 512, 1024, 10 ** 9]), "bad sample_index"),
])
def test_a_damaged_index_is_refused_with_one_line(split, capsys, edit, why):
    bad = edited(split, "bad.json", edit)
    with pytest.raises(ValueError, match=why):
        ShardList.from_manifest(str(bad))
    assert prep(["loader-stats", str(bad), "--world", "1", "--batch", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sample_index" in err[0] and "Traceback" not in err[0]


def test_verify_checks_the_index_and_finalize_rewrites_it(split, tmp_path, capsys):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(split.parent, dst)
    good = json.loads((dst / "train/manifest.json").read_text())
    assert prep(["verify", str(dst), "--splits", "train"]) == 0
    bad = json.loads((dst / "train/manifest.json").read_text())
    bad["shards"][2]["sample_index"][1] += 512
    (dst / "train/manifest.json").write_text(json.dumps(bad))
    capsys.readouterr()
    assert prep(["verify", str(dst), "--splits", "train"]) != 0
    out = capsys.readouterr()
    assert json.loads(out.out)["splits"][0]["bad_index"] == [bad["shards"][2]["name"]]
    assert "1 with a sample_index that does not match" in out.err and "finalize" in out.err
    assert prep(["finalize", str(dst), "--splits", "train"]) == 0
    assert json.loads((dst / "train/manifest.json").read_text())["shards"] == good["shards"]
    assert prep(["verify", str(dst), "--splits", "train"]) == 0
