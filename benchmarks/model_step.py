"""CrossMAE vs MAE training step, side by side in one run.

Forward+backward time, activation memory and peak memory for ViT-B/16 at 224 px:
CrossMAE (gamma=0.25, decoder depth 12, inter-block attention) vs MAE (decoder depth 8),
plus the analytical decoder FLOPs of both, and the CrossMAE decoder's feature fusion + K/V
projection (fwd+bwd) against the per-block code it replaced (issue 12). Steps alternate
between the compared models so machine noise hits both equally.

Targets (paper: 0.65x time per epoch, 0.54x memory per GPU, 2.5-3.7x less decoder compute),
set for the GPU setting (bf16, batch 256): step time <= 0.65x, peak memory <= 0.55x, decoder
FLOPs <= 0.41x. ``--estimate-batch 256`` adds the bytes autograd saves at that batch,
extrapolated from batches 1 and 2 (saved bytes are affine in the batch size).

    python benchmarks/model_step.py --batch 8 --steps 10 [--device cuda --bf16] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import emit  # noqa: E402
from crossmae import create_model, flops_per_image  # noqa: E402

MODELS = {"CrossMAE": "crossmae_vit_base_patch16_dec512d12b", "MAE": "mae_vit_base_patch16_dec512d8b"}


def step(model, imgs, bf16: bool):
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(imgs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def saved_bytes(run, module) -> tuple[int, object]:
    """(bytes autograd keeps alive for backward while ``run()`` executes, run's output): what
    dominates training memory, counted exactly: each saved storage once, however many ops save
    it; the module's parameters excluded (their autocast copies count)."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


def saved_activation_bytes(model, imgs, bf16: bool, backward: bool = True) -> int:
    def forward():
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(imgs).loss

    nbytes, loss = saved_bytes(forward, model)
    if backward:
        loss.backward()
        model.zero_grad(set_to_none=True)
    return nbytes


def fusion_reference(dec, maps):
    """The per-block code the fast decoder replaced: stack on the LAST dim, Linear over k,
    strided slice per block, LayerNorm, that block's kv Linear."""
    fused = F.linear(torch.stack(maps, dim=-1), dec.feature_fusion.weight)  # (N, T, C, depth)
    return [blk.cross_attn.kv(norm(fused[..., i]))
            for i, (norm, blk) in enumerate(zip(dec.fused_norms, dec.decoder_blocks))]


def fusion_fast(dec, maps):
    return list(dec.project_kv(dec.contexts(maps)).unbind(0))


def fusion_fast_recomputed(dec, maps):  # decoder.recompute_kv = True
    return list(checkpoint(dec._contexts_kv, maps, use_reentrant=False).unbind(0))


def compare_fusion(dec, args, device) -> dict:
    """Feature fusion + K/V projection for all decoder blocks, forward+backward, old vs new, on the
    13 ViT-B feature maps of the visible tokens (T = 1 + 49)."""
    torch.manual_seed(0)
    k = dec.feature_fusion.in_features
    maps = [torch.randn(args.batch, 50, 768, device=device, requires_grad=True) for _ in range(k)]
    fns = {"per-block (old)": fusion_reference, "batched (new)": fusion_fast, "batched+recompute": fusion_fast_recomputed}

    def forward(fn):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            return fn(dec, maps)

    times = {name: [] for name in fns}
    for i in range(args.warmup + args.steps * 3):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            kvs = forward(fn)
            torch.autograd.backward(kvs, [torch.ones_like(kv) for kv in kvs])
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    saved = {name: saved_bytes(lambda: forward(fn), dec)[0] for name, fn in fns.items()}
    rows = {name: dict(ms=1e3 * statistics.median(t), ms_min=1e3 * min(t), saved_gib=saved[name] / 2**30)
            for name, t in times.items()}

    def bf16_forward(fn, batch):
        small = [torch.randn(batch, 50, 768, device=device, requires_grad=True) for _ in range(k)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(dec, small)

    if args.estimate_batch:  # bf16, extrapolated from batches 1 and 2 like estimate_activation
        for name, fn in fns.items():
            one, two = (saved_bytes(lambda: bf16_forward(fn, b), dec)[0] for b in (1, 2))
            rows[name]["saved_gib_bf16_estimate"] = (one + (two - one) * (args.estimate_batch - 1)) / 2**30

    dec.zero_grad(set_to_none=True)
    return rows


def print_fusion(fusion: dict) -> None:
    print("CrossMAE decoder, feature fusion + K/V projection of all 12 blocks, fwd+bwd "
          "(saved = kept for backward, excluding the 13 maps the encoder keeps anyway):")
    for name, r in fusion.items():
        est = f", bf16 at --estimate-batch {r['saved_gib_bf16_estimate']:.3f} GiB" if "saved_gib_bf16_estimate" in r else ""
        print(f"  {name:18} {r['ms']:9.2f} ms (min {r['ms_min']:.2f})   saved {r['saved_gib']:.3f} GiB{est}")
    old = next(iter(fusion.values()))
    for name, r in list(fusion.items())[1:]:
        print(f"  {name} / old: time {r['ms'] / old['ms']:.3f}x (min {r['ms_min'] / old['ms_min']:.3f}x), "
              f"saved activations {r['saved_gib'] / old['saved_gib']:.3f}x")


def estimate_activation(model, batch: int, device) -> float:
    """GiB autograd saves for one bf16 step at ``batch``, extrapolated from batches 1 and 2
    (forward only: saving happens in the forward). On a CPU, layer_norm runs in bf16 under
    autocast where CUDA runs it in fp32, so a GPU saves somewhat more."""
    torch.manual_seed(0)
    one, two = (saved_activation_bytes(model, torch.randn(b, 3, 224, 224, device=device), True, backward=False)
                for b in (1, 2))
    return (one + (two - one) * (batch - 1)) / 2**30


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
    ap.add_argument("--estimate-batch", type=int, default=0,
                    help="also extrapolate bf16 saved activations to this batch (e.g. 256)")
    ap.add_argument("--fusion-only", action="store_true", help="only the decoder fusion old-vs-new comparison")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(child_peak(args.child, args))
        return

    device = torch.device(args.device)
    if args.fusion_only:
        print_fusion(compare_fusion(create_model(MODELS["CrossMAE"]).to(device).decoder, args, device))
        return
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
        if args.estimate_batch:
            rows[k][f"activation_gib_bf16_batch{args.estimate_batch}"] = estimate_activation(
                m, args.estimate_batch, device)
    c, m = rows["CrossMAE"], rows["MAE"]
    ratios = dict(step_time=c["step_s"] / m["step_s"], peak=c["peak_gib"] / m["peak_gib"],
                  activation=c["activation_gib"] / m["activation_gib"],
                  decoder_flops=c["decoder_gflops"] / m["decoder_gflops"])
    fusion = compare_fusion(models["CrossMAE"].decoder, args, device)
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
               batch=args.batch, steps=args.steps, bf16=args.bf16, torch=torch.__version__)
    print(f"ViT-B/16 224px, batch {args.batch}, {args.steps} steps, {env['device']}, bf16={args.bf16}")
    print(f"{'model':10} {'step s':>8} {'img/s':>8} {'act GiB':>8} {'peak GiB':>9} {'dec GFLOPs':>11} {'enc GFLOPs':>11}")
    for k, r in rows.items():
        print(f"{k:10} {r['step_s']:8.3f} {r['img_per_s']:8.1f} {r['activation_gib']:8.3f} {r['peak_gib']:9.3f} "
              f"{r['decoder_gflops']:11.2f} {r['encoder_gflops']:11.2f}")
    print(f"CrossMAE / MAE: step time {ratios['step_time']:.3f}x | peak memory {ratios['peak']:.3f}x | "
          f"saved activations {ratios['activation']:.3f}x | decoder FLOPs {ratios['decoder_flops']:.3f}x")
    if args.estimate_batch:
        est = {k: r[f"activation_gib_bf16_batch{args.estimate_batch}"] for k, r in rows.items()}
        print(f"saved activations, bf16, batch {args.estimate_batch} (extrapolated): "
              + ", ".join(f"{k} {v:.2f} GiB" for k, v in est.items())
              + f" ({est['CrossMAE'] / est['MAE']:.3f}x)")
    print_fusion(fusion)
    ok = ratios["step_time"] <= 0.65 and ratios["peak"] <= 0.55 and ratios["decoder_flops"] <= 0.41
    print(f"targets (set for bf16 batch 256 on a GPU; step time <= 0.65x, peak memory <= 0.55x, "
          f"decoder FLOPs <= 0.41x): {'met' if ok else 'NOT met'} here")
    emit(dict(env=env, models=rows, ratios=ratios, fusion=fusion, targets_met=ok), args.json)

if __name__ == "__main__":
    main()
