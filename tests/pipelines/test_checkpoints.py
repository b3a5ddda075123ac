import pytest

from pipelines import checkpoints as ckpt
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
