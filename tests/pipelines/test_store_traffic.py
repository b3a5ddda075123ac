"""Object-store traffic, counted by the loader and by a proxy in front of the real S3 server:
with the shard cache each shard is read from the store once over a 3-epoch run, without it
once per epoch, and the loader's own counters say the same as the server side."""
import pathlib
from collections import Counter

import pytest

from data_prep.cli import main as prep
from pipelines import storage
from pipelines.data.loader import StreamingLoader
from pipelines.data.transforms import MAETrainTransform
from tests.data_prep.fixtures import make_image_folder
from tests.reliability.fault_proxy import FaultProxy

EPOCHS = 3


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("traffic")
    make_image_folder(root / "src", ("ant", "bee", "cow"), per_class=32)
    assert prep(["folder", str(root / "src"), str(root / "out"), "--shard-samples", "16"]) == 0
    return root / "out/train"


@pytest.fixture
def remote(local_shards, s3_bucket, s3_env, monkeypatch):
    """The shards on S3, read through a counting proxy: (manifest URL, proxy, {shard name: bytes})."""
    base = f"s3://{s3_bucket}/traffic/train"
    sizes = {}
    for p in sorted(q for q in local_shards.iterdir() if q.is_file()):
        storage.write_bytes(f"{base}/{p.name}", p.read_bytes())
        if p.suffix == ".tar":
            sizes[p.name] = p.stat().st_size
    with FaultProxy(s3_env.endpoint_url) as proxy:  # no faults: it only counts
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield f"{base}/manifest.json", proxy, sizes


def run_epochs(manifest, tmp_path, cache: bool, workers: int, access: str = "stream"):
    kw = dict(cache_dir=str(tmp_path / "cache"), cache_bytes=1 << 30) if cache else {}
    with StreamingLoader.from_manifest(manifest, batch_size=8, transform=MAETrainTransform(16), num_workers=workers,
                                       block_size=16, seed=3, access=access, **kw) as loader:
        for _ in range(EPOCHS):
            assert sum(1 for _ in loader) == len(loader) > 0
    return loader


def shard_gets(proxy) -> Counter:
    return Counter(e.path.split("?")[0].rsplit("/", 1)[-1] for e in proxy.events
                   if e.method == "GET" and e.path.split("?")[0].endswith(".tar"))


@pytest.mark.parametrize("workers,access", [(0, "stream"), (2, "stream"), (0, "random"), (2, "random")])
def test_with_the_shard_cache_each_shard_is_read_from_the_store_once_in_three_epochs(remote, tmp_path, workers,
                                                                                     access):
    """Random access too: every batch draws from every shard, and the node's cache serves them all."""
    manifest, proxy, sizes = remote
    loader = run_epochs(manifest, tmp_path, cache=True, workers=workers, access=access)
    assert shard_gets(proxy) == Counter({name: 1 for name in sizes}), "server side: one GET per shard"
    total = loader.traffic_total()
    assert loader.dataset_bytes == sum(sizes.values())
    assert (total["gets"], total["bytes"], total["retries"]) == (len(sizes), sum(sizes.values()), 0)
    assert (total["shard_reads"], total["shard_rereads"]) == (len(sizes), 0)
    assert [loader.traffic.get(e, Counter())["bytes"] for e in range(EPOCHS)] == [sum(sizes.values()), 0, 0]


@pytest.mark.parametrize("workers", [0, 2])
def test_without_a_cache_each_shard_is_read_once_per_epoch(remote, tmp_path, workers):
    """Once per epoch and reader: with several workers, a shard whose samples straddle two workers'
    runs of the epoch is read by both (at most workers - 1 such shards per epoch on a rank)."""
    manifest, proxy, sizes = remote
    loader = run_epochs(manifest, tmp_path, cache=False, workers=workers)
    gets, straddling = shard_gets(proxy), max(0, workers - 1)
    assert set(gets) == set(sizes) and all(EPOCHS <= n <= EPOCHS * (1 + straddling) for n in gets.values())
    assert sum(gets.values()) <= EPOCHS * (len(sizes) + straddling) + workers * len(sizes)  # + epoch 4's prefetch
    if workers <= 1:
        assert gets == Counter({name: EPOCHS for name in sizes}), "server side: one GET per shard and epoch"
    for epoch in range(EPOCHS):
        t = loader.traffic[epoch]
        assert t["gets"] == t["shard_reads"] and t["retries"] == 0, epoch
        assert len(sizes) <= t["shard_reads"] <= len(sizes) + straddling, epoch
        assert t["shard_rereads"] == t["shard_reads"] - (len(sizes) if epoch == 0 else 0)
        assert 0 < t["bytes"] <= (1 + straddling) * sum(sizes.values())
    # workers run on into epoch 4 before the loader closes: what they read for it reaches no batch
    assert sum(gets.values()) - straddling * (len(sizes) // 2 + 1) <= loader.traffic_total()["gets"]
    if workers == 0:
        assert sum(gets.values()) == loader.traffic_total()["gets"], "the loader counts what the server saw"


def test_random_access_refuses_remote_shards_without_a_cache_that_holds_them(remote, tmp_path):
    manifest, proxy, sizes = remote
    with pytest.raises(ValueError, match="remote: give the node a shard cache"):
        run_epochs(manifest, tmp_path, cache=False, workers=0, access="random")
    small = sum(sizes.values()) - 1
    with pytest.raises(ValueError, match="the shard cache must hold all of them"):
        StreamingLoader.from_manifest(manifest, batch_size=8, transform=MAETrainTransform(16), access="random",
                                      cache_dir=str(tmp_path / "c"), cache_bytes=small)
    assert shard_gets(proxy) == Counter(), "refused before any shard was read"
