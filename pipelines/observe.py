"""Rank 0's view of a run: progress bar, metrics.jsonl, TensorBoard, reconstruction PNGs,
and the facts written next to them (code version, peak memory, model FLOPs utilisation)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import numpy as np
import torch

# Dense bf16 tensor-core peaks per device (vendor datasheets, SXM parts; no sparsity).
# MFU is reported against these; set run.peak_tflops for other parts or precisions.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                    "B200": 2250.0, "GH200": 989.0}


def peak_tflops(override: float | None = None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def code_version(root: str | None = None) -> dict:
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    try:
        out["git"] = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    import deepspeed
    import timm

    out.update(torch=torch.__version__, deepspeed=deepspeed.__version__, timm=timm.__version__,
               python=sys.version.split()[0])
    return out


def write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


class Observer:
    """Everything rank 0 reports. Other ranks get an Observer that does nothing."""

    def __init__(self, out: str, enabled: bool, total: int, initial: int, tensorboard: bool = True):
        self.out, self.enabled = out, enabled
        self.metrics = self.tb = self.bar = None
        if not enabled:
            return
        self.metrics = open(os.path.join(out, "metrics.jsonl"), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=initial or None)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)

    def step(self, n: int = 1, **postfix) -> None:
        if self.bar:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items() if v is not None}, refresh=False)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
            self.tb.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar else lambda t: print(t, file=sys.stderr))(text)

    def recon(self, step: int, grid: torch.Tensor) -> str | None:
        if not self.enabled:
            return None
        path = os.path.join(self.out, "recon", f"step{step:08d}.png")
        write_png(path, grid.numpy())
        if self.tb:
            self.tb.add_image("recon", grid.numpy(), step, dataformats="HWC")
            self.tb.flush()
        return path

    def close(self) -> None:
        for h in (self.bar, self.tb, self.metrics):
            if h:
                h.close()
