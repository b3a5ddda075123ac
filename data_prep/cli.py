"""``crossmae-prep``: image sets -> globally shuffled WebDataset shards + manifest.

    crossmae-prep imagenet /data/imagenet s3://bucket/imagenet-wds --splits train,val --processes 8
    crossmae-prep folder /data/flowers ./flowers-wds --split train --shard-samples 5000
    crossmae-prep finalize s3://bucket/imagenet-wds --splits train     (after all array workers)
    crossmae-prep verify s3://bucket/imagenet-wds          (every split found; --splits: these, each must exist)
    crossmae-prep loader-stats s3://bucket/imagenet-wds/train/manifest.json --world 64 --ranks-per-node 8 --batch 256

Options are checked before anything is read or written (one stderr line, exit 2): sizes and
counts > 0, qualities 1..100, split names plain (no paths), the destination outside the source.
A destination another crossmae-prep is writing to, or a manifest naming a shard outside its
folder, is exit 2 too; an error of the OS, the network or a library is one line naming the file
or URL and the cause (exit 1).

Multi-machine: every worker runs the same command with --num-workers M --worker-index I
(defaults from JOB_COMPLETION_INDEX / SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT or
CROSSMAE_NUM_WORKERS); each writes a disjoint set of shards; then one ``finalize``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
import traceback
import urllib.parse

from pipelines.data import crop_decode
from pipelines.data.shard_names import ShardNameError

from .errors import PrepError, UsageError, describe
from .ffcv_out import FFCVOptions
from .lock import DestinationLock
from .plan import workers_from_env
from .prep import PrepOptions, finalize, prepare_ffcv, prepare_split, prepared_splits, verify
from .shards import ImageOptions
from .sources import SourceError, list_image_folder, list_imagenet


def _size(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    t = text.strip().lower().rstrip("b")
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 500MB, 1000000)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text!r}")
    return n


def _int_in(lo: int, hi: int | None = None):
    """argparse type: an integer in [lo, hi] (hi None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"must be {f'{lo}..{hi}' if hi is not None else f'>= {lo}'}, not {n}")
        return n
    return parse


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _split_name(text: str) -> str:
    """A split is a folder and a shard-name prefix under DST: a plain name, never a path
    ('../escape' would write escape-000000.tar outside the destination)."""
    if not _PLAIN_NAME.fullmatch(text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"split name {text!r} is not a plain name (letters, digits, - _ .)")
    return text


