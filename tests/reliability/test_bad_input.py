"""Bad data and bad input: damaged shards are detected (crossmae-prep verify), counted by the
loader (StreamingLoader.stats) and trained through; every CLI turns bad arguments, missing
files, an unreachable endpoint and bad credentials into one stderr line and a non-zero exit."""
from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

from data_prep.cli import main as prep
from pipelines.data.transforms import MAETrainTransform
from pipelines.data.loader import StreamingLoader
from tests.data_prep.fixtures import make_image_folder
from tests.pipelines.test_pretrain import ARGS

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = dict(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> pathlib.Path:
    """64 real JPEGs in 4 classes -> 4 shards of 16 samples (train-000000..3.tar)."""
    root = tmp_path_factory.mktemp("bad-input")
    make_image_folder(root / "src", ("a", "b", "c", "d"), per_class=16)
    assert prep(["folder", str(root / "src"), str(root / "wds"), "--shard-samples", "16"]) == 0
    return root / "wds"


def rewrite_shard(path: pathlib.Path, edit) -> int:
    """Rewrite a tar member by member: edit(index, name, data) -> new data, or None to drop the
    member. Returns the number of members changed or dropped."""
    out, changed = io.BytesIO(), 0
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for i, m in enumerate(src.getmembers()):
            data = src.extractfile(m).read()
            new = edit(i, m.name, data)
            changed += new != data
            if new is not None:
                m.size = len(new)
                dst.addfile(m, io.BytesIO(new))
    path.write_bytes(out.getvalue())
    return changed


def damage(clean: pathlib.Path, dst: pathlib.Path, truncate: bool = False) -> dict:
    """A copy of the dataset with real damage; returns what the loader must count per reason.

    shard 0: 3 JPEGs replaced by non-image bytes (undecodable: DecodeError)
    shard 1: bytes flipped inside the entropy-coded data of 2 JPEGs (decodes to garbage or
             fails: either is fine, the loader must not stop); its manifest hash is left stale
    shard 2: 4 labels removed (KeyError) and 2 labels not an integer (ValueError)
    shard 3: its manifest sha256 is wrong (the shard itself is intact)
    truncate: shard 1 is also cut in the middle of a member (half of its bytes are kept)
    """
    shutil.copytree(clean, dst)
    split = dst / "train"
    jpgs = lambda name: name.endswith(".jpg")  # noqa: E731
    assert rewrite_shard(split / "train-000000.tar",
                         lambda i, n, d: b"this is not an image" * 10 if jpgs(n) and i < 6 else d) == 3

    def flip(i, n, d):
        if not jpgs(n) or i >= 4:
            return d
        b = bytearray(d)
        for j in range(len(b) // 2, len(b) - 4, 97):  # inside the scan, away from the headers
            b[j] ^= 0x5A
        return bytes(b)

    assert rewrite_shard(split / "train-000001.tar", flip) == 2
    labels = {"KeyError": 0, "ValueError": 0}

    def relabel(i, n, d):
        if not n.endswith(".cls") or i >= 24:
            return d
        kind = "KeyError" if i < 16 else "ValueError"
        labels[kind] += 1
        return None if kind == "KeyError" else b"dog"

    rewrite_shard(split / "train-000002.tar", relabel)
    assert labels == {"KeyError": 8, "ValueError": 4}  # members 1, 3, ... 15 and 17, ... 23
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"][3]["sha256"] = "0" * 64
    (split / "manifest.json").write_text(json.dumps(manifest))
    if truncate:
        shard = split / "train-000001.tar"
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2 + 100])  # mid-member: a partial upload, a full disk
    return dict(DecodeError=3, KeyError=8, ValueError=4)


