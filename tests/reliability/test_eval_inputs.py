"""Evaluation trusts nothing it reads: exports made by the real `crossmae-export`, then damaged on
disk or in the S3 store, are refused by every job (k-NN, linear probe, fine-tune, load_timm) in one
line naming the export and the file (exit 2); non-finite features or weights are an error naming
the export; results record the sha256 of the bytes read; nonsense options of crossmae-eval and
crossmae-export are refused naming the option; OS and library errors name their file."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from crossmae import CheckpointError, create_model
from crossmae.interop import library_to_released
from crossmae.timm_export import load_timm
from pipelines import storage
from pipelines.evaluate import main as eval_main
from pipelines.export import main as export_main
from tests.pipelines.test_evaluate import digits  # noqa: F401 - the digits fixture (1,500 / 297 images)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRESET = "crossmae_vit_micro_patch4_dec64d2b"
TORCH_LOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d")
ENV = dict(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))


def released_pth(path: pathlib.Path, nan_weight: bool = False) -> pathlib.Path:
    torch.manual_seed(0)
    state = library_to_released(create_model(PRESET).state_dict())
    if nan_weight:  # a diverged run: the file is intact and its hashes are right
        state["blocks.1.mlp.fc1.weight"][0, :4] = float("nan")
    args = argparse.Namespace(mask_ratio=0.75, kept_mask_ratio=0.75, norm_pix_loss=False)
    torch.save(dict(model=state, args=args), path)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Exports written by the real CLI (`crossmae-export released`): a random-init micro CrossMAE,
    and the same with NaN in one weight matrix."""
    root = tmp_path_factory.mktemp("eval-inputs")
    for name, nan in (("micro", False), ("diverged", True)):
        pth = released_pth(root / f"{name}.pth", nan)
        assert export_main(["released", str(pth), str(root / "exports"), "--preset", PRESET]) == 0
    return dict(root=root, micro=root / "exports/micro", diverged=root / "exports/diverged", pth=root / "micro.pth")


def copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def overwrite_middle(data: bytes) -> bytes:
    """The issue's damage: the middle third 0x7f, same size, header intact (it still parses)."""
    n = len(data)
    return data[:n // 3] + b"\x7f" * (2 * n // 3 - n // 3) + data[2 * n // 3:]


def cli(module: str, *args: str, timeout: int = 300) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=dict(os.environ, **ENV),
                          capture_output=True, text=True, timeout=timeout)
    # torch's own C++ log lines ("W1202 01:22:23.96 ... No CUDA runtime is found") are not the tool's
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not TORCH_LOG.match(ln)]
    return proc.returncode, lines, proc.stderr


def knn_args(digits, target, *extra) -> list[str]:  # noqa: F811
    return ["knn", "--train", digits["val"], "--val", digits["val"], str(target), "--workers", "0", *extra]


def record(record_property, fault: str, checked: str) -> None:
    record_property("fault", fault)
    record_property("trials", 1)
    record_property("checked", checked)
    record_property("result", "pass")


@pytest.mark.parametrize("job", ["knn", "linprobe"])
def test_an_export_overwritten_in_place_is_refused_by_the_eval_cli(job, exports, digits, tmp_path,  # noqa: F811
                                                                    record_property):
    """crossmae-eval knn / linprobe refuse an export whose model.safetensors was overwritten (0x7f, same size)."""
    export = copy(exports["micro"], tmp_path / "e")
    path = export / "model.safetensors"
    path.write_bytes(overwrite_middle(path.read_bytes()))
    argv = knn_args(digits, export)
    if job == "linprobe":
        argv = ["linprobe", *argv[1:], "--epochs", "2", "--warmup-epochs", "0"]
    code, lines, stderr = cli("pipelines.evaluate", *argv)
    # before: NaN features, top-1 8%, exit 0, and eval/knn.json with the sha256 export.json claimed
    assert code == 2, stderr
    assert lines[0].startswith(f"crossmae-eval: {export}: model.safetensors does not match its export.json"), lines
    assert "Traceback" not in stderr and not (export / "eval" / f"{job}.json").exists()
    record(record_property, f"export's model.safetensors overwritten in place, same size (crossmae-eval {job})",
           "exit 2, one line naming the export and model.safetensors, no result written")