def _split_list(text: str) -> list[str]:
    names = [_split_name(s) for s in text.split(",")]
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a split is named twice in {text!r}")
    return names


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="crossmae-prep", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def shard_args(p):
        p.add_argument("src", help="local source directory")
        p.add_argument("dst", help="destination: local path, file:// or s3://bucket/prefix (not inside SRC)")
        p.add_argument("--format", choices=["wds", "ffcv"], default="wds",
                       help="wds: WebDataset tars (default); ffcv: one .beton per split (needs the ffcv extra)")
        p.add_argument("--ffcv-write-mode", choices=["raw", "jpg", "smart", "proportion"], default="smart",
                       help="FFCV's RGBImageField write_mode (default smart)")
        p.add_argument("--ffcv-max-resolution", type=_int_in(1), default=512,
                       help="longer side stored in the .beton (default 512)")
        p.add_argument("--ffcv-quality", type=_int_in(1, 100), default=90,
                       help="JPEG quality 1..100 of the .beton's compressed images (default 90)")
        size = p.add_mutually_exclusive_group()
        size.add_argument("--shard-bytes", type=_size, default=None, help="target shard size (default 1GB)")
        size.add_argument("--shard-samples", type=_int_in(1), default=None, help="samples per shard")
        p.add_argument("--seed", type=_int_in(0), default=0, help="global shuffle seed, >= 0 (default 0)")
        p.add_argument("--validate", choices=["header", "decode"], default="header",
                       help="header: parse headers + end marker (fast); decode: decode every pixel")
        p.add_argument("--max-size", type=_int_in(1), default=None,
                       help="re-encode images whose longer side exceeds this (default: keep original bytes; wds only)")
        p.add_argument("--quality", type=_int_in(1, 100), default=90,
                       help="JPEG quality 1..100 for --max-size re-encodes (default 90)")
        p.add_argument("--sample-index-every", type=_int_in(0), default=64,
                       help="the manifest's sample index: the byte offset of every N-th sample of each shard, "
                            "so a streaming reader starting mid-shard reads from there (default 64; 0: none)")
        p.add_argument("--jpeg-restarts", action="store_true",
                       help="rewrite each JPEG losslessly (same DCT coefficients, same pixels; optimized Huffman "
                            "tables, metadata kept) with restart markers every ~32 px of each MCU row, so the "
                            "loader decodes only the crop's cells (~4 ms CPU per image here; see README)")
        p.add_argument("--processes", type=_int_in(1), default=1, help="parallel processes on this machine")
        p.add_argument("--num-workers", type=_int_in(1), default=None,
                       help="machines sharing the job (default: from the environment, else 1)")
        p.add_argument("--worker-index", type=_int_in(0), default=None,
                       help="this machine's index 0..num-workers-1 (default: from the environment, else 0)")
        p.add_argument("--summary-json", help="also write the summary here (local path)")
        p.add_argument("--follow-links", action="store_true",
                       help="read symbolic links that stay inside the source, each file once (default: links are "
                            "not followed, only counted and named)")

    p = sub.add_parser("imagenet", help="ImageNet: extracted tree or the original archives")
    shard_args(p)
    p.add_argument("--splits", type=_split_list, default="train,val",
                   help="comma-separated, of train and val (default train,val)")
    p = sub.add_parser("folder", help="any labelled image folder: SRC/<class>/*.jpg")
    shard_args(p)
    p.add_argument("--split", type=_split_name, default="train", help="split name in the output (default train)")
    for name, what, splits in (
            ("finalize", "assemble manifest.json after all workers finished", "every split with a _plan.json"),
            ("verify", "re-read shards and check sizes and hashes against the manifest",
             "every split with a manifest.json or _plan.json")):
        p = sub.add_parser(name, help=what)
        p.add_argument("dst", help="the destination the shards were written to")
        p.add_argument("--splits", type=_split_list, default=None,
                       help=f"comma-separated; each must exist (default: {splits} under DST)")
    p = sub.add_parser("loader-stats", help="what a run will read from the store and how its batches mix shards "
                                            "(pipelines/data/read_plan.py), before the run")
    p.add_argument("manifest", help="a WebDataset manifest.json (local, file:// or s3://)")
    for flag, default, what in (("--world", 1, "ranks (default 1)"), ("--workers", 8, "loader workers per rank "
                                "(data.num_workers; default 8)"), ("--batch", 64, "deepspeed.micro_batch (default 64)"),
                                ("--block-size", 512, "data.block_size (default 512)"),
                                ("--ranks-per-node", None, "ranks sharing one node's shard cache (default: --world)"),
                                ("--epochs", 3, "epochs the cache row spans (default 3)"),
                                ("--seed", 0, "run.seed (default 0)")):
        p.add_argument(flag, type=_int_in(0 if flag == "--seed" else 1), default=default, help=what)
    p.add_argument("--access", choices=("stream", "random"), default="stream",
                   help="data.access (default stream; random: one permutation per epoch, read through the cache)")
    return ap


def _local_path(url: str) -> str | None:
    if url.startswith("s3://"):
        return None
    return urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it, after resolving links (either may not exist yet)."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([p, f]) == f


