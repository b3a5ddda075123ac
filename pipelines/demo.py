"""``make demo``: the whole product on a laptop-sized problem, CPU only, a few minutes.

1. a real labelled image set that ships inside a dependency: scikit-learn's 1,797 handwritten
   digits (8x8), upsampled to 32x32 and written as JPEGs in class folders;
2. ``crossmae-prep`` shards it (train / val) into the store (local by default; ``--store s3://...``
   with AWS_ENDPOINT_URL for object storage);
3. ``crossmae-pretrain`` trains a tiny CrossMAE under DeepSpeed (ZeRO-2, 2 processes, gloo);
4. the last checkpoint is consolidated and its encoder exported as timm safetensors.
(k-NN evaluation of the export arrives with the export/eval issue.)
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
    ap.add_argument("--out", default="runs/demo", help="local directory for images, run, export")
    ap.add_argument("--store", default=None, help="dataset store (default OUT/store; s3://bucket/prefix works)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.time()
    out = (ROOT / args.out).resolve() if not os.path.isabs(args.out) else pathlib.Path(args.out)
    store = args.store or str(out / "store")
    if not (out / "images" / "train").exists():
        print(f"demo: writing digits to {out / 'images'}: {write_digits(out / 'images')}", file=sys.stderr)
    py = sys.executable
    for split in ("train", "val"):
        run([py, "-m", "data_prep.cli", "folder", str(out / "images" / split), store, "--split", split,
             "--shard-samples", "256"])
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    run_dir = out / "run"
    from pipelines.pretrain import _free_port

    run([py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port", str(_free_port()), "-m",
         "pipelines.pretrain", "model.preset=crossmae_vit_micro_patch4_dec64d2b", f"data.train={store}/train/manifest.json",
         "data.image_size=32", "data.num_workers=1", "deepspeed.micro_batch=32", "deepspeed.zero_stage=2",
         "optim.lr=1e-3", "optim.warmup_epochs=1", "optim.epochs=15", f"run.max_steps={args.steps}",
         f"run.output={run_dir}", "run.log_every=10", "run.save_every=100"], env=env)
    export_dir = export_last(run_dir, out / "export")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = dict(store=store, run=str(run_dir), metrics=str(run_dir / "metrics.jsonl"), export=str(export_dir),
                   first_loss=metrics[0]["loss"], last_loss=metrics[-1]["loss"], steps=metrics[-1]["step"],
                   seconds=round(time.time() - t0, 1))
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"\ndemo done in {summary['seconds']} s: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
          f"over {summary['steps']} steps\n  dataset: {store}\n  metrics: {summary['metrics']}\n"
          f"  checkpoints: {run_dir / 'checkpoints'}\n  encoder export (timm safetensors): {export_dir}\n"
          f"  summary: {out / 'demo.json'}")
    return 0


def export_last(run_dir: pathlib.Path, export_dir: pathlib.Path) -> pathlib.Path:
    """Consolidate the newest checkpoint to fp32 and export its encoder (crossmae-export)."""
    from pipelines.export import export_checkpoint
    from pipelines.pretrain import checkpoints

    tag = checkpoints(str(run_dir))[-1]
    result = export_checkpoint(str(run_dir), tag, str(export_dir))
    if result["status"] == "failed":
        raise SystemExit(f"demo: export failed: {result['error']}")
    return export_dir


if __name__ == "__main__":
    sys.exit(main())
