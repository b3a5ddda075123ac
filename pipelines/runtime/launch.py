"""Joining the job: a plain process becomes a world of one, a launched rank joins its launcher's process group
(gloo on CPU, NCCL on GPU) with the run's collective timeout, dies with its launcher, and starts the
heartbeat watchdog (pipelines/runtime/watchdog.py). Used by every entry that trains: pretrain and finetune."""
from __future__ import annotations

import os
import socket
import sys

import torch

from pipelines.runtime import distributed, watchdog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(on_gpu: bool, run=None) -> tuple[int, int]:
    """(rank, world size); a plain process becomes a world of one. ``run`` (a RunSection; None or
    a section without them: RunSection's defaults) sets the collective and heartbeat timeouts;
    a launched rank also dies with its launcher (pipelines/runtime/watchdog.py)."""
    import atexit

    import deepspeed

    collective_s = float(getattr(run, "collective_timeout_s", watchdog.COLLECTIVE_TIMEOUT_S))
    heartbeat_s = float(getattr(run, "heartbeat_timeout_s", watchdog.HEARTBEAT_TIMEOUT_S))
    watchdog.check_timeouts(collective_s, heartbeat_s)
    if "RANK" not in os.environ:  # a plain process: a world of one
        watchdog.plain_process = True  # RANK below is ours: a later call in this process is no launched rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    elif not watchdog.plain_process:
        watchdog.die_with_launcher()
    if on_gpu:  # before the process group: NCCL binds each rank's communicator to its device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        warning = watchdog.nccl_error_handling()
        if warning and os.environ["RANK"] == "0":
            print(f"{watchdog.program_name()}: warning: {warning}", file=sys.stderr)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                               timeout=watchdog.collective_timeout(collective_s))
    distributed.install_device_check_from_env()  # tests: CROSSMAE_CHECK_COLLECTIVES=meta
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dog = watchdog.start(rank, world, heartbeat_s, watchdog.program_name())
    if dog is not None:
        atexit.register(dog.stop)  # a clean exit (also 143 after a stop signal) is not a lost rank
    return rank, world
