"""The streaming loader over real shards written by crossmae-prep, local and on S3."""
import itertools
import pathlib
import tarfile

import pytest
import torch

from data_prep.cli import main as prep
from pipelines.data.transforms import MAETrainTransform
from pipelines.data.loader import StreamingLoader
from tests.data_prep.fixtures import make_image_folder

N = 150  # 3 classes x 50


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    make_image_folder(root / "src", ("ant", "bee", "cow"), per_class=50)
    assert prep(["folder", str(root / "src"), str(root / "out"), "--shard-samples", "16"]) == 0
    return root / "out/train/manifest.json"


def loader(manifest, **kw):
    args = dict(batch_size=8, transform=MAETrainTransform(32), num_workers=0, block_size=32, seed=5)
    args.update(kw)
    return StreamingLoader.from_manifest(str(manifest), **args)


def take(ld, n=None):
    out = []
    for batch in itertools.islice(iter(ld), n):
        out.append(batch)
    return out


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


def test_every_rank_gets_the_same_number_of_full_batches_and_no_sample_twice(shards):
    world = 3
    per_rank = [take(loader(shards, rank=r, world_size=world, num_workers=2)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(loader(shards, world_size=world))
    assert all(b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.uint8 for r in per_rank for b in r)
    seen = [k for r in per_rank for k in keys_of(r)]
    assert len(seen) == len(set(seen)) and N - len(seen) < world * 8
    for r in per_rank:  # labels agree with the class in the key
        for b in r:
            assert [("ant", "bee", "cow")[lab] for lab in b["label"].tolist()] == [k.split("_")[0] for k in b["key"]]


def test_order_and_augmentation_do_not_depend_on_the_number_of_workers(shards):
    def by_index(batches):
        return {int(i): (k, img) for b in batches for i, k, img in zip(b["index"], b["key"], b["image"])}

    one, three = by_index(take(loader(shards, num_workers=0))), by_index(take(loader(shards, num_workers=3)))
    assert one.keys() == three.keys()
    for i in one:
        assert one[i][0] == three[i][0] and torch.equal(one[i][1], three[i][1])


def test_epochs_reshuffle(shards):
    ld = loader(shards)
    first, second = keys_of(take(ld)), keys_of(take(ld))
    assert len(set(first) & set(second)) >= N - 2 * 8 and first != second and ld.epoch == 2


@pytest.mark.parametrize("world,workers,world2,workers2,access", [
    (2, 2, 2, 2, "stream"), (2, 2, 3, 1, "stream"), (1, 3, 2, 0, "stream"), (2, 2, 2, 2, "random"),
    (2, 2, 3, 1, "random")])
def test_resume_mid_epoch_yields_unseen_samples_only(shards, world, workers, world2, workers2, access):
    stop = 3
    before, states = [], []
    for r in range(world):
        ld = loader(shards, rank=r, world_size=world, num_workers=workers, access=access)
        it = iter(ld)
        before += keys_of([next(it) for _ in range(stop)])
        states.append(ld.state_dict())
        del it
    assert all(s == states[0] for s in states), "every rank computes the same global state"
    after = []
    for r in range(world2):
        ld = loader(shards, rank=r, world_size=world2, num_workers=workers2, access=access)
        ld.load_state_dict(states[0])
        after += keys_of(take(ld))
    both = before + after
    assert len(both) == len(set(both)), "a sample was repeated after the restart"
    assert N - len(both) < world2 * 8, "more than the last partial batches went unseen"
    if (world, workers) == (world2, workers2):  # same shape: the very same batches as without a restart
        full = []
        for r in range(world):
            full += keys_of(take(loader(shards, rank=r, world_size=world, num_workers=workers, access=access)))
        assert sorted(full) == sorted(both)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 3)])
def test_random_access_gives_the_batches_of_streaming_the_same_order(shards, world, workers):
    """access="random" reads each sample alone at its byte span; its order is one permutation of the
    epoch, which streaming with block_size = N also gives: the same batches, crops included."""
    for r in range(world):
        rand = loader(shards, rank=r, world_size=world, num_workers=workers, access="random")
        stream = loader(shards, rank=r, world_size=world, num_workers=workers, block_size=N)
        assert rand.block_size == N
        for _ in range(2):
            a, b = take(rand), take(stream)
            assert len(a) == len(b) == rand.batches_per_epoch > 0
            for x, y in zip(a, b):
                assert x["key"] == y["key"] and torch.equal(x["image"], y["image"])
                assert torch.equal(x["label"], y["label"]) and torch.equal(x["index"], y["index"])
        rand.close()
        stream.close()


def test_a_run_resumed_with_another_access_keeps_the_epoch_order_then_switches(shards):
    ld = loader(shards)
    head = take(ld, 4)
    state = ld.state_dict()
    assert state["block_size"] == 32
    resumed = loader(shards, access="random")
    resumed.load_state_dict(state)
    rest = take(resumed)
    assert sorted(keys_of(head + rest)) == sorted(keys_of(take(loader(shards)))), "the epoch as streamed"
    assert resumed.epoch == 1 and resumed.block_size == N and resumed.state_dict()["block_size"] == N
    fresh = loader(shards, access="random")
    take(fresh)
    assert keys_of(take(resumed)) == keys_of(take(fresh)), "epoch 1: random access's own order"


