"""Pretraining throughput on one GPU: images/s and model FLOPs utilisation of CrossMAE
(gamma=0.25) and MAE ViT-B/16 steps through the trainer's own path (DeepSpeed engine, bf16,
fused AdamW, SDPA attention, uint8 batches from pinned memory normalised on the device),
with synthetic batches and, given --manifest, with the real streaming loader.
Target on one H100: >= 3,000 img/s for CrossMAE ViT-B/16 at 224 px.

    python benchmarks/gpu_throughput.py --batch 256 --steps 30 [--compile] \
        [--manifest s3://b/in1k/train/manifest.json --workers 12] [--json benchmarks/results/gpu_throughput.json]
    python benchmarks/gpu_throughput.py --smoke      # CPU, micro model, 2 steps: the script still runs
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crossmae import MaskedAutoencoder, flops_per_image, model_config  # noqa: E402
from pipelines.observe import peak_tflops  # noqa: E402
from benchmarks._common import emit  # noqa: E402
from pipelines.optim import build_optimizer  # noqa: E402
from pipelines.pretrain import init_distributed  # noqa: E402
from pipelines.transforms import MAETrainTransform, normalize_batch  # noqa: E402
from pipelines.wds_loader import StreamingLoader  # noqa: E402

MODELS = {"CrossMAE": "crossmae_vit_base_patch16_dec512d12b", "MAE": "mae_vit_base_patch16_dec512d8b"}


def bench(preset: str, args, device, batches) -> dict:
    import deepspeed

    torch.manual_seed(0)
    model = MaskedAutoencoder(model_config(preset, img_size=args.image_size)).to(device)
    bf16 = device.type == "cuda" and not args.fp32
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, 1e-4, 0.05), config=dict(
        train_batch_size=args.batch, train_micro_batch_size_per_gpu=args.batch, gradient_clipping=0.0,
        zero_optimization=dict(stage=args.zero_stage), bf16=dict(enabled=bf16), steps_per_print=10**9))
    if args.compile:
        engine.compile()
    dtype = torch.bfloat16 if bf16 else torch.float32

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(n):
        wait = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            u8 = next(batches)
            wait += time.perf_counter() - t0
            loss = engine(normalize_batch(u8, device, dtype)).loss
            engine.backward(loss)
            engine.step()
        sync()
        return wait

    run(args.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    wait = run(args.steps)
    seconds = time.perf_counter() - t0
    ips = args.steps * args.batch / seconds
    flops = 3 * flops_per_image(engine.module.config, "pred")["total"]
    peak = peak_tflops(args.peak_tflops)
    out = dict(preset=preset, images_per_s=round(ips, 1), step_ms=round(1000 * seconds / args.steps, 2),
               data_wait_share=round(wait / seconds, 4), gflops_per_image=round(flops / 1e9, 2),
               achieved_tflops=round(flops * ips / 1e12, 2), mfu=round(flops * ips / (peak * 1e12), 4) if peak else None,
               peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None)
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def synthetic(args, device):
    pool = [torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8) for _ in range(4)]
    if device.type == "cuda":
        pool = [b.pin_memory() for b in pool]
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1


def streaming(args, device):
    loader = StreamingLoader.from_manifest(args.manifest, batch_size=args.batch, transform=MAETrainTransform(args.image_size),
                                           num_workers=args.workers, seed=0)
    while True:
        for batch in loader:
            yield batch["image"].pin_memory() if device.type == "cuda" else batch["image"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fp32", action="store_true", help="no bf16 (CPU always runs fp32)")
    ap.add_argument("--manifest", default=None, help="also measure with the streaming loader on these shards")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--smoke", action="store_true", help="CPU, 32 px micro models, 2 steps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    models = dict(MODELS)
    if args.smoke:
        models = {"CrossMAE": "crossmae_vit_micro_patch4_dec64d2b", "MAE": "mae_vit_micro_patch4_dec64d2b"}
        args.batch, args.image_size, args.steps, args.warmup, args.workers = 8, 32, 2, 1, 1
    on_gpu = torch.cuda.is_available() and not args.smoke
    init_distributed(on_gpu)
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    result = dict(device=torch.cuda.get_device_name() if on_gpu else "cpu", batch=args.batch,
                  image_size=args.image_size, steps=args.steps, compile=args.compile,
                  precision="bf16" if on_gpu and not args.fp32 else "fp32", torch=torch.__version__, runs=[])
    sources = [("synthetic", synthetic)] + ([("loader", streaming)] if args.manifest else [])
    for source, make in sources:
        for name in args.models:
            r = dict(bench(models[name], args, device, make(args, device)), model=name, source=source)
            result["runs"].append(r)
            print(json.dumps(r), file=sys.stderr)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
