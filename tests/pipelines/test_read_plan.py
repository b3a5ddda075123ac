"""`crossmae-prep loader-stats` (pipelines/data/read_plan.py) says before a run what the loader will
read from the store: the GETs it predicts are the GETs the real loader sends to a real S3 server,
rank by rank, without a cache and with one cache per node; and bad input is one line, non-zero."""
import json

import pytest

from data_prep.cli import main as prep
from pipelines import storage
from pipelines.data.loader import StreamingLoader
from pipelines.data.transforms import MAETrainTransform
from tests.data_prep.fixtures import make_image_folder

WORLD, WORKERS, BATCH, BLOCK = 2, 2, 4, 8  # blocks of half a shard: readers start and stop inside shards


@pytest.fixture(scope="module")
def local_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("readplan")
    make_image_folder(root / "src", ("ant", "bee", "cow"), per_class=32)
    assert prep(["folder", str(root / "src"), str(root / "out"), "--shard-samples", "16"]) == 0
    return root / "out/train/manifest.json"


@pytest.fixture
def remote(local_manifest, s3_bucket):
    base = f"s3://{s3_bucket}/readplan/train"
    for p in local_manifest.parent.iterdir():
        if p.is_file():
            storage.write_bytes(f"{base}/{p.name}", p.read_bytes())
    return f"{base}/manifest.json"


def stats(capsys, manifest, *extra):
    assert prep(["loader-stats", str(manifest), "--world", str(WORLD), "--workers", str(WORKERS), "--batch",
                 str(BATCH), "--block-size", str(BLOCK), *extra]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), [ln for ln in out.err.splitlines() if ln.startswith("crossmae-prep: loader-stats: ")]


def read_epochs(manifest, rank, epochs, cache_dir=None, access="stream"):
    """The real loader of one rank; its own store counters per epoch (pipelines/storage/traffic.py)."""
    kw = dict(cache_dir=str(cache_dir), cache_bytes=1 << 30) if cache_dir else {}
    with StreamingLoader.from_manifest(manifest, batch_size=BATCH, transform=MAETrainTransform(16), rank=rank,
                                       world_size=WORLD, num_workers=WORKERS, block_size=BLOCK, seed=0,
                                       access=access, **kw) as ld:
        for _ in range(epochs):
            assert sum(1 for _ in ld) == len(ld) > 0
    return ld.traffic


def test_loader_stats_prints_what_a_run_will_read_and_the_loader_reads_it(local_manifest, remote, tmp_path, capsys):
    r, lines = stats(capsys, local_manifest, "--epochs", "3", "--ranks-per-node", "1")
    m = json.loads(local_manifest.read_text())
    dataset = sum(s["bytes"] for s in m["shards"])
    assert (r["shards"], r["samples"], r["dataset_bytes"]) == (m["num_shards"], 96, dataset)
    assert len(lines) == 6 and f"{m['num_shards']} shards, 96 samples" in lines[0]
    assert f"no shard cache: {r['no_cache']['gets_per_epoch']} GETs" in lines[2] and "shards per batch" in lines[4]
    assert "prep with --jpeg-restarts" in lines[5] and r["jpeg_restarts"] is None

    no_cache = [read_epochs(remote, rank, 1) for rank in range(WORLD)]
    assert sum(t[0]["gets"] for t in no_cache) == r["no_cache"]["gets_per_epoch"] > m["num_shards"]
    read = sum(t[0]["bytes"] for t in no_cache) / r["dataset_bytes"]
    assert read == pytest.approx(r["no_cache"]["bytes_per_dataset_per_epoch"], rel=0.15)

    per_node = [read_epochs(remote, rank, 3, tmp_path / f"node{rank}") for rank in range(WORLD)]  # a cache each
    gets = [sum(t["gets"] for t in node.values()) for node in per_node]
    assert max(gets) == r["cache"]["gets_per_node"] and all(g <= m["num_shards"] for g in gets)


def test_loader_stats_for_random_access(local_manifest, remote, tmp_path, capsys):
    """access random: no store reads without a cache; with one, each node fetches the shards its
    ranks' samples fall in, whole, once; batches mix more shards than the streamed order's."""
    stream, _ = stats(capsys, local_manifest, "--epochs", "3", "--ranks-per-node", "1")
    r, lines = stats(capsys, local_manifest, "--epochs", "3", "--ranks-per-node", "1", "--access", "random")
    assert r["access"] == "random" and r["no_cache"] is None and r["block_size"] == r["samples"]
    assert "access random" in lines[1] and "none allowed" in lines[2] and "whole epoch" in lines[4]
    assert r["shards_per_batch"]["mean"] > stream["shards_per_batch"]["mean"]
    per_node = [read_epochs(remote, rank, 3, tmp_path / f"node{rank}", access="random") for rank in range(WORLD)]
    gets = [sum(t["gets"] for t in node.values()) for node in per_node]
    assert max(gets) == r["cache"]["gets_per_node"] and r["cache"]["bytes_per_dataset_per_node"] <= 1.0


def exit_code(argv):
    try:
        return prep(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


def test_bad_input_to_loader_stats_is_one_line_and_a_non_zero_exit(local_manifest, tmp_path, capsys):
    (tmp_path / "ffcv.json").write_text(json.dumps(dict(format="ffcv")))
    for args, code, said in (
            ([str(tmp_path / "none" / "manifest.json")], 1, "no such file"),
            ([str(tmp_path / "ffcv.json")], 1, "not a WebDataset manifest"),
            ([str(local_manifest.parent / "train-000000.tar")], 2, "not a manifest"),
            ([str(local_manifest), "--world", "4", "--batch", "32"], 2, "an epoch gives no batch"),
            ([str(local_manifest), "--workers", "0"], 2, "argument --workers")):
        assert exit_code(["loader-stats", *args]) == code, args
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("crossmae-prep") and said in err[0], err
