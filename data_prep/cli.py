"""``crossmae-prep``: image sets -> globally shuffled WebDataset shards + manifest.

    crossmae-prep imagenet /data/imagenet s3://bucket/imagenet-wds --splits train,val --processes 8
    crossmae-prep folder /data/flowers ./flowers-wds --split train --shard-samples 5000
    crossmae-prep finalize s3://bucket/imagenet-wds --splits train     (after all array workers)
    crossmae-prep verify s3://bucket/imagenet-wds --splits train,val

Multi-machine: every worker runs the same command with --num-workers M --worker-index I
(defaults from JOB_COMPLETION_INDEX / SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT or
CROSSMAE_NUM_WORKERS); each writes a disjoint set of shards; then one ``finalize``.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipelines import storage

from .plan import workers_from_env
from .ffcv_out import FFCVOptions
from .prep import PrepError, PrepOptions, finalize, prepare_ffcv, prepare_split, verify
from .shards import ImageOptions
from .sources import SourceError, list_image_folder, list_imagenet


def _size(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    t = text.strip().lower().rstrip("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 500MB, 1000000)") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="crossmae-prep", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def shard_args(p):
        p.add_argument("src", help="local source directory")
        p.add_argument("dst", help="destination: local path, file:// or s3://bucket/prefix")
        p.add_argument("--format", choices=["wds", "ffcv"], default="wds",
                       help="wds: WebDataset tars (default); ffcv: one .beton per split (needs the ffcv extra)")
        p.add_argument("--ffcv-write-mode", choices=["raw", "jpg", "smart", "proportion"], default="smart")
        p.add_argument("--ffcv-max-resolution", type=int, default=512, help="longer side stored in .beton")
        p.add_argument("--ffcv-quality", type=int, default=90)
        size = p.add_mutually_exclusive_group()
        size.add_argument("--shard-bytes", type=_size, default=None, help="target shard size (default 1GB)")
        size.add_argument("--shard-samples", type=int, default=None, help="samples per shard")
        p.add_argument("--seed", type=int, default=0, help="global shuffle seed (default 0)")
        p.add_argument("--validate", choices=["header", "decode"], default="header",
                       help="header: parse headers + end marker (fast); decode: decode every pixel")
        p.add_argument("--max-size", type=int, default=None,
                       help="re-encode images whose longer side exceeds this (default: keep original bytes)")
        p.add_argument("--quality", type=int, default=90, help="JPEG quality for --max-size re-encodes")
        p.add_argument("--processes", type=int, default=1, help="parallel processes on this machine")
        p.add_argument("--num-workers", type=int, default=None, help="machines sharing the job")
        p.add_argument("--worker-index", type=int, default=None, help="this machine's index")
        p.add_argument("--summary-json", help="also write the summary here (local path)")

    p = sub.add_parser("imagenet", help="ImageNet: extracted tree or the original archives")
    shard_args(p)
    p.add_argument("--splits", default="train,val", help="comma-separated (default train,val)")
    p = sub.add_parser("folder", help="any labelled image folder: SRC/<class>/*.jpg")
    shard_args(p)
    p.add_argument("--split", default="train", help="split name in the output (default train)")
    for name, what in (("finalize", "assemble manifest.json after all workers finished"),
                       ("verify", "re-read shards and check sizes and hashes against the manifest")):
        p = sub.add_parser(name, help=what)
        p.add_argument("dst")
        p.add_argument("--splits", default="train,val")
    return ap


def _prepare(args) -> dict:
    num_workers, worker_index = workers_from_env(args.num_workers, args.worker_index)
    if not args.shard_bytes and not args.shard_samples:
        args.shard_bytes = 1_000_000_000
    opts = PrepOptions(seed=args.seed, shard_bytes=args.shard_bytes, shard_samples=args.shard_samples,
                       image=ImageOptions(args.validate, args.max_size, args.quality), processes=args.processes,
                       num_workers=num_workers, worker_index=worker_index)
    splits = args.splits.split(",") if args.command == "imagenet" else [args.split]
    results = []
    for split in splits:
        listing = (list_imagenet(args.src, split) if args.command == "imagenet"
                   else list_image_folder(args.src, split))
        if args.format == "ffcv":
            res = prepare_ffcv(listing, args.dst, opts, FFCVOptions(args.ffcv_write_mode, args.ffcv_max_resolution,
                                                                    args.ffcv_quality))
        else:
            res = prepare_split(listing, args.dst, opts)
        results.append(res)
        print(f"{split}: {res.get('written_samples', 0)} samples in {res['written_shards']} new shards "
              f"({res['skipped_shards']} already done), {res.get('converted', 0)} converted, "
              f"{res.get('rejected', 0)} rejected, {res.get('seconds', 0)} s"
              + ("" if num_workers == 1 else f" [worker {worker_index}/{num_workers}: run `crossmae-prep "
                 f"finalize {args.dst} --splits {split}` when all workers are done]"), file=sys.stderr)
    return dict(command=args.command, dst=args.dst, splits=results)


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.command in ("imagenet", "folder"):
        out = _prepare(args)
    elif args.command == "finalize":
        out = dict(splits=[{k: v for k, v in finalize(args.dst, s).items() if k in ("split", "num_samples",
                   "num_shards")} for s in args.splits.split(",")])
    else:
        out = dict(splits=[verify(args.dst, s) for s in args.splits.split(",")])
        for r in out["splits"]:
            print(f"{r['split']}: {r['shards']} shards, {len(r['missing'])} missing, {len(r['corrupt'])} corrupt"
                  + (f" ({', '.join((r['missing'] + r['corrupt'])[:5])})" if not r["ok"] else ""), file=sys.stderr)
        out["ok"] = all(r["ok"] for r in out["splits"])
    if getattr(args, "summary_json", None):
        with open(args.summary_json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        out = run(argv)
    except (SourceError, PrepError, storage.StorageError, OSError, ValueError) as e:
        print(f"crossmae-prep: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("crossmae-prep: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    print(json.dumps(out))
    return 0 if out.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
