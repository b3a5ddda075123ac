"""deploy/ is validated, not just written: Kubernetes manifests against the Kubernetes schemas,
shell scripts through shellcheck and bash -n, DeepSpeed configs through DeepSpeed's own
parser, the presets through PretrainConfig, the Slurm variable derivation with fake SLURM_*
variables, and the launch script's local form as a real 2-process CPU run that checkpoints,
then exports and evaluates that checkpoint with deploy/export_eval.sh."""
import atexit
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

from data_prep.cli import main as prep
from pipelines.runtime import config_loader
from pipelines.runtime.launch import free_port
from pipelines.train.config import PretrainConfig, deepspeed_config
from tests.data_prep.fixtures import make_image_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = pathlib.Path(sys.executable).parent
PRESETS = sorted((DEPLOY / "configs").glob("*.yaml"))
SCRIPTS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".sh", ".sbatch"))
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
K8S_VERSIONS = ("1.33", "1.37")  # oldest supported (backoffLimitPerIndex is GA in 1.33), newest schema
IMAGENET_TRAIN = 1_281_167
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def env(**extra) -> dict:
    # .venv/bin stays FIRST on PATH (tests/conftest.py puts it there; appended again for the
    # console scripts): one `ninja` for every process, or pip's (1.13) and Debian's (1.11) take
    # turns rebuilding DeepSpeed's shared CPU op, 30-45 s each time.
    return dict(os.environ, PATH=f"{os.environ['PATH']}:{BIN}", DEEPSPEED=str(BIN / "deepspeed"), PYTHON=sys.executable,
                OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")),
                **extra)


def load_preset(path) -> PretrainConfig:
    return config_loader.load(PretrainConfig, str(path), [])


def preset_world(path) -> tuple[int, int]:
    """The layout a preset documents: a '# world: N nodes x G GPUs' line."""
    m = re.search(r"^# world: (\d+) nodes x (\d+) GPUs$", pathlib.Path(path).read_text(), re.M)
    assert m, f"{path.name} documents no '# world: N nodes x G GPUs' line"
    return int(m[1]), int(m[2])


def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in K8S for d in yaml.safe_load_all(p.read_text()) if d]


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec of a Job, CronJob or JobSet."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "Job":
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "JobSet":
        return [rj["template"]["spec"]["template"]["spec"] for rj in spec["replicatedJobs"]]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for ps in pod_specs(doc) for c in ps.get("containers", []) + ps.get("initContainers", [])]


def env_value(container: dict, name: str) -> str:
    return next(e["value"] for e in container.get("env", []) if e["name"] == name)


# ---------------------------------------------------------------- presets and DeepSpeed configs

def test_presets_give_batch_4096_and_the_papers_lr_at_their_node_counts():
    assert {p.stem for p in PRESETS} == {f"crossmae_vit_{s}_in1k" for s in ("small", "base", "large")}
    dims = {"small": (384, 256, 8), "base": (768, 512, 16), "large": (1024, 512, 16)}  # PAPER.md
    for path in PRESETS:
        cfg = load_preset(path)
        nodes, gpus = preset_world(path)
        world = nodes * gpus
        d = cfg.schedule(IMAGENET_TRAIN, world)
        assert d.effective_batch == 4096, path.name
        assert d.lr == pytest.approx(1.5e-4 * 4096 / 256 * 0.25 / 0.75), path.name  # 8e-4
        assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.blr) == (800, 40, 1.5e-4)
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05 and cfg.optim.gradient_clipping == 0
        mc = cfg.model_config()
        assert (mc.mask_ratio, mc.pred_ratio, mc.norm_pix_loss, mc.decoder) == (0.75, 0.25, True, "cross")
        assert (mc.embed_dim, mc.decoder_embed_dim, mc.decoder_num_heads, mc.decoder_depth) == \
            (*dims[path.stem.split("_")[2]], 12)
        # the comment's arithmetic is the config's: "N nodes x 8 GPUs x micro M x accum A = 4,096"
        text = path.read_text()
        assert f"{nodes} nodes x {gpus} GPUs x micro {cfg.deepspeed.micro_batch} x accum " \
               f"{cfg.deepspeed.grad_accum} = 4,096" in text
        assert f"= {d.steps_per_epoch} per epoch; x 800 = {d.total_steps:,} steps" in text