def _door_problem(args) -> str | None:
    """What is wrong with the arguments, found before anything is read or written (exit 2)."""
    if args.command not in ("imagenet", "folder"):
        return None
    args.num_workers, args.worker_index = workers_from_env(args.num_workers, args.worker_index)
    if not 0 <= args.worker_index < args.num_workers:
        return (f"argument --worker-index: worker index {args.worker_index} is outside 0..{args.num_workers - 1} "
                "(from --worker-index, JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID)")
    args.splits = args.splits if args.command == "imagenet" else [args.split]
    if args.command == "imagenet" and set(args.splits) - {"train", "val"}:
        return f"argument --splits: ImageNet splits are train and val, not {','.join(args.splits)}"
    if args.format == "ffcv" and args.max_size:
        return "argument --max-size: re-encodes WebDataset samples only; with --format ffcv use --ffcv-max-resolution"
    if args.format == "ffcv" and args.jpeg_restarts:
        return "argument --jpeg-restarts: rewrites WebDataset samples only; FFCV stores its own re-encoded images"
    if args.jpeg_restarts and crop_decode.EXTENSION_ERROR is not None:
        return (f"argument --jpeg-restarts: needs the C extension pipelines.data._crop_decode, which is not built "
                f"({crop_decode.EXTENSION_ERROR}); reinstall where libjpeg62-turbo-dev is installed")
    if args.format == "ffcv" and args.num_workers > 1:
        return "argument --num-workers: FFCV output is one file per split; use --processes, not several workers"
    if args.summary_json and not os.path.isdir(os.path.dirname(os.path.abspath(args.summary_json))):
        return f"argument --summary-json: no folder for {args.summary_json} (it is written after the run)"
    dst = _local_path(args.dst)
    if dst is not None and _inside(dst, args.src):
        return (f"the destination {args.dst} is inside the source {args.src}: the next run would read its output "
                "as input (a new class); choose a destination outside the source")
    for split in args.splits if dst is not None else ():
        if _inside(args.src, os.path.join(dst, split)):
            return (f"the source {args.src} is inside the output folder {os.path.join(dst, split)} that this run "
                    "writes (and that is deleted to start over); move the source or choose another destination")
    return None


def _warn_listing(listing, args) -> None:
    """Listing-time findings a user must see before the shards are written: links left out and
    classes without an image (worker 0 only: every worker lists the same source)."""
    d, split = listing.description, listing.split
    if args.worker_index != 0:
        return
    if d["num_ignored_links"]:
        links = d["ignored_links"]
        named = ", ".join(f"{r['path']} -> {r['target']} ({r['reason']})" for r in links[:3])
        more = f" and {d['num_ignored_links'] - 3} more" if d["num_ignored_links"] > 3 else ""
        print(f"crossmae-prep: warning: {split}: {d['num_ignored_links']} link(s) left out: {named}{more} "
              f"(all in manifest.json source.ignored_links"
              + ("" if args.follow_links else "; --follow-links reads links that stay inside the source") + ")",
              file=sys.stderr)
    if d["empty_classes"]:
        index = {c: i for i, c in enumerate(listing.classes)}
        named = ", ".join(f"{c!r} (index {index[c]})" for c in d["empty_classes"][:5])
        more = f" and {len(d['empty_classes']) - 5} more" if len(d["empty_classes"]) > 5 else ""
        print(f"crossmae-prep: warning: {split}: {len(d['empty_classes'])} class(es) without a usable image: "
              f"{named}{more}; kept in the class map, so every class keeps the index of its sorted name "
              "(all in manifest.json source.empty_classes)", file=sys.stderr)


def _restarts_said(r: dict | None) -> str:
    """--jpeg-restarts' part of the summary line: how many have restart markers, which kept their
    original bytes and why (those decode as before: the whole JPEG's Huffman pass)."""
    if not r:
        return ""
    kept = sum(r["kept"].values())
    ratio = f"{r['bytes_after'] / r['bytes_before']:.3f}x the bytes" if r["bytes_before"] else "no bytes"
    return (f", {r['transcoded']} with restart markers ({ratio})"
            + (f", {kept} kept without them ({', '.join(f'{k} {n}' for k, n in r['kept'].items())})" if kept else ""))


def _say(split: str, res: dict, args) -> None:
    """The split's one summary line on stderr: everything written, skipped, changed or left out."""
    if res.get("complete") and not res["written_shards"]:
        line = f"{split}: already complete ({res['skipped_shards']} shards), nothing written"
    else:
        line = (f"{split}: {res.get('written_samples', 0)} samples in {res['written_shards']} new shards "
                f"({res['skipped_shards']} already done), {res.get('converted', 0)} converted"
                + (f", {res.get('resized', 0)} resized" if args.max_size else "")
                + f", {res.get('rejected', 0)} rejected" + (" (listed in manifest.json)" if res.get("rejected") else "")
                + _restarts_said(res.get("restarts"))
                + f", {res.get('seconds', 0)} s")
    if res.get("ignored"):
        line += (f"; {res['ignored']} ignored (not images, hidden or links: "
                 f"{', '.join(res['ignored_examples'][:3])}{', ...' if res['ignored'] > 3 else ''})")
    if args.num_workers > 1:
        line += (f" [worker {args.worker_index}/{args.num_workers}"
                 + ("" if args.worker_index == 0 else "; listing rejects and ignored files: see worker 0")
                 + f": run `crossmae-prep finalize {args.dst} --splits {split}` when all workers are done]")
    print(line, file=sys.stderr)