def test_streams_from_s3(shards, s3_bucket):
    from pipelines import storage

    base = f"s3://{s3_bucket}/wds/train"
    for p in sorted(pathlib.Path(shards).parent.iterdir()):
        if p.is_file():
            storage.write_bytes(f"{base}/{p.name}", p.read_bytes())
    local, remote = take(loader(shards, num_workers=2)), take(loader(f"{base}/manifest.json", num_workers=2))
    assert keys_of(local) == keys_of(remote)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(local, remote))


@pytest.mark.parametrize("access", ["stream", "random"])
def test_corrupt_and_missing_samples_are_replaced_and_counted(shards, tmp_path, access):
    out = tmp_path / "train"
    out.mkdir()
    for p in pathlib.Path(shards).parent.iterdir():
        if p.is_file():
            (out / p.name).write_bytes(p.read_bytes())
    victim = out / "train-000001.tar"
    with tarfile.open(victim) as tar:  # garble one image in place (same length: the tar stays valid)
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(victim.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = b"\x00" * member.size
    victim.write_bytes(bytes(data))
    short = out / "train-000003.tar"  # cut the last samples off another shard
    with tarfile.open(short) as tar:
        cut_at = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-2].offset
    short.write_bytes(short.read_bytes()[:cut_at] + b"\0" * 1024)
    ld = loader(out / "manifest.json", drop_last=False, access=access)
    batches = take(ld)
    assert all(len(b["key"]) == 8 for b in batches)
    assert ld.stats["missing"] == 2 and sum(v for k, v in ld.stats.items() if k not in ("missing", "samples")) == 1
    assert member.name.split(".")[0] not in keys_of(batches)
    valid = [k for b in batches for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert len(valid) == len(set(valid)) == N - 3  # substitutes and pad repeats are not valid


def test_local_shard_cache_serves_later_epochs_and_evicts_least_recently_used(shards, s3_bucket, tmp_path):
    import os

    from pipelines import storage
    from pipelines.data.shard_cache import ShardCache

    base = f"s3://{s3_bucket}/cached/train"
    files = {p.name: p.read_bytes() for p in pathlib.Path(shards).parent.iterdir() if p.is_file()}
    for name, data in files.items():
        storage.write_bytes(f"{base}/{name}", data)
    shard_bytes = max(len(d) for n, d in files.items() if n.endswith(".tar"))
    ld = loader(f"{base}/manifest.json", cache_dir=str(tmp_path / "c"), cache_bytes=100 * shard_bytes)
    first = keys_of(take(ld))
    cached = sorted(n for n in os.listdir(tmp_path / "c") if not n.startswith("."))  # .locks/: the cache's own
    assert len(cached) == sum(n.endswith(".tar") for n in files)
    for name in list(files):
        if name.endswith(".tar"):
            storage.delete(f"{base}/{name}")  # the next epoch must come from the cache alone
    second = keys_of(take(ld))
    assert sorted(set(first) | set(second)) and len(second) == len(first)
    cache = ShardCache(str(tmp_path / "c"), max_bytes=3 * shard_bytes)
    oldest = min(cached, key=lambda n: os.path.getmtime(tmp_path / "c" / n))
    assert cache.evict() > 0
    left = [n for n in os.listdir(tmp_path / "c") if not n.startswith(".")]
    assert len(left) <= 3 and oldest not in left


def test_the_shard_cache_never_evicts_a_shard_another_process_is_reading(shards, s3_bucket, tmp_path):
    import os
    import subprocess
    import sys

    from pipelines import storage
    from pipelines.data.shard_cache import ShardCache

    base = f"s3://{s3_bucket}/held/train"
    tars = sorted(p for p in pathlib.Path(shards).parent.iterdir() if p.suffix == ".tar")[:3]
    for p in tars:
        storage.write_bytes(f"{base}/{p.name}", p.read_bytes())
    cache = ShardCache(str(tmp_path / "c"), max_bytes=1 << 30)
    for p in tars:
        cache.open(f"{base}/{p.name}").close()
    held = cache.open(f"{base}/{tars[1].name}")
    assert not cache.fetched, "cached by the loop above"
    evict = ("import sys; from pipelines.data.shard_cache import ShardCache; "
             "print(ShardCache(sys.argv[1], 0).evict())")
    run = lambda: subprocess.run([sys.executable, "-c", evict, str(tmp_path / "c")], capture_output=True,
                                 text=True, check=True, cwd=os.getcwd(), timeout=60).stdout
    freed = int(run())
    assert [p for _, _, p in cache.shards()] == [cache.path_for(f"{base}/{tars[1].name}")], "only the one being read"
    assert freed == tars[0].stat().st_size + tars[2].stat().st_size
    assert held.read() == tars[1].read_bytes()
    held.close()
    assert int(run()) == tars[1].stat().st_size and cache.shards() == [], "closed: evicted like any other"


def test_any_webdataset_shards_by_brace_pattern(shards):
    base = pathlib.Path(shards).parent
    n = len(list(base.glob("*.tar")))
    pattern = str(base / f"train-{{000000..{n - 1:06d}}}.tar")
    by_manifest, by_pattern = take(loader(shards)), take(loader(pattern))
    assert keys_of(by_manifest) == keys_of(by_pattern)


@pytest.mark.parametrize("samples,world,batch", [(N, 1, 2000), (15, 2, 8)])
def test_a_batch_larger_than_the_rank_share_is_an_error_not_an_endless_loop(shards, tmp_path, samples, world, batch):
    from pipelines.data.epoch_order import EmptyEpochError
    from pipelines.data.shard_cache import ShardList

    few = ShardList.from_manifest(str(shards)) if samples == N else _first_samples(shards, samples)
    assert sum(few.counts) == samples
    with pytest.raises(EmptyEpochError) as e:
        StreamingLoader(few, batch_size=batch, transform=MAETrainTransform(32), rank=world - 1, world_size=world,
                        num_workers=2)
    assert isinstance(e.value, ValueError)
    assert f"{samples} samples over {world} rank(s)" in str(e.value) and f"batch of {batch}" in str(e.value)


def _first_samples(shards, n):
    """The first shards of the manifest, cut to ``n`` samples in all (the rest of the last one unread)."""
    from pipelines.data.shard_cache import ShardList

    full = ShardList.from_manifest(str(shards))
    urls, counts, left = [], [], n
    for url, c in zip(full.urls, full.counts):
        if left <= 0:
            break
        urls.append(url)
        counts.append(min(c, left))
        left -= c
    return ShardList(tuple(urls), tuple(counts))


@pytest.mark.parametrize("world,workers,drop_last,batch", [(1, 0, True, 8), (2, 3, True, 8), (3, 2, False, 8),
                                                           (2, 3, True, 32)])  # last: a worker with no batch
def test_len_is_exactly_what_the_next_loop_yields_and_a_loop_left_early_continues(shards, world, workers, drop_last,
                                                                                   batch):
    for r in range(world):
        ld = loader(shards, rank=r, world_size=world, num_workers=workers, drop_last=drop_last, batch_size=batch)
        assert len(ld) == ld.batches_per_epoch
        first = take(ld)
        assert len(first) == ld.batches_per_epoch
        it = iter(ld)  # epoch 1: leave the loop after 2 batches, as a trainer saving mid-epoch
        head = [next(it), next(it)]
        del it
        assert len(ld) == ld.batches_per_epoch - 2
        rest = take(ld)  # the rest of epoch 1, not epoch 1 again
        assert len(rest) == ld.batches_per_epoch - 2 and ld.epoch == 2
        ks = keys_of(head + rest)
        assert len(ks) == len(set(ks)) if drop_last else True
        assert sorted(int(i) for b in head + rest for i in b["index"]) == \
            sorted(int(i) for b in first for i in b["index"])  # the same positions as a whole epoch
        ld.close()


def _damaged_copy(shards, out):
    out.mkdir()
    for p in pathlib.Path(shards).parent.iterdir():
        if p.is_file():
            (out / p.name).write_bytes(p.read_bytes())
    short = out / "train-000003.tar"  # cut the last 2 samples off one shard
    with tarfile.open(short) as tar:
        cut_at = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-2].offset
    short.write_bytes(short.read_bytes()[:cut_at] + b"\0" * 1024)
    return out / "manifest.json", str(short)


