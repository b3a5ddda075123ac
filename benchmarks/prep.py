"""Sharding throughput vs a plain tar copy of the same bytes, side by side in one run.

Generates N photo-like JPEGs (default 2000, 500x375, q90) in a class folder tree, then times
on ONE process: (a) `tar cf` of the tree (the floor: reading + writing the same bytes), (a') the same plus
sha256 and fsync of the tar (the integrity and durability prep guarantees),
(b) `crossmae-prep folder` with header validation (original bytes kept), (c) the same with
full decode validation, (d) header validation with --jpeg-restarts (each JPEG rewritten losslessly
with restart markers). Target: header-validated sharding >= 0.5x the plain copy rate.

    python benchmarks/prep.py --images 2000 [--json out.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_prep.prep import PrepOptions, prepare_split  # noqa: E402
from data_prep.shards import ImageOptions  # noqa: E402
from data_prep.sources import list_image_folder  # noqa: E402


def make_images(root: str, n: int, classes: int = 10) -> int:
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:375, 0:500].astype(np.float32)
    total = 0
    for i in range(n):
        d = os.path.join(root, f"class{i % classes:03d}")
        os.makedirs(d, exist_ok=True)
        f = rng.uniform(0.005, 0.05, size=(3, 2))
        img = np.stack([np.sin(xs * f[c, 0] + ys * f[c, 1] + i) for c in range(3)], -1) * 90 + 128
        img += rng.normal(0, 12, img.shape)  # grain: photo-like JPEG sizes (~50-90 KB at q90)
        path = os.path.join(d, f"img{i:06d}.jpg")
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        total += os.path.getsize(path)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="prep-bench-")
    try:
        src = os.path.join(work, "src")
        total = make_images(src, args.images)
        subprocess.run(["tar", "cf", os.path.join(work, "warm.tar"), "-C", src, "."], check=True)  # warm cache
        best = {}
        for r in range(args.repeats):
            for name in ("tar copy", "tar+sha256+fsync", "prep header", "prep decode", "prep restarts"):
                out = os.path.join(work, f"out-{r}-{name.replace(' ', '-')}")
                t0 = time.perf_counter()
                if name.startswith("tar"):
                    os.makedirs(out)
                    subprocess.run(["tar", "cf", os.path.join(out, "all.tar"), "-C", src, "."], check=True)
                    if name != "tar copy":  # the same guarantees prep gives: content hash, durable on disk
                        with open(os.path.join(out, "all.tar"), "rb") as f:
                            hashlib.file_digest(f, "sha256")
                            os.fsync(f.fileno())
                else:
                    listing = list_image_folder(src, "train")
                    restarts = name == "prep restarts"  # --jpeg-restarts (header validation + the lossless rewrite)
                    opts = PrepOptions(shard_bytes=64_000_000, image=ImageOptions(
                        validate="header" if restarts else name.split()[1], restarts=restarts))
                    prepare_split(listing, out, opts, progress=False)
                dt = time.perf_counter() - t0
                best[name] = min(best.get(name, dt), dt)
                shutil.rmtree(out)
        rows = {k: dict(seconds=v, img_per_s=args.images / v, mb_per_s=total / v / 1e6) for k, v in best.items()}
        print(f"{args.images} JPEGs, {total / args.images / 1e3:.1f} KB mean, one process, best of {args.repeats}")
        print(f"{'method':16} {'s':>8} {'img/s':>9} {'MB/s':>8} {'vs tar':>7}")
        for k, r in rows.items():
            print(f"{k:16} {r['seconds']:8.3f} {r['img_per_s']:9.0f} {r['mb_per_s']:8.1f} "
                  f"{rows['tar copy']['seconds'] / r['seconds']:6.2f}x")
        ratio = rows["tar copy"]["seconds"] / rows["prep header"]["seconds"]
        print(f"header-validated sharding at {ratio:.2f}x the plain copy rate (target >= 0.5x): "
              f"{'met' if ratio >= 0.5 else 'NOT met'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(images=args.images, mean_bytes=total / args.images, rows=rows, ratio=ratio), f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