def _prepare(args) -> dict:
    opts = PrepOptions(seed=args.seed, shard_bytes=args.shard_bytes or (None if args.shard_samples else 1_000_000_000),
                       shard_samples=args.shard_samples, image=ImageOptions(args.validate, args.max_size, args.quality,
                                                                              args.jpeg_restarts),
                       processes=args.processes, num_workers=args.num_workers, worker_index=args.worker_index,
                       sample_index_every=args.sample_index_every)
    results = []
    for split in args.splits:
        listing = (list_imagenet(args.src, split, args.follow_links) if args.command == "imagenet"
                   else list_image_folder(args.src, split, follow_links=args.follow_links))
        _warn_listing(listing, args)
        if args.format == "ffcv":
            res = prepare_ffcv(listing, args.dst, opts, FFCVOptions(args.ffcv_write_mode, args.ffcv_max_resolution,
                                                                    args.ffcv_quality))
        else:
            res = prepare_split(listing, args.dst, opts)
        first = args.worker_index == 0  # listing-time findings: counted once, by worker 0
        res.update(ignored=listing.description["ignored_files"] if first else 0,
                   ignored_examples=listing.description["ignored_examples"] if first else [])
        results.append(res)
        _say(split, res, args)
    return dict(command=args.command, dst=args.dst, splits=results)


def _verify(args) -> dict:
    """Verify the asked-for splits (each must exist), else every split found under DST."""
    splits, unfinished = args.splits, []
    if splits is None:
        found = prepared_splits(args.dst)
        splits = [s for s, names in found.items() if "manifest.json" in names]
        unfinished = [s for s, names in found.items() if "manifest.json" not in names]
        if not found:
            raise PrepError(f"nothing prepared under {args.dst}: no {{split}}/manifest.json or _plan.json")
    out = [verify(args.dst, s) for s in splits]
    for r in out:
        print(f"{r['split']}: {r['shards']} shards, {len(r['missing'])} missing, {len(r['corrupt'])} corrupt"
              + (f", {len(r['bad_index'])} with a sample_index that does not match their samples (`crossmae-prep "
                 f"finalize {args.dst} --splits {r['split']}` rewrites the manifest from the part records)"
                 if r["bad_index"] else "")
              + (f" ({', '.join((r['missing'] + r['corrupt'] + r['bad_index'])[:5])})" if not r["ok"] else ""),
              file=sys.stderr)
    for s in unfinished:
        print(f"{s}: unfinished: _plan.json but no manifest.json (run the missing workers, then "
              f"`crossmae-prep finalize {args.dst} --splits {s}`)", file=sys.stderr)
        out.append(dict(split=s, unfinished=True, shards=0, missing=[], corrupt=[], bad_index=[], ok=False))
    return dict(splits=sorted(out, key=lambda r: r["split"]), ok=all(r["ok"] for r in out))


