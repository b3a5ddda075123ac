"""crossmae-export on real checkpoints: a 2-process ZeRO-2 run (local and mirrored to the S3
server) and short ZeRO-0/1/3 runs, exported to timm safetensors; the exports hold exactly the
trained encoder, re-runs skip, half-written exports are redone, bad input is one line."""
import argparse
import hashlib
import json
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from crossmae import MaskedAutoencoder, ModelConfig, create_model, create_timm_encoder
from crossmae.interop import library_to_released
from crossmae.timm_export import tensors_sha256
from pipelines import storage
from pipelines.export import main
from pipelines.checkpoints.export import export_checkpoint
from tests.conftest import smooth_images
from tests.pipelines.test_pretrain import consolidated, launch, manifest  # noqa: F401 (manifest: a fixture)

TAGS = ["step00000002", "step00000004", "step00000006"]


@pytest.fixture(scope="module")
def run(manifest, s3_server, tmp_path_factory):  # noqa: F811
    """One ZeRO-2 run, 2 processes, checkpoints at steps 2, 4, 6, mirrored to an S3 store."""
    bucket = s3_server.create_bucket()
    out = tmp_path_factory.mktemp("export") / "run"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        launch(manifest, out, "run.max_steps=6", "run.save_every=2", "run.keep_last=10",
               f"run.store=s3://{bucket}/runs/r1")
    yield dict(dir=out, store=f"s3://{bucket}/runs/r1", bucket=bucket, manifest=manifest)
    s3_server.delete_bucket(bucket)


def trained_encoder(run_dir, tag) -> MaskedAutoencoder:
    """The reference: DeepSpeed's consolidation loaded strictly into the library model."""
    from pipelines.runtime.config_loader import load
    from pipelines.train.config import PretrainConfig

    model = MaskedAutoencoder(load(PretrainConfig, str(pathlib.Path(run_dir) / "config.yaml")).model_config())
    model.load_state_dict(consolidated(run_dir, tag))
    return model.eval()


def assert_same_features(export_dir, reference: MaskedAutoencoder):
    export_dir = pathlib.Path(export_dir)
    vit, missing = create_timm_encoder(json.loads((export_dir / "config.json").read_text()),
                                       load_file(str(export_dir / "model.safetensors")))
    assert missing == []
    x = smooth_images(4)
    with torch.no_grad():
        assert torch.allclose(vit.eval().forward_features(x), reference.encoder(x), atol=1e-5)


def exported(out) -> list[str]:
    return sorted(p.parent.name for p in pathlib.Path(out).glob("*/export.json"))


def summary(out) -> dict:
    return json.loads((pathlib.Path(out) / "export-summary.json").read_text())


def test_zero2_exports_hold_the_trained_encoder_with_provenance(run, tmp_path, capsys):
    out = tmp_path / "exports"
    assert main([str(run["dir"]), str(out), "--jobs", "2"]) == 0  # two spawned worker processes
    assert exported(out) == TAGS
    assert "exported 3, skipped 0, failed 0" in capsys.readouterr().err
    hashes = set()
    for tag in TAGS:
        assert_same_features(out / tag, trained_encoder(run["dir"], tag))
        rec = json.loads((out / tag / "export.json").read_text())
        tensors = load_file(str(out / tag / "model.safetensors"))
        assert rec["weights_sha256"] == tensors_sha256(tensors)
        assert rec["files"]["model.safetensors"]["sha256"] == hashlib.sha256(
            (out / tag / "model.safetensors").read_bytes()).hexdigest()
        assert rec["source"] == str(run["dir"] / "checkpoints" / tag) and rec["tag"] == tag
        assert rec["step"] == int(tag[4:]) and rec["zero_stage"] == 2 and rec["world_size"] == 2
        # 128 samples / 2 ranks / micro batch 8 = 8 steps per epoch
        assert (rec["epoch"], rec["epochs_done"]) == (0, rec["step"] / 8)
        assert rec["preset"] == "crossmae_vit_micro_patch4_dec64d2b"
        assert rec["config_sha256"] == hashlib.sha256((run["dir"] / "config.yaml").read_bytes()).hexdigest()
        assert rec["data_manifest"]["sha256"] == hashlib.sha256(pathlib.Path(run["manifest"]).read_bytes()).hexdigest()
        assert rec["code_version"] and "full.safetensors" not in rec["files"]
        hashes.add(rec["weights_sha256"])
    assert len(hashes) == 3, "each checkpoint exports its own weights"
    assert [i["status"] for i in summary(out)["items"]] == ["exported"] * 3


def test_select_latest_every_and_tags(run, tmp_path):
    for spec, want in (("latest", TAGS[2:]), ("every:4", TAGS[1:2]), ("tags:step00000006,step00000002", TAGS[::2])):
        out = tmp_path / spec.replace(":", "_")
        assert main([str(run["dir"]), str(out), "--select", spec]) == 0
        assert exported(out) == want, spec


