"""Shuffle quality of an epoch, this loader vs the usual alternatives, on one manifest (issue 23).

    OMP_NUM_THREADS=1 python benchmarks/shuffle_quality.py [--ranks 8 --workers 8 --batch 256]
        [--blocks 512,4096,...] [--json benchmarks/results/shuffle_quality.json]

A synthetic ImageNet-1k manifest (1,281,167 samples, 1000 classes, 1,024 shards; no tars: only
which sample is where) in two layouts: as crossmae-prep writes it (its own plan: a global shuffle,
then consecutive shards) and class-sorted (a naive prep that cuts the class-sorted listing).
For each, the sample order every rank receives in epoch 0 (``--ranks`` ranks, ``--workers``
DataLoader workers each, delivered round-robin, ``--batch`` per rank), computed without decoding:
  random permutation   the reference: a uniformly random order of all samples;
  this loader          the real pipelines.data.epoch_order code (EpochOrder, Partition) over the
                       shard counts read by ShardList.from_manifest, at its default block_size
                       (LoaderConfig: 512) and at the ``--blocks`` sweep;
  webdataset buffer B  webdataset's own shuffle (webdataset.filters._shuffle) of sample ids with
                       a buffer of B, after split_by_node / split_by_worker and its shard-list
                       shuffle (shardshuffle=100), as WebDataset(..., shardshuffle=100).shuffle(B);
  shard order          the same pipeline without either shuffle;
  mosaic ALGO          mosaicml-streaming's own get_partitions + get_shuffle at StreamingDataset's
                       defaults (relaxed partition, one node, its block size), if it is installed.
Measures (pipelines/data/shuffle_quality.py): per decile of the epoch and its last 1%, the
class chi-square ratio (1 = a random batch) and the step/shard and step/position correlations as
z (a random order stays below 3.50 in all 22 of them in 99% of epochs). Target: within 1.1x
of the random permutation everywhere: class ratio <= 1.1 and |z| <= 1.1 x 3.50 = 3.86. For
this loader it also counts what its workers read (samples streamed per epoch / dataset, most
samples a worker holds), by the read rule of its workers.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.manifest_scale import IMAGENET_TRAIN, synthetic_imagenet  # noqa: E402
from pipelines.data.shuffle_quality import epoch_report, meets_target, z_limit  # noqa: E402
from pipelines.data.epoch_order import EpochOrder, Partition  # noqa: E402
from pipelines.data.shard_cache import ShardList  # noqa: E402


def round_robin(per_worker: list[list], steps: int | None = None) -> list:
    """PyTorch DataLoader's delivery: one batch from each worker in turn, skipping exhausted ones."""
    out, queues = [], [list(reversed(q)) for q in per_worker]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop())
    return out[:steps] if steps is not None else out


def lockstep(ranks: list[np.ndarray]) -> np.ndarray:
    """(steps, ranks, batch) sample ids; every rank keeps the shortest rank's step count (DDP)."""
    steps = min(len(r) for r in ranks)
    return np.stack([r[:steps] for r in ranks], axis=1)


# --- the orders, as global sample ids (offset of the shard in the manifest + position) ------------

def random_order(counts, ranks, batch, seed) -> np.ndarray:
    n = sum(counts)
    steps = n // ranks // batch
    perm = np.random.default_rng(seed).permutation(n)[:steps * ranks * batch]
    return perm.reshape(steps, ranks, batch)


LOADER_READS: dict[int, dict] = {}  # block_size -> what the loader's workers read for that order