def test_cached_features_do_not_vouch_for_a_damaged_export(exports, digits, tmp_path, capsys):  # noqa: F811
    export = copy(exports["micro"], tmp_path / "e")
    assert eval_main(knn_args(digits, export)) == 0
    good = (export / "eval/knn.json").read_bytes()
    path = export / "model.safetensors"
    path.write_bytes(overwrite_middle(path.read_bytes()))
    capsys.readouterr()
    assert eval_main(knn_args(digits, export, "--force")) == 2  # the features are cached: the file is still read
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"crossmae-eval: {export}: model.safetensors does not match"), err
    assert (export / "eval/knn.json").read_bytes() == good, "the result of the intact weights is left as it was"


def test_the_result_records_the_sha256_of_the_bytes_it_read_once(exports, digits, tmp_path, monkeypatch):  # noqa: F811
    export = copy(exports["micro"], tmp_path / "e")
    reads = []
    for name in ("read_bytes", "open_read"):
        real = getattr(storage, name)

        def spy(url, *a, _real=real, **k):
            reads.append(str(url))
            return _real(url, *a, **k)
        monkeypatch.setattr(storage, name, spy)
    assert eval_main(knn_args(digits, export)) == 0  # features computed: the encoder is built from the same bytes
    res = json.loads((export / "eval/knn.json").read_text())
    record_ = json.loads((export / "export.json").read_text())
    for name in ("model.safetensors", "config.json"):
        assert res["read_sha256"][name] == hashlib.sha256((export / name).read_bytes()).hexdigest()
        assert res["read_sha256"][name] == record_["files"][name]["sha256"]
    assert res["verified"] is True and res["weights_sha256"] == record_["weights_sha256"]
    assert reads.count(str(export / "model.safetensors")) == 1, reads


def test_non_finite_weights_are_an_error_naming_the_export(exports, digits, tmp_path, record_property):  # noqa: F811
    """An export of a diverged run (NaN in one weight matrix, hashes intact): crossmae-eval refuses it."""
    export = copy(exports["diverged"], tmp_path / "e")
    code, lines, stderr = cli("pipelines.evaluate", *knn_args(digits, export))
    assert code == 2, stderr
    assert lines[0].startswith(f"crossmae-eval: {export}: the encoder gives non-finite features for 297 of 297 "), lines
    assert not (export / "eval/knn.json").exists()
    assert not list((export / "eval").rglob("*.safetensors")), "no feature cache of NaN"
    record(record_property, "export of a diverged run (NaN weights, valid sha256), crossmae-eval knn",
           "exit 2, one line naming the export and the non-finite features, no result or feature cache")


def test_config_json_edited_after_export_is_refused(exports, digits, tmp_path, capsys):  # noqa: F811
    export = copy(exports["micro"], tmp_path / "e")
    text = (export / "config.json").read_text()
    (export / "config.json").write_text(text.replace('"global_pool": "avg"', '"global_pool": "token"'))
    assert eval_main(knn_args(digits, export)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"crossmae-eval: error: {export}: config.json does not match"), err


@pytest.mark.parametrize("damage", ["overwritten", "nan weights"])
def test_finetune_refuses_a_damaged_export(damage, exports, digits, tmp_path, record_property):  # noqa: F811
    """crossmae-eval finetune refuses an overwritten model.safetensors and NaN weights before training."""
    export = copy(exports["micro" if damage == "overwritten" else "diverged"], tmp_path / "e")
    if damage == "overwritten":
        (export / "model.safetensors").write_bytes(overwrite_middle((export / "model.safetensors").read_bytes()))
    code, lines, stderr = cli("pipelines.finetune", export, f"data.train={digits['val']}", f"data.val={digits['val']}",
                              "data.num_workers=0", "deepspeed.micro_batch=32", "optim.epochs=2", "run.max_epochs=1",
                              "optim.warmup_epochs=1", f"run.output={tmp_path / 'run'}")
    want = "model.safetensors does not match its export.json" if damage == "overwritten" else \
        "model.safetensors holds non-finite weights (1 tensors: blocks.1.mlp.fc1.weight)"
    assert code == 2 and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"crossmae-eval finetune: error: {export}: {want}"), lines
    assert not (export / "eval/finetune.json").exists()
    record(record_property, f"crossmae-eval finetune of an export with {damage} weights",
           "exit 2 before training, one line naming the export and the file, no result")


def test_load_timm_refuses_a_damaged_export(exports, tmp_path):
    export = copy(exports["micro"], tmp_path / "e")
    load_timm(export)  # intact: loads
    (export / "model.safetensors").write_bytes(overwrite_middle((export / "model.safetensors").read_bytes()))
    with pytest.raises(CheckpointError, match=f"{export}: model.safetensors does not match its export.json"):
        load_timm(export)


