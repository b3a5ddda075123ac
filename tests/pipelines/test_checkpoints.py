import pytest

from pipelines.checkpoints import store as ckpt
from pipelines import storage


def test_keep_last_and_every_mth():
    steps = {f"step{s:08d}": s for s in (100, 200, 300, 400, 500, 600)}
    assert ckpt.tags_to_delete(list(steps), steps, keep_last=2, keep_every=0) == [
        "step00000100", "step00000200", "step00000300", "step00000400"]
    assert ckpt.tags_to_delete(list(steps), steps, keep_last=1, keep_every=200) == ["step00000100", "step00000300",
                                                                                    "step00000500"]


def test_latest_is_published_only_when_every_file_arrived(tmp_path):
    local, store = tmp_path / "local", str(tmp_path / "store")
    (local / "step00000010").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (local / "step00000010" / name).write_bytes(b"x" * 100)
    expected = ckpt.files(str(local / "step00000010"))
    ckpt.upload(str(local), "step00000010", store, names=expected[:1])  # a crash after the first file
    with pytest.raises(storage.StorageError, match="missing 1 files"):
        ckpt.publish(store, "step00000010", 10, expected)
    assert ckpt.latest(store) is None
    ckpt.upload(str(local), "step00000010", store)
    ckpt.publish(store, "step00000010", 10, expected)
    assert ckpt.latest(store) == {"tag": "step00000010", "step": 10}
    storage.delete(storage.join(store, "checkpoints", "step00000010", "COMPLETE"))
    assert ckpt.latest(store) is None, "a pointer to an incomplete tag is not trusted"
    ckpt.download(store, "step00000010", str(tmp_path / "node2"))
    assert sorted(p.name for p in (tmp_path / "node2" / "step00000010").iterdir()) == sorted(expected)


def test_resume_follows_the_newer_record_and_ignores_tags_past_it():
    t = [f"step{s:08d}" for s in (0, 5, 10, 15)]
    # another run wrote step 5 into this directory after this run's step 10: its record wins
    order, ignored, said = ckpt.resume_order(t[1:3], [], {"out/checkpoints/latest": t[1]})
    assert (order, ignored) == ([t[1]], [t[2]])
    assert said == [f"ignoring checkpoint(s) {t[2]}: newer than the run's record (out/checkpoints/latest names "
                    f"{t[1]}), so not this run's (another run wrote into this directory, or the save was never "
                    "recorded)"]
    # the store's record is further along than the local one (a node back to an old output)
    order, ignored, said = ckpt.resume_order(t[1:2], t[1:4], {"local": t[1], "store": t[3]})
    assert (order, ignored, said) == ([t[3], t[2], t[1]], [], [])
    # the record names a save cut short: the newest complete one before it
    order, ignored, said = ckpt.resume_order(t[1:3], [], {"local": t[3]})
    assert order == [t[2], t[1]] and said == [f"local names {t[3]}, which is not complete (its save or upload "
                                              f"was cut short); trying {t[2]}"]
    # no record at all (a directory copied without checkpoints/latest): the newest, said
    order, ignored, said = ckpt.resume_order(t[1:3], [], {})
    assert order == [t[2], t[1]] and "no record" in said[0]
    assert ckpt.resume_order([], [], {}) == ([], [], [])


def _tag(tmp_path, name="step00000007"):
    import torch

    tag = tmp_path / name
    tag.mkdir()
    torch.save({"w": torch.arange(4096.0)}, tag / "mp_rank_00_model_states.pt")
    torch.save({"m": torch.ones(4096)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return tag


def test_manifest_names_each_kind_of_damage_before_anything_is_unpickled(tmp_path):
    from pipelines.checkpoints.integrity import DamagedCheckpoint, verify_checkpoint, write_manifest

    tag = _tag(tmp_path)
    record = write_manifest(str(tag), node=0)
    assert sorted(record["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    verify_checkpoint(str(tag))
    model = tag / "mp_rank_00_model_states.pt"
    data = model.read_bytes()
    middle = len(data) // 2  # inside the tensor data: torch.load with mmap reads it without complaint
    model.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    verify_checkpoint(str(tag), hash=False)  # same size: only the sha256 sees it
    with pytest.raises(DamagedCheckpoint, match=r"^checkpoint step00000007 is damaged \(mp_rank_00_model_states.pt: "
                                                r"its sha256 differs from the one recorded at save time"):
        verify_checkpoint(str(tag))
    model.write_bytes(data[:1000])
    with pytest.raises(DamagedCheckpoint, match=rf"\(mp_rank_00_model_states.pt: 1000 bytes, {len(data)} when saved\)$"):
        verify_checkpoint(str(tag))
    model.write_bytes(data)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(DamagedCheckpoint, match=r"\(zero_pp_rank_0_mp_rank_00_optim_states.pt: missing\)$"):
        verify_checkpoint(str(tag))
    (tag / "MANIFEST.0.json").write_text('{"files": ')
    with pytest.raises(DamagedCheckpoint, match=r"\(MANIFEST.0.json: unreadable manifest"):
        verify_checkpoint(str(tag))


def test_a_checkpoint_without_a_manifest_is_checked_by_its_pickles_alone(tmp_path):
    from pipelines.checkpoints.integrity import DamagedCheckpoint, verify_checkpoint

    tag = _tag(tmp_path, "step00000003")
    verify_checkpoint(str(tag))  # saved before manifests existed: still resumes
    model = tag / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:5000])
    with pytest.raises(DamagedCheckpoint, match=r"^checkpoint step00000003 is damaged \(mp_rank_00_model_states.pt: "
                                                r"not a whole torch zip archive \(cut short or overwritten\)\)$"):
        verify_checkpoint(str(tag))
