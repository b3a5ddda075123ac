"""The trainer's wait for data around epoch boundaries (issue 15), StreamingLoader with workers.

    OMP_NUM_THREADS=1 python benchmarks/epoch_boundary.py --images 256 --workers 2 --step-ms 60 [--json out.json]

A consumer takes batches for ``--epochs`` epochs and spends ``--step-ms`` per batch (a stand-in
for the training step, long enough that workers keep up in the middle of an epoch). It records
how long each ``next()`` waited. Printed: the wait for the first batch of the run (workers
starting), the mean wait for the first batch of each later epoch (the boundary), the median
wait in the middle of epochs, and the total wait per epoch. A loader that restarts its workers
per epoch pays the start-up at every boundary; one whose workers run on into the next epoch
has the next epoch's first batches ready.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import emit  # noqa: E402
from benchmarks.transforms import make_jpegs  # noqa: E402
from data_prep.cli import main as prep  # noqa: E402
from pipelines.data.transforms import MAETrainTransform  # noqa: E402
from pipelines.data.loader import StreamingLoader  # noqa: E402

torch.set_num_threads(1)


def measure(manifest: str, args) -> list[list[float]]:
    """Per epoch, the seconds each next() waited."""
    ld = StreamingLoader.from_manifest(manifest, batch_size=args.batch, transform=MAETrainTransform(args.image_size),
                                       num_workers=args.workers, seed=0)
    waits = []
    for _ in range(args.epochs):
        epoch, it = [], iter(ld)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            epoch.append(time.perf_counter() - t0)
            time.sleep(args.step_ms / 1000)  # the training step
        waits.append(epoch)
    getattr(ld, "close", lambda: None)()
    return waits


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--step-ms", type=float, default=60.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="epoch-boundary-") as work:
        work = pathlib.Path(work)
        for i, d in enumerate(make_jpegs(args.images)):
            (work / "src" / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
            (work / "src" / f"c{i % 10}" / f"img{i:05d}.jpg").write_bytes(d)
        assert prep(["folder", str(work / "src"), str(work / "wds"), "--shard-samples", "64"]) == 0
        waits = measure(str(work / "wds/train/manifest.json"), args)
    first_of_run = waits[0][0]
    boundary = statistics.mean(e[0] for e in waits[1:])
    middle = statistics.median(w for e in waits for w in e[1:])
    per_epoch = [sum(e) for e in waits]
    print("| epoch | batches | first-batch wait (ms) | total wait (ms) |\n|---|---|---|---|")
    for i, e in enumerate(waits):
        print(f"| {i} | {len(e)} | {e[0] * 1e3:.1f} | {sum(e) * 1e3:.1f} |")
    print(f"\nboundary wait (epochs 1..): {boundary * 1e3:.1f} ms; mid-epoch median: {middle * 1e3:.2f} ms; "
          f"first batch of the run: {first_of_run * 1e3:.1f} ms")
    emit(dict(images=args.images, batch=args.batch, workers=args.workers, step_ms=args.step_ms,
              first_batch_of_run_ms=round(first_of_run * 1e3, 1), boundary_wait_ms=round(boundary * 1e3, 1),
              mid_epoch_median_wait_ms=round(middle * 1e3, 2),
              wait_per_epoch_ms=[round(w * 1e3, 1) for w in per_epoch]), args.json)


if __name__ == "__main__":
    main()