def _loader_stats(args) -> dict:
    """A manifest's expectations for one run shape, as lines on stderr (and the JSON on stdout)."""
    from pipelines.data.read_plan import expected_reads
    from pipelines.data.shard_cache import ShardList

    if not args.manifest.endswith(".json"):
        raise UsageError(f"{args.manifest}: not a manifest (loader-stats reads a crossmae-prep manifest.json)")
    shards = ShardList.from_manifest(args.manifest)
    try:
        r = expected_reads(shards, args.world, args.workers, args.batch, args.block_size, args.ranks_per_node,
                           args.epochs, args.seed, args.access)
    except ValueError as e:  # a batch larger than a rank's share
        raise UsageError(str(e)) from None
    gib, size = 2 ** 30, r["dataset_bytes"]
    none, cache, mix = r["no_cache"], r["cache"], r["shards_per_batch"]
    for line in (
            f"{args.manifest}: {r['shards']} shards, {r['samples']} samples, "
            + (f"{size / gib:.2f} GiB" if size is not None else "shard bytes unknown (the ratios count samples)"),
            f"run: {r['world']} rank(s), {r['workers']} worker(s) each, batch {r['batch']}, "
            + (f"block {r['block_size']} samples ({r['block_shards']} shards' worth)" if none is not None else
               "access random (one permutation of the epoch)")
            + f"; {r['nodes']} node(s) of {r['ranks_per_node']} rank(s)",
            f"store reads per epoch, no shard cache: {none['gets_per_epoch']} GETs, "
            f"{none['bytes_per_dataset_per_epoch']:.3f}x the dataset (all nodes; "
            + (f"readers start mid-shard at the manifest's sample index, every {r['sample_index_every']} samples)"
               if r["sample_index_every"] else "no sample index in the manifest: a reader starting mid-shard "
               "streams it from its start; re-run crossmae-prep to write one)")
            if none is not None else
            "store reads without a shard cache: none allowed (access random reads remote shards through the cache "
            "only; local shards are read in place)",
            f"store reads with a shard cache that holds the data: {cache['gets_per_node']} GETs, "
            f"{cache['bytes_per_dataset_per_node']:.3f}x the dataset per node over {r['epochs']} epoch(s) "
            "(never over 1x)",
            f"shuffle: {mix['mean']:.2f} shards per batch on rank 0 (min {mix['min']}, max {mix['max']}); "
            + (f"a batch is a run of the epoch order, whose blocks of {r['block_size']} samples are each shuffled"
               if none is not None else "every batch is drawn from the whole epoch"),
            _decode_line(shards.restarts)):
        print(f"crossmae-prep: loader-stats: {line}", file=sys.stderr)
    r["jpeg_restarts"] = None if shards.restarts is None else dict(zip(("transcoded", "kept"), shards.restarts))
    return r


def _decode_line(restarts: tuple[int, int] | None) -> str:
    """loader-stats' line on what the workers' crops decode."""
    if restarts is None:
        return ("decode: each crop's rows and MCU columns; the Huffman pass reads every row above it "
                "(prep with --jpeg-restarts to decode only the crop's restart cells)")
    done, kept = restarts
    return (f"decode: {done} samples carry restart markers (--jpeg-restarts): a crop decodes only its cells"
            + (f"; {kept} kept without them decode as before" if kept else ""))


def _finalize(args) -> dict:
    splits = args.splits
    if splits is None:
        splits = [s for s, names in prepared_splits(args.dst).items() if "_plan.json" in names]
        if not splits:
            raise PrepError(f"nothing prepared under {args.dst}: no {{split}}/_plan.json")
    return dict(splits=[{k: v for k, v in finalize(args.dst, s).items() if k in ("split", "num_samples", "num_shards")}
                        for s in splits])


def run(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _door_problem(args)
    if problem:
        parser.error(problem)
    if args.command == "verify":  # reads only: no lock
        return _verify(args)
    if args.command == "loader-stats":
        return _loader_stats(args)
    writes = args.command in ("imagenet", "folder")
    lock = DestinationLock(args.dst, "write" if writes else "finalize", args.splits,
                           getattr(args, "num_workers", 1), getattr(args, "worker_index", 0), args.command)
    with lock:  # held to the end, the summary file included
        out = _prepare(args) if writes else _finalize(args)
        if getattr(args, "summary_json", None):
            try:
                with open(args.summary_json, "w") as f:
                    json.dump(out, f, indent=1)
            except OSError as e:
                raise PrepError(describe(e, args.summary_json)) from None
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        out = run(argv)
    except (UsageError, ShardNameError) as e:  # a busy destination, a manifest naming a shard outside its folder
        print(f"crossmae-prep: error: {e}", file=sys.stderr)
        return 2
    except (SourceError, PrepError, OSError, ValueError, MemoryError, EOFError, ImportError, tarfile.TarError) as e:
        print(f"crossmae-prep: error: {describe(e)}", file=sys.stderr)  # the OS's, the network's, a library's
        return 1
    except KeyboardInterrupt:
        print("crossmae-prep: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: the traceback, then the error as the last line
        traceback.print_exc()
        print(f"crossmae-prep: error: internal error {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0 if out.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
