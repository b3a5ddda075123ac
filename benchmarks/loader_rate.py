"""The streaming loader at full width on this machine, as the trainer configures it: images/s of
training-ready batches (decoded, cropped, resized, normalised on the device) over whole epochs of
the given shards; the first epoch (worker start-up) is not counted.

    python benchmarks/loader_rate.py --manifest /tmp/wds/train/manifest.json --workers 14 --batch 256 \
        [--resize cpu,device] [--epochs 2] [--json out.json] [data.KEY=VALUE ...]

The data.* overrides are the trainer's own config keys (pipelines/train/config.py, read by the one
config loader), so an option the trainer refuses is refused here too: then the script says so in
one line and exits 3 (benchmarks/gpu_check.py records that stage as skipped, not failed).
Seen on an H200 host with 16 cores (14 workers, ~500x375 JPEGs): ~5,200 img/s with resize=cpu,
~5,850 with resize=device (../shared/gpu/README.md, 2026-11-30).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import emit  # noqa: E402
from pipelines.runtime import config_loader  # noqa: E402
from pipelines.train.config import PretrainConfig  # noqa: E402
from pipelines.data.device_decode import batch_to_device  # noqa: E402
from pipelines.trainer import train_loader  # noqa: E402

NOT_SUPPORTED_RC = 3


class NotSupported(Exception):
    """The loader refuses an option for this data (e.g. data.decode=gpu on FFCV)."""


def device_images(batch: dict, cfg: PretrainConfig, device: torch.device, dtype) -> torch.Tensor:
    """A loader batch -> the model's input on the device, as the trainer does it."""
    return batch_to_device(batch, cfg.data.image_size, device, dtype)


def measure(cfg: PretrainConfig, epochs: int, device: torch.device) -> dict:
    dtype = torch.float32  # the trainer's input under its default bf16 autocast (pipelines/train/step.py)
    try:
        loader = train_loader(cfg, 0, 1, device.type == "cuda")  # the trainer's own loader
    except ValueError as e:  # an option this data's format refuses
        raise NotSupported(f"{type(e).__name__}: {e}") from None
    rates, n = [], 0
    for epoch in range(epochs + 1):
        t0, n = time.perf_counter(), 0
        for b in loader:
            n += device_images(b, cfg, device, dtype).shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:  # epoch 0 includes starting the workers
            rates.append(n / (time.perf_counter() - t0))
    return dict(images_per_s=round(max(rates), 1), per_epoch=[round(r, 1) for r in rates], images_per_epoch=n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="counted epochs, after one warm-up epoch")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--resize", type=lambda s: s.split(","), default=["cpu", "device"], help="cpu,device")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="trainer config overrides, e.g. data.decode=gpu")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch < 1 or args.workers < 0 or set(args.resize) - {"cpu", "device"}:
        print("loader_rate: error: --epochs and --batch must be >= 1, --workers >= 0, --resize cpu and/or device",
              file=sys.stderr)
        return 2
    base = [f"data.train={args.manifest}", f"data.image_size={args.image_size}", f"data.num_workers={args.workers}",
            f"deepspeed.micro_batch={args.batch}"]
    try:
        cfg = config_loader.load(PretrainConfig, None, base + args.overrides)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except config_loader.ConfigError as e:
        unknown = "unknown config key" in str(e) and any(o.split("=")[0] in str(e) for o in args.overrides)
        print(f"loader_rate: {'not supported by this checkout' if unknown else 'error'}: {e}", file=sys.stderr)
        return NOT_SUPPORTED_RC if unknown else 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    result = dict(manifest=args.manifest, device=torch.cuda.get_device_name() if use_cuda else "cpu",
                  workers=args.workers, batch=args.batch, image_size=args.image_size, epochs=args.epochs,
                  overrides=args.overrides, cpus=os.cpu_count(), modes={})
    try:
        for resize in args.resize:
            cfg.data.resize = resize
            mode = f"resize={resize}" + "".join(f",{o}" for o in args.overrides)
            result["modes"][mode] = r = measure(cfg, args.epochs, device)
            print(f"{mode}: {r['images_per_s']:,.0f} img/s", file=sys.stderr)
    except NotSupported as e:
        print(f"loader_rate: not supported by this checkout: {e}", file=sys.stderr)
        return NOT_SUPPORTED_RC
    except (FileNotFoundError, ValueError) as e:
        print(f"loader_rate: error: {e}", file=sys.stderr)
        return 2
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