def test_verify_names_every_damaged_shard(clean, tmp_path, capsys, record_property):
    """crossmae-prep verify: rewritten, truncated and stale-hash shards are each reported corrupt (exit 1)."""
    damage(clean, tmp_path / "d", truncate=True)
    capsys.readouterr()
    assert prep(["verify", str(tmp_path / "d"), "--splits", "train"]) == 1
    err = capsys.readouterr().err
    assert "0 missing, 4 corrupt" in err, err
    for i in range(4):
        assert f"train-00000{i}.tar" in err
    (tmp_path / "d/train/train-000003.tar").unlink()
    assert prep(["verify", str(tmp_path / "d"), "--splits", "train"]) == 1
    assert "1 missing, 3 corrupt" in capsys.readouterr().err
    record_property("fault", "damaged shards: rewritten JPEGs/labels, flipped bytes, truncated tar, wrong manifest "
                             "sha256, missing shard")
    record_property("trials", 2)
    record_property("checked", "crossmae-prep verify exits 1 and names each damaged / missing shard")
    record_property("result", "pass")


def epoch_stats(manifest: str) -> tuple[int, dict]:
    loader = StreamingLoader.from_manifest(manifest, batch_size=8, transform=MAETrainTransform(32), block_size=16)
    n = 0
    for batch in loader:
        assert batch["image"].shape == (8, 3, 32, 32) and int(batch["valid"].sum()) <= 8
        n += len(batch["key"])
    return n, {k: v for k, v in loader.stats.items() if k != "samples"}


def test_loader_counts_damaged_samples_and_finishes_the_epoch(clean, tmp_path, record_property):
    """The loader replaces undecodable samples and missing / bad labels, counts each by reason, never stops."""
    expected = damage(clean, tmp_path / "d")
    n, stats = epoch_stats(str(tmp_path / "d/train/manifest.json"))
    assert n == 64, "batch sizes never change: corrupt samples are substituted"
    flipped = stats.pop("DecodeError", 0) - expected.pop("DecodeError")
    assert 0 <= flipped <= 2, stats  # the 2 bit-flipped JPEGs may still decode (to garbage)
    assert stats == expected
    record_property("fault", "undecodable JPEGs, flipped JPEG bytes, missing labels, non-integer labels")
    record_property("trials", 1)
    record_property("checked", "one full epoch, batch sizes kept, loader.stats counts per reason exact")
    record_property("result", "pass")


def test_loader_counts_a_truncated_shard_and_finishes_the_epoch(clean, tmp_path, record_property):
    """A shard cut mid-member: the samples after the cut are counted as missing; the epoch completes."""
    record_property("fault", "truncated tar (half a shard, cut inside a member)")
    record_property("trials", 1)
    record_property("checked", "epoch completes, samples after the cut counted as 'missing'")
    record_property("result", "pass")
    damage(clean, tmp_path / "d", truncate=True)
    n, stats = epoch_stats(str(tmp_path / "d/train/manifest.json"))
    assert n == 64 and 0 < stats.get("missing", 0) < 16, stats


def test_trainer_trains_through_damaged_data_and_logs_the_counts(clean, tmp_path, record_property):
    """A plain-process trainer run over a damaged dataset completes one epoch and logs skipped_samples per reason."""
    expected = damage(clean, tmp_path / "d")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipelines.pretrain", *ARGS, f"data.train={tmp_path / 'd/train/manifest.json'}",
           "data.num_workers=0", "data.block_size=16", f"run.output={out}", "run.max_steps=8", "run.save_every=8",
           "data.max_skipped_fraction=0.5"]  # deliberately damaged: above the 1% default the run would stop
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 8, "8 steps of 8 samples: exactly the 64 samples of one epoch"
    reasons = dict(last["skipped_samples_rank0"])
    flipped = reasons.pop("DecodeError", 0) - expected.pop("DecodeError")
    assert 0 <= flipped <= 2 and reasons == expected, last
    assert last["skipped_samples"] == sum(expected.values()) + 3 + flipped
    record_property("fault", "damaged dataset (undecodable JPEGs, flipped bytes, missing/bad labels) under training")
    record_property("trials", 1)
    record_property("checked", "crossmae-pretrain exits 0 after one epoch; metrics.jsonl skipped_samples per reason exact")
    record_property("result", "pass")