def worker_reads(order: EpochOrder, batches: list[list[int]]) -> tuple[int, int]:
    """(samples streamed, most samples held) by one worker reading ``batches`` (epoch positions):
    the read rule of pipelines/data/loader.py _EpochStream._epoch and ShardReader.get, counted in
    samples (keep it in step with them): a batch with unread samples reads, in stream order,
    every unread sample of its blocks within the next batch + 2 blocks of the worker's positions;
    a shard is read forward from its first sample, and opened anew to go back."""
    flat = [g for batch in batches for g in batch]
    cached, start, shard, next_index, streamed, held = set(), 0, None, 0, 0, 0
    for positions in batches:
        missing = [g for g in positions if g not in cached]
        if missing:
            blocks = {g // order.block_size for g in missing}
            window = flat[start:start + len(positions) + 2 * order.block_size]
            wanted = {g for g in window if g // order.block_size in blocks and g not in cached}
            for s, g in sorted((order.stream_position(g), g) for g in wanted):
                k, i = order.locate(s)
                if k != shard or i < next_index:
                    shard, next_index = k, 0
                streamed += i - next_index + 1
                next_index = i + 1
                cached.add(g)
        held = max(held, len(cached))
        start += len(positions)
        cached.difference_update(positions)
    return streamed, held


def loader_order(counts, ranks, workers, batch, seed, block_size) -> np.ndarray:
    """What StreamingLoader's ranks deliver in epoch 0 (drop_last), by its own arithmetic; what
    its workers read for it goes to LOADER_READS."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    order = EpochOrder(tuple(counts), seed, 0, block_size)
    part = Partition(((0, order.num_samples),), ranks, workers, batch, True)
    per_rank, streamed, held = [], 0, 0
    for r in range(ranks):
        per_worker = []
        for w in range(workers):
            batches = [[g for a, b in intervals for g in range(a, b)] for intervals in part.worker_batches(r, w)]
            per_worker.append([[offsets[k] + i for k, i in map(order.sample, batch)] for batch in batches])
            n, h = worker_reads(order, batches)
            streamed, held = streamed + n, max(held, h)
        per_rank.append(np.asarray(round_robin(per_worker), dtype=np.int64))
    LOADER_READS[block_size] = dict(read_x_dataset=streamed / order.num_samples, held_per_worker=held)
    return lockstep(per_rank)


def wds_order(counts, ranks, workers, batch, seed, buffer: int, shard_buffer: int = 100) -> np.ndarray:
    """WebDataset(urls, nodesplitter=split_by_node, shardshuffle=shard_buffer).shuffle(buffer)
    .batched(batch, partial=False) in a DataLoader; buffer 0: no shuffle at all."""
    from webdataset.filters import _shuffle

    offsets = np.concatenate([[0], np.cumsum(counts)])
    per_rank = []
    for r in range(ranks):
        per_worker = []
        for w in range(workers):
            shards = list(range(len(counts)))[r::ranks][w::workers]  # islice by rank, then by worker
            if buffer:
                shards = list(_shuffle(iter(shards), bufsize=shard_buffer, rng=random.Random(f"{seed}/{r}/{w}/shards")))
            ids = (int(offsets[s]) + i for s in shards for i in range(counts[s]))
            if buffer:
                ids = _shuffle(ids, bufsize=buffer, rng=random.Random(f"{seed}/{r}/{w}/samples"))
            flat = np.fromiter(ids, dtype=np.int64)
            per_worker.append(list(flat[:len(flat) // batch * batch].reshape(-1, batch)))
        per_rank.append(np.asarray(round_robin(per_worker)))
    return lockstep(per_rank)


def import_mosaic():
    """mosaicml-streaming's pure shuffle and partition modules, or None. Its package __init__
    imports its whole dataset stack (transformers among it); these two need numpy only, so
    they are imported from the installed package without running that __init__."""
    spec = importlib.util.find_spec("streaming")
    if spec is None or not spec.submodule_search_locations:
        return None
    if "streaming" not in sys.modules:
        for name, path in (("streaming", spec.submodule_search_locations[0]),
                           ("streaming.base", os.path.join(spec.submodule_search_locations[0], "base"))):
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            sys.modules[name] = mod
    try:
        return (importlib.import_module("streaming.base.partition"), importlib.import_module("streaming.base.shuffle"))
    except ImportError:
        return None


def mosaic_order(mosaic, counts, ranks, workers, batch, seed, algo: str) -> np.ndarray:
    """StreamingDataset(shuffle=True, shuffle_algo=algo) on one node of ``ranks`` GPUs at its
    defaults (batching 'random', partition 'relaxed', num_canonical_nodes 1 for py1e/py1br and
    64 for py1s/py2s, shuffle_block_size max(4e6 / canonical nodes, 2^18)), epoch 0."""
    partition, shuffle = mosaic
    canonical = 64 if algo in ("py1s", "py2s") else 1
    ids = partition.get_partitions("relaxed", sum(counts), canonical, 1, ranks, workers, batch, 0)
    perm = shuffle.get_shuffle(algo, np.asarray(counts, dtype=np.int64), canonical, seed, 0,
                               max(4_000_000 // canonical, 1 << 18))
    ids = np.where(ids != -1, perm[ids], -1)
    per_rank = []
    for r in range(ranks):
        per_worker = []
        for w in range(workers):
            flat = ids[0, r, w].reshape(-1)
            flat = flat[flat != -1]
            per_worker.append(list(flat[:len(flat) // batch * batch].reshape(-1, batch)))
        per_rank.append(np.asarray(round_robin(per_worker)))
    return lockstep(per_rank)


# --- scoring --------------------------------------------------------------------------------

def score(ids: np.ndarray, counts, shard_labels, class_counts) -> dict:
    offsets = np.concatenate([[0], np.cumsum(counts)])
    shard = np.searchsorted(offsets, ids, side="right") - 1
    labels = np.concatenate(shard_labels)
    report = epoch_report(shard, ids - offsets[shard], labels[ids], class_counts)
    report["meets_target"] = meets_target(report)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--samples", type=int, default=IMAGENET_TRAIN)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--buffers", default="1000,5000,10000", help="webdataset shuffle buffer sizes")
    ap.add_argument("--blocks", default="", help="extra loader block_size values to sweep (comma-separated)")
    ap.add_argument("--layouts", default="prep,class-sorted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    mosaic = import_mosaic()
    if mosaic is None:
        print("shuffle_quality: mosaicml-streaming is not installed: its rows are left out "
              "(pip install --no-deps mosaicml-streaming)", file=sys.stderr)
    r, w, b, s = args.ranks, args.workers, args.batch, args.seed
    orders = {"random permutation": lambda c: random_order(c, r, b, s + 1),
              "this loader, block 512 (default)": lambda c: loader_order(c, r, w, b, s, 512)}
    for blk in [int(x) for x in args.blocks.split(",") if x]:
        orders[f"this loader, block {blk}"] = lambda c, blk=blk: loader_order(c, r, w, b, s, blk)
    for buf in [int(x) for x in args.buffers.split(",") if x]:
        orders[f"webdataset buffer {buf}"] = lambda c, buf=buf: wds_order(c, r, w, b, s, buf)
    orders["shard order (no shuffle)"] = lambda c: wds_order(c, r, w, b, s, 0)
    if mosaic is not None:
        for algo in ("py1e", "py1br", "py1s"):
            orders[f"mosaic {algo}" + (" (default)" if algo == "py1e" else "")] = (
                lambda c, algo=algo: mosaic_order(mosaic, c, r, w, b, s + 9176, algo))
    results = {}
    with tempfile.TemporaryDirectory(prefix="shuffle-quality-") as work:
        for layout in args.layouts.split(","):
            manifest, shard_labels = synthetic_imagenet(layout, args.classes, args.samples,
                                                        -(-args.samples // args.shards), args.seed)
            path = pathlib.Path(work) / layout / "manifest.json"
            path.parent.mkdir()
            path.write_text(json.dumps(manifest))
            counts = ShardList.from_manifest(str(path)).counts  # the loader's own reader
            class_counts = list(manifest["source"]["class_counts"].values())
            results[layout] = {}
            for name, build in orders.items():
                t = time.perf_counter()
                report = score(build(counts), counts, shard_labels, class_counts)
                report["seconds"] = round(time.perf_counter() - t, 1)
                if name.startswith("this loader"):
                    report["reads"] = LOADER_READS[int(name.split("block ")[1].split()[0])]
                results[layout][name] = report
                print(f"{layout:>12} | {name:<34} | {report['seconds']:5.1f} s", file=sys.stderr)
    for layout, rows in results.items():
        print(f"\n{layout} shards ({args.samples:,} samples, {args.shards} shards, {args.classes} classes; "
              f"{r} ranks x {w} workers, batch {b}). Worst window of the epoch (deciles and last 1%):\n")
        print("| order | class ratio | class ratio, last 1% | \\|z\\| shard | \\|z\\| position | shards/batch "
              "| within 1.1x of random |\n|---|---|---|---|---|---|---|")
        for name, rep in rows.items():
            worst, last, ok = rep["worst"], rep["windows"][-1], rep["meets_target"]
            verdict = "yes" if all(ok.values()) else "no: " + ", ".join(k for k, v in ok.items() if not v)
            print(f"| {name} | {worst['class_ratio']:.3f} | {last['class_ratio']:.3f} | {worst['z_shard']:.1f} | "
                  f"{worst['z_position']:.1f} | {np.mean([x['shards_per_batch'] for x in rep['windows']]):.1f} "
                  f"| {verdict} |")
    limit = z_limit(2 * len(next(iter(next(iter(results.values())).values()))["windows"]))
    print(f"\nrandom order: class ratio 1.000 (expectation), |z| < {limit:.2f} in every window of 99% of "
          f"epochs; target: class ratio <= 1.1, |z| <= 1.1 x {limit:.2f} = {1.1 * limit:.2f}")
    print("\nthis loader, what its workers read per epoch (samples streamed / dataset; samples held per worker):")
    for blk, reads in sorted(LOADER_READS.items()):
        print(f"  block {blk:>9,}: {reads['read_x_dataset']:.2f}x, {reads['held_per_worker']:,} held")
    if args.json:  # not printed: every window of every order is ~50 kB
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(samples=args.samples, shards=args.shards, classes=args.classes, ranks=r, workers=w,
                           batch=b, mosaic=mosaic is not None, results=results, command=" ".join(sys.argv)), f,
                      indent=1)


if __name__ == "__main__":
    main()
