"""What DeepSpeed's wrapper costs: the trainer's step (DeepSpeed engine, ZeRO stage S, one
process) against the same model and the same torch AdamW in a plain PyTorch loop, same batch,
steps interleaved so machine noise hits both. Target: DeepSpeed >= 0.9x the plain loop's
images/s.

    python benchmarks/train_step.py --preset crossmae_vit_small_patch16_dec256d12b --batch 16 \
        --rounds 5 --steps 4 [--stages 0 2] [--json benchmarks/results/train_step.json]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crossmae import MaskedAutoencoder, model_config  # noqa: E402
from benchmarks._common import emit  # noqa: E402
from pipelines.train.optim import build_optimizer  # noqa: E402
from pipelines.runtime.launch import init_distributed  # noqa: E402
from pipelines.data.transforms import normalize_batch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="crossmae_vit_small_patch16_dec256d12b")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps per mode per round")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import deepspeed

    on_gpu = torch.cuda.is_available()
    init_distributed(on_gpu)
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(0)
    base = MaskedAutoencoder(model_config(args.preset, img_size=args.image_size))
    u8 = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8)
    noise = torch.rand(args.batch, base.config.num_patches, device=device)

    plain = copy.deepcopy(base).to(device)
    plain_opt = build_optimizer(plain, 1e-4, 0.05)

    def plain_step():
        loss = plain(normalize_batch(u8, device), noise).loss
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    modes = {"plain": plain_step}
    for stage in args.stages:
        model = copy.deepcopy(base).to(device)
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, 1e-4, 0.05), config=dict(
            train_batch_size=args.batch, train_micro_batch_size_per_gpu=args.batch, gradient_clipping=0.0,
            zero_optimization=dict(stage=stage), steps_per_print=10**9))

        def ds_step(engine=engine):
            loss = engine(normalize_batch(u8, device), noise).loss
            engine.backward(loss)
            engine.step()

        modes[f"deepspeed_zero{stage}"] = ds_step

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    for fn in modes.values():  # warm-up: allocations, DeepSpeed's first-step set-up
        fn()
        fn()
    times = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    result = dict(preset=args.preset, batch=args.batch, image_size=args.image_size, rounds=args.rounds,
                  steps=args.steps, device=torch.cuda.get_device_name() if on_gpu else "cpu",
                  threads=torch.get_num_threads(), modes={})
    plain_s = statistics.median(times["plain"])
    for name, ts in times.items():
        s = statistics.median(ts)
        result["modes"][name] = dict(step_s=round(s, 4), images_per_s=round(args.batch / s, 2),
                                     vs_plain=round(plain_s / s, 3))
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