def test_an_export_damaged_in_the_s3_store_is_refused(exports, digits, s3_bucket, capsys,  # noqa: F811
                                                       record_property):
    """An export in the S3 store whose model.safetensors was replaced by same-size garbage is refused."""
    prefix = f"s3://{s3_bucket}/exports"
    assert export_main(["released", str(exports["pth"]), prefix, "--preset", PRESET]) == 0  # the real CLI, to S3
    url = f"{prefix}/micro/model.safetensors"
    storage.write_bytes(url, overwrite_middle(storage.read_bytes(url)))
    capsys.readouterr()
    assert eval_main(knn_args(digits, prefix)) == 2  # the prefix: a sweep over the store
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"crossmae-eval: {prefix}/micro: model.safetensors does not match its export.json"), err
    assert not storage.exists(f"{prefix}/micro/eval/knn.json")
    record(record_property, "export in the S3 store overwritten with same-size garbage (crossmae-eval knn sweep)",
           "exit 2, one line naming the s3:// export and model.safetensors, no result written")


EVAL_OPTIONS = [  # every one of these ran (or crashed deep inside) before: 8% top-1 at --temperature 0
    (["--temperature", "0"], "--temperature"), (["--temperature", "-0.07"], "--temperature"),
    (["--temperature", "nan"], "--temperature"), (["--temperature", "inf"], "--temperature"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-8"], "--batch-size"),
    (["--workers", "-1"], "--workers"), (["--name", "../escape"], "--name"), (["--device", "cuda:99"], "--device"),
    (["linprobe", "--epochs", "0"], "--epochs"), (["linprobe", "--probe-batch", "0"], "--probe-batch"),
    (["linprobe", "--lr", "0"], "--lr"), (["linprobe", "--lr", "nan"], "--lr"), (["linprobe", "--blr", "-1"], "--blr"),
    (["linprobe", "--warmup-epochs", "-1"], "--warmup-epochs"), (["linprobe", "--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("extra, option", EVAL_OPTIONS, ids=[" ".join(e) for e, _ in EVAL_OPTIONS])
def test_nonsense_eval_options_are_refused_naming_the_option(extra, option, exports, digits, tmp_path,  # noqa: F811
                                                             capsys, record_property):
    """crossmae-eval refuses a nonsense option value in one line naming the option (exit 2), before any work."""
    export = copy(exports["micro"], tmp_path / "e")
    job, extra = ("linprobe", extra[1:]) if extra[0] == "linprobe" else ("knn", extra)
    quick = ["--epochs", "1", "--warmup-epochs", "0"] if job == "linprobe" else []  # the case's own value comes last
    assert eval_main([job, *knn_args(digits, export)[1:], *quick, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"crossmae-eval {job}: error: argument {option}"), err
    assert not (export / "eval").exists() and not (tmp_path / "escape.json").exists()
    record(record_property, f"crossmae-eval {job} {' '.join(extra)}", "exit 2, one line naming the option, nothing evaluated")


FINETUNE_OPTIONS = ["optim.epochs=0", "optim.lr=0", "optim.lr=nan", "optim.blr=-1", "optim.betas=[0.9,1.5]",
                    "deepspeed.micro_batch=0", "run.eval_every=0", "run.seed=-1", "model.drop_path=1.5",
                    "augment.smoothing=1.5", "augment.reprob=2", "augment.crop_scale=[0.9,0.1]",
                    "augment.randaug=bogus"]


def test_nonsense_finetune_options_are_refused_naming_the_key(exports, digits, tmp_path,  # noqa: F811
                                                              record_property, monkeypatch, capsys):
    """crossmae-eval finetune refuses each nonsense config value in one line naming the key (exit 2),
    before training starts. In-process through its main (13 processes took 116 s of the suite); the
    first case also runs as the command, so the entry point and the exit code are the real ones."""
    from pipelines.eval import finetune as ft

    export = copy(exports["micro"], tmp_path / "e")
    base = [str(export), f"data.train={digits['val']}", f"data.val={digits['val']}", "data.num_workers=0",
            "deepspeed.micro_batch=32", "optim.epochs=2", "run.max_epochs=1", "optim.warmup_epochs=1",
            f"run.output={tmp_path / 'run'}"]
    code, lines, stderr = cli("pipelines.finetune", *base, FINETUNE_OPTIONS[0], timeout=240)
    assert code == 2 and len(lines) == 1 and "optim.epochs" in lines[0] and "Traceback" not in stderr, lines

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(ft, "finetune", no_training)
    wrong = {}
    for override in FINETUNE_OPTIONS:
        try:
            code = ft.main([*base, override])
        except AssertionError as e:  # a value that passed the checks and reached training
            code = str(e)
        lines = capsys.readouterr().err.strip().splitlines()
        key = override.split("=")[0]
        if not (code == 2 and len(lines) == 1 and lines[0].startswith("crossmae-eval finetune: error: ")
                and key in lines[0]):
            wrong[override] = (code, lines[-1:])
    record_property("fault", f"crossmae-eval finetune nonsense values: {', '.join(FINETUNE_OPTIONS)}")
    record_property("trials", len(FINETUNE_OPTIONS))
    record_property("checked", "each: exit 2, one line naming the config key, no training")
    record_property("result", "pass" if not wrong else f"FAIL: {sorted(wrong)}")
    assert not wrong, wrong
    assert not (export / "eval").exists()


@pytest.mark.parametrize("argv, message", [
    (["--name", "../escape"], "--name must be a plain directory name"),
    (["--name", ""], "--name must be a plain directory name"),
    (["--preset", "vit_bogus"], "--preset: unknown model preset 'vit_bogus'"),
])
def test_nonsense_export_options_are_refused_naming_the_option(argv, message, exports, tmp_path, capsys):
    out = tmp_path / "out" / "exports"
    assert export_main(["released", str(exports["pth"]), str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"crossmae-export: error: {message}"), err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- OS and library errors name their file
def test_damaged_files_around_an_export_are_named_in_one_line(exports, digits, tmp_path, capsys):  # noqa: F811
    prefix = tmp_path / "exports"
    a, b = copy(exports["micro"], prefix / "a"), copy(exports["micro"], prefix / "b")
    assert eval_main(knn_args(digits, prefix)) == 0
    capsys.readouterr()
    cache = next((a / "eval/features").iterdir())
    cache.write_bytes(b"torn")  # a feature cache cut short: recomputed, and said
    assert eval_main(knn_args(digits, a, "--force")) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"crossmae-eval: {cache}: damaged feature cache (SafetensorError: ") and \
        err[0].endswith("): recomputing"), err
    (b / "eval/knn.json").write_text('{"job": "knn", "metr')  # a result cut short: left out of the report, said
    assert eval_main(["report", str(prefix), "--report", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"crossmae-eval report: {b}/eval/knn.json: not valid JSON ("), err
    assert "| a |" in (tmp_path / "rep/report.md").read_text() and "| b |" not in (tmp_path / "rep/report.md").read_text()
    (b / "export.json").write_text('{"tag": "micro", "st')  # one export given alone: its export.json is named
    assert eval_main(knn_args(digits, b)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"crossmae-eval: error: ValueError: {b}/export.json: not valid JSON"), err


def test_finetune_os_and_library_errors_are_one_line_naming_the_file(exports, digits, tmp_path):  # noqa: F811
    export = copy(exports["micro"], tmp_path / "e")
    (tmp_path / "bad.json").write_text("{not json")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    common = [export, f"data.val={digits['val']}", "data.num_workers=0", "deepspeed.micro_batch=32",
              "optim.epochs=2", "run.max_epochs=1", "optim.warmup_epochs=1"]
    code, lines, stderr = cli("pipelines.finetune", *common, f"data.train={tmp_path / 'bad.json'}",
                              f"run.output={tmp_path / 'run'}")
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith(f"crossmae-eval finetune: error: data.train {tmp_path / 'bad.json'}: not a manifest")
    code, lines, stderr = cli("pipelines.finetune", *common, f"data.train={digits['val']}",
                              f"run.output={blocker / 'run'}")  # the run directory cannot be made
    assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith("crossmae-eval finetune: error: ") and str(blocker) in lines[-1], lines


def test_export_failure_names_the_file_it_could_not_read(exports, tmp_path, capsys):
    torn = tmp_path / "torn.pth"
    torn.write_bytes(exports["pth"].read_bytes()[:400_000])  # a download cut short
    assert export_main(["released", str(torn), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("crossmae-export: failed torn: CheckpointError: ") and err[0].endswith(f"(reading {torn})")
