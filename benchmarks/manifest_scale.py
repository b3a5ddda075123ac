"""Manifest load + epoch plan at ImageNet-1k size, per rank, one process per simulated rank (issue 23).

    OMP_NUM_THREADS=1 python benchmarks/manifest_scale.py [--procs 8] [--worlds 8,64] [--s3] [--json out.json]

Writes a synthetic ImageNet-1k manifest in crossmae-prep's format (1,281,167 samples in 1,024
shards, 1000 classes, with prep's sample index every 64 samples; the manifest only, no tars) and starts ``--procs`` processes at once, each
one rank of a world of W. Each times what the loader computes before its first read:
  manifest  ``build_loader`` of the WebDataset manifest: the factory's format check, then
            ``ShardList.from_manifest`` (json parse through the storage layer, the shard URLs),
            then StreamingLoader's checks (workers are not started: they plan on their own);
  plan      what the rank and each of its 8 DataLoader workers compute at the first batch:
            ``Partition``, ``EpochOrder``, the worker's batches and valid counts, its flat list of
            positions and the stream positions of its first read window (_EpochStream._epoch);
            workers run in parallel, so the rank's cost is the slowest worker's, reported here
            as ``plan`` = rank + slowest worker;
  save      ``state_dict()`` half-way through the epoch (what a checkpoint computes);
  resume    a new loader from that state: manifest + plan of what is left;
  resume2   the same for a run resumed twice (its remainder is more fragmented).
Imports (torch and the loader modules; for S3 also boto3, which the storage layer imports at
the first S3 URL) are timed apart: they are not the target's but every rank pays them before
its first batch. CPU seconds are the rank's own work (this 2-core box is
shared, so wall seconds also count the waits of 8 processes for 2 cores).
Target: manifest + plan <= 1 s per rank. ``--s3`` repeats world 8 reading the manifest from a
SeaweedFS server on loopback (tests/s3_server.py). ``--profile`` prints the top of cProfile for
one rank of the largest world.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import emit  # noqa: E402
from data_prep.plan import make_plan, shard_name  # noqa: E402
from data_prep.shards import SAMPLE_INDEX_EVERY  # noqa: E402

IMAGENET_TRAIN = 1_281_167  # ImageNet-1k train images
TAR_OVERHEAD = 2 * 1024  # per sample: two tar headers (.jpg, .cls) and padding


def imagenet_class_counts(num_classes: int = 1000, total: int = IMAGENET_TRAIN, seed: int = 0) -> np.ndarray:
    """ImageNet-1k's shape: most classes full (1300 images at ImageNet size), the rest short
    (down to 56% of full, like its 732), summing to ``total`` exactly."""
    rng = np.random.default_rng(seed)
    full = max(1, round(total * 1300 / (num_classes * 1281.167)))  # ImageNet: 1300 = 1.0147 x the mean
    counts = np.full(num_classes, full, dtype=np.int64)
    deficit = int(counts.sum() - total)
    for c in rng.permutation(num_classes):
        if deficit <= 0:
            break
        cut = min(deficit, int(rng.integers(1, max(2, int(full * 0.44)))), int(counts[c]) - 1)
        counts[c] -= cut
        deficit -= cut
    if deficit:
        raise ValueError(f"cannot spread {total} samples over {num_classes} classes")
    return counts


def synthetic_imagenet(layout: str = "prep", num_classes: int = 1000, total: int = IMAGENET_TRAIN,
                       shard_samples: int = 1252, seed: int = 0, index_every: int = SAMPLE_INDEX_EVERY
                       ) -> tuple[dict, list[np.ndarray]]:
    """(manifest, class of every sample of every shard in tar order) of an ImageNet-like split.
    The source listing is class-sorted (like ImageNet's per-synset archives). ``layout``:
    "prep" cuts it with crossmae-prep's own plan (data_prep.plan.make_plan: global shuffle,
    then consecutive shards); "class-sorted" cuts it in listing order (a naive prep).
    ``index_every``: the sample index crossmae-prep writes (0: none), from the samples' sizes."""
    counts = imagenet_class_counts(num_classes, total, seed)
    labels = np.repeat(np.arange(num_classes), counts)
    sizes = np.random.default_rng(seed + 1).lognormal(np.log(110_000) - 0.125, 0.5, total).astype(np.int64)
    if layout == "prep":
        shards = [np.asarray(s.items) for s in make_plan(sizes.tolist(), "train", seed, shard_samples=shard_samples)]
    elif layout == "class-sorted":
        shards = [np.arange(a, min(a + shard_samples, total)) for a in range(0, total, shard_samples)]
    else:
        raise ValueError(f"unknown layout {layout!r} (prep or class-sorted)")
    classes = [f"n{10_000_000 + 7919 * c:08d}" for c in range(num_classes)]  # wnid-like names
    entries = [dict(name=shard_name("train", k), num_samples=int(len(items)),
                    bytes=int(sizes[items].sum() + TAR_OVERHEAD * len(items) + 1024),
                    sha256=hashlib.sha256(f"{layout}/{k}".encode()).hexdigest()) for k, items in enumerate(shards)]
    if index_every:
        for entry, items in zip(entries, shards):
            starts = np.concatenate([[0], np.cumsum(sizes[items] + TAR_OVERHEAD)[:-1]])
            entry["sample_index"] = starts[::index_every].tolist()
    options = dict(seed=seed, shard_bytes=None, shard_samples=shard_samples, validate="header", max_size=None,
                   quality=95)
    manifest = dict(
        format="webdataset", split="train", plan_digest=hashlib.sha256(json.dumps(options).encode()).hexdigest(),
        num_samples=total, num_shards=len(entries), shards=entries, classes=classes,
        class_map={c: i for i, c in enumerate(classes)},
        source=dict(kind="imagenet", split="train", num_items=total, num_classes=num_classes, num_rejects=0,
                    ignored_files=0, ignored_examples=[], num_ignored_links=0, ignored_links=[], empty_classes=[],
                    renamed_duplicate_keys=0, class_counts=dict(zip(classes, counts.tolist()))),
        **({"sample_index_every": index_every} if index_every else {}),
        options=options, tool=dict(name="crossmae-prep", version="synthetic"), num_rejected=0, rejects=[],
        num_converted=0, converted=[], num_resized=0, created="2025-01-01T00:00:00Z")
    return manifest, [labels[items] for items in shards]