def test_rerun_skips_and_a_half_written_export_is_redone(run, tmp_path, capsys):
    out = tmp_path / "exports"
    # make demo's call: one checkpoint into one directory; the batch then sees it as done
    assert export_checkpoint(str(run["dir"]), TAGS[0], str(out / TAGS[0]))["status"] == "exported"
    assert main([str(run["dir"]), str(out)]) == 0
    assert (summary(out)["exported"], summary(out)["skipped"]) == (2, 1)
    assert main([str(run["dir"]), str(out)]) == 0
    assert (summary(out)["exported"], summary(out)["skipped"]) == (0, 3)

    first = (out / TAGS[1] / "model.safetensors").stat().st_mtime_ns
    (out / TAGS[1] / "export.json").unlink()  # a crash before the commit marker
    (out / TAGS[2] / "model.safetensors").write_bytes(b"torn")  # damaged after the fact
    assert main([str(run["dir"]), str(out)]) == 0
    s = summary(out)
    assert (s["exported"], s["skipped"]) == (2, 1)
    assert [i["status"] for i in s["items"]] == ["skipped", "exported", "exported"]
    assert (out / TAGS[1] / "model.safetensors").stat().st_mtime_ns != first
    assert_same_features(out / TAGS[2], trained_encoder(run["dir"], TAGS[2]))

    assert main([str(run["dir"]), str(out), "--select", "latest", "--full"]) == 0  # asks for more: redone
    assert summary(out)["exported"] == 1
    full = load_file(str(out / TAGS[2] / "full.safetensors"))
    reference = trained_encoder(run["dir"], TAGS[2]).state_dict()
    assert full.keys() == reference.keys() and all(torch.equal(full[k], reference[k]) for k in full)
    assert "exported 1, skipped 0, failed 0" in capsys.readouterr().err


