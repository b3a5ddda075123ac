"""``make gpu-check``: the one command to run on a new GPU node (or any GPU machine at hand).

    python3 benchmarks/gpu_check.py [--out DIR] [--work DIR] [--wheelhouse DIR] [--budget S]
    python3 benchmarks/gpu_check.py --cpu            # or GPU_CHECK_SMOKE=1: every stage, tiny, on CPUs
    python  benchmarks/gpu_check.py wheelhouse DIR   # here, with network: the wheels a node may lack

Stages, each in its own process group under its own time box; a failed stage is recorded and the
next one runs: install (wheels the node lacks, into WORK/site, never the node's torch), images
(a small set of real photos, sharded with crossmae-prep, and again with --jpeg-restarts),
pretrain_1gpu / pretrain_ngpu (crossmae-pretrain under torchrun on 1 and on every visible GPU,
ViT-B preset, batch 256 per GPU, 80 steps), throughput (benchmarks/gpu_throughput.py), loader_rate,
loader_rate_restarts (the --jpeg-restarts shards) and loader_rate_gpu_decode
(benchmarks/loader_rate.py; the last is skipped while the trainer refuses data.decode=gpu).
OUT gets gpu_check.json (rewritten after every stage), gpu_check.log, the trainer's metrics and the
benchmarks' JSON: 8 files at most. Exit 1 if any stage failed or timed out, 2 on bad usage.
Only the standard library is imported here: the node's Python may lack everything else until
the install stage has run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from gpu_check_setup import install, make_images, make_wheelhouse  # noqa: E402

STAGES = ("install", "images", "pretrain_1gpu", "pretrain_ngpu", "throughput", "loader_rate", "loader_rate_restarts",
          "loader_rate_gpu_decode")
NOT_SUPPORTED_RC = 3  # benchmarks/loader_rate.py: the checkout refuses the option -> "skipped"
STEPS, BATCH = 80, 256
OUT_PREFIXES = ("gpu_check.", "metrics_pretrain_", "gpu_throughput.", "loader_rate")  # what a check writes to OUT


@dataclass
class Stage:
    name: str
    cmd: list[str] | None  # None: skipped, with `reason`
    timeout: float
    reason: str = ""
    skip_rc: int | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # OUT name -> file the stage writes
    read: Callable[[], dict] | None = None  # results for the summary, after the stage ran


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts its workers in new sessions: a process-group
    kill would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (ValueError, OSError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_tree(proc: subprocess.Popen, grace: float = 15.0) -> None:
    pids = _tree(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGTERM first: the trainer saves and exits 143
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        pids = _tree(proc.pid) if proc.poll() is None else [p for p in pids if os.path.exists(f"/proc/{p}")]
        grace = 5.0


# a failed stage's line to show: our CLIs' one-line "prog: error: ...", else an exception line
ERROR_LINES = (re.compile(r"\berror:", re.I), re.compile(r"\w(Error|Exception|Interrupt)\b|\bKilled\b|SIGKILL"))


def _last_line(path: str, errors_first: bool) -> str:
    """The last line with any text; of a failed stage, its last error line (torchrun ends with
    banners and its own ChildFailedError around the worker's real error)."""
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f.read()[-50000:].splitlines() if re.search(r"[A-Za-z0-9]", ln)]
    for pattern in ERROR_LINES if errors_first else ():
        hits = [ln for ln in lines if pattern.search(ln) and "ChildFailedError" not in ln]
        if hits:
            return hits[-1][:400]
    return (lines or [""])[-1][:400]


