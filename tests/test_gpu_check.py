"""`make gpu-check` (benchmarks/gpu_check.py) in its CPU mode: the summary names every stage with
its rc and seconds, a failed or over-time stage is recorded and the next one still runs, the
time box kills a stage's whole process tree (torchrun's workers live in their own sessions), and
the offline install adds what is missing without touching torch. The slow stages (DeepSpeed
pretraining, the throughput benchmark) run here only until their time box; `make gpu-check
GPU_CHECK_SMOKE=1` runs all of them."""
import json
import os
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_check import STAGES  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))


def gpu_check(tmp_path, *args, timeout=300):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(out), "--work", str(work),
                           *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    summary = json.loads((out / "gpu_check.json").read_text())
    return proc, summary, out


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd[:200]}")
    return found


def test_summary_names_every_stage_with_rc_and_seconds(tmp_path):
    proc, summary, out = gpu_check(tmp_path, "--stages", "images,loader_rate,loader_rate_restarts,loader_rate_gpu_decode")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = summary["stages"]
    assert list(stages) == list(STAGES) and summary["ok"] is True and summary["mode"] == "cpu"
    assert all({"status", "rc", "seconds"} <= set(r) for r in stages.values())
    assert stages["images"]["status"] == "ok" and stages["images"]["result"]["images"] == 256
    rate = stages["loader_rate"]
    assert rate["status"] == "ok" and rate["rc"] == 0 and rate["seconds"] > 0
    assert set(rate["result"]["modes"]) == {"resize=cpu", "resize=device"}
    assert all(m["images_per_s"] > 0 and m["images_per_epoch"] == 256 for m in rate["result"]["modes"].values())
    restarts = stages["loader_rate_restarts"]  # the same images, prepared with --jpeg-restarts
    assert restarts["status"] == "ok" and stages["images"]["result"]["prep_restarts_rc"] == 0
    assert all(m["images_per_epoch"] == 256 for m in restarts["result"]["modes"].values())
    decode = stages["loader_rate_gpu_decode"]  # runs once the trainer takes data.decode=gpu, else skipped
    assert decode["status"] == "ok" or (decode["rc"] == 3 and "not supported" in decode["last_stderr"]), decode
    assert stages["pretrain_1gpu"] == dict(status="skipped", rc=None, seconds=0.0, reason="not in --stages")
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"gpu_check.json", "gpu_check.log", "loader_rate.json"} <= set(files), files
    assert not (tmp_path / "work").exists()  # images, shards, runs: removed unless --keep-work


def test_failed_and_overtime_stages_are_recorded_and_the_rest_run(tmp_path):
    proc, summary, out = gpu_check(tmp_path, "--stages", "install,images,pretrain_1gpu", "--inject", "install:--bogus",
                                   "--stage-timeout", "pretrain_1gpu=3")  # below torch + DeepSpeed's import time alone
    assert proc.returncode == 1 and "FAILED" in proc.stderr
    stages = summary["stages"]
    assert stages["install"]["status"] == "failed" and stages["install"]["rc"] == 2
    assert "unrecognized arguments: --bogus" in stages["install"]["last_stderr"]
    assert stages["images"]["status"] == "ok"  # ran after the failure
    pretrain = stages["pretrain_1gpu"]
    assert pretrain["status"] == "timeout" and pretrain["rc"] == 124 and 3 <= pretrain["seconds"] < 30, pretrain
    assert summary["ok"] is False
    assert not processes_mentioning(str(tmp_path)), "a stage outlived its time box"
    assert "===== pretrain_1gpu stderr" in (out / "gpu_check.log").read_text()


def test_gpu_plan_trains_the_vit_b_preset_80_steps_with_a_warmup_inside_the_run(tmp_path):
    """The GPU commands cannot run here; their trainer settings go through the trainer's own
    config loader and schedule: ViT-B preset, batch 256 per GPU, 80 steps, warm-up done by then."""
    import argparse

    import gpu_check
    from pipelines.runtime.config_loader import load
    from pipelines.train.config import PretrainConfig

    args = argparse.Namespace(cpu=False, wheelhouse=str(tmp_path / "wh"))
    for n_gpus in (1, 2, 8):
        stages = {s.name: s for s in gpu_check.plan(args, sys.executable, n_gpus, 16, str(tmp_path), str(tmp_path))}
        assert (stages["pretrain_ngpu"].cmd is None) == (n_gpus == 1)
        for stage in (stages["pretrain_1gpu"], stages["pretrain_ngpu"]):
            if stage.cmd is None:
                continue
            cmd = stage.cmd
            world = int(cmd[cmd.index("--nproc_per_node") + 1])
            cfg = load(PretrainConfig, str(ROOT / cmd[cmd.index("--config") + 1]), [a for a in cmd if "=" in a])
            cfg.validate()
            d = cfg.schedule(8192, world)
            assert cfg.model.preset == "crossmae_vit_base_patch16_dec512d12b" and cfg.deepspeed.micro_batch == 256
            assert d.max_steps == 80 and 16 <= d.warmup_steps <= 32 and d.total_steps >= 80, (world, d)
            assert cfg.run.store is None and cfg.optim.lr == 5e-4


def test_a_stage_past_the_overall_budget_is_not_run_and_fails_the_check(tmp_path):
    proc, summary, _ = gpu_check(tmp_path, "--budget", "1", "--stages", "images")
    assert proc.returncode == 1 and summary["ok"] is False
    assert summary["stages"]["images"] == dict(status="not_run", rc=None, seconds=0.0, reason="out of the 1 s budget")


def test_unknown_stage_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(tmp_path), "--stages",
                           "images,imgaes"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"gpu_check: error: unknown stage imgaes (stages: {', '.join(STAGES)})"]
    assert not list(tmp_path.iterdir())


def _wheel(folder: pathlib.Path, dist: str, version: str, module: str) -> None:
    """A minimal valid pure-Python wheel (PEP 427)."""
    info = f"{dist}-{version}.dist-info"
    files = {f"{module}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def test_install_adds_missing_wheels_offline_and_never_replaces_torch(tmp_path):
    wheels, site = tmp_path / "wheelhouse", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, "gpucheck_probe", "1.0", "gpucheck_probe")
    _wheel(wheels, "torch", "0.0.1", "torch")  # a wheelhouse mistake must not shadow the node's torch
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "install", str(wheels), str(site), "--report",
                           str(tmp_path / "r.json")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["installed"] == ["gpucheck-probe==1.0"] and report["refused"] == ["torch"]
    assert (site / "gpucheck_probe" / "__init__.py").exists() and not (site / "torch").exists()
    assert report["kept"]["deepspeed"] and not report["torch_file"].startswith(str(site))
    assert "not replaced (the node's own): torch" in proc.stderr