# --- one rank (runs in its own process) ------------------------------------------------------

def _worker_plan(loader, part, worker: int) -> None:
    """What one DataLoader worker computes before its first read (pipelines/data/loader.py
    _EpochStream.__iter__ / _epoch), through the same functions."""
    from pipelines.data.epoch_order import EpochOrder, Partition

    part = Partition(part.remaining, part.world_size, part.num_workers, part.batch_size, part.drop_last)
    order = EpochOrder(loader.shards.counts, loader.seed, loader.epoch, loader.block_size)
    batches = [[g for a, b in batch for g in range(a, b)] for batch in part.worker_batches(loader.rank, worker)]
    part.valid_counts(loader.rank, worker)
    flat = [g for batch in batches for g in batch]
    if batches:
        blocks = {g // order.block_size for g in batches[0]}
        window = flat[:len(batches[0]) + 2 * order.block_size]
        for s in sorted(order.stream_position(g) for g in window if g // order.block_size in blocks):
            order.locate(s)


def _timed(fn, *a):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*a)
    return out, dict(wall=time.perf_counter() - w, cpu=time.process_time() - c)


def _plan(loader) -> dict:
    part, t = _timed(loader._begin)
    slowest = dict(wall=0.0, cpu=0.0)
    for w in range(loader._readers):
        _, tw = _timed(_worker_plan, loader, part, w)
        slowest = max(slowest, tw, key=lambda d: d["cpu"])
    return dict(wall=t["wall"] + slowest["wall"], cpu=t["cpu"] + slowest["cpu"])


def rank_main(spec: dict) -> dict:
    """Times for one rank: imports, manifest, plan, save, resume, resume2 (each wall and cpu)."""
    w0, c0 = time.perf_counter(), time.process_time()
    from pipelines.data.factory import LoaderConfig, build_loader

    out = dict(rank=spec["rank"], imports=dict(wall=time.perf_counter() - w0, cpu=time.process_time() - c0))
    if spec["manifest"].startswith("s3://"):  # boto3 (the storage layer imports it at the first S3 URL)
        _, out["s3_import"] = _timed(importlib.import_module, "pipelines.storage.s3")
    cfg = LoaderConfig(manifest=spec["manifest"], batch_size=spec["batch"], num_workers=spec["workers"],
                       block_size=spec["block"])

    def build():
        return build_loader(cfg, train=True, rank=spec["rank"], world_size=spec["world"])

    loader, out["manifest"] = _timed(build)
    out["plan"] = _plan(loader)
    loader.batches_done = loader.batches_per_epoch // 2  # as if half the epoch was delivered
    state, out["save"] = _timed(loader.state_dict)
    for phase in ("resume", "resume2"):
        def resume(state=state):
            resumed = build()
            resumed.load_state_dict(state)
            return resumed
        loader, t = _timed(resume)
        p = _plan(loader)
        out[phase] = dict(wall=t["wall"] + p["wall"], cpu=t["cpu"] + p["cpu"])
        loader.batches_done = len(loader) // 2
        state = loader.state_dict()
        out[phase]["intervals"] = len(state["remaining"])
    return out


def run_world(manifest: str, world: int, procs: int, args, env=None) -> list[dict]:
    """``procs`` ranks of a ``world``-rank job, spread over its ranks, all started at once."""
    ranks = sorted({i * world // procs for i in range(procs)})
    running = []
    for r in ranks:
        spec = dict(manifest=manifest, rank=r, world=world, workers=args.workers, batch=args.batch, block=args.block)
        running.append(subprocess.Popen([sys.executable, __file__, "--rank-spec", json.dumps(spec)], cwd=ROOT,
                                        env=env, stdout=subprocess.PIPE, text=True))
    results = []
    for p in running:
        stdout, _ = p.communicate(timeout=600)
        if p.returncode:
            raise SystemExit(f"manifest_scale: a rank process failed (exit {p.returncode})")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


PHASES = ("imports", "manifest", "plan", "save", "resume", "resume2")


def summarize(results: list[dict]) -> dict:
    """Per phase: the slowest rank's wall and cpu seconds."""
    out = {ph: dict(wall=max(r[ph]["wall"] for r in results), cpu=max(r[ph]["cpu"] for r in results))
           for ph in PHASES + ("s3_import",) if ph in results[0]}
    out["manifest+plan"] = dict(wall=max(r["manifest"]["wall"] + r["plan"]["wall"] for r in results),
                                cpu=max(r["manifest"]["cpu"] + r["plan"]["cpu"] for r in results))
    out["resume_intervals"] = max(r["resume2"]["intervals"] for r in results)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank-spec", help=argparse.SUPPRESS)
    ap.add_argument("--procs", type=int, default=8, help="rank processes started at once")
    ap.add_argument("--worlds", default="8,64", help="world sizes to simulate (comma-separated)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--s3", action="store_true", help="also read the manifest from a SeaweedFS server (world 8)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.rank_spec:
        print(json.dumps(rank_main(json.loads(args.rank_spec))))
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    with tempfile.TemporaryDirectory(prefix="manifest-scale-") as work:
        t = time.perf_counter()
        manifest, _ = synthetic_imagenet("prep", shard_samples=-(-IMAGENET_TRAIN // args.shards))
        path = pathlib.Path(work) / "train" / "manifest.json"
        path.parent.mkdir()
        path.write_text(json.dumps(manifest, indent=1))
        print(f"synthetic manifest: {manifest['num_samples']:,} samples, {manifest['num_shards']} shards, "
              f"{path.stat().st_size / 1e6:.2f} MB ({time.perf_counter() - t:.1f} s to build)", file=sys.stderr)
        runs = {f"world {w}, local": summarize(run_world(str(path), w, args.procs, args)) for w in worlds}
        if args.s3:
            from tests.s3_server import seaweedfs_server
            from pipelines import storage

            with seaweedfs_server() as srv:
                env = dict(os.environ, **srv.env())
                os.environ.update(srv.env())
                bucket = srv.create_bucket("scale")
                storage.write_bytes(f"s3://{bucket}/train/manifest.json", path.read_bytes())
                runs[f"world {worlds[0]}, S3"] = summarize(
                    run_world(f"s3://{bucket}/train/manifest.json", worlds[0], args.procs, args, env))
        if args.profile:
            import cProfile
            import pstats

            cProfile.runctx("rank_main(spec)", globals(), dict(spec=dict(
                manifest=str(path), rank=max(worlds) - 1, world=max(worlds), workers=args.workers,
                batch=args.batch, block=args.block)), str(pathlib.Path(work) / "prof"))
            pstats.Stats(str(pathlib.Path(work) / "prof"), stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    cols = list(runs)
    print(f"\n{args.procs} rank processes at once; slowest rank, wall s (cpu s)\n")
    print("| phase | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for ph in ("imports", "s3_import", "manifest", "plan", "manifest+plan", "save", "resume", "resume2"):
        print(f"| {ph} | " + " | ".join(f"{runs[c][ph]['wall']:.3f} ({runs[c][ph]['cpu']:.3f})" if ph in runs[c]
                                        else "-" for c in cols) + " |")
    ok = all(r["manifest+plan"]["cpu"] <= 1.0 and r["resume"]["cpu"] <= 1.0 for r in runs.values())
    print(f"\ntarget manifest + plan <= 1 s per rank (cpu): {'met' if ok else 'MISSED'}")
    emit(dict(samples=manifest["num_samples"], shards=manifest["num_shards"], procs=args.procs,
              workers=args.workers, batch=args.batch, block=args.block, runs=runs, target_met=ok), args.json)


if __name__ == "__main__":
    main()
