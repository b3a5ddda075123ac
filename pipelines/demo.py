"""``make demo``: the whole product on a laptop-sized problem, CPU only, a few minutes.

1. a real labelled image set that ships inside a dependency: scikit-learn's 1,797 handwritten
   digits (8x8), upsampled to 32x32 and written as JPEGs in class folders;
2. ``crossmae-prep`` shards it (train / val) into the store (local by default; ``--store s3://...``
   with AWS_ENDPOINT_URL for object storage);
3. ``crossmae-pretrain`` trains a tiny CrossMAE under DeepSpeed (ZeRO-2, 2 processes, gloo),
   checkpoints mirrored into the store, reconstruction grids and TensorBoard on the way;
4. ``crossmae-export`` consolidates every checkpoint and exports its encoder (timm safetensors);
   the same architecture at its random initialisation is exported as the baseline;
5. ``crossmae-eval knn`` scores every export on the held-out digits and writes a report
   (markdown, CSV, and a PNG of k-NN accuracy against pretraining step).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_digits(root: pathlib.Path, holdout: int = 297) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    counts = {}
    for n, i in enumerate(order):
        split = "val" if n < holdout else "train"
        img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
        d = root / split / str(digits.target[i])
        d.mkdir(parents=True, exist_ok=True)
        img.convert("RGB").save(d / f"digit{i:04d}.jpg", quality=95)
        counts[split] = counts.get(split, 0) + 1
    return counts


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"demo: step failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="crossmae-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="local directory for images, run, report")
    ap.add_argument("--store", default=None, help="dataset, checkpoint and export store (default OUT/store; "
                                                  "s3://bucket/prefix works with AWS_ENDPOINT_URL and credentials)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.time()
    out = (ROOT / args.out).resolve() if not os.path.isabs(args.out) else pathlib.Path(args.out)
    store = (args.store or str(out / "store")).rstrip("/")
    if not (out / "images" / "train").exists():
        print(f"demo: writing digits to {out / 'images'}: {write_digits(out / 'images')}", file=sys.stderr)
    py = sys.executable
    for split in ("train", "val"):
        run([py, "-m", "data_prep.cli", "folder", str(out / "images" / split), store, "--split", split,
             "--shard-samples", "256"])
    # the venv's bin first: one `ninja` (DeepSpeed's cached CPU op is rebuilt when it changes)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    run_dir, run_store, exports = out / "run", f"{store}/run", f"{store}/exports"
    from pipelines.runtime.launch import free_port

    save_every = max(1, args.steps // 3)
    run([py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port", str(free_port()), "-m",
         "pipelines.pretrain", "model.preset=crossmae_vit_micro_patch4_dec64d2b", f"data.train={store}/train/manifest.json",
         "data.image_size=32", "data.num_workers=1", "deepspeed.micro_batch=32", "deepspeed.zero_stage=2",
         "optim.lr=1e-3", "optim.warmup_epochs=1", "optim.epochs=15", f"run.max_steps={args.steps}",
         f"run.output={run_dir}", f"run.store={run_store}", "run.log_every=10", f"run.save_every={save_every}",
         f"run.recon_every={save_every}"], env=env)
    # every checkpoint in the store -> timm exports; plus the same architecture at its random
    # initialisation (the trainer's seed) as the k-NN baseline, exported as "step 0"
    run([py, "-m", "pipelines.export", run_store, exports, "--select", "all"], env=env)
    write_random_init_export(run_dir, f"{exports}/step00000000")
    run([py, "-m", "pipelines.evaluate", "knn", "--train", f"{store}/train/manifest.json", "--val",
         f"{store}/val/manifest.json", exports, "--workers", "1", "--report", str(out / "report")], env=env)

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = {}
    from pipelines import storage

    for url, _ in storage.list_objects(exports + "/"):
        if url.endswith("/eval/knn.json"):
            r = json.loads(storage.read_bytes(url))
            knn[r["step"]] = r["metrics"]["top1"]
    wait = sum(m["data_wait_share"] * m["seconds"] for m in metrics) / sum(m["seconds"] for m in metrics)
    summary = dict(store=store, run=str(run_dir), metrics=str(run_dir / "metrics.jsonl"), exports=exports,
                   first_loss=metrics[0]["loss"], last_loss=metrics[-1]["loss"], steps=metrics[-1]["step"],
                   images_per_s=metrics[-1]["images_per_s"], data_wait_share=round(wait, 4),
                   knn_top1_by_step={str(k): v for k, v in sorted(knn.items())},
                   recon=sorted(str(p) for p in (run_dir / "recon").glob("*.png")),
                   report=str(out / "report"), seconds=round(time.time() - t0, 1))
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    knn_line = ", ".join(f"step {k}: {v:.1f}%" for k, v in sorted(knn.items()))
    print(f"\ndemo done in {summary['seconds']} s: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
          f"over {summary['steps']} steps ({summary['images_per_s']:.0f} img/s, data wait {100 * wait:.1f}%)\n"
          f"  k-NN top-1 on the 297 held-out digits ({knn_line}; chance 10%)\n"
          f"  dataset:            {store}/{{train,val}}/manifest.json\n"
          f"  metrics:            {summary['metrics']} (TensorBoard: {run_dir / 'tensorboard'})\n"
          f"  reconstructions:    {run_dir / 'recon'}/step*.png\n"
          f"  checkpoints:        {run_dir / 'checkpoints'} (mirrored to {run_store})\n"
          f"  exports (timm):     {exports}/step*/\n"
          f"  k-NN report:        {out / 'report'}/report.{{md,csv,png}}\n"
          f"  summary:            {out / 'demo.json'}")
    return 0


def write_random_init_export(run_dir: pathlib.Path, out: str) -> None:
    """The trained architecture at the trainer's initialisation (same seed): the k-NN baseline."""
    import torch

    from crossmae import MaskedAutoencoder
    from pipelines.runtime.config_loader import load
    from pipelines.checkpoints.export import export_model
    from pipelines.train.config import PretrainConfig

    cfg = load(PretrainConfig, str(run_dir / "config.yaml"))
    torch.manual_seed(cfg.run.seed)
    export_model(MaskedAutoencoder(cfg.model_config()), out,
                 dict(tag="step00000000", step=0, epoch=0, source=f"random initialisation (seed {cfg.run.seed})",
                      preset=cfg.model.preset))


def export_last(run_dir: pathlib.Path, export_dir: pathlib.Path) -> pathlib.Path:
    """Consolidate the newest checkpoint to fp32 and export its encoder (crossmae-export)."""
    from pipelines.checkpoints.export import export_checkpoint
    from pipelines.checkpoints.store import complete_tags

    tag = complete_tags(str(run_dir))[-1]
    result = export_checkpoint(str(run_dir), tag, str(export_dir))
    if result["status"] == "failed":
        raise SystemExit(f"demo: export failed: {result['error']}")
    return export_dir


if __name__ == "__main__":
    sys.exit(main())