# ---------------------------------------------------------------- every CLI, bad input
PREP, PRETRAIN, EXPORT, EVAL, FINETUNE = ("data_prep.cli", "pipelines.pretrain", "pipelines.export",
                                          "pipelines.evaluate", "pipelines.finetune")
UNREACHABLE = dict(AWS_ENDPOINT_URL="http://127.0.0.1:1", AWS_ACCESS_KEY_ID="AKIAEXAMPLEEXAMPLE",
                   AWS_SECRET_ACCESS_KEY="unreachable-secret-1234", AWS_DEFAULT_REGION="us-east-1",
                   CROSSMAE_S3_ATTEMPTS="2")  # pipelines/storage/s3.py: per-request attempts (default 8)
WRONG_SECRET = "wrong-secret-value-9d7e"
# (id, module, argv, env kind, stderr lines): SRC/OUT/MISSING/BUCKET/MANIFEST are filled in;
# env None | "unreachable" | "badcreds"
CASES = [
    ("prep-bad-argument", PREP, ["folder", "SRC", "OUT", "--shard-bytes", "lots"], None, 1),
    ("prep-unknown-command", PREP, ["resize", "SRC"], None, 1),
    ("prep-missing-source", PREP, ["folder", "MISSING", "OUT"], None, 1),
    ("prep-verify-missing-manifest", PREP, ["verify", "OUT", "--splits", "train"], None, 1),
    ("prep-unreachable-endpoint", PREP, ["folder", "SRC", "s3://bucket/x"], "unreachable", 1),
    ("prep-bad-credentials", PREP, ["folder", "SRC", "s3://BUCKET/x"], "badcreds", 1),
    # checked at the door (exit 2, nothing written; tests/data_prep/test_cli_input.py checks both)
    ("prep-negative-shard-samples", PREP, ["folder", "SRC", "OUT", "--shard-samples", "-5"], None, 1),
    ("prep-zero-processes", PREP, ["folder", "SRC", "OUT", "--processes", "0"], None, 1),
    ("prep-quality-out-of-range", PREP, ["folder", "SRC", "OUT", "--quality", "500"], None, 1),
    ("prep-zero-num-workers", PREP, ["folder", "SRC", "OUT", "--num-workers", "0"], None, 1),
    ("prep-destination-inside-source", PREP, ["folder", "SRC", "SRC/a/out"], None, 1),
    ("pretrain-unknown-key", PRETRAIN, ["optim.bogus=1", "data.train=x"], None, 1),
    pytest.param("pretrain-missing-manifest", PRETRAIN, ["data.train=MISSING/manifest.json", "run.output=OUT"],
                 None, 1, id="pretrain-missing-manifest"),
    pytest.param("pretrain-unreachable-endpoint", PRETRAIN, ["data.train=s3://bucket/m.json", "run.output=OUT"],
                 "unreachable", 1, id="pretrain-unreachable-endpoint"),
    pytest.param("pretrain-bad-credentials", PRETRAIN, ["data.train=s3://BUCKET/m.json", "run.output=OUT"],
                 "badcreds", 1, id="pretrain-bad-credentials"),
    ("export-bad-select", EXPORT, ["SRC", "OUT", "--select", "bogus"], None, 1),
    ("export-missing-run", EXPORT, ["MISSING", "OUT"], None, 1),
    ("export-released-missing-file", EXPORT, ["released", "MISSING/x.pth", "OUT"], None, 1),
    # a batch tool: one line per failed item, then the summary line (exit 1)
    ("export-released-not-a-checkpoint", EXPORT, ["released", "SRC/a/a_0000.jpg", "OUT"], None, 2),
    ("export-unreachable-endpoint", EXPORT, ["s3://bucket/run", "OUT"], "unreachable", 1),
    ("export-bad-credentials", EXPORT, ["s3://BUCKET/run", "OUT"], "badcreds", 1),
    ("eval-missing-option", EVAL, ["knn", "OUT"], None, 1),
    ("eval-knn-missing-files", EVAL, ["knn", "MISSING", "--train", "MISSING/t.json", "--val", "MISSING/v.json"],
     None, 1),
    ("eval-report-nothing", EVAL, ["report", "MISSING"], None, 1),
    ("eval-knn-unreachable-endpoint", EVAL, ["knn", "s3://bucket/e", "--train", "s3://bucket/t.json", "--val",
                                             "s3://bucket/v.json"], "unreachable", 1),
    ("eval-knn-bad-credentials", EVAL, ["knn", "s3://BUCKET/e", "--train", "s3://BUCKET/t.json", "--val",
                                        "s3://BUCKET/v.json"], "badcreds", 1),
    ("eval-finetune-unknown-key", EVAL, ["finetune", "OUT", "optim.bogus=1"], None, 1),
    ("finetune-missing-export", FINETUNE, ["MISSING", "data.train=MANIFEST", "data.val=MANIFEST"], None, 1),
    ("finetune-unreachable-endpoint", FINETUNE, ["s3://bucket/e", "data.train=s3://bucket/t.json",
                                                 "data.val=s3://bucket/v.json"], "unreachable", 1),
    ("finetune-bad-credentials", FINETUNE, ["s3://BUCKET/e", "data.train=s3://BUCKET/t.json",
                                            "data.val=s3://BUCKET/v.json"], "badcreds", 1),
]
PROGS = {PREP: "crossmae-prep", PRETRAIN: "crossmae-pretrain", EXPORT: "crossmae-export", EVAL: "crossmae-eval",
         FINETUNE: "crossmae-eval finetune"}  # every line a tool writes starts with its name