@pytest.mark.parametrize("access", ["stream", "random"])
def test_a_damaged_shard_is_said_once_per_rank_on_stderr_and_counted(shards, tmp_path, capfd, access):
    manifest, short = _damaged_copy(shards, tmp_path / "train")
    ld = loader(manifest, num_workers=2, access=access)
    skipped = []
    for _ in range(2):
        for b in ld:
            skipped += b["skipped"]
    ld.close()
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err  # two epochs, two workers: said once (random: every worker reads every shard)
    assert short in warnings[0] and "unreadable after 14 of its 16 samples" in warnings[0]
    assert {(s.url, s.reason) for s in skipped} == {(short, "missing")} and sum(s.count for s in skipped) == 4
    assert ld.stats["missing"] == 4 and ld.skipped == 4 and dict(ld.skipped_by_shard[short]) == {"missing": 4}
    assert ld.samples_seen == ld.stats["samples"] - 4 == 2 * len(ld) * 8 - 4
    assert ld.skipped_fraction == pytest.approx(4 / ld.stats["samples"])
    assert "4 skipped" in ld.summary() and short in ld.summary()
    resumed = loader(manifest)
    resumed.load_state_dict(ld.state_dict())
    assert resumed.skipped == 4 and resumed.samples_seen == ld.samples_seen and resumed.skipped_by_shard == \
        ld.skipped_by_shard
