"""Damaged and foreign checkpoints under `--resume auto`, for real: 2-process ZeRO-2 runs of the
micro preset write checkpoints at steps 5 and 10; then a file of the newest one is cut short, has
bytes flipped or is deleted (locally, or in the S3 store a fresh node restores from), or another
run leaves its own step 5 and record in the same directory. The resume names the damaged file and
falls back to the previous checkpoint (and then trains exactly as the original run did), or
follows the run's record, never just the highest step number."""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch

from pipelines.checkpoints import store as ckpt
from pipelines import storage
from tests.pipelines.test_pretrain import consolidated, launch, manifest  # noqa: F401 - manifest is a fixture

RUN = ("run.save_every=5", "run.max_steps=10")
MODEL, SHARD0, SHARD1 = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                         "zero_pp_rank_1_mp_rank_00_optim_states.pt")


@pytest.fixture(scope="module")
def original(manifest, tmp_path_factory) -> pathlib.Path:  # noqa: F811
    """The run every test damages a copy of: checkpoints step 5 and 10, each with its manifest."""
    out = tmp_path_factory.mktemp("damaged") / "original"
    launch(manifest, out, *RUN)
    return out


def verify_checkpoint(tag_dir: str) -> None:
    from pipelines.checkpoints.integrity import verify_checkpoint as verify  # here: the file reads on older trees too

    verify(tag_dir)


