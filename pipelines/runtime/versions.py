"""What code made a file: ``git describe`` of the checkout (the package version where installed
without one) and the library versions. Written into version.json by the trainer and into
export.json by the exporter, so a result can be traced to its code."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def describe(root: str | None = None) -> str | None:
    """``git describe --always --dirty --tags`` of the checkout; "crossmae-pipeline <version>" when
    installed without a checkout; None when neither is known."""
    from importlib import metadata

    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], check=False,
                                   cwd=root or ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = ""
    if described:
        return described
    try:
        return "crossmae-pipeline " + metadata.version("crossmae-pipeline")
    except metadata.PackageNotFoundError:
        return None


def code_version(root: str | None = None) -> dict:
    """{git, torch, deepspeed, timm, python}: ``git`` is `describe`'s answer."""
    import deepspeed
    import timm
    import torch

    return dict(git=describe(root), torch=torch.__version__, deepspeed=deepspeed.__version__,
                timm=timm.__version__, python=sys.version.split()[0])
