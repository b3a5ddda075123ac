"""Pretraining throughput on one GPU through the trainer's own step (pipelines/train/step.py:
the engine ``crossmae-pretrain`` builds, the step it runs): images/s, step time, MFU and peak
memory of CrossMAE (gamma=0.25) and MAE ViT-B/16 side by side, with synthetic uint8 batches
from pinned memory and, given --manifest, the real streaming loader. ``--plain`` adds the
reference: the same model in a plain compiled PyTorch loop (autocast bf16, fused AdamW), so
"trainer step / plain loop" is measured in the same run. ``--sweep`` measures the DeepSpeed
configurations the trainer offers (ZeRO stage x bf16 mode x compile).
Targets on one H100/H200 (bf16, ViT-B/16 224 px, batch 256): CrossMAE >= 6,000 img/s, MFU >= 23%,
CrossMAE/MAE step time <= 0.65, peak memory <= 0.55, trainer / plain compiled loop >= 0.95.

    python benchmarks/gpu_throughput.py --batch 256 --steps 30 --plain [--sweep] [--json out.json]
    python benchmarks/gpu_throughput.py --manifest s3://b/in1k/train/manifest.json --workers 12
    python benchmarks/gpu_throughput.py --smoke      # CPU, micro models, 2 steps: the script still runs
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import emit  # noqa: E402
from crossmae import MaskedAutoencoder, flops_per_image, model_config  # noqa: E402
from pipelines.runtime.config_loader import load  # noqa: E402
from pipelines.train.metrics import model_flops_utilization, peak_tflops  # noqa: E402
from pipelines.train.optim import build_optimizer  # noqa: E402
from pipelines.runtime.launch import init_distributed  # noqa: E402
from pipelines.train.config import PretrainConfig  # noqa: E402
from pipelines.train.step import TrainStep, build_engine, device_batches  # noqa: E402

MODELS = {"CrossMAE": "crossmae_vit_base_patch16_dec512d12b", "MAE": "mae_vit_base_patch16_dec512d8b"}


def trainer_config(preset: str, args, zero_stage: int, bf16_mode: str, compile_: bool) -> PretrainConfig:
    overrides = [f"model.preset={preset}", f"data.image_size={args.image_size}", f"deepspeed.micro_batch={args.batch}",
                 f"deepspeed.zero_stage={zero_stage}", f"deepspeed.bf16_mode={bf16_mode}", f"model.compile={compile_}",
                 "optim.lr=1e-4", f"deepspeed.precision={'fp32' if args.fp32 else 'auto'}"]
    if preset.startswith("mae"):
        overrides.append("model.pred_ratio=0.75")
    return load(PretrainConfig, None, overrides)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(run, args, device) -> tuple[float, float]:
    run(args.warmup)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    wait = run(args.steps)
    _sync(device)
    return time.perf_counter() - t0, wait


def bench_trainer(cfg: PretrainConfig, args, device, batches) -> dict:
    engine, _, dtype = build_engine(cfg, 1, device)
    step = TrainStep(engine, cfg, device, rank=0, world=1)
    batches = device_batches(batches, cfg.data.image_size, device, dtype)  # as the trainer: one batch ahead
    counter = itertools.count()

    def run(n):
        return sum(step(next(counter), batches).data_wait for _ in range(n))

    seconds, wait = _measure(run, args, device)
    out = _result(engine.module.config, args, device, seconds, wait)
    batches.close()
    return out


def bench_plain(preset: str, args, device, batches) -> dict:
    """The reference: no DeepSpeed, torch.compile, autocast bf16, fused AdamW."""
    from pipelines.data.transforms import normalize_batch

    torch.manual_seed(0)
    model = MaskedAutoencoder(model_config(preset, img_size=args.image_size)).to(device)
    opt = build_optimizer(model, 1e-4, 0.05)
    fwd = torch.compile(model) if device.type == "cuda" else model
    bf16 = device.type == "cuda" and not args.fp32

    def run(n):
        wait = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = fwd(normalize_batch(batch["image"], device, torch.float32)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return wait

    seconds, wait = _measure(run, args, device)
    return _result(model.config, args, device, seconds, wait)


def _result(mc, args, device, seconds: float, wait: float) -> dict:
    ips = args.steps * args.batch / seconds
    flops = 3 * flops_per_image(mc, "pred")["total"]
    out = dict(images_per_s=round(ips, 1), step_ms=round(1000 * seconds / args.steps, 2),
               data_wait_share=round(wait / seconds, 4), gflops_per_image=round(flops / 1e9, 2),
               achieved_tflops=round(flops * ips / 1e12, 2),
               mfu=model_flops_utilization(flops, ips, peak_tflops(args.peak_tflops)),
               peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def synthetic(args, device):
    pool = [torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8) for _ in range(4)]
    if device.type == "cuda":
        pool = [b.pin_memory() for b in pool]
    for i in itertools.count():
        yield dict(image=pool[i % len(pool)])


def streaming(args, device):
    from pipelines.data.transforms import MAETrainTransform
    from pipelines.data.loader import StreamingLoader

    loader = StreamingLoader.from_manifest(args.manifest, batch_size=args.batch, transform=MAETrainTransform(args.image_size),
                                           num_workers=args.workers, seed=0, pin_memory=device.type == "cuda")
    while True:
        yield from loader


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    ap.add_argument("--bf16-mode", default="autocast", choices=["autocast", "weights"])
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="auto: on for CUDA")
    ap.add_argument("--fp32", action="store_true", help="no bf16 (CPU always runs fp32)")
    ap.add_argument("--plain", action="store_true", help="also the plain compiled PyTorch loop (the reference)")
    ap.add_argument("--sweep", action="store_true", help="every ZeRO stage 0-2 x bf16 mode x compile on/off")
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
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    compile_ = on_gpu if args.compile == "auto" else args.compile == "on"
    configs = [(args.zero_stage, args.bf16_mode, compile_)]
    if args.sweep:
        configs = [(z, m, c) for z in (0, 1, 2) for m in ("autocast", "weights") for c in (True, False)]
    result = dict(device=torch.cuda.get_device_name() if on_gpu else "cpu", batch=args.batch,
                  image_size=args.image_size, steps=args.steps,
                  precision="bf16" if on_gpu and not args.fp32 else "fp32", torch=torch.__version__, runs=[])
    sources = [("synthetic", synthetic)] + ([("loader", streaming)] if args.manifest else [])
    for source, make in sources:
        for zero_stage, bf16_mode, comp in configs:
            for name in args.models:
                cfg = trainer_config(models[name], args, zero_stage, bf16_mode, comp)
                r = dict(bench_trainer(cfg, args, device, make(args, device)), model=name, source=source, path="trainer",
                         zero_stage=zero_stage, bf16_mode=bf16_mode, compile=comp)
                result["runs"].append(r)
                print(json.dumps(r), file=sys.stderr)
        if args.plain and source == "synthetic":
            for name in args.models:
                r = dict(bench_plain(models[name], args, device, make(args, device)), model=name, source=source,
                         path="plain", compile=on_gpu)
                result["runs"].append(r)
                print(json.dumps(r), file=sys.stderr)
    result["ratios"] = ratios(result["runs"])
    emit(result, args.json)
    return 0


def ratios(runs: list[dict]) -> dict:
    """CrossMAE / MAE (step time, peak memory) per configuration, and trainer / plain loop."""
    out = {}
    by = {(r["path"], r["source"], r.get("zero_stage"), r.get("bf16_mode"), r.get("compile"), r["model"]): r for r in runs}
    for (path, source, z, m, c, model), r in by.items():
        if model != "CrossMAE":
            continue
        mae = by.get((path, source, z, m, c, "MAE"))
        label = f"{path}/{source}" + (f"/zero{z}/{m}/compile={c}" if path == "trainer" else "")
        if mae:
            out[f"{label}: CrossMAE/MAE step time"] = round(r["step_ms"] / mae["step_ms"], 3)
            if r["peak_memory_gb"] and mae["peak_memory_gb"]:
                out[f"{label}: CrossMAE/MAE peak memory"] = round(r["peak_memory_gb"] / mae["peak_memory_gb"], 3)
        plain = by.get(("plain", source, None, None, c, model))
        if path == "trainer" and plain:
            out[f"{label}: trainer/plain img/s"] = round(r["images_per_s"] / plain["images_per_s"], 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