def copy_of(original: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    out = tmp_path / "run"
    shutil.copytree(original, out)
    return out


def damage(path: pathlib.Path, how: str) -> int:
    """Cut the file to half, flip 16 bytes in its middle (same size), or delete it; its saved size."""
    size = path.stat().st_size
    if how == "truncated":
        os.truncate(path, size // 2)
    elif how == "flipped":
        data = bytearray(path.read_bytes())
        data[size // 2: size // 2 + 16] = bytes(b ^ 0xFF for b in data[size // 2: size // 2 + 16])
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    return size


def key_runs(out: pathlib.Path) -> dict[tuple, list]:
    """{(rank file, step, micro): [keys of each time the step ran]} from the keys logs (appended by
    every launch into the same run directory)."""
    runs: dict[tuple, list] = {}
    for f in sorted(out.glob("keys-rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            runs.setdefault((f.name, rec["step"], rec["micro"]), []).append(rec["keys"])
    return runs


def assert_resumed_exactly_from_step_5(out: pathlib.Path, original: pathlib.Path) -> None:
    """Steps 5-9 ran twice (before the damage, and after the fallback) on the same samples, and the
    step-10 weights saved again equal the original run's."""
    runs = key_runs(out)
    again = {k: v for k, v in runs.items() if len(v) > 1}
    assert sorted({k[1] for k in again}) == [5, 6, 7, 8, 9], sorted(again)
    assert all(v[0] == v[1] for v in again.values()), "the resumed run saw other samples"
    a, b = consolidated(original, "step00000010"), consolidated(out, "step00000010")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


CASES = {"truncated": (MODEL, r"{size2} bytes, {size} when saved"),
         "flipped": (SHARD0, "its sha256 differs from the one recorded at save time (bytes changed on disk or in "
                             "transit)"),
         "missing": (SHARD1, "missing")}


@pytest.mark.parametrize("how", list(CASES))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(manifest, original, tmp_path, how,  # noqa: F811
                                                                           record_property):
    """A damaged file in the newest checkpoint: one line names it and why, --resume auto falls back
    to the previous checkpoint, and the run ends where the undamaged one did."""
    name, why = CASES[how]
    record_property("fault", f"{how} {name} in the newest checkpoint (step 10 of 5, 10), 2-process ZeRO-2")
    record_property("trials", 1)
    record_property("checked", "stderr names the file and the cause; resumed from step 5; the damaged copy "
                               "moved to checkpoints_damaged/; steps 5-9 see the same samples and the new "
                               "step-10 weights equal the original (atol 1e-6)")
    out = copy_of(original, tmp_path)
    size = damage(out / "checkpoints/step00000010" / name, how)
    proc = launch(manifest, out, *RUN)
    why = why.format(size=size, size2=size // 2)
    moved = out / "checkpoints_damaged/step00000010"
    assert (f"crossmae-pretrain: checkpoint step00000010 is damaged ({name}: {why}); moved to {moved}; resuming "
            "from the previous complete checkpoint, step00000005, instead") in proc.stderr, proc.stderr[-3000:]
    assert "resumed from step00000005 at step 5" in proc.stderr
    assert moved.is_dir() and (out / "checkpoints/latest").read_text() == "step00000010"
    assert (out / "checkpoints/step00000010/MANIFEST.0.json").exists()
    verify_checkpoint(str(out / "checkpoints/step00000010"))  # saved again, whole
    assert_resumed_exactly_from_step_5(out, original)
    record_property("result", "pass")


def test_a_damaged_only_checkpoint_stops_the_run_in_one_line(manifest, original, tmp_path,  # noqa: F811
                                                              record_property):
    """The only complete checkpoint is damaged: exit 2, one line naming it, nothing trained or written."""
    record_property("fault", "truncated model states in the only complete checkpoint (step 5; step 10 removed)")
    record_property("trials", 1)
    record_property("checked", "exit 2; the error line names step00000005, the file and its sizes; no traceback; "
                               "no new checkpoint")
    out = copy_of(original, tmp_path)
    shutil.rmtree(out / "checkpoints/step00000010")  # checkpoints/latest still names it
    size = damage(out / "checkpoints/step00000005" / MODEL, "truncated")
    proc = launch(manifest, out, *RUN, launcher="plain", expect=2)  # torchrun would answer 1 for any failure
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("crossmae-pretrain: error:")]
    assert errors and errors[0] == (
        f"crossmae-pretrain: error: checkpoint step00000005 is damaged ({MODEL}: {size // 2} bytes, {size} when "
        f"saved); moved to {out / 'checkpoints_damaged/step00000005'}; no earlier complete checkpoint in "
        f"{out / 'checkpoints'} to fall back on (1 damaged: step00000005)"), proc.stderr[-3000:]
    assert "names step00000010, which is not complete" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == []
    record_property("result", "pass")


def test_a_checkpoint_saved_before_manifests_still_resumes_and_a_cut_one_falls_back(manifest, original,  # noqa: F811
                                                                                    tmp_path,
                                                                                    record_property):
    """Checkpoints without MANIFEST files (saved before them): the newest, cut short, is found by its
    pickle check and the previous one resumes."""
    record_property("fault", "no manifests (an older checkpoint layout); truncated model states in step 10")
    record_property("trials", 1)
    record_property("checked", "step 10 named damaged (not a whole torch zip archive); step 5, checked by its "
                               "pickles alone, resumes exactly")
    out = copy_of(original, tmp_path)
    for m in (out / "checkpoints").glob("step*/MANIFEST.*"):
        m.unlink()
    damage(out / "checkpoints/step00000010" / MODEL, "truncated")
    proc = launch(manifest, out, *RUN)
    assert (f"checkpoint step00000010 is damaged ({MODEL}: not a whole torch zip archive (cut short or "
            "overwritten)); moved to") in proc.stderr, proc.stderr[-3000:]
    assert "resumed from step00000005 at step 5" in proc.stderr
    assert_resumed_exactly_from_step_5(out, original)
    record_property("result", "pass")


def test_auto_resume_follows_the_runs_record_not_the_highest_step(manifest, original, tmp_path,  # noqa: F811
                                                                  record_property):
    """Another run took this directory over after step 10 was saved (its run.json, its step 5 and
    its record, checkpoints/latest): --resume auto continues that record's step 5 and says step 10
    is ignored, never just the highest step number."""
    record_property("fault", "a second run's step-5 checkpoint and latest record over a run that saved 5 and 10")
    record_property("trials", 1)
    record_property("checked", "resumed from step00000005 (not 10); step 10 said ignored; the re-saved step 10 "
                               "passes its manifest")
    out = copy_of(original, tmp_path)
    other = tmp_path / "other"
    launch(manifest, other, "run.save_every=5", "run.max_steps=5")
    shutil.rmtree(out / "checkpoints/step00000005")
    shutil.copytree(other / "checkpoints/step00000005", out / "checkpoints/step00000005")
    for name in ("checkpoints/latest", "run.json"):  # run.json: the run id its checkpoints carry (if any)
        if (other / name).exists():
            shutil.copy(other / name, out / name)
    proc = launch(manifest, out, *RUN)
    assert "resumed from step00000005 at step 5" in proc.stderr, proc.stderr[-3000:]
    assert (f"ignoring checkpoint(s) step00000010: newer than the run's record ({out / 'checkpoints/latest'} "
            "names step00000005)") in proc.stderr
    verify_checkpoint(str(out / "checkpoints/step00000010"))
    record_property("result", "pass")


def test_a_damaged_store_copy_on_a_fresh_node_falls_back_to_the_previous_one(manifest, tmp_path, s3_env,  # noqa: F811
                                                                             s3_bucket, record_property):
    """A fresh run.output restores from the S3 store whose newest checkpoint has flipped bytes: the
    download is checked against its manifest, named damaged, and the store's previous one resumes."""
    record_property("fault", "16 flipped bytes in the S3 copy of the newest checkpoint's rank-1 optimizer shard; "
                             "fresh run.output")
    record_property("trials", 1)
    record_property("checked", "stderr names the shard and the store copy; resumed from step 5 downloaded from the "
                               "store; the store's step 10 is whole again after the run")
    store = f"s3://{s3_bucket}/runs/r1"
    out = tmp_path / "run"
    launch(manifest, out, *RUN, f"run.store={store}")
    url = f"{store}/checkpoints/step00000010/{SHARD1}"
    data = bytearray(storage.read_bytes(url))
    data[len(data) // 2: len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 16])
    storage.write_bytes(url, bytes(data))
    shutil.rmtree(out)  # a fresh node
    proc = launch(manifest, out, *RUN, f"run.store={store}")
    assert (f"checkpoint step00000010 is damaged ({SHARD1}: its sha256 differs from the one recorded at save time "
            f"(bytes changed on disk or in transit)) (the copy in {store}, left there as it is); resuming from the "
            "previous complete checkpoint, step00000005, instead") in proc.stderr, proc.stderr[-3000:]
    assert "resumed from step00000005 at step 5" in proc.stderr
    assert ckpt.latest(store) == {"tag": "step00000010", "step": 10}
    ckpt.download(store, "step00000010", str(tmp_path / "check"))
    verify_checkpoint(str(tmp_path / "check/step00000010"))  # uploaded again by the resumed run
    record_property("result", "pass")