def run_stage(stage: Stage, env: dict, work: str, out: str, log) -> dict:
    rec = dict(status="skipped", rc=None, seconds=0.0, timeout_s=round(stage.timeout), reason=stage.reason)
    if stage.cmd is None:
        return rec
    rec = dict(rec, command=" ".join(stage.cmd))
    rec.pop("reason")
    paths = {s: os.path.join(work, f"{stage.name}.{s}") for s in ("out", "err")}
    t0 = time.monotonic()
    with open(paths["out"], "w") as so, open(paths["err"], "w") as se:
        proc = subprocess.Popen(stage.cmd, cwd=ROOT, env=env, stdout=so, stderr=se, start_new_session=True)
        try:
            rc = proc.wait(stage.timeout)
            status = "ok" if rc == 0 else "skipped" if rc == stage.skip_rc else "failed"
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            rc, status = 124, "timeout"
    rec.update(status=status, rc=rc, seconds=round(time.monotonic() - t0, 1),
               last_stderr=_last_line(paths["err"], status != "ok") or _last_line(paths["out"], status != "ok"))
    for stream in ("out", "err"):
        with open(paths[stream], errors="replace") as f:
            text = f.read()
        log.write(f"\n===== {stage.name} std{stream} (rc {rc}, {rec['seconds']} s): {rec['command']}\n")
        log.write(text if len(text) < 200_000 else "[...]\n" + text[-200_000:])
    log.flush()
    for name, src in stage.outputs.items():
        if os.path.exists(src) and os.path.abspath(src) != os.path.join(out, name):
            shutil.copyfile(src, os.path.join(out, name))
    if status == "ok" and stage.read:
        try:
            rec["result"] = stage.read()
        except (OSError, ValueError, KeyError, IndexError) as e:  # exit 0, but not what the stage must leave
            rec.update(status="failed", last_stderr=f"gpu_check: {stage.name}: {type(e).__name__}: {e}")
    return rec


def _json(path: str) -> Callable[[], dict]:
    def read():
        with open(path) as f:
            return json.load(f)
    return read


def _metrics(path: str, steps: int) -> Callable[[], dict]:
    """The trainer's metrics.jsonl: first and last loss, the last window's speed; the run must
    have reached its last step."""
    def read():
        with open(path) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        last = rows[-1]
        if last["step"] != steps:
            raise ValueError(f"the trainer exited 0 at step {last['step']} of {steps}")
        keys = ("images_per_s", "images_per_s_per_rank", "data_wait_share", "data_wait_share_max", "mfu",
                "peak_memory_gb")
        return dict(steps=last["step"], first_loss=rows[0]["loss"], last_loss=last["loss"],
                    loss_fell=last["loss"] < rows[0]["loss"], **{k: last.get(k) for k in keys})
    return read


def _throughput(path: str) -> Callable[[], dict]:
    def read():
        with open(path) as f:
            r = json.load(f)
        runs = {"/".join(str(x.get(k)) for k in ("path", "model", "source") if x.get(k)):
                {k: x.get(k) for k in ("images_per_s", "step_ms", "mfu", "peak_memory_gb", "data_wait_share")}
                for x in r["runs"]}
        return dict(runs=runs, ratios=r.get("ratios", {}))
    return read


def warmup_epochs(steps: int, per_epoch: int) -> int:
    """Whole epochs (the trainer's unit) closest to a warm-up of steps/5: 80 steps on 1 GPU (32 per
    epoch) -> 1 epoch = 32 steps; 2/4/8 GPUs -> 16 steps; none when one epoch is over half the run."""
    return 0 if per_epoch > steps // 2 else -(-(steps // 5) // per_epoch)


