"""The evaluation jobs behind ``crossmae-eval`` (pipelines/evaluate.py has the usage): features of an export
(cached by weights, manifest and protocol), k-NN and linear probe, the sweep over a prefix with its skip rule
(``result_key``), and the report."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from pipelines.eval import knn, linprobe
from pipelines import storage
from pipelines.eval.inputs import BAD_EXPORT, Dataset, Export, UsageError, check_finite, check_same_classes, find_exports
from pipelines.eval.report import write_report
from pipelines.storage.hashing import sha256_bytes

PROG = "crossmae-eval"


def one_line(e: BaseException) -> str:
    """``Type: message`` on one line; for errors re-raised from DataLoader workers (whose message
    carries the worker's traceback) just the original exception's final line."""
    name, text = type(e).__name__, " ".join(str(e).split())
    if "Original Traceback" in text and f"{name}: " in text:
        text = text.rsplit(f"{name}: ", 1)[1]
    return f"{name}: {text}"


def features(export: Export, data: Dataset, role: str, args, encoder_cache: dict, log: dict) -> knn.Features:
    """Frozen features of the dataset, cached per (weights sha, manifest sha, split, image size,
    precision: bf16 autocast on GPUs, fp32 on CPUs)."""
    precision = "bf16" if device(args).type == "cuda" else "fp32"
    name = f"{export.weights_sha256[:16]}-{data.sha256[:16]}-{data.split}-{export.image_size}px-{precision}.safetensors"
    url = storage.join(args.cache_dir or storage.join(export.url, "eval", "features"), name)
    if not args.no_cache and storage.exists(url):
        try:
            feats = knn.load_features(url)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types; any damage: recompute
            print(f"{PROG}: {url}: damaged feature cache ({one_line(e)}): recomputing", file=sys.stderr)
        else:
            log[role] = "hit"
            return check_finite(export, feats, data, f"cached in {url}; --no-cache recomputes")
    if "model" not in encoder_cache:
        encoder_cache["model"] = export.encoder()
    feats = knn.extract(encoder_cache["model"], data.manifest, export.image_size, args.batch_size, args.workers,
                        device(args), progress=f"{data.split} features")
    if len(feats.label) != data.num_samples:
        raise ValueError(f"{data.manifest}: got {len(feats.label)} samples, the manifest lists {data.num_samples}")
    check_finite(export, feats, data, "its weights are damaged or diverged")  # before anything is cached
    log[role] = "off" if args.no_cache else "miss"
    if not args.no_cache:
        knn.save_features(url, feats, dict(export=export.url, manifest=data.manifest, split=data.split))
    return feats


def device(args) -> torch.device:
    return torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def num_classes(train: Dataset, feats: knn.Features) -> int:
    return max(train.num_classes, int(feats.label.max()) + 1)


def protocol(job: str, export: Export, train: Dataset, args) -> dict:
    """Everything besides the weights and the data that a result's numbers depend on."""
    if job == "knn":
        return dict(job=job, k=list(knn.effective_ks(args.k, train.num_samples)), temperature=args.temperature,
                    headline=f"avg_k{min(knn.HEADLINE_K, train.num_samples)}", image_size=export.image_size)
    return dict(job=job, image_size=export.image_size, **dataclasses.asdict(probe_config(args)))


def result_key(job: str, export: Export, train: Dataset, val: Dataset, args) -> str:
    """sha256 over the weights, both manifests and the protocol: a cached result is reused only
    under the same key."""
    parts = dict(weights=export.weights_sha256, train=train.sha256, val=val.sha256,
                 protocol=protocol(job, export, train, args))
    return sha256_bytes(json.dumps(parts, sort_keys=True).encode())


def stale_reason(old: dict, export: Export, train: Dataset, val: Dataset, proto: dict) -> str:
    """Why an existing result does not answer this request (for the stderr line)."""
    if "key" not in old:
        return "no key: written by an older crossmae-eval"
    data = old.get("dataset", {})
    for role, d in (("train", train), ("val", val)):
        if data.get(role, {}).get("sha256") != d.sha256:
            return f"another --{role} manifest ({data.get(role, {}).get('manifest')})"
    if old.get("weights_sha256") != export.weights_sha256:
        return "other weights under the same export URL"
    diff = [f"{k} {old.get('protocol', {}).get(k)!r} -> {v!r}" for k, v in proto.items()
            if old.get("protocol", {}).get(k) != v]
    return "another protocol (" + ", ".join(diff) + ")" if diff else "another key"


def run_knn(export: Export, train: Dataset, val: Dataset, args) -> tuple[dict, dict]:
    enc, cache = {}, {}
    ftr, fval = features(export, train, "train", args, enc, cache), features(export, val, "val", args, enc, cache)
    ks = knn.effective_ks(args.k, len(ftr.label))
    metrics = knn.knn_metrics(ftr, fval, num_classes(train, ftr), ks, args.temperature)
    metrics["corrupt"] = ftr.corrupt + fval.corrupt
    return metrics, dict(k=list(ks), temperature=args.temperature, feature_cache=cache)


def probe_config(args) -> linprobe.ProbeConfig:
    return linprobe.ProbeConfig(pool=args.pool, epochs=args.epochs, batch_size=args.probe_batch, blr=args.blr,
                                lr=args.lr, warmup_epochs=args.warmup_epochs, optimizer=args.optimizer,
                                seed=args.seed, augment=args.augment)


def run_linprobe(export: Export, train: Dataset, val: Dataset, args) -> tuple[dict, dict]:
    cfg = probe_config(args)
    enc, cache = {}, {}
    ftr, fval = features(export, train, "train", args, enc, cache), features(export, val, "val", args, enc, cache)
    classes = num_classes(train, ftr)
    batch, _, warning = cfg.resolve(len(ftr.label))
    if warning:
        print(f"{PROG} linprobe: {export.url}: {warning}", file=sys.stderr)
    batches = steps = None
    if cfg.augment:  # one encoder pass per sample and epoch on the loader's training augmentation
        from pipelines.data.factory import LoaderConfig, build_loader

        enc.setdefault("model", export.encoder())
        loader = build_loader(LoaderConfig(manifest=train.manifest, batch_size=batch,
                                           num_workers=args.workers, image_size=export.image_size, seed=cfg.seed))
        dev, idx = device(args), 1 if cfg.pool == "cls" else 0

        def batches(epoch):
            for b in loader:
                with torch.no_grad():  # not around the yield: the head trains between yields
                    x = knn.encode(enc["model"], b["image"], dev)[idx]
                yield x, b["label"]
        steps = len(loader)
    metrics, hparams = linprobe.probe(ftr.get(cfg.pool), ftr.label, fval.get(cfg.pool), fval.label, classes, cfg,
                                      batches, steps, batch)
    metrics["corrupt"] = ftr.corrupt + fval.corrupt
    return metrics, dict(probe=hparams, feature_cache=cache)


JOBS = {"knn": run_knn, "linprobe": run_linprobe}


def evaluate(job: str, export: Export, train: Dataset, val: Dataset, args) -> dict:
    """Run one job on one export and write ``<export>/eval/<name>.json``; returns the result."""
    t0 = time.time()
    _, model_sha256, verified = export.load()  # read and checked even where cached features answer
    if not verified:
        print(f"{PROG}: {export.url}: warning: its export.json records no sha256 of model.safetensors (not written "
              f"by crossmae-export): the weights are not verified", file=sys.stderr)
    metrics, config = JOBS[job](export, train, val, args)
    config.update(encoder_batch=args.batch_size, image_size=export.image_size, device=str(device(args)))
    result = dict(job=job, name=args.name or job, metrics=metrics, export=export.url, tag=export.info.get("tag"),
                  step=export.step, epoch=export.info.get("epoch"), weights_sha256=export.weights_sha256,
                  read_sha256={"model.safetensors": model_sha256, "config.json": export.config_sha256},
                  verified=verified,
                  dataset={role: asdict(d) for role, d in (("train", train), ("val", val))},
                  protocol=protocol(job, export, train, args), key=result_key(job, export, train, val, args),
                  config=config, seconds=round(time.time() - t0, 2),
                  time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    storage.write_bytes(result_url(export.url, args.name or job), json.dumps(result, indent=1).encode())
    return result


def result_url(export_url: str, name: str) -> str:
    return storage.join(export_url, "eval", f"{name}.json")


def select_index(index: str | None) -> int | None:
    if index is None:
        return None
    if index == "auto":
        index = os.environ.get("SLURM_ARRAY_TASK_ID") or os.environ.get("JOB_COMPLETION_INDEX")
        if index is None:
            raise UsageError("--index auto: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set")
    if not index.isdigit():
        raise UsageError(f"--index must be a non-negative integer or 'auto', not {index!r}")
    return int(index)


def read_result(url: str) -> dict | None:
    try:
        r = json.loads(storage.read_bytes(url))
    except storage.StorageNotFoundError:
        return None
    except ValueError:  # a damaged result is redone, not trusted
        return {}
    return r if isinstance(r, dict) else {}


def failure(url: str, e: BaseException) -> str:
    """The stderr line of a failed export: the export's URL once, then the cause."""
    text = " ".join(str(e).split())
    return text if isinstance(e, BAD_EXPORT) and text.startswith(url + ":") else f"{url}: {one_line(e)}"


def run_sweep(args) -> int:
    train, val = Dataset.read(args.train), Dataset.read(args.val)
    check_same_classes(train, val)
    if args.job == "knn" and max(args.k) > train.num_samples:
        print(f"{PROG} knn: k {', '.join(str(k) for k in sorted(args.k) if k > train.num_samples)} > the "
              f"{train.num_samples} training samples: k={train.num_samples} (all vote) is reported instead; "
              f"the headline stays k={min(knn.HEADLINE_K, train.num_samples)}", file=sys.stderr)
    exports, broken, single = find_exports(args.target)
    if not exports and not broken:
        raise UsageError(f"{args.target}: no export (no export.json there or under it)")
    for url, error in broken.items():
        line = failure(url, error) if isinstance(error, BAD_EXPORT) else f"{url}: unreadable export: {one_line(error)}"
        print(f"{PROG}: {line}", file=sys.stderr)
    index = select_index(args.index)
    if index is not None:
        if index >= len(exports):
            print(f"{PROG}: index {index} >= {len(exports)} exports under {args.target}: nothing to do",
                  file=sys.stderr)
            return 0
        exports = exports[index:index + 1]
    done, skipped, stale, failed = 0, 0, 0, len(broken) if index is None else 0
    bad = sum(isinstance(e, BAD_EXPORT) for e in broken.values()) if index is None else 0
    name = args.name or args.job
    for export in exports:
        try:
            old = None if args.force else read_result(result_url(export.url, name))
            if old is not None:
                if old.get("key") == result_key(args.job, export, train, val, args):
                    skipped += 1
                    continue
                stale += 1
                print(f"{PROG}: {export.url}: eval/{name}.json does not match ("
                      f"{stale_reason(old, export, train, val, protocol(args.job, export, train, args))}): "
                      "recomputing", file=sys.stderr)
            res = evaluate(args.job, export, train, val, args)
        except Exception as e:  # noqa: BLE001 - one broken export (any cause) is counted; the sweep goes on
            failed, bad = failed + 1, bad + isinstance(e, BAD_EXPORT)
            print(f"{PROG}: {failure(export.url, e)}", file=sys.stderr)
            continue
        finally:
            export.release()  # one export's weights in memory at a time
        done += 1
        m = res["metrics"]
        print(f"{name} {export.url} step {export.step}: top1 {m['top1']:.2f} top5 {m['top5']:.2f} "
              f"({res['seconds']} s)", file=sys.stderr)
    print(f"{PROG} {name}: {done} evaluated ({stale} stale results redone), {skipped} skipped (same data and "
          f"protocol; --force redoes), {failed} failed", file=sys.stderr)
    if args.report or (not single and index is None):
        write_report(args.target, args.report or args.target, PROG)
    return 2 if bad else 1 if failed else 0


def run_report(args) -> int:
    paths = write_report(args.target, args.report or args.target, PROG)
    if paths is None:
        raise UsageError(f"{args.target}: no evaluation results under it")
    print("\n".join(paths), file=sys.stderr)
    return 0
