import pytest

from data_prep.plan import make_plan, plan_digest, worker_slice, workers_from_env


def test_plan_is_deterministic_and_covers_every_item_once():
    sizes = [100 + (i * 37) % 900 for i in range(1000)]
    a = make_plan(sizes, "train", seed=3, shard_samples=64)
    assert a == make_plan(sizes, "train", seed=3, shard_samples=64)
    assert sorted(i for s in a for i in s.items) == list(range(1000))
    assert [len(s.items) for s in a] == [64] * 15 + [40]
    assert a[0].name == "train-000000.tar" and a[15].name == "train-000015.tar"
    assert make_plan(sizes, "train", seed=4, shard_samples=64)[0].items != a[0].items


def test_shards_close_at_the_target_bytes():
    sizes = [1000] * 95
    plan = make_plan(sizes, "val", seed=0, shard_bytes=10_000)
    assert [len(s.items) for s in plan] == [10] * 9 + [5]


def test_shuffle_mixes_classes_across_shards():
    labels = [i // 100 for i in range(1000)]  # a class-grouped source, like the archives
    plan = make_plan([1] * 1000, "train", seed=0, shard_samples=100)
    for shard in plan:
        assert len({labels[i] for i in shard.items}) >= 8  # every shard sees most classes


def test_workers_take_disjoint_shards_that_cover_the_plan():
    plan = make_plan([1] * 100, "train", seed=0, shard_samples=7)
    slices = [worker_slice(plan, 3, w) for w in range(3)]
    names = [s.name for sl in slices for s in sl]
    assert sorted(names) == sorted(s.name for s in plan) and len(set(names)) == len(names)
    with pytest.raises(ValueError):
        worker_slice(plan, 3, 3)


def test_digest_changes_with_inputs_and_options():
    keys = [f"k{i}" for i in range(50)]
    plan = make_plan([1] * 50, "train", seed=0, shard_samples=10)
    d = plan_digest(keys, plan, {"seed": 0})
    assert d == plan_digest(keys, plan, {"seed": 0})
    assert d != plan_digest(keys, plan, {"seed": 1})
    assert d != plan_digest(keys[:-1] + ["other"], plan, {"seed": 0})


def test_worker_defaults_from_slurm_and_kubernetes(monkeypatch):
    for var in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                "SLURM_ARRAY_TASK_MAX", "CROSSMAE_NUM_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    assert workers_from_env(None, None) == (1, 0)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "8")
    assert workers_from_env(None, None) == (8, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert workers_from_env(None, None) == (8, 4)
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    monkeypatch.setenv("CROSSMAE_NUM_WORKERS", "4")
    assert workers_from_env(None, None) == (4, 2)
    assert workers_from_env(6, 1) == (6, 1)  # explicit flags win