def plan(args, py: str, n_gpus: int, cpus: int, work: str, out: str) -> list[Stage]:
    """The stages with their commands and time boxes; CPU mode: the same stages, tiny."""
    cpu = args.cpu
    # GPU: 32 steps of 256 per epoch on one GPU; ~1.6 s per loader epoch at the ~5,200 img/s seen on an H200
    # host (loader workers restart every epoch: a smaller set would time mostly their start)
    n_images = 256 if cpu else 8192
    manifest = os.path.join(work, "wds", "train", "manifest.json")
    world_n = 2 if cpu else n_gpus
    me = os.path.abspath(__file__)
    stages = [
        Stage("install", [py, me, "install", args.wheelhouse, os.path.join(work, "site"), "--report",
                          os.path.join(work, "install.json")], 120, read=_json(os.path.join(work, "install.json"))),
        Stage("images", [py, me, "images", os.path.join(work, "images"), os.path.join(work, "wds"), str(n_images),
                         "--processes", str(min(cpus, 16)), "--report", os.path.join(work, "images.json"),
                         "--restarts-wds", os.path.join(work, "wds_rst")]
              + (["--small"] if cpu else []), 60 if cpu else 150, read=_json(os.path.join(work, "images.json")))]
    for name, world in (("pretrain_1gpu", 1), ("pretrain_ngpu", world_n)):
        if name == "pretrain_ngpu" and world < 2:
            stages.append(Stage(name, None, 0, reason=f"{n_gpus} GPU(s) visible"))
            continue
        run = os.path.join(work, name)
        shutil.rmtree(run, ignore_errors=True)  # a fresh run: never resume an older check's checkpoint
        per_epoch = max(1, n_images // world // (16 if cpu else BATCH))
        steps = 6 if cpu else STEPS
        sets = [f"data.train={manifest}", f"run.output={run}", "run.store=null", f"run.max_steps={steps}",
                f"run.log_every={2 if cpu else 10}", f"run.save_every={steps}",
                # the recipe's lr (blr x 256/256 x gamma/p = 5e-5 at batch 256) barely moves the loss in
                # 80 steps; a short warm-up and a schedule that ends with the check
                f"optim.lr={1e-3 if cpu else 5e-4}", f"optim.epochs={-(-steps // per_epoch)}",
                f"optim.warmup_epochs={warmup_epochs(steps, per_epoch)}"]
        # GPUs: data.num_workers and model.compile stay the trainer's defaults (from the cores; on for CUDA)
        sets += (["model.preset=crossmae_vit_micro_patch4_dec64d2b", "data.image_size=32", "deepspeed.micro_batch=16",
                  "run.recon_every=0", "data.num_workers=1"] if cpu else
                 [f"deepspeed.micro_batch={BATCH}", f"run.recon_every={steps}"])
        stages.append(Stage(name, [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                                   "-m", "pipelines.pretrain", "--config", "deploy/configs/crossmae_vit_base_in1k.yaml",
                                   "--resume", "none", *sets], 120 if cpu else 240,
                            outputs={f"metrics_{name}.jsonl": os.path.join(run, "metrics.jsonl")},
                            read=_metrics(os.path.join(run, "metrics.jsonl"), steps)))
    tp = os.path.join(out, "gpu_throughput.json")
    # synthetic batches only: the loader's share is loader_rate's and the trainer's data wait; each
    # model compiles once (~1 min on an H200), so the loader source would double the stage
    stages.append(Stage("throughput", [py, "benchmarks/gpu_throughput.py", "--json", tp] + (
        ["--smoke"] if cpu else ["--batch", str(BATCH), "--steps", "20", "--warmup", "3"]), 120 if cpu else 240,
        read=_throughput(tp)))
    # loader_rate_restarts: the same images sharded with --jpeg-restarts (the loader decodes only each crop's cells)
    for name, extra, m in (("loader_rate", [], manifest),
                           ("loader_rate_restarts", [], os.path.join(work, "wds_rst", "train", "manifest.json")),
                           ("loader_rate_gpu_decode", ["--resize", "device", "data.decode=gpu"], manifest)):
        js = os.path.join(out, f"{name}.json")
        size = ["--batch", "16", "--image-size", "32", "--epochs", "1", "--workers", "0"] if cpu else \
            ["--batch", str(BATCH), "--epochs", "2", "--workers", str(max(1, cpus - 2))]
        stages.append(Stage(name, [py, "benchmarks/loader_rate.py", "--manifest", m, "--json", js,
                                   *size, *extra],
                            60 if cpu else 120, skip_rc=NOT_SUPPORTED_RC, read=_json(js)))
    return stages


def _probe(py: str, env: dict) -> dict:
    """torch's version and the GPUs it sees (CUDA_VISIBLE_DEVICES respected), in a child process."""
    code = ("import json, torch; print(json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda, "
            "gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])))")
    try:
        r = subprocess.run([py, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return dict(torch=None, gpus=[], error="importing torch took over 120 s")
    if r.returncode:
        return dict(torch=None, gpus=[], error=(r.stderr.strip().splitlines() or ["?"])[-1])
    info = json.loads(r.stdout.strip().splitlines()[-1])
    if shutil.which("nvidia-smi"):  # driver and memory, which torch does not say
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=60)
        info["nvidia_smi"] = q.stdout.strip().splitlines() if q.returncode == 0 else q.stderr.strip()[-300:]
    return info


def check(args) -> int:
    t_start = time.monotonic()
    out, work = os.path.abspath(args.out), os.path.abspath(args.work)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # OUT holds this run's results only (other files there are left alone)
        if name.startswith(OUT_PREFIXES):
            os.remove(os.path.join(out, name))
    os.makedirs(work, exist_ok=True)
    py, cpus = sys.executable, len(os.sched_getaffinity(0))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([os.path.join(work, "site"), ROOT] + ([os.environ["PYTHONPATH"]]
                                          if os.environ.get("PYTHONPATH") else [])))
    env.setdefault("OMP_NUM_THREADS", "1" if args.cpu else "4")
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    node = _probe(py, env)
    n_gpus = 0 if args.cpu else len(node["gpus"])
    summary = dict(mode="cpu" if args.cpu else "gpu", ok=None, host=platform.node(), python=platform.python_version(),
                   cpus=cpus, node=node, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), out=out, work=work, stages={})
    if not args.cpu and n_gpus == 0:
        print("gpu_check: no GPU visible to torch on this machine; the GPU stages will fail (--cpu runs them on CPUs)",
              file=sys.stderr)
    stages = plan(args, py, n_gpus, cpus, work, out)
    for spec in args.inject:
        name, _, arg = spec.partition(":")
        for s in stages:
            if s.name == name and s.cmd:
                s.cmd.append(arg)
    for spec in args.stage_timeout:
        name, _, sec = spec.partition("=")
        for s in stages:
            if s.name == name:
                s.timeout = float(sec)
    with open(os.path.join(out, "gpu_check.log"), "w") as log:
        for stage in stages:
            left = args.budget - (time.monotonic() - t_start)
            if args.stages and stage.name not in args.stages:
                rec = dict(status="skipped", rc=None, seconds=0.0, reason="not in --stages")
            elif stage.cmd and left < 10:
                rec = dict(status="not_run", rc=None, seconds=0.0, reason=f"out of the {args.budget:.0f} s budget")
            else:
                stage.timeout = min(stage.timeout, max(1.0, left))
                rec = run_stage(stage, env, work, out, log)
            summary["stages"][stage.name] = rec
            print(f"[{time.monotonic() - t_start:6.0f} s] {stage.name:24s} {rec['status']:8s} rc={rec['rc']} "
                  f"{rec['seconds']} s  {rec.get('last_stderr') or rec.get('reason', '')}"[:220], file=sys.stderr)
            summary.update(seconds=round(time.monotonic() - t_start, 1),
                           ok=all(r["status"] in ("ok", "skipped") for r in summary["stages"].values()))
            with open(os.path.join(out, "gpu_check.json.tmp"), "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(os.path.join(out, "gpu_check.json.tmp"), os.path.join(out, "gpu_check.json"))
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    verdict = "all stages passed" if summary["ok"] else "FAILED"
    print(f"gpu_check: {verdict}; summary {out}/gpu_check.json", file=sys.stderr)
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    helpers = dict(wheelhouse=make_wheelhouse, install=install, images=make_images)
    if argv and argv[0] in helpers:
        return helpers[argv[0]](argv[1:])
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    smoke = os.environ.get("GPU_CHECK_SMOKE", "") not in ("", "0")
    ap.add_argument("--cpu", action="store_true", default=smoke, help="every stage, tiny, on CPUs (GPU_CHECK_SMOKE=1)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check"))
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "crossmae-gpu-check"),
                    help="images, shards, runs, installed wheels (removed at the end unless --keep-work)")
    ap.add_argument("--wheelhouse", default=os.path.join(ROOT, "wheelhouse"))
    ap.add_argument("--budget", type=float, default=None, help="seconds for all stages (GPU 540, CPU 300)")
    ap.add_argument("--stages", type=lambda s: s.split(","), default=None, help=f"a subset of {','.join(STAGES)}")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--inject", action="append", default=[], metavar="STAGE:ARG", help="append ARG to a stage (tests)")
    ap.add_argument("--stage-timeout", action="append", default=[], metavar="STAGE=SECONDS")
    args = ap.parse_args(argv)
    names = set(args.stages or []) | {s.partition(":")[0] for s in args.inject} | \
        {s.partition("=")[0] for s in args.stage_timeout}
    if names - set(STAGES):
        print(f"gpu_check: error: unknown stage {sorted(names - set(STAGES))[0]} (stages: {', '.join(STAGES)})",
              file=sys.stderr)
        return 2
    if args.budget is None:
        args.budget = 300.0 if args.cpu else 540.0  # GPU: the whole check fits in a 10-minute slot
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