def test_a_broken_checkpoint_fails_alone(run, tmp_path, capsys):
    src = tmp_path / "run"
    shutil.copytree(run["dir"], src)
    (src / "checkpoints" / TAGS[1] / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(f"crossmae-export: failed {TAGS[1]}: DamagedCheckpoint: checkpoint {TAGS[1]} is damaged (")
    assert "exported 2, skipped 0, failed 1" in err[1]
    assert exported(tmp_path / "out") == [TAGS[0], TAGS[2]]
    assert summary(tmp_path / "out")["items"][1]["status"] == "failed"


def test_export_from_the_s3_store_to_s3(run, s3_env, tmp_path):
    dst = f"s3://{run['bucket']}/exports/r1"
    # the trainer copies its config.yaml into the store, so a store alone describes the run
    assert main([run["store"], dst, "--select", "every:2"]) == 0
    local = tmp_path / "local"
    assert main([str(run["dir"]), str(local)]) == 0
    for tag in TAGS:
        rec = json.loads(storage.read_bytes(f"{dst}/{tag}/export.json"))
        assert rec["source"] == f"{run['store']}/checkpoints/{tag}"
        assert rec["preset"] == "crossmae_vit_micro_patch4_dec64d2b" and rec["config_sha256"]
        # the same bytes as the export of the local copy of that checkpoint
        assert rec["weights_sha256"] == json.loads((local / tag / "export.json").read_text())["weights_sha256"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(storage.read_bytes(f"{dst}/{TAGS[2]}/model.safetensors"))
    (tmp_path / "m" / "config.json").write_bytes(storage.read_bytes(f"{dst}/{TAGS[2]}/config.json"))
    assert_same_features(tmp_path / "m", trained_encoder(run["dir"], TAGS[2]))
    assert main([run["store"], dst]) == 0
    assert json.loads(storage.read_bytes(f"{dst}/export-summary.json"))["skipped"] == 3
    # without config.yaml in the store the architecture is read from the weights; --config names it
    config_yaml = storage.read_bytes(f"{run['store']}/config.yaml")
    storage.delete(f"{run['store']}/config.yaml")
    dst3 = f"s3://{run['bucket']}/exports/r3"
    try:
        assert main([run["store"], dst3, "--select", "latest"]) == 0
    finally:
        storage.write_bytes(f"{run['store']}/config.yaml", config_yaml)
    rec = json.loads(storage.read_bytes(f"{dst3}/{TAGS[2]}/export.json"))
    assert rec["preset"] is None and rec["architecture"].startswith("inferred")
    dst2 = f"s3://{run['bucket']}/exports/r2"
    assert main([run["store"], dst2, "--select", "latest", "--config", str(run["dir"] / "config.yaml")]) == 0
    rec = json.loads(storage.read_bytes(f"{dst2}/{TAGS[2]}/export.json"))
    assert rec["preset"] == "crossmae_vit_micro_patch4_dec64d2b" and rec["config_sha256"]


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_every_zero_stage_exports_the_same_encoder(run, stage, tmp_path):
    """Same seed, data and lr: after 2 steps ZeRO-0/1/3 hold the ZeRO-2 run's parameters."""
    out = tmp_path / "run"
    launch(run["manifest"], out, "run.max_steps=2", "run.save_every=2", f"deepspeed.zero_stage={stage}")
    assert main([str(out), str(tmp_path / "exports")]) == 0
    assert json.loads((tmp_path / "exports" / TAGS[0] / "export.json").read_text())["zero_stage"] == stage
    assert_same_features(tmp_path / "exports" / TAGS[0], trained_encoder(run["dir"], TAGS[0]))


def test_released_checkpoint_exports_in_the_same_layout(tmp_path, capsys, s3_bucket):
    model = create_model("crossmae_vit_micro_patch4_dec64d2b").eval()
    path = tmp_path / "crossmae_micro.pth"
    args = argparse.Namespace(lr=1e-3, mask_ratio=0.75, kept_mask_ratio=0.75, norm_pix_loss=False)  # gamma 0.75
    torch.save(dict(model=library_to_released(model.state_dict()), args=args), path)
    out = tmp_path / "exports"
    assert main(["released", str(path), str(out), "--full", "--preset", "crossmae_vit_micro_patch4_dec64d2b"]) == 0
    assert_same_features(out / "crossmae_micro", model)
    rec = json.loads((out / "crossmae_micro" / "export.json").read_text())
    assert (rec["model_config"]["pred_ratio"], rec["model_config"]["norm_pix_loss"]) == (0.75, False), "as trained"
    assert rec["source"] == str(path) and rec["step"] is None and rec["preset"] == "crossmae_vit_micro_patch4_dec64d2b"
    assert rec["data_manifest"]["reason"] == "released checkpoint"
    full = load_file(str(out / "crossmae_micro" / "full.safetensors"))
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    rebuilt = MaskedAutoencoder(ModelConfig(**rec["model_config"]))
    rebuilt.load_state_dict(full)  # a reconstruction demo rebuilds the whole model from the export
    assert main(["released", str(path), str(out), "--full"]) == 0
    assert summary(out)["skipped"] == 1
    # from object storage, read with weights_only like a local file
    storage.write_bytes(f"s3://{s3_bucket}/released/crossmae_micro.pth", path.read_bytes())
    assert main(["released", f"s3://{s3_bucket}/released/crossmae_micro.pth", str(tmp_path / "from_s3")]) == 0
    assert_same_features(tmp_path / "from_s3" / "crossmae_micro", model)

    (tmp_path / "evil.pth").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["released", str(tmp_path / "evil.pth"), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("crossmae-export: failed evil: CheckpointError: refused or unreadable checkpoint")
    assert not (out / "evil" / "export.json").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: source, out"),
    (["{run}", "{out}", "--select", "every:0"], "bad --select 'every:0'"),
    (["{run}", "{out}", "--select", "newest"], "bad --select 'newest'"),
    (["{run}", "{out}", "--select", "tags:step00000003"], "no complete checkpoint step00000003 (complete: step000"),
    (["{run}", "{out}", "--jobs", "0"], "--jobs must be at least 1"),
    (["{run}", "{out}", "--config", "{out}/none.yaml"], "config {out}/none.yaml not found"),
    (["{out}", "{out}"], "no complete checkpoints under {out}/checkpoints/"),
    (["{run}", "{out}", "--bogus"], "unrecognized arguments: --bogus"),
    (["released", "{out}/missing.pth", "{out}"], "no such file {out}/missing.pth"),
    (["{run}", "ftp://x/y"], "unsupported storage URL"),
])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, argv, message):
    fill = dict(run=str(run["dir"]), out=str(tmp_path))
    try:
        code = main([a.format(**fill) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("crossmae-export"), err
    assert message.format(**fill) in err[0]
    assert not os.path.exists(tmp_path / "export-summary.json")


def test_help_lists_every_subcommand_and_explains_every_option(capsys):
    from pipelines.export import SUBCOMMANDS, build_parser

    for sub in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main(([sub] if sub else []) + ["--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0
        for name in SUBCOMMANDS:  # each help page names every subcommand and how to call it
            assert SUBCOMMANDS[name].split(": ", 1)[1] in text
        assert f"crossmae-export released {'FILE' if sub else ''}".strip() in text
        actions = build_parser(sub)._actions
        assert all(a.help and a.help.strip() for a in actions), [a.dest for a in actions if not a.help]
        for a in actions:  # and every option is on the page
            assert all(opt in text for opt in a.option_strings) and (a.option_strings or a.dest in text)
    assert set(SUBCOMMANDS) == {"", "released"}
