"""``crossmae-export``: a run's DeepSpeed checkpoints -> timm-compatible encoders, in batch.

    crossmae-export runs/r1 exports/r1                                   every complete checkpoint
    crossmae-export s3://b/runs/r1 s3://b/exports/r1 --select every:10000 --jobs 4 --full
    crossmae-export runs/r1 exports/r1 --select tags:step00001000,step00002000
    crossmae-export released mae_pretrain_vit_base.pth exports/released  released CrossMAE / MAE .pth

The job itself: pipelines/checkpoints/export.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pipelines import storage
from pipelines.checkpoints.export import ExportError, Job, _url, check_select, export_run, run_jobs
from pipelines.runtime.versions import describe

PROG = "crossmae-export"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


# subcommand -> one-line help; the first ("") is the default, chosen when argv[0] is no subcommand
SUBCOMMANDS = {
    "": "export a run's checkpoints: crossmae-export SOURCE OUT [options]",
    "released": "export a released CrossMAE / MAE .pth: crossmae-export released FILE OUT [options]",
}
EXAMPLES = """examples:
  crossmae-export runs/r1 exports/r1                                   every complete checkpoint
  crossmae-export s3://b/runs/r1 s3://b/exports/r1 --select every:10000 --jobs 4 --full
  crossmae-export runs/r1 exports/r1 --select tags:step00001000,step00002000
  crossmae-export released mae_pretrain_vit_base.pth exports/released

Each export OUT/<name>/ holds model.safetensors (encoder, timm names), config.json (timm),
export.json (provenance, written last) and with --full full.safetensors (encoder + decoder).
Load one in timm: crossmae.timm_export.load_timm(OUT/<name>)."""


def build_parser(subcommand: str = "") -> _Parser:
    """The parser of one subcommand ("" = exporting a run); every argument has a help line."""
    listing = "\n".join(f"  {name or '(none)':<10}{text}" for name, text in SUBCOMMANDS.items())
    usage = "\n       ".join(text.split(": ", 1)[1] for text in SUBCOMMANDS.values())
    what = ("a released CrossMAE / MAE checkpoint -> a timm-compatible encoder export" if subcommand
            else __doc__.splitlines()[0].split(": ", 1)[1])
    ap = _Parser(prog=PROG + (f" {subcommand}" if subcommand else ""), usage=usage,
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                 description=f"{what}\n\nsubcommands:\n{listing}\n  (`{PROG} released --help` for its options)")
    if subcommand == "released":
        ap.add_argument("file", help="released CrossMAE / MAE .pth (local or s3://); read with weights_only, "
                                     "only argparse.Namespace allowed beyond tensors")
        ap.add_argument("out", help="export root: the export goes to OUT/NAME/")
        ap.add_argument("--name", help="export directory name (default: the file name without .pth)")
        ap.add_argument("--preset", help="take head counts from this preset, for widths no preset has "
                                         "(default: the preset of the same width)")
    else:
        ap.add_argument("source", help="run directory (run.output) or checkpoint store (run.store), local or s3://")
        ap.add_argument("out", help="export root: one directory OUT/<tag>/ per checkpoint")
        ap.add_argument("--select", default="all", metavar="SPEC",
                        help="which complete checkpoints: all | latest | every:N (steps divisible by N) | "
                             "tags:TAG,TAG (default all)")
        ap.add_argument("--config", metavar="YAML",
                        help="the run's resolved config.yaml when SOURCE has none (default: SOURCE/config.yaml, "
                             "else the architecture is inferred from the weights)")
        ap.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="checkpoints exported in parallel, one process each (default 1)")
    ap.add_argument("--full", action="store_true", help="also write full.safetensors (encoder + decoder, "
                                                        "library names) for reconstruction demos")
    ap.add_argument("--summary", metavar="URL", help="JSON summary path (default OUT/export-summary.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    released = bool(argv) and argv[0] == "released"
    ap = build_parser("released" if released else "")
    args = ap.parse_args(argv[1:] if released else argv)
    t0 = time.time()
    summary_url = args.summary or storage.join(_url(args.out), "export-summary.json")
    try:
        storage.exists(summary_url)  # an unusable OUT (bad URL, no credentials) fails before any work
        if released:
            name = args.name if args.name is not None else os.path.basename(args.file.rstrip("/")).removesuffix(".pth")
            if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
                raise ExportError(f"--name must be a plain directory name (no '/'), not {name!r}")
            if args.preset:
                from crossmae import model_config

                try:
                    model_config(args.preset)
                except ValueError as e:
                    raise ExportError(f"--preset: {e}") from None
            if not storage.exists(args.file):
                raise ExportError(f"no such file {args.file}")
            results = run_jobs([Job(source=_url(args.file), out=storage.join(_url(args.out), name), tag=name,
                                    full=args.full, preset=args.preset, code_version=describe())])
        else:
            if args.jobs < 1:
                raise ExportError("--jobs must be at least 1")
            check_select(args.select)  # a bad spec fails before any listing
            results = export_run(args.source, args.out, args.select, workers=args.jobs, full=args.full,
                                 config=args.config)
    except (ExportError, OSError, ValueError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a library's own error type (botocore, yaml): one line, no traceback
        print(f"{PROG}: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    counts = {s: sum(r["status"] == s for r in results) for s in ("exported", "skipped", "failed")}
    summary = dict(source=_url(args.file if released else args.source), out=_url(args.out), **counts,
                   seconds=round(time.time() - t0, 2), items=results)
    try:
        storage.write_bytes(summary_url, json.dumps(summary, indent=1).encode())
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: cannot write the summary: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for r in results:
        if r["status"] == "failed":
            print(f"{PROG}: failed {r['tag']}: {r['error']}", file=sys.stderr)
    print(f"{PROG}: exported {counts['exported']}, skipped {counts['skipped']}, failed {counts['failed']} "
          f"-> {summary['out']} ({summary['seconds']} s; summary {summary_url})", file=sys.stderr)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
