"""``crossmae-pretrain``: DeepSpeed pretraining of CrossMAE / MAE.

    deepspeed --num_gpus 8 --module pipelines.pretrain --config run.yaml data.train=s3://b/in1k/train/manifest.json
    torchrun --nproc_per_node 2 -m pipelines.pretrain --config run.yaml deepspeed.zero_stage=3
    crossmae-pretrain --config run.yaml run.max_steps=100          (one plain process)

Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from the launcher (``--local_rank`` is
accepted and ignored). ``run.output`` is a local directory that belongs to one run: rank 0 locks
it (run.lock; and ``run.store``) before writing anything (pipelines/storage/run_lock.py), then writes
run.json (the run's id), config.yaml (resolved), deepspeed.json, metrics.jsonl, and
checkpoints/<tag>/ (DeepSpeed checkpoints whose client state holds the loader position, step,
samples seen and run id). ``--resume auto`` continues from the newest complete checkpoint with
exactly the samples not yet seen, after checking that the checkpoint's model and data settings
and run id are the ones asked for; ``--resume none`` starts a new run, refused where one already
is unless ``--move-old-run`` moves it into previous-<UTC time>/ (pipelines/checkpoints/run_checks.py).

The run itself is a `Trainer` (pipelines/trainer.py); its components: pipelines/train/step.py (one optimizer step, shared with the GPU benchmark),
pipelines/checkpoints/checkpointer.py (save / resume / store mirror), pipelines/train/metrics.py (metrics),
pipelines/runtime/distributed.py (every collective), the loader factory (pipelines/data/factory.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

from pipelines import storage
from pipelines.checkpoints.run_checks import RunDirError, check_run_paths, claim_run_directory, describe_os_error
from pipelines.checkpoints.store import complete_tags
from pipelines.runtime import config_loader
from pipelines.runtime.launch import init_distributed
from pipelines.storage import run_lock
from pipelines.train.config import PretrainConfig
from pipelines.train.metrics import DataLossError
from pipelines.train.step import NonFiniteLoss
from pipelines.trainer import StopRequest, Trainer


def train(cfg: PretrainConfig, resume: str = "auto", move_old_run: bool = False) -> dict:
    """Join the job, lock and claim the run directory, then run a `Trainer` (pipelines/trainer.py)."""
    on_gpu = torch.cuda.is_available()
    rank, world = init_distributed(on_gpu, cfg.run)
    stop, lock = StopRequest(), None
    try:
        lock = run_lock.lock_run(cfg.run, rank, describe_os_error)  # before anything is written (rank 0)
        claim_run_directory(cfg, resume, move_old_run, rank)  # --resume none never lands on another run
        return Trainer(cfg, resume, stop, on_gpu, rank, world).train()
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="crossmae-pretrain", description="DeepSpeed pretraining of CrossMAE / MAE")
    ap.add_argument("--config", help="YAML config (sections: model, data, optim, deepspeed, run)")
    ap.add_argument("--resume", default="auto", choices=["auto", "none"],
                    help="auto: continue from the newest complete checkpoint (local or in run.store); none: start a "
                         "new run (refused where run.output or run.store holds a run's checkpoints)")
    ap.add_argument("--move-old-run", action="store_true",
                    help="with --resume none: first move the run in run.output into run.output/previous-<UTC time>/")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.blr=1e-4")
    args = ap.parse_args(argv)
    try:
        cfg = config_loader.load(PretrainConfig, args.config, args.overrides)
        if not cfg.data.train:
            raise config_loader.ConfigError("data.train is not set (a manifest URL or shard pattern)")
        cfg.validate()
        check_run_paths(cfg.run)  # a URL, a file or a read-only place as run.output: before DeepSpeed starts
        if args.move_old_run and args.resume != "none":
            raise config_loader.ConfigError("--move-old-run goes with --resume none (it starts a new run)")
        if cfg.data.train.endswith(".json") and not storage.exists(cfg.data.train):  # fail before DeepSpeed starts
            raise config_loader.ConfigError(f"data.train: no such manifest {cfg.data.train}")
    except (config_loader.ConfigError, storage.StorageError) as e:
        print(f"crossmae-pretrain: error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, args.resume, args.move_old_run)
    except NonFiniteLoss as e:
        print(f"crossmae-pretrain: error: {e}; last checkpoint: {(complete_tags(cfg.run.output) or ['none'])[-1]}",
              file=sys.stderr)
        return 3
    except (config_loader.ConfigError, storage.StorageError, ValueError, DataLossError, run_lock.RunLockError,
            RunDirError) as e:
        print(f"crossmae-pretrain: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission, a file in the way: the file and the cause, no traceback
        print(f"crossmae-pretrain: error: {describe_os_error(e, cfg.run.output)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crossmae-pretrain: interrupted (Ctrl-C) before training or a second time: stopped at once, nothing "
              f"more saved; newest checkpoint: {(complete_tags(cfg.run.output) or ['none'])[-1]}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or a device failure: the traceback, then the error as the last line
        traceback.print_exc()
        print(f"crossmae-pretrain: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if result["stopped_by_signal"]:
        name = {"SIGINT": " (SIGINT, Ctrl-C)", None: ""}.get(result["signal"], f" ({result['signal']})")
        print(f"crossmae-pretrain: stopped by a signal at step {result['step']}{name} after saving a checkpoint; "
              "run again with --resume auto to continue", file=sys.stderr)
        return 130 if result["signal"] == "SIGINT" else 143
    if result["upload_failures"]:
        print(f"crossmae-pretrain: error: {result['upload_failures']} checkpoint(s) were not mirrored to "
              f"{cfg.run.store} (local copies kept in {cfg.run.output}/checkpoints)", file=sys.stderr)
        return 1
    return 0


def _exit(code: int) -> None:
    """Leave at once on failure: leftover loader workers or a dead peer's collective must not keep
    a crashed trainer alive (the last line stays the real error)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code not in (0, 130, 143):
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
