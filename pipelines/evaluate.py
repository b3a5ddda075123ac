"""``crossmae-eval``: evaluation jobs over exported encoders, one export or a sweep over a prefix.

    crossmae-eval knn --train T/manifest.json --val V/manifest.json EXPORT_OR_PREFIX
    crossmae-eval linprobe --train ... --val ... EXPORT_OR_PREFIX [--epochs 90 --augment]
    crossmae-eval report PREFIX [--report DIR]         # table (md + csv) and plot over steps: pipelines/eval/report.py
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
import math
import sys

import torch

from pipelines.eval import knn, linprobe
from pipelines.eval.inputs import BAD_EXPORT, UsageError
from pipelines.data.shard_names import ShardNameError
from pipelines.eval.jobs import one_line, run_report, run_sweep

PROG = "crossmae-eval"


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
        try:  # DeepSpeed and the fine-tuning recipe, only when asked for
            from pipelines.eval import finetune
        except ModuleNotFoundError as e:
            if e.name != "pipelines.eval.finetune":
                raise
            print(f"{PROG} finetune: not available (pipelines/eval/finetune.py is missing)", file=sys.stderr)
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
