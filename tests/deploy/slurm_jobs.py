"""What the Slurm tests share: the environment a user's shell would export before sbatch, the
CPU sizes given on the sbatch command line, the training overrides, and readers of the jobs'
outputs (Slurm states, output files, the trainer's per-step sample keys)."""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
SLURM = ROOT / "deploy/slurm"
BIN = pathlib.Path(sys.executable).parent
TRAIN_IMAGES, VAL_IMAGES = 3 * 32, 3 * 4  # 3 classes (tests/data_prep/fixtures.py)
# The sbatch lines of the scripts ask for GPUs, 8-64 CPUs and GBs of memory; these nodes have 1 CPU.
CPU = ["--cpus-per-task=1", "--mem=0"]
PRETRAIN_CPU = [*CPU, "--gpus-per-node=0"]
EXPORT_CPU = [*CPU, "--gpus=0"]
TIMINGS: dict[str, float] = {}  # phase -> seconds, printed after the session (deploy/README.md)


def job_env(slurm_s3: dict, **extra) -> dict:
    """What a user's shell exports before sbatch (--export=ALL is sbatch's default)."""
    return dict(os.environ, **slurm_s3, PATH=f"{BIN}:{os.environ['PATH']}", CROSSMAE_ROOT=str(ROOT),
                CROSSMAE_VENV=sys.prefix, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")),
                **extra)


def output(work: pathlib.Path, name: str) -> str:
    path = work / name
    assert path.exists(), f"no job output {path}; there: {sorted(p.name for p in work.glob('*.out'))}"
    return path.read_text(errors="replace")


def finished_ok(task: dict) -> bool:
    return task["JobState"] == "COMPLETED" and task["ExitCode"] == "0:0"


TRAIN = ("model.preset=crossmae_vit_micro_patch4_dec64d2b", "data.image_size=32", "data.num_workers=1",
         "deepspeed.micro_batch=8", "optim.lr=1e-3", "optim.warmup_epochs=0", "optim.epochs=20", "run.log_every=1",
         "run.log_keys=true", "run.recon_every=0", "run.tensorboard=false")

MAX_STEPS, SAVE_EVERY = 60, 20
RUN = (f"run.max_steps={MAX_STEPS}", f"run.save_every={SAVE_EVERY}")


def store_url(dataset, name: str) -> str:
    return dataset["dst"].rsplit("/", 1)[0] + f"/runs/{name}"


def train_args(dataset, work: pathlib.Path, name: str, *overrides: str) -> list[str]:
    return [f"data.train={dataset['dst']}/train/manifest.json", f"run.output={work / name}",
            f"run.store={store_url(dataset, name)}", *TRAIN, *overrides]


def use_store(env: dict, monkeypatch) -> None:
    """This process reads the bucket as the jobs do."""
    for key, value in env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)


def submit_pretrain(cluster, dataset, work, name: str, *overrides: str, nodes: int = 2) -> str:
    return cluster.sbatch([f"--nodes={nodes}", *PRETRAIN_CPU, str(SLURM / "pretrain.sbatch"),
                           *train_args(dataset, work, name, *overrides)], env=dataset["env"], cwd=work)


def key_records(out: pathlib.Path, rank: int) -> list[dict]:
    path = out / f"keys-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged_steps(out: pathlib.Path) -> int:
    path = out / "keys-rank0.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def keys_by_step(out: pathlib.Path, world: int = 2) -> dict[int, list[list[str]]]:
    """step -> each rank's keys; every step logged once per rank (nothing recomputed)."""
    steps: dict[int, list] = {}
    for rank in range(world):
        recs = key_records(out, rank)
        assert len({r["step"] for r in recs}) == len(recs), f"rank {rank} logged a step twice: recomputed"
        for r in recs:
            steps.setdefault(r["step"], [None] * world)[rank] = r["keys"]
    return steps


def wait_for(what: str, ok, timeout: float, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ok()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")

