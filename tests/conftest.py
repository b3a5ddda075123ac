import os
import sys

# torch.compile as a no-op in the processes the tests start (model.compile is on for CUDA only,
# so no run here compiles), because DeepSpeed's ZeRO check imports its Muon optimizer, whose
# @torch.compile decorators load TorchInductor at every start: a 3-step micro run measured 11.3-12.9 s of CPU with this vs 16.0-17.1 s without (2026-12-02,
# same loss; its 3 steps also ran 35 vs 7 img/s). The demo test runs without it, as users do, and
# a run that asks for model.compile under it says that it will not compile (train/step.py).
# The test that does compile (crossmae/test_decoder_fast.py) switches dynamo back on for itself.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

# One `ninja` for every process: the venv's (pip) and Debian's take turns rebuilding DeepSpeed's
# CPU comm op in the shared TORCH_EXTENSIONS_DIR (30-45 s each time) when PATHs differ.
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

# The real S3 server (SeaweedFS) fixtures: s3_server, s3_env, s3_bucket.
pytest_plugins = ["tests.s3_server"]

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A fixed batch of structured images (gradients, stripes, blobs): learnable, not noise."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = []
    for _ in range(n):
        f = torch.rand(3, 3, generator=g) * 4 + 1
        phase = torch.rand(3, generator=g) * 6.28
        cx, cy = (torch.rand(2, generator=g) - 0.5).tolist()
        blob = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) * 8)
        chans = [torch.sin(f[c, 0] * xs + f[c, 1] * ys + phase[c]) * 0.5 + blob * f[c, 2] / 5 for c in range(3)]
        imgs.append(torch.stack(chans))
    return torch.stack(imgs)
