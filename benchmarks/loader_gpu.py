"""The input pipeline at the device's speed: images/s into normalised device batches, decode="gpu"
(workers read tar members + JPEG headers, the device decodes with nvJPEG, crops, resizes) vs the
CPU path (workers decode + resize), through DevicePrefetcher; then a training step fed by each
vs the same step on synthetic device tensors. One JSON result.

    python benchmarks/loader_gpu.py --device cuda --workers 4 [--manifest s3://b/in1k/train/manifest.json] --json out.json
    python benchmarks/loader_gpu.py --device cpu --smoke      # CPU: tiny, checks the script runs end to end

Targets (one H100/H200, ViT-B/16 CrossMAE, bf16, batch 256): decode="gpu" loader alone
>= 12,000 img/s with <= 4 workers; training step fed by the loader / synthetic >= 0.95.
Without --manifest, --images photo-like JPEGs (500x375, ImageNet's typical size) are sharded
with crossmae-prep into a temporary directory.
"""
from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import emit  # noqa: E402
from pipelines.data.device_decode import batch_to_device  # noqa: E402
from pipelines.data.prefetch import DevicePrefetcher  # noqa: E402
from pipelines.data.transforms import MAETrainTransform  # noqa: E402
from pipelines.data.loader import StreamingLoader  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_shards(n: int, workdir: pathlib.Path) -> str:
    from benchmarks.transforms import make_jpegs
    from data_prep.cli import main as prep

    for i, d in enumerate(make_jpegs(n, w=500, h=375)):
        (workdir / "src" / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
        (workdir / "src" / f"c{i % 10}" / f"img{i:06d}.jpg").write_bytes(d)
    assert prep(["folder", str(workdir / "src"), str(workdir / "wds"), "--shard-bytes", "64MB"]) == 0
    return str(workdir / "wds/train/manifest.json")


def device_stream(manifest: str, decode: str, args, device, dtype):
    """(loader, DevicePrefetcher yielding normalised device batches), forever over epochs."""
    loader = StreamingLoader.from_manifest(manifest, batch_size=args.batch, num_workers=args.workers, seed=0,
                                           transform=MAETrainTransform(args.image_size, decode=decode,
                                                                       resize="device" if decode == "gpu" else "cpu"),
                                           pin_memory=device.type == "cuda")

    def batches():
        while True:
            yield from loader

    fn = lambda b: batch_to_device(b, args.image_size, device, dtype)  # noqa: E731
    return loader, DevicePrefetcher(batches(), fn, device, state_source=loader)


def rate(stream, n: int, warmup: int, batch: int, device, step=None) -> float:
    for x in itertools.islice(stream, warmup):
        if step:
            step(x)
    _sync(device)
    t0 = time.perf_counter()
    for x in itertools.islice(stream, n):
        if step:
            step(x)
    _sync(device)
    return n * batch / (time.perf_counter() - t0)


def train_step_fn(args, device, dtype):
    from crossmae import MaskedAutoencoder, model_config
    from pipelines.train.optim import build_optimizer

    torch.manual_seed(0)
    model = MaskedAutoencoder(model_config(args.model, img_size=args.image_size)).to(device)
    opt = build_optimizer(model, 1e-4, 0.05)
    bf16 = dtype == torch.bfloat16

    def step(x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x.float() if bf16 else x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--manifest", help="a data-prep manifest or shard pattern (default: generated shards)")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--model", default="crossmae_vit_base_patch16_dec512d12b")
    ap.add_argument("--no-train", action="store_true", help="loader rates only")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: the script runs end to end on a CPU")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.batch, args.image_size, args.batches, args.warmup = 64, 8, 32, 3, 1
        args.workers, args.model = min(args.workers, 2), "crossmae_vit_micro_patch4_dec64d2b"
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("no CUDA device here")
    except (RuntimeError, ValueError) as e:
        print(f"loader_gpu: --device {args.device}: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the resize matmuls: < 0.5 grey level (transforms.py)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  workers=args.workers, batch=args.batch, image_size=args.image_size, cpu_cores=os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="loader-gpu-") as work:
        manifest = args.manifest or make_shards(args.images, pathlib.Path(work))
        step = None if args.no_train else train_step_fn(args, device, dtype)
        for decode in ("gpu", "cpu"):
            loader, stream = device_stream(manifest, decode, args, device, dtype)
            result[f"loader_img_per_s_decode_{decode}"] = round(rate(stream, args.batches, args.warmup, args.batch,
                                                                     device), 1)
            if step is not None:
                result[f"train_img_per_s_decode_{decode}"] = round(rate(stream, args.batches, args.warmup, args.batch,
                                                                        device, step), 1)
            result[f"skipped_decode_{decode}"] = {k: v for k, v in stream.stats.items() if k != "samples"}
            stream.close()
            if hasattr(loader, "close"):
                loader.close()
        if step is not None:
            x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device, dtype=dtype)
            result["train_img_per_s_synthetic"] = round(rate(itertools.repeat(x), args.batches, args.warmup,
                                                             args.batch, device, step), 1)
            for decode in ("gpu", "cpu"):
                result[f"train_real_over_synthetic_decode_{decode}"] = round(
                    result[f"train_img_per_s_decode_{decode}"] / result["train_img_per_s_synthetic"], 3)
    result["targets"] = dict(loader_img_per_s_decode_gpu=">= 12000 with <= 4 workers (H100/H200)",
                             train_real_over_synthetic_decode_gpu=">= 0.95")
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
