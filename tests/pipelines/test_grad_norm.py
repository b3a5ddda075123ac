"""grad_norm in metrics.jsonl is the global L2 norm of the step's averaged gradients under every
ZeRO stage: DeepSpeed's own value where its optimizer computes one (ZeRO 1-3), the trainer's under
ZeRO-0 (where DeepSpeed's get_global_grad_norm() is None), and the two agree."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from pipelines.runtime.launch import free_port
from tests.pipelines.test_pretrain import launch, manifest, records  # noqa: F401 (manifest is a fixture)

ROOT = pathlib.Path(__file__).resolve().parents[2]

# One process: the project's engine and TrainStep on fixed images, then the same step redone in
# plain torch (same seed -> same weights, same masking noise, loss / grad_accum per micro-batch).
REPRODUCE = r"""
import json, math, os, sys
import torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from crossmae import MaskedAutoencoder
from pipelines.runtime.config_loader import load
from pipelines.train.config import PretrainConfig
from pipelines.train.step import TrainStep, build_engine, masking_noise

cfg = load(PretrainConfig, None, ["model.preset=crossmae_vit_micro_patch4_dec64d2b", "data.image_size=32",
           "deepspeed.micro_batch=4", "deepspeed.grad_accum=2", f"deepspeed.zero_stage={sys.argv[1]}",
           "optim.lr=1e-3", "deepspeed.precision=fp32"])
cpu = torch.device("cpu")
engine, optimizer, _ = build_engine(cfg, 1, cpu)
initial = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
g = torch.Generator().manual_seed(1)
imgs = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(4)]
step = TrainStep(engine, cfg, cpu, rank=0, world=1)
batches = iter([(dict(key=[str(i)] * 4), x) for i, x in enumerate(imgs)])
results = [step(0, batches), step(1, batches)]

torch.manual_seed(cfg.run.seed)
model = MaskedAutoencoder(cfg.model_config())
same_init = all(torch.equal(model.state_dict()[k], v) for k, v in initial.items())
for micro in range(2):
    noise = masking_noise(cfg.run.seed, 0, micro, 0, 4, 64, cpu)
    (model(imgs[micro], noise).loss / 2).backward()
reference = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
groups = [dict(betas=list(gr["betas"]), weight_decay=gr["weight_decay"]) for gr in optimizer.param_groups]
print(json.dumps(dict(norms=[float(r.grad_norm) for r in results], own=step.own_grad_norm,
                      is_tensor=isinstance(results[0].grad_norm, torch.Tensor),
                      reference=reference, same_init=same_init, groups=groups)))
"""


@pytest.mark.parametrize("stage", [0, 2])
def test_step_grad_norm_equals_a_plain_torch_reproduction(stage):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))
    proc = subprocess.run([sys.executable, "-c", REPRODUCE, str(stage), str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # a shm-op rebuild can take minutes
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["same_init"]
    assert out["own"] is (stage == 0)  # ZeRO-0: the trainer's norm; ZeRO-2: DeepSpeed's
    assert out["is_tensor"]  # a device tensor: no host read in the step
    first, second = out["norms"]
    assert first == pytest.approx(out["reference"], rel=1e-5)
    assert math.isfinite(second) and second > 0 and second != first
    assert all(g["betas"] == [0.9, 0.95] for g in out["groups"])
    assert sorted(g["weight_decay"] for g in out["groups"]) == [0.0, 0.05]


def test_metrics_have_a_real_grad_norm_under_zero_0_and_2(manifest, tmp_path):  # noqa: F811
    """The real trainer (2 processes, the same seed and data): every record's grad_norm is a
    finite positive float that changes across steps, and ZeRO-0's (the trainer's own norm of the
    all-reduced gradients) equals ZeRO-2's (DeepSpeed's norm over its gradient partitions)."""
    runs = {}
    for stage in (0, 2):
        out = tmp_path / f"zero{stage}"
        launch(manifest, out, f"deepspeed.zero_stage={stage}", "run.max_steps=4", "run.save_every=4")
        runs[stage] = records(out)
    for stage, recs in runs.items():
        norms = [r["grad_norm"] for r in recs]
        assert [r["step"] for r in recs] == [1, 2, 3, 4]
        assert all(isinstance(n, float) and math.isfinite(n) and n > 0 for n in norms), (stage, norms)
        assert len(set(norms)) == 4, (stage, norms)
        # the lr of each step: MAE's lr_sched at the fractional epoch (8 steps per epoch, no warm-up)
        for r in recs:
            expected = 2e-3 * 0.5 * (1 + math.cos(math.pi * ((r["step"] - 1) / 8) / 4))
            assert r["lr"] == pytest.approx(expected, rel=1e-9)
    zero0, zero2 = ([r["grad_norm"] for r in runs[s]] for s in (0, 2))
    assert zero0[0] == pytest.approx(zero2[0], rel=1e-4)
    assert zero0 == pytest.approx(zero2, rel=1e-3)