@pytest.fixture
def cli_env(request, monkeypatch):
    """The environment of one case: unreachable endpoint, or the test server with a wrong secret."""
    kind = request.param
    env = dict(os.environ, **ENV)
    if kind == "unreachable":
        env.update(UNREACHABLE)
    bucket = None
    if kind == "badcreds":
        s3 = request.getfixturevalue("s3_env")
        bucket = s3.create_bucket()
        request.addfinalizer(lambda: s3.delete_bucket(bucket))
        env.update(s3.env(), AWS_SECRET_ACCESS_KEY=WRONG_SECRET, AWS_CONFIG_FILE=os.devnull,
                   AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env, bucket


@pytest.mark.parametrize("case,module,argv,cli_env,n_lines",
                         [pytest.param(*c, id=c[0]) if type(c) is tuple else c for c in CASES],
                         indirect=["cli_env"])
def test_cli_user_error_is_one_line_and_a_nonzero_exit(case, module, argv, cli_env, n_lines, clean, tmp_path,
                                                       record_property):
    """Each CLI turns a user error into one stderr line naming the tool, a non-zero exit and no traceback."""
    env, bucket = cli_env
    fill = {"SRC": str(clean.parent / "src"), "OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing"),
            "MANIFEST": str(clean / "train/manifest.json"), "BUCKET": bucket or "no-bucket"}
    args = list(argv)
    for key, value in fill.items():
        args = [a.replace(key, value) for a in args]
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    ok = (proc.returncode != 0 and "Traceback" not in proc.stderr and len(lines) == n_lines
          and all(ln.startswith(PROGS[module]) for ln in lines) and WRONG_SECRET not in proc.stderr + proc.stdout)
    record_property("fault", f"CLI user error: {case}")
    record_property("trials", 1)
    record_property("checked", f"non-zero exit, {n_lines} stderr line(s) naming the tool, no traceback, no secret")
    record_property("result", "pass" if ok else f"FAIL: exit {proc.returncode}, {len(lines)} stderr lines")
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == n_lines and all(ln.startswith(PROGS[module]) for ln in lines), proc.stderr[-3000:]
    assert WRONG_SECRET not in proc.stderr + proc.stdout
