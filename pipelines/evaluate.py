"""``crossmae-eval``: evaluation jobs over exported encoders, one export or a sweep over a prefix.

    crossmae-eval knn --train T/manifest.json --val V/manifest.json EXPORT_OR_PREFIX
    crossmae-eval linprobe --train ... --val ... EXPORT_OR_PREFIX [--epochs 90 --augment]
    crossmae-eval report PREFIX [--report DIR]         # table (md + csv) and plot over steps: eval_report.py
    crossmae-eval finetune ...                         # pipelines/finetune.py

An export is a directory or prefix (local or s3://) with model.safetensors, timm's config.json
and export.json (tag, step, epoch, source, weights_sha256). Given a prefix, every export under
it is evaluated in turn, skipping those whose ``<export>/eval/<name>.json`` was computed from the
same weights, both manifests (sha256) and protocol (``result_key``; ``--force`` redoes them all),
then the report is written. Train and val manifests with different class maps are refused. ``--index I`` (or ``--index auto``: $SLURM_ARRAY_TASK_ID
or $JOB_COMPLETION_INDEX) evaluates only the I-th export (sorted by step), so a job array fans out;
run ``report`` once the array is done.

Nothing is trusted: every job reads the export's model.safetensors once and checks it against the
sha256 its export.json records (crossmae.timm_export.load_export_tensors), non-finite features
are an error naming the export, and the result records the sha256 of the bytes it read. Exit 2:
bad input (options, manifests, a damaged export); 1: an export failed otherwise; 0: all done.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch

from . import knn, linprobe, storage
from .eval_inputs import BAD_EXPORT, Dataset, Export, UsageError, check_finite, check_same_classes, find_exports
from .eval_report import write_report
from .hashing import sha256_bytes
from .shard_names import ShardNameError

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
        from .loaders import LoaderConfig, build_loader

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


# argparse types: nonsense is refused before any work, as "argument --temperature: must be ..."
# (--temperature 0 divided every similarity by zero and reported 8% top-1 with exit 0)
def whole(low: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, not {n}")
        return n
    return parse


def positive_number(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {text}")
    return x


def plain_name(text: str) -> str:
    """--name becomes <export>/eval/NAME.json: a file name, never a path."""
    if not text or text in (".", "..") or any(c in text for c in "/\\\0"):
        raise argparse.ArgumentTypeError(f"must be a plain file name (no '/'), not {text!r}")
    return text


def device_name(text: str) -> str:
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (auto, cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return text


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Evaluate exported encoders: k-NN, linear probe, fine-tune, report.")
    sub = ap.add_subparsers(dest="job", required=True, parser_class=_Parser)
    for job, doc in (("knn", "k-NN on frozen features (cosine, T-weighted votes)"),
                     ("linprobe", "linear probe on frozen features (MAE protocol)")):
        p = sub.add_parser(job, help=doc)
        p.add_argument("target", help="an export, or a prefix holding many (local or s3://)")
        p.add_argument("--train", required=True, help="training split manifest (crossmae-prep)")
        p.add_argument("--val", required=True, help="evaluation split manifest")
        p.add_argument("--name", type=plain_name, help=f"result name: <export>/eval/NAME.json (default: {job})")
        p.add_argument("--batch-size", type=whole(1), default=256, help="images per encoder forward")
        p.add_argument("--workers", type=whole(0), default=4, help="loader worker processes (0: in this process)")
        p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if present), cpu, cuda, cuda:1")
        p.add_argument("--cache-dir", help="feature cache (default <export>/eval/features)")
        p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
        p.add_argument("--force", action="store_true", help="evaluate even where the result exists")
        p.add_argument("--index", help="evaluate only the I-th export of the prefix; 'auto': Slurm/K8s array index")
        p.add_argument("--report", help="also write the report here (default: the prefix, for sweeps)")
        if job == "knn":
            p.add_argument("--k", type=whole(1), nargs="+", default=list(knn.KS),
                           help="neighbour counts (k=20: headline)")
            p.add_argument("--temperature", type=positive_number, default=knn.TEMPERATURE,
                           help=f"votes weigh exp(cosine / T) (default {knn.TEMPERATURE}, DINO's)")
        else:
            d = linprobe.ProbeConfig()
            p.add_argument("--pool", choices=("cls", "avg"), default=d.pool)
            p.add_argument("--epochs", type=whole(1), default=d.epochs)
            p.add_argument("--probe-batch", type=whole(1), default=d.batch_size,
                           help=f"head training batch (default: MAE's {linprobe.MAE_BATCH}, capped to "
                                f"{linprobe.MIN_STEPS_PER_EPOCH} steps per epoch)")
            p.add_argument("--blr", type=positive_number, default=d.blr, help="lr = blr x batch / 256")
            p.add_argument("--lr", type=positive_number, help="absolute lr (overrides --blr)")
            p.add_argument("--warmup-epochs", type=whole(0), default=d.warmup_epochs)
            p.add_argument("--optimizer", choices=("auto", "lars", "sgd"), default=d.optimizer,
                           help="auto: LARS at MAE's batch, SGD below it")
            p.add_argument("--seed", type=whole(0), default=d.seed)
            p.add_argument("--augment", action="store_true", help="encoder per epoch on augmented crops (slow on CPU)")
    p = sub.add_parser("report", help="table (markdown, CSV) and plot of all results under a prefix")
    p.add_argument("target")
    p.add_argument("--report", help="output directory (default: the prefix)")
    sub.add_parser("finetune", help="end-to-end fine-tuning (pipelines/finetune.py)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:
        try:
            from . import finetune
        except ModuleNotFoundError as e:
            if e.name != "pipelines.finetune":
                raise
            print(f"{PROG} finetune: not available (pipelines/finetune.py is missing)", file=sys.stderr)
            return 2
        return finetune.main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return run_report(args) if args.job == "report" else run_sweep(args)
    except (UsageError, ShardNameError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BAD_EXPORT as e:  # e.g. config.json of a single export does not match its export.json
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; re-run the same command: finished results are kept", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - OS and library errors name their file or URL; one line, no traceback
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
