"""Store reads per epoch without a shard cache at ImageNet-1k size, with and without the manifest's
sample index (issue 23): what `crossmae-prep loader-stats` predicts, through the same function
(pipelines/data/read_plan.py expected_reads; the read rule of the streaming loader, held against
the real loader's GETs and bytes on the S3 test server by tests/pipelines/test_read_plan.py and
tests/pipelines/test_sample_index.py).

    python benchmarks/store_reads.py [--worlds 8,64] [--workers 8] [--json out.json]

The manifest is benchmarks/manifest_scale.py's synthetic ImageNet-1k (1,281,167 samples in 1,024
shards, ~134 GiB), once with crossmae-prep's sample index (every 64th sample's byte offset) and
once without. Without the index, a reader (one worker of one rank) that starts inside a shard
streams it from the shard's first byte; with it, from the indexed sample at or before its first.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import emit  # noqa: E402
from benchmarks.manifest_scale import IMAGENET_TRAIN, synthetic_imagenet  # noqa: E402


def main() -> None:
    import json

    from pipelines.data.read_plan import expected_reads
    from pipelines.data.shard_cache import ShardList

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="8,64", help="ranks (comma-separated), 8 per node")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--samples", type=int, default=IMAGENET_TRAIN)
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="store-reads-") as work:
        for every in (0, 64):
            manifest, _ = synthetic_imagenet("prep", total=args.samples, shard_samples=-(-args.samples // args.shards),
                                             index_every=every)
            path = pathlib.Path(work) / f"index{every}" / "manifest.json"
            path.parent.mkdir()
            path.write_text(json.dumps(manifest))
            shards = ShardList.from_manifest(str(path))
            for world in (int(w) for w in args.worlds.split(",")):
                t = time.perf_counter()
                r = expected_reads(shards, world, args.workers, args.batch, args.block, min(8, world), epochs=1)
                rows[f"{world} ranks x {args.workers} workers, " + (f"index every {every}" if every else "no index")] \
                    = dict(r["no_cache"], seconds=round(time.perf_counter() - t, 2), manifest_bytes=path.stat().st_size)
    print(f"\n{args.samples:,} samples in {args.shards} shards, batch {args.batch}, block {args.block}; per epoch, "
          "no shard cache, all nodes\n")
    print("| run | sample index | GETs | bytes / dataset | manifest MB |\n|---|---|---|---|---|")
    for name, r in rows.items():
        run, index = name.split(", ")
        print(f"| {run} | {index} | {r['gets_per_epoch']} | {r['bytes_per_dataset_per_epoch']:.3f} | "
              f"{r['manifest_bytes'] / 1e6:.2f} |")
    emit(dict(samples=args.samples, shards=args.shards, workers=args.workers, batch=args.batch, block=args.block,
              rows=rows), args.json)


if __name__ == "__main__":
    main()
