"""Time to first batch (cold and on resume) and object-store traffic of real pretraining runs (issue 23).

    python benchmarks/first_batch.py [--ranks 2] [--repeats 2] [--json benchmarks/results/first_batch.json]

Every number here is the trainer's own: each run is ``torchrun --nproc_per_node R -m pipelines.pretrain``
(one process per simulated rank, DeepSpeed ZeRO-2 on the CPU, gloo) of the micro model
(crossmae_vit_micro_patch4_dec64d2b, 32 px), its data crossmae-prep shards on a SeaweedFS S3 server
on loopback (tests/s3_server.py), and the numbers are read back from its metrics.jsonl
(pipelines/train/metrics.py: report_first_batch, the store counters of pipelines/storage/traffic.py).

first batch: ``cold`` is a fresh node: an empty run directory and an empty shard cache, manifest and
shards read from S3. ``resume`` continues that run from its mid-epoch checkpoint, again on an empty
shard cache (a fresh node; the loader reads only the samples not yet seen). Three spans per rank, the
slowest rank's reported (every rank's in the JSON):
  process   from process start (/proc starttime): Python, torch and DeepSpeed imports, joining the
            job, the run lock, the loader, the DeepSpeed engine, a resume's checkpoint load
  loader    from loader construction: all of the above after the imports, the join and the run lock
            (process - loader: those three, the first part of every rank's start)
  data      the loader's own part: build_loader (manifest read and parse) plus the wait for the
            first batch (workers start, epoch plan, shard GETs, decode, collate); the target's span
Targets: data span of a cold first batch <= 5 s; resume within 1.2x of cold (same span).
``--access random`` (data.access=random) reads each sample alone at its byte span, in one permutation of the
epoch, through a node shard cache that can hold the dataset (refused without one): its first batch draws from
the whole epoch, so a cold start waits for the shards of that batch's samples (here all of them; at ImageNet
size ~226 of 1,024 for a batch of 256), where streaming waits for one shard per worker.

store traffic: two 3-epoch runs with the ranks sharing one node's shard cache, and without a cache.
``bytes / dataset`` is the store bytes all ranks read (the loader's counters, summed over ranks on the
last log line) over the manifest's shard bytes. Target: <= 1.05x over the run with the cache (each
shard once per node); without it once per epoch (~3x, plus the shards that straddle two readers).
The block (data.block_size=16, one shard) keeps each rank's share many blocks long, as at ImageNet size
(512-sample blocks, 1,252-sample shards, 20,018 samples per rank at 64 ranks); with a block larger than a
rank's share every rank would read (a prefix of) every shard: `crossmae-prep loader-stats` says which.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import emit  # noqa: E402

PRESET = "crossmae_vit_micro_patch4_dec64d2b"
ARGS = (f"model.preset={PRESET}", "data.image_size=32", "data.num_workers=1", "deepspeed.micro_batch=8",
        "deepspeed.zero_stage=2", "optim.warmup_epochs=0", "optim.epochs=3", "run.log_every=1", "run.recon_every=0",
        "data.block_size=16")  # = the shard size: each rank reads whole blocks, as at ImageNet size (see below)
SPANS = {"process": "first_batch_rank_s", "loader": "first_batch_loader_rank_s", "data": "first_batch_data_rank_s"}


def make_dataset(work: pathlib.Path, images: int, shard_samples: int) -> pathlib.Path:
    """crossmae-prep shards of synthetic photos-like JPEGs (tests/data_prep/fixtures.py), 4 classes."""
    from data_prep.cli import main as prep
    from tests.data_prep.fixtures import make_image_folder

    make_image_folder(work / "src", ("a", "b", "c", "d"), per_class=images // 4)
    if prep(["folder", str(work / "src"), str(work / "wds"), "--shard-samples", str(shard_samples)]) != 0:
        raise SystemExit("first_batch: crossmae-prep failed")
    return work / "wds" / "train"


def pretrain(ranks: int, env: dict, out: pathlib.Path, *overrides: str) -> list[dict]:
    """One run of the trainer; its metrics.jsonl records of this run (the file is appended to)."""
    from pipelines.runtime.launch import free_port

    before = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), "-m", "pipelines.pretrain", *ARGS, f"run.output={out}", *overrides]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"first_batch: pretraining run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    said = [ln for ln in proc.stderr.splitlines() if "first batch after" in ln and "done" not in ln]
    print(f"  {time.perf_counter() - t:5.1f} s  {said[0] if said else '(no first-batch line)'}", file=sys.stderr)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[before:]]


def spans(record: dict) -> dict:
    """Per span: the slowest rank's seconds and every rank's."""
    return {name: dict(slowest=max(record[key]), ranks=record[key]) for name, key in SPANS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="processes (simulated ranks) per run, on one node")
    ap.add_argument("--repeats", type=int, default=2, help="cold + resume pairs (the median is reported)")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--shard-samples", type=int, default=16)
    ap.add_argument("--access", choices=("stream", "random", "both"), default="both",
                    help="data.access of the runs: streaming, random access (a cache holding the dataset), or both")
    ap.add_argument("--json")
    args = ap.parse_args()
    from pipelines import storage
    from tests.s3_server import seaweedfs_server

    with tempfile.TemporaryDirectory(prefix="first-batch-") as tmp, seaweedfs_server() as srv:
        work = pathlib.Path(tmp)
        local = make_dataset(work, args.images, args.shard_samples)
        os.environ.update(srv.env())
        bucket = srv.create_bucket("firstbatch")
        for p in sorted(q for q in local.iterdir() if q.is_file()):
            storage.write_bytes(f"s3://{bucket}/train/{p.name}", p.read_bytes())
        manifest = json.loads((local / "manifest.json").read_text())
        dataset_bytes = sum(s["bytes"] for s in manifest["shards"])
        train = f"s3://{bucket}/train/manifest.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
                   TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))
        steps_per_epoch = manifest["num_samples"] // (8 * args.ranks)
        mid = steps_per_epoch // 2
        accesses = ("stream", "random") if args.access == "both" else (args.access,)
        runs = {(access, kind): [] for access in accesses for kind in ("cold", "resume")}
        for access in accesses:
            for k in range(args.repeats):
                out = work / f"run-{access}{k}"
                fresh = {name: (f"data.shard_cache_dir={work / f'cache-{access}{k}-{name}'}",
                                "data.shard_cache_bytes=1073741824")
                         for name in ("cold", "resume")}  # each run an empty cache: a fresh node
                print(f"access={access}, repeat {k + 1}/{args.repeats}: cold, then resume at step {mid} of "
                      f"{steps_per_epoch}", file=sys.stderr)
                cold = pretrain(args.ranks, env, out, f"data.train={train}", f"data.access={access}",
                                f"run.max_steps={mid}", f"run.save_every={mid}", *fresh["cold"])
                resumed = pretrain(args.ranks, env, out, f"data.train={train}", f"data.access={access}",
                                   f"run.max_steps={mid + 2}", f"run.save_every={mid}", *fresh["resume"])
                assert cold[0]["first_batch_start"] == "cold start" and resumed[0]["first_batch_start"] == "resume"
                runs[access, "cold"].append(spans(cold[0]))
                runs[access, "resume"].append(spans(resumed[0]))
        traffic = {}
        plans = [(f"{access}, shard cache, one per node", access, True) for access in accesses]
        if "stream" in accesses:
            plans.append(("stream, no cache", "stream", False))  # random access without a cache is refused
        for name, access, cached in plans:
            print(f"3 epochs ({3 * steps_per_epoch} steps), {name}", file=sys.stderr)
            extra = (f"data.shard_cache_dir={work / f'cache-traffic-{access}'}", "data.shard_cache_bytes=1073741824") \
                if cached else ()
            recs = pretrain(args.ranks, env, work / f"traffic-{access}-{int(cached)}", f"data.train={train}",
                            f"data.access={access}", f"run.max_steps={3 * steps_per_epoch}",
                            f"run.save_every={3 * steps_per_epoch}", *extra)
            last = recs[-1]
            traffic[name] = dict(gets=last["store_gets"], bytes=last["store_bytes"], retries=last["store_retries"],
                                 shard_rereads=last["shard_rereads"], epochs=3,
                                 bytes_per_dataset=round(last["store_bytes"] / dataset_bytes, 4))

    median = {key: {s: statistics.median(r[s]["slowest"] for r in rs) for s in SPANS} for key, rs in runs.items()}
    ratio = {access: {s: round(median[access, "resume"][s] / median[access, "cold"][s], 3) for s in SPANS}
             for access in accesses}
    targets = {}
    for access in accesses:
        targets[f"{access}: cold first batch, data span <= 5 s"] = median[access, "cold"]["data"] <= 5.0
        targets[f"{access}: resume within 1.2x of cold (data span)"] = ratio[access]["data"] <= 1.2
        cached = traffic[f"{access}, shard cache, one per node"]
        targets[f"{access}: 3 epochs with the shard cache <= 1.05x dataset bytes per node"] = \
            cached["bytes_per_dataset"] <= 1.05
    print(f"\n{args.ranks} ranks (one process each) on one node, micro model; {manifest['num_samples']} samples in "
          f"{manifest['num_shards']} shards ({dataset_bytes / 2**20:.2f} MiB) on S3; median of {args.repeats}, "
          "slowest rank, seconds\n")
    print("| access | span | cold | resume | resume / cold |\n|---|---|---|---|---|")
    for access in accesses:
        for s in SPANS:
            print(f"| {access} | {s} | {median[access, 'cold'][s]:.2f} | {median[access, 'resume'][s]:.2f} | "
                  f"{ratio[access][s]:.2f} |")
        before = {kind: median[access, kind]["process"] - median[access, kind]["loader"] for kind in ("cold", "resume")}
        print(f"| {access} | process - loader: imports, joining the job, run lock | {before['cold']:.2f} | "
              f"{before['resume']:.2f} | |")
    print("\n| 3 epochs | GETs | MiB | bytes / dataset | retries | shard re-reads |\n|---|---|---|---|---|---|")
    for name, t in traffic.items():
        print(f"| {name} | {t['gets']} | {t['bytes'] / 2**20:.2f} | {t['bytes_per_dataset']:.3f} | {t['retries']} | "
              f"{t['shard_rereads']} |")
    if "stream, no cache" in traffic:
        print(f"\nno cache: {traffic['stream, no cache']['bytes_per_dataset'] / 3:.3f}x the dataset per epoch")
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    emit(dict(ranks=args.ranks, repeats=args.repeats, samples=manifest["num_samples"], shards=manifest["num_shards"],
              dataset_bytes=dataset_bytes, preset=PRESET, access=list(accesses),
              median_slowest_s={f"{a}/{k}": v for (a, k), v in median.items()}, resume_over_cold=ratio,
              runs={f"{a}/{k}": v for (a, k), v in runs.items()}, traffic=traffic, targets=targets), args.json)


if __name__ == "__main__":
    main()
