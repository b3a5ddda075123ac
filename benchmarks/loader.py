"""The streaming loader end to end on ONE worker process, every row on the same images in one run.

    OMP_NUM_THREADS=1 python benchmarks/loader.py --images 1000 --rounds 2 [--json out.json]

(a) reference full-decode pipeline and (e) the common pipeline (webdataset decode('pil') +
torchvision v2 RRC), both on in-memory bytes; (f) decode only; (b) this loader
(pipelines.data.loader, num_workers=0: the loop runs in this process) from local shards written
by crossmae-prep; (c) the same from a SeaweedFS S3 server on loopback; (d) FFCV on a .beton of
the same images; (b') as (b) with resize="device" (CPU side only: batches of crops, the resize
runs on the trainer's device); (b'') as (b) with decode="gpu" (CPU side only: tar members, JPEG
headers, crop boxes, packed bytes; decode + resize run on the trainer's device). Targets: (b) >= 1.7x (e) and >= 1.0x (d); (c) >= 0.9x (b).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.transforms import best_rates, ffcv_epoch_runner, make_jpegs, pipelines  # noqa: E402
from data_prep.cli import main as prep  # noqa: E402
from pipelines import storage  # noqa: E402
from pipelines.data.transforms import MAETrainTransform  # noqa: E402
from pipelines.data.loader import StreamingLoader  # noqa: E402

torch.set_num_threads(1)


def loader_runner(manifest: str, n: int, resize: str = "cpu", decode: str = "cpu"):
    transform = MAETrainTransform(224, resize=resize, decode=decode)
    ld = StreamingLoader.from_manifest(manifest, batch_size=64, transform=transform,
                                       num_workers=0, drop_last=False)

    def run():
        count = sum(len(b["label"]) for b in ld)
        assert count >= n, count

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    jpegs = make_jpegs(args.images)
    runs = pipelines(jpegs)
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as work:
        work = pathlib.Path(work)
        for i, d in enumerate(jpegs):
            (work / "src" / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
            (work / "src" / f"c{i % 10}" / f"img{i:05d}.jpg").write_bytes(d)
        assert prep(["folder", str(work / "src"), str(work / "wds"), "--shard-bytes", "16MB"]) == 0
        local = str(work / "wds/train/manifest.json")
        runs["(b) this loader, local shards"] = loader_runner(local, len(jpegs))
        runs["(b') this loader, local, resize on device"] = loader_runner(local, len(jpegs), "device")
        runs["(b'') this loader, local, decode on device"] = loader_runner(local, len(jpegs), "device", "gpu")
        from tests.s3_server import seaweedfs_server

        with seaweedfs_server() as srv:
            os.environ.update(srv.env())
            bucket = srv.create_bucket("bench")
            for p in sorted((work / "wds/train").iterdir()):
                if p.is_file():
                    storage.write_bytes(f"s3://{bucket}/train/{p.name}", p.read_bytes())
            runs["(c) this loader, S3 loopback"] = loader_runner(f"s3://{bucket}/train/manifest.json", len(jpegs))
            ff = ffcv_epoch_runner(jpegs, str(work))
            if ff is not None:
                runs["(d) FFCV RRC decoder (.beton)"] = ff[0]
            rate = best_rates(runs, len(jpegs), args.rounds)
    dec, common, b = rate["(f) decode only (simplejpeg)"], rate["(e) common: wds decode('pil') + v2 RRC"], \
        rate["(b) this loader, local shards"]
    print("| pipeline | img/s | vs decode only | vs (e) |\n|---|---|---|---|")
    for k, v in rate.items():
        print(f"| {k} | {v:,.0f} | {v / dec:.2f}x | {v / common:.2f}x |")
    print(f"\n(b) vs (e): {b / common:.2f}x (target >= 1.7x); (c) vs (b): "
          f"{rate['(c) this loader, S3 loopback'] / b:.2f}x (target >= 0.9x)")
    gpu = rate["(b'') this loader, local, decode on device"]
    print(f"(b'') decode on device, whole loader on one core: {1e6 / gpu:.0f} us/img CPU ({gpu / b:.1f}x (b))")
    if "(d) FFCV RRC decoder (.beton)" in rate:
        print(f"(b) vs (d) FFCV: {b / rate['(d) FFCV RRC decoder (.beton)']:.2f}x (target >= 1.0x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(images=len(jpegs), rounds=args.rounds, img_per_s=rate), f, indent=1)


if __name__ == "__main__":
    main()
