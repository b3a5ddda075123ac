"""pipelines.runtime.distributed: collectives put their tensors where the backend needs them."""
import os
import socket

import pytest
import torch
import torch.distributed as dist

from pipelines.runtime import distributed


@pytest.fixture
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_all_reduce_moves_the_tensor_to_the_collective_device(world_of_one):
    seen = []
    real = dist.all_reduce

    def spy(t, *a, **k):  # installed first, so the check wraps it: meta never reaches it
        seen.append(t.device.type)
        return real(t, *a, **k)
    dist.all_reduce = spy
    try:
        with distributed.check_tensor_devices("meta"):
            out = distributed.all_reduce(torch.tensor([1.0, 2.0]))
        assert seen == [] and out.device.type == "cpu"  # checked on meta, values kept
        distributed.all_reduce(torch.tensor([1.0]))
        assert seen == ["cpu"]  # gloo without the check: the host
    finally:
        dist.all_reduce = real


def test_a_direct_cpu_collective_fails_the_check_as_nccl_would(world_of_one):
    with distributed.check_tensor_devices("meta"):
        with pytest.raises(RuntimeError, match="route collectives through pipelines.runtime.distributed"):
            dist.all_reduce(torch.tensor([1.0]))  # what pretrain.py did before: fine on gloo, fatal on NCCL
        import deepspeed.comm as ds_dist  # the thin deepspeed.comm API counts as direct too
        ds_dist.init_distributed(dist_backend="gloo")
        with pytest.raises(RuntimeError, match="directly"):
            ds_dist.all_reduce(torch.tensor([1.0]))


def test_reduced_values_come_back_on_the_callers_device(world_of_one):
    assert distributed.all_reduce(torch.tensor([3.0]), op="max").tolist() == [3.0]
    assert distributed.all_reduce_values([1.0, 2.5]) == [1.0, 2.5]
    with pytest.raises(ValueError, match="reduce op"):
        distributed.all_reduce(torch.tensor([1.0]), op="mean")


def test_nccl_means_the_current_cuda_device(monkeypatch, world_of_one):
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)


def test_no_process_group_is_a_world_of_one():
    assert not distributed.is_distributed()
    assert distributed.all_reduce(torch.tensor([2.0])).tolist() == [2.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(5) == [5]


def test_the_env_switch_keeps_the_check_on_for_the_whole_process(world_of_one, monkeypatch):
    """CROSSMAE_CHECK_COLLECTIVES=meta (what the trainer tests launch with) must stay active after
    install returns: a dropped context manager would undo itself at once."""
    import gc

    monkeypatch.setenv("CROSSMAE_CHECK_COLLECTIVES", "meta")
    original = dist.all_reduce
    try:
        distributed.install_device_check_from_env()
        gc.collect()
        assert distributed.collective_device().type == "meta"
        with pytest.raises(RuntimeError, match="directly"):
            dist.all_reduce(torch.tensor([1.0]))
        with pytest.raises(RuntimeError, match="directly"):  # keyword arguments (as ZeRO calls it): no TypeError
            dist.all_gather_into_tensor(output_tensor=torch.zeros(1), input_tensor=torch.ones(1))
    finally:
        if distributed._env_check is not None:
            distributed._env_check.__exit__(None, None, None)
            distributed._env_check = None
    assert dist.all_reduce is original
