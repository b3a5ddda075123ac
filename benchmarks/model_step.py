"""CrossMAE vs MAE training step, side by side in one run.

Forward+backward time, activation memory and peak memory for ViT-B/16 at 224 px:
CrossMAE (gamma=0.25, decoder depth 12, inter-block attention) vs MAE (decoder depth 8),
plus the analytical decoder FLOPs of both. Steps alternate between the two models so
machine noise hits both equally. Targets (paper: 0.65-0.68x time per epoch, 2.5-3.7x less
decoder compute): step time ratio <= 0.70, decoder FLOPs ratio <= 0.41.

    python benchmarks/model_step.py --batch 8 --steps 10 [--device cuda --bf16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crossmae import create_model, flops_per_image  # noqa: E402

MODELS = {"CrossMAE": "crossmae_vit_base_patch16_dec512d12b", "MAE": "mae_vit_base_patch16_dec512d8b"}


def step(model, imgs, bf16: bool):
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(imgs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def saved_activation_bytes(model, imgs, bf16: bool) -> int:
    """Bytes autograd keeps alive for backward (what dominates training memory), counted
    exactly: each saved storage once, however many ops save it; parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(imgs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def child_peak(name: str, args) -> float:
    """Peak memory of a training step in a fresh process, GiB above the steady state between steps
    (weights and gradients excluded: activations and temporaries)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(MODELS[name]).to(device)
    imgs = torch.randn(args.batch, 3, 224, 224, device=device)
    for p in model.parameters():  # gradients exist before the measured step, as in training
        p.grad = torch.zeros_like(p)

    def measured_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(imgs).loss
        loss.backward()

    if device.type == "cuda":
        measured_step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        measured_step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30

    # CPU: sample resident memory every millisecond during ONE step (later steps reuse memory
    # the allocator keeps, hiding the peak; ru_maxrss would include start-up peaks).
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base, peak, done = rss(), [0], threading.Event()

    def sampler():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sampler)
    t.start()
    measured_step()
    done.set()
    t.join()
    return (peak[0] - base) / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(child_peak(args.child, args))
        return

    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {k: create_model(v).to(device) for k, v in MODELS.items()}
    imgs = torch.randn(args.batch, 3, 224, 224, device=device)
    times = {k: [] for k in models}
    for i in range(args.warmup + args.steps):
        for k, m in models.items():  # alternate: noise hits both equally
            sync(device)
            t0 = time.perf_counter()
            step(m, imgs, args.bf16)
            sync(device)
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    rows = {}
    for k, m in models.items():
        flops = flops_per_image(m.config)
        child = [sys.executable, __file__, "--child", k, "--batch", str(args.batch), "--device", args.device]
        peak = float(subprocess.check_output(child + (["--bf16"] if args.bf16 else [])).decode().split()[-1])
        rows[k] = dict(
            preset=MODELS[k], step_s=statistics.median(times[k]), step_s_min=min(times[k]),
            img_per_s=args.batch / statistics.median(times[k]),
            activation_gib=saved_activation_bytes(m, imgs, args.bf16) / 2**30, peak_gib=peak,
            decoder_gflops=flops["decoder"] / 1e9, encoder_gflops=flops["encoder"] / 1e9,
        )
    c, m = rows["CrossMAE"], rows["MAE"]
    ratios = dict(step_time=c["step_s"] / m["step_s"], activation=c["activation_gib"] / m["activation_gib"],
                  peak=c["peak_gib"] / m["peak_gib"], decoder_flops=c["decoder_gflops"] / m["decoder_gflops"])
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
               batch=args.batch, steps=args.steps, bf16=args.bf16, torch=torch.__version__)
    print(f"ViT-B/16 224px, batch {args.batch}, {args.steps} steps, {env['device']}, bf16={args.bf16}")
    print(f"{'model':10} {'step s':>8} {'img/s':>8} {'act GiB':>8} {'peak GiB':>9} {'dec GFLOPs':>11} {'enc GFLOPs':>11}")
    for k, r in rows.items():
        print(f"{k:10} {r['step_s']:8.3f} {r['img_per_s']:8.1f} {r['activation_gib']:8.3f} {r['peak_gib']:9.3f} "
              f"{r['decoder_gflops']:11.2f} {r['encoder_gflops']:11.2f}")
    print("CrossMAE / MAE: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))
    ok = ratios["step_time"] <= 0.70 and ratios["decoder_flops"] <= 0.41
    print(f"targets (step time <= 0.70x, decoder FLOPs <= 0.41x): {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, models=rows, ratios=ratios, targets_met=ok), f, indent=2)


if __name__ == "__main__":
    main()