DS_PARSE = r"""
import json, os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig

class DataParallel:
    # Megatron-style mpu: DeepSpeedConfig asks it for the data-parallel world size, so one
    # process can check a config meant for 32 ranks (without it the parser sees world 1).
    def __init__(self, n):
        self.n = n
    def get_data_parallel_world_size(self):
        return self.n

deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeedConfig reads the rank from deepspeed.comm
out = []
for item in json.load(sys.stdin):
    try:
        c = DeepSpeedConfig(item["config"], mpu=DataParallel(item["world"]))
        out.append(dict(ok=True, world=c.world_size, train_batch_size=c.train_batch_size,
                        micro=c.train_micro_batch_size_per_gpu, accum=c.gradient_accumulation_steps,
                        zero_stage=c.zero_optimization_stage, bf16=c.bfloat16_config.enabled,
                        autocast=c.torch_autocast_enabled))
    except Exception as e:
        out.append(dict(ok=False, error=f"{type(e).__name__}: {e}"))
print("RESULT " + json.dumps(out))
"""


def test_generated_deepspeed_configs_pass_deepspeeds_own_parser():
    items = []
    for path in PRESETS:
        cfg = load_preset(path)
        nodes, gpus = preset_world(path)
        for n in (nodes, nodes // 2):  # the documented layout, and half the nodes with accumulation
            c = config_loader.load(PretrainConfig, str(path), [f"deepspeed.grad_accum={nodes // n}"])
            items.append(dict(name=f"{path.stem}@{n}", world=n * gpus, config=deepspeed_config(c, n * gpus, on_gpu=True)))
        items.append(dict(name=f"{path.stem}@cpu", world=2, config=deepspeed_config(cfg, 2, on_gpu=False)))
    # the parser really checks: a batch that does not add up for the world size is refused
    bad = dict(deepspeed_config(load_preset(PRESETS[0]), 16, on_gpu=True))
    items.append(dict(name="inconsistent", world=8, config=bad))
    proc = subprocess.run([sys.executable, "-c", DS_PARSE, str(free_port())], input=json.dumps(items), env=env(),
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    results = dict(zip((i["name"] for i in items), json.loads(line[7:])))
    assert not results.pop("inconsistent")["ok"]
    for name, r in results.items():
        assert r["ok"], f"{name}: {r.get('error')}"
        on_cpu = name.endswith("@cpu")
        assert r["train_batch_size"] == (load_preset(DEPLOY / "configs" / f"{name.split('@')[0]}.yaml")
                                         .deepspeed.micro_batch * 2 if on_cpu else 4096), name
        assert r["train_batch_size"] == r["micro"] * r["accum"] * r["world"] and r["zero_stage"] == 0
        assert r["autocast"] is not on_cpu and r["bf16"] is False, name  # bf16 as torch_autocast on GPUs


# ---------------------------------------------------------------- Kubernetes

def validate_k8s(doc: dict, version: str) -> None:
    import kubernetes_validate

    if doc["kind"] == "JobSet":  # a CRD: its Jobs are core batch/v1 Jobs, validated as such
        for rj in doc["spec"]["replicatedJobs"]:
            job = dict(apiVersion="batch/v1", kind="Job", spec=rj["template"]["spec"],
                       metadata=dict(name=f"{doc['metadata']['name']}-{rj['name']}", **rj["template"].get("metadata", {})))
            kubernetes_validate.validate(job, version, strict=True)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_kubernetes_manifest_validates_against_the_schemas():
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (requirements/pins.txt)")
    docs = k8s_docs()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["ConfigMap", "ConfigMap", "CronJob", "Job", "Job", "Job", "JobSet", "Kustomization"]
    for name, doc in docs:
        if doc["kind"] == "Kustomization":  # kustomize's own file: every manifest listed, nothing else
            assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
            assert sorted(doc["resources"]) == sorted(p.name for p in K8S if p.name != name)
            continue
        for version in K8S_VERSIONS:
            validate_k8s(doc, version)


def test_the_schema_check_rejects_broken_manifests():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = dict((d["kind"], d) for _, d in k8s_docs())
    typo = json.loads(json.dumps(docs["Job"]))
    typo["spec"]["template"]["spec"]["containers"][0]["envFrm"] = []  # a misspelt field
    wrong_type = json.loads(json.dumps(docs["JobSet"]))
    wrong_type["spec"]["replicatedJobs"][0]["template"]["spec"]["completions"] = "four"
    for doc in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_k8s(doc, K8S_VERSIONS[0])


def test_jobset_has_the_crd_fields_and_a_consistent_rendezvous():
    (doc,) = [d for _, d in k8s_docs() if d["kind"] == "JobSet"]
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["network"]["enableDNSHostnames"] is True and spec["failurePolicy"]["maxRestarts"] > 0
    (rj,) = spec["replicatedJobs"]
    assert rj["name"] and rj["replicas"] == 1 and set(rj["template"]) <= {"metadata", "spec"}
    job = rj["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0  # any pod failure restarts the set
    (c,) = containers(doc)
    nnodes, nproc = int(env_value(c, "NNODES")), int(env_value(c, "NPROC_PER_NODE"))
    assert job["completions"] == job["parallelism"] == nnodes
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == nproc
    # pod 0's stable name: <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain>
    subdomain = spec["network"].get("subdomain", doc["metadata"]["name"])
    assert env_value(c, "MASTER_ADDR") == f"{doc['metadata']['name']}-{rj['name']}-0-0.{subdomain}"
    script = c["command"][-1]
    assert '--node-rank "$JOB_COMPLETION_INDEX"' in script and "--resume auto" in script
    # the run config it mounts gives the paper's batch at this layout
    (cm,) = [d for _, d in k8s_docs() if d["kind"] == "ConfigMap" and "run.yaml" in d["data"]]
    run = config_loader.from_dict(PretrainConfig, yaml.safe_load(cm["data"]["run.yaml"]))
    assert run.effective_batch(nnodes * nproc) == 4096
    vol = next(v for v in pod_specs(doc)[0]["volumes"] if "configMap" in v)
    assert vol["configMap"]["name"] == cm["metadata"]["name"]


def test_configmap_run_config_is_the_vit_b_preset():
    (cm,) = [d for _, d in k8s_docs() if d["kind"] == "ConfigMap" and "run.yaml" in d["data"]]
    assert yaml.safe_load(cm["data"]["run.yaml"]) == yaml.safe_load((DEPLOY / "configs/crossmae_vit_base_in1k.yaml").read_text())


def test_s3_credentials_come_from_a_secret_never_inlined():
    docs = k8s_docs()
    assert not [n for n, d in docs if d["kind"] == "Secret"], "no Secret manifests: kubectl create secret"
    checked = 0
    for name, doc in docs:
        for c in containers(doc):
            env_vars = {e["name"]: e for e in c.get("env", [])}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env_vars[var], f"{name}: {var} inlined"
                assert env_vars[var]["valueFrom"]["secretKeyRef"] == {"name": "crossmae-s3", "key": var}
                checked += 1
            for e in env_vars.values():
                assert not (e["name"] in SECRET_ENV and "value" in e), f"{name}: {e['name']} inlined"
    assert checked == 2 * 5  # 5 containers touch the store
    cms = [d for _, d in docs if d["kind"] == "ConfigMap"]
    assert not any(k in SECRET_ENV for cm in cms for k in cm["data"])


def test_prep_job_worker_count_matches_its_completions():
    (job,) = [d for _, d in k8s_docs() if d["kind"] == "Job" and d["metadata"]["name"] == "crossmae-prep"]
    script = containers(job)[0]["command"][-1]
    assert job["spec"]["completionMode"] == "Indexed"
    assert re.search(r"--num-workers (\d+)", script)[1] == str(job["spec"]["completions"])
    assert '--worker-index "$JOB_COMPLETION_INDEX"' in script


# ---------------------------------------------------------------- shell scripts

def embedded_scripts() -> list[tuple[str, str]]:
    """`bash -c SCRIPT` bodies inside the Kubernetes manifests."""
    out = []
    for name, doc in k8s_docs():
        for c in containers(doc):
            cmd = c.get("command", [])
            if cmd[:2] == ["bash", "-c"]:
                out.append((f"{name}:{c['name']}", "#!/bin/bash\n" + cmd[2]))
    return out


def test_every_shell_script_passes_bash_n_and_shellcheck(tmp_path):
    assert {p.name for p in SCRIPTS} >= {"launch.sh", "env.sh", "prep.sbatch", "finalize.sbatch", "pretrain.sbatch",
                                         "pretrain_node.sh", "export_eval.sbatch", "export_eval.sh"}
    embedded = embedded_scripts()
    assert len(embedded) == 5
    for i, (name, text) in enumerate(embedded):
        (tmp_path / f"k8s-{i}.sh").write_text(text)
    files = [str(p.relative_to(ROOT)) for p in SCRIPTS] + sorted(str(p) for p in tmp_path.glob("k8s-*.sh"))
    for f in files:
        proc = subprocess.run(["bash", "-n", f], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"bash -n {f}: {proc.stderr}"
    for p in SCRIPTS:
        if p.name != "env.sh":  # env.sh is sourced, the rest are run
            assert os.access(p, os.X_OK) and p.read_text().startswith("#!/bin/bash\n"), p
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (Debian package shellcheck); bash -n passed")
    proc = subprocess.run(["shellcheck", "-x", "--severity=style", *files], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_shellcheck_reports_a_broken_script(tmp_path):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (Debian package shellcheck)")
    (tmp_path / "bad.sh").write_text('#!/bin/bash\nrm -rf $DIR/*\n')  # unquoted: SC2086
    assert subprocess.run(["shellcheck", str(tmp_path / "bad.sh")], capture_output=True).returncode != 0


# ---------------------------------------------------------------- Slurm

@functools.cache
def no_scontrol_path() -> str:
    """A PATH with only what env.sh runs besides scontrol (`make test` installs Slurm's clients)."""
    bin_dir = pathlib.Path(tempfile.mkdtemp(prefix="crossmae-no-scontrol-"))
    atexit.register(shutil.rmtree, bin_dir, True)
    (bin_dir / "head").symlink_to(shutil.which("head"))
    return str(bin_dir)


def slurm_env(**slurm) -> dict:
    """Source deploy/slurm/env.sh under fake SLURM_* variables (no scontrol on PATH)."""
    script = "source deploy/slurm/env.sh; for v in MASTER_ADDR MASTER_PORT NNODES NODE_RANK NPROC_PER_NODE WORLD_SIZE; " \
             'do echo "$v=${!v}"; done'
    clean = {"PATH": no_scontrol_path(), "HOME": os.environ.get("HOME", "/tmp"), **slurm}
    assert not shutil.which("scontrol", path=clean["PATH"]), "these tests check the scontrol-free parser"
    proc = subprocess.run(["/bin/bash", "-c", script], cwd=ROOT, env=clean, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.split())


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[01-04]", "gpu01"), ("gpu[07,09-10]", "gpu07"), ("node5", "node5"), ("a1,b[2-3]", "a1"),
    ("rack[2-3]-n[08-09],x", "rack2-n08"), ("n[008-011]", "n008"),
])
def test_slurm_env_derives_rendezvous_and_world_from_slurm_variables(nodelist, first):
    got = slurm_env(SLURM_JOB_NODELIST=nodelist, SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="4",
                    SLURM_NODEID="3", SLURM_GPUS_ON_NODE="8")
    assert got == dict(MASTER_ADDR=first, MASTER_PORT=str(20000 + 4242 % 20000), NNODES="4", NODE_RANK="3",
                       NPROC_PER_NODE="8", WORLD_SIZE="32")


def test_slurm_env_gpu_count_fallbacks_and_overrides():
    base = dict(SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_ID="123456", SLURM_NNODES="2", SLURM_NODEID="1")
    assert slurm_env(**base, SLURM_GPUS_PER_NODE="a100:4")["WORLD_SIZE"] == "8"  # "type:count"
    assert slurm_env(**base, CUDA_VISIBLE_DEVICES="0,1,2")["NPROC_PER_NODE"] == "3"
    assert slurm_env(**base)["NPROC_PER_NODE"] == "1"
    # a CPU allocation (sbatch --gpus-per-node=0 sets both to 0): one process per node, not torchrun's
    # bare AssertionError for --nproc-per-node 0
    assert slurm_env(**base, SLURM_GPUS_ON_NODE="0", SLURM_GPUS_PER_NODE="0")["WORLD_SIZE"] == "2"
    got = slurm_env(**base, SLURM_GPUS_ON_NODE="8", MASTER_PORT="29500", MASTER_ADDR="10.0.0.1")
    assert (got["MASTER_PORT"], got["MASTER_ADDR"], got["MASTER_PORT"]) == ("29500", "10.0.0.1", "29500")
    assert slurm_env(**base)["MASTER_PORT"] == str(20000 + 123456 % 20000)  # same on every node of the job


def test_slurm_nodelist_expansion_and_hostfile():
    script = 'source deploy/slurm/env.sh; crossmae_expand_nodelist "$L" | paste -sd" "; crossmae_hostfile "gpu[1-2]" 8'
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "SLURM_JOB_NODELIST": "x", "L": "a[1-2]-ib,gpu[08-10,12],z"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "a1-ib a2-ib gpu08 gpu09 gpu10 gpu12 z"
    assert lines[1:] == ["gpu1 slots=8", "gpu2 slots=8"]


def test_slurm_env_outside_an_allocation_is_one_clear_error():
    proc = subprocess.run(["bash", "-c", "source deploy/slurm/env.sh || echo FAILED"], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"})
    assert "FAILED" in proc.stdout and "not inside a Slurm allocation" in proc.stderr


def test_slurm_scripts_match_the_presets():
    text = (DEPLOY / "slurm/pretrain.sbatch").read_text()
    nodes, gpus = preset_world(DEPLOY / "configs/crossmae_vit_base_in1k.yaml")
    assert f"#SBATCH --nodes={nodes}\n" in text and f"#SBATCH --gpus-per-node={gpus}\n" in text
    assert "#SBATCH --requeue\n" in text and "#SBATCH --signal=B:USR1@" in text
    assert "--resume auto" in (DEPLOY / "slurm/pretrain_node.sh").read_text()
    assert "#SBATCH --array=0-" in (DEPLOY / "slurm/prep.sbatch").read_text()


# ---------------------------------------------------------------- DeepSpeed launcher files

def test_hostfile_and_deepspeed_env_examples_parse_as_deepspeed_reads_them():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(DEPLOY / "deepspeed/hostfile.example"))
    nodes, gpus = preset_world(DEPLOY / "configs/crossmae_vit_base_in1k.yaml")
    assert list(pool.values()) == [gpus] * nodes
    # DeepSpeed splits EVERY line of .deepspeed_env at "=": no comments, no blank lines
    lines = (DEPLOY / "deepspeed/deepspeed_env.example").read_text().splitlines()
    pairs = [line.split("=", maxsplit=1) for line in lines]
    assert all(len(p) == 2 and re.fullmatch(r"[A-Z_][A-Z0-9_]*", p[0]) for p in pairs), lines
    assert "AWS_ENDPOINT_URL" in dict(pairs) and not SECRET_ENV & set(dict(pairs))  # pdsh puts them on a command line


def dry_run(mode, **extra):
    cfg = DEPLOY / "configs/crossmae_vit_base_in1k.yaml"
    return subprocess.run([str(DEPLOY / "deepspeed/launch.sh"), mode, str(cfg), "run.max_steps=5"], cwd=ROOT,
                          env=env(DRY_RUN="1", **extra), capture_output=True, text=True, timeout=30)


def test_launch_script_builds_the_multi_node_commands():
    hostfile = str(DEPLOY / "deepspeed/hostfile.example")
    proc = dry_run("--hostfile", HOSTFILE=hostfile, NUM_GPUS="8", MASTER_ADDR="gpu-node-01")
    assert proc.returncode == 0, proc.stderr
    assert f"--hostfile {hostfile} --num_nodes 4 --master_port 29500 --num_gpus 8 --launcher pdsh " \
           "--master_addr gpu-node-01 --module pipelines.pretrain --config" in proc.stderr
    assert proc.stderr.rstrip().endswith("--resume auto run.max_steps=5")
    proc = dry_run("--no-ssh", HOSTFILE=hostfile, NODE_RANK="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="29600")
    assert proc.returncode == 0, proc.stderr
    assert "--num_nodes 4 --master_port 29600 --no_ssh --node_rank 2 --master_addr 10.0.0.1 --module" in proc.stderr
    proc = dry_run("--no-ssh", HOSTFILE=hostfile)
    assert proc.returncode != 0 and "NODE_RANK" in proc.stderr
    proc = dry_run("--cluster")
    assert proc.returncode == 2 and "usage:" in proc.stderr


# ---------------------------------------------------------------- a real launch, export and evaluation

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    make_image_folder(root / "src", ("a", "b", "c", "d"), per_class=16)
    assert prep(["folder", str(root / "src"), str(root / "wds"), "--shard-samples", "16"]) == 0
    make_image_folder(root / "src-val", ("a", "b", "c", "d"), per_class=4, seed=1)
    assert prep(["folder", str(root / "src-val"), str(root / "wds"), "--split", "val", "--shard-samples", "16"]) == 0
    return root / "wds"


@pytest.fixture(scope="module")
def launched_run(shards, tmp_path_factory):
    """NUM_GPUS=2 deploy/deepspeed/launch.sh --local CONFIG ...: 2 CPU processes, 3 steps."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = out.parent / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        model=dict(preset="crossmae_vit_micro_patch4_dec64d2b"),
        data=dict(train=str(shards / "train/manifest.json"), image_size=32, num_workers=1),
        optim=dict(lr=1e-3, warmup_epochs=0, epochs=2),
        deepspeed=dict(micro_batch=8, zero_stage=2),
        run=dict(output=str(out), max_steps=3, save_every=3, log_every=1, recon_every=0, tensorboard=False))))
    e = env(NUM_GPUS="2", MASTER_PORT=str(free_port()))
    e.pop("DS_ACCELERATOR")  # the script picks the CPU accelerator itself when there is no GPU
    e.pop("OMP_NUM_THREADS")
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the local form would launch on its GPUs")
    proc = subprocess.run([str(DEPLOY / "deepspeed/launch.sh"), "--local", str(cfg)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_launch_script_local_form_trains_two_cpu_processes_to_a_checkpoint(launched_run):
    out, proc = launched_run
    assert "--num_gpus 2" in proc.stderr and "--module pipelines.pretrain" in proc.stderr
    assert (out / "checkpoints/step00000003/COMPLETE").exists()
    ds = json.loads((out / "deepspeed.json").read_text())
    assert ds["derived"]["world_size"] == 2 and ds["train_batch_size"] == 16 and "bf16" not in ds
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m] == [1, 2, 3]
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in steps if "loss" in m)


def test_export_eval_script_exports_and_evaluates_the_checkpoint(launched_run, shards, tmp_path):
    out, _ = launched_run
    exports = tmp_path / "exports"
    e = env(STORE=str(out), EXPORTS=str(exports), TRAIN_MANIFEST=str(shards / "train/manifest.json"),
            VAL_MANIFEST=str(shards / "val/manifest.json"))
    proc = subprocess.run(["bash", str(DEPLOY / "export_eval.sh"), "0"], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    export = exports / "step00000003"
    assert json.loads((export / "export.json").read_text())["step"] == 3
    result = json.loads((export / "eval/knn.json").read_text())
    assert result["step"] == 3
    proc = subprocess.run(["bash", str(DEPLOY / "export_eval.sh"), "1"], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "only 1 complete checkpoint(s); nothing to do" in proc.stderr


# ---------------------------------------------------------------- containers

@pytest.mark.parametrize("flavour", ["gpu", "cpu"])
def test_dockerfiles_copy_existing_paths_and_install_with_the_pins(flavour):
    text = (DEPLOY / f"docker/Dockerfile.{flavour}").read_text()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile.{flavour}: COPY {src}: no such path"
    (install,) = re.findall(r"pip install (-c \S+) -e", text)
    if flavour == "gpu":  # the base image's CUDA torch stays: torch/torchvision pins dropped
        assert "grep -vE '^(torch|torchvision)==' requirements/pins.txt > /tmp/pins-system-torch.txt" in text
        assert install == "-c /tmp/pins-system-torch.txt"
    else:
        assert install == "-c requirements/pins.txt"
    ignore = (DEPLOY / f"docker/Dockerfile.{flavour}.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
