"""The one way the pipelines talk across ranks.

Every collective goes through here so that its tensors are on the device the backend can
use: NCCL only reduces CUDA tensors (a CPU tensor fails with "No backend type associated with
device type cpu"), gloo on a CPU machine takes CPU tensors. Code that builds a tensor on the
host (a loss value, a counter, a flag) hands it to these functions and gets the result back
on the tensor's own device, so no caller needs to know the backend.

Tests make the CPU path fail the way NCCL would: :func:`check_tensor_devices` (or
``CROSSMAE_CHECK_COLLECTIVES=meta`` in a launched trainer) pretends the backend wants another
device, checks that every tensor this module hands to torch.distributed is on it, and makes
any project code that calls a tensor collective directly (bypassing this module) raise.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

_OPS = ("sum", "max", "min")
_device_override: torch.device | None = None
_env_check = None


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """cuda:LOCAL_RANK under NCCL, cpu under gloo (or without a process group)."""
    if _device_override is not None:
        return _device_override
    forced = os.environ.get("CROSSMAE_COLLECTIVE_DEVICE")
    if forced:
        return torch.device(forced)
    if is_distributed() and _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_collective_device(device: torch.device | str | None) -> None:
    """Tests: pretend the backend wants ``device`` (None: back to the real backend's)."""
    global _device_override
    _device_override = None if device is None else torch.device(device)


def _op(name: str):
    if name not in _OPS:
        raise ValueError(f"reduce op must be one of {_OPS}, got {name!r}")
    return getattr(_dist().ReduceOp, name.upper())


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` over all ranks; the result comes back on ``t``'s device. A world of one
    (no process group) returns a copy of ``t``."""
    op_ = _op(op)
    if not is_distributed():
        return t.detach().clone()
    buf = t.detach().to(collective_device(), copy=True)
    _dist().all_reduce(buf, op=op_)
    if buf.device.type == "meta":  # check_tensor_devices("meta") in tests: the device was right, no data
        return t.detach().clone()
    return buf.to(t.device)


def all_reduce_values(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a few host numbers in ONE collective (one host-device round trip on GPUs)."""
    return all_reduce(torch.tensor(values, dtype=torch.float64), op).tolist()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s object on every rank (pickled; small objects only)."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * _dist().get_world_size()
    _dist().all_gather_object(out, obj)  # torch moves the pickled bytes to the current CUDA device itself
    return out


def barrier() -> None:
    if is_distributed():
        if _dist().get_backend() == "nccl":
            _dist().barrier(device_ids=[torch.cuda.current_device()])
        else:
            _dist().barrier()


def _object_device():
    dev = collective_device()
    return None if dev.type == "meta" else dev


_PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
_TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
                       "all_gather")


def _direct_caller() -> str | None:
    """The project file that called a torch.distributed collective itself (directly or through
    deepspeed.comm's thin API), or None when the call came from DeepSpeed's own internals."""
    import inspect

    frame = inspect.currentframe().f_back.f_back  # the wrapper's caller
    while frame is not None and os.sep + os.path.join("torch", "distributed") in frame.f_code.co_filename:
        frame = frame.f_back
    while frame is not None and os.sep + os.path.join("deepspeed", "comm") in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return None
    name = frame.f_code.co_filename
    if name.startswith(_PROJECT) and os.sep + ".venv" + os.sep not in name and "site-packages" not in name:
        return name
    return None


def install_device_check_from_env() -> None:
    """``CROSSMAE_CHECK_COLLECTIVES=meta`` (tests, in a launched trainer): check every
    collective of this process as :func:`check_tensor_devices` does, until it exits."""
    global _env_check
    device = os.environ.get("CROSSMAE_CHECK_COLLECTIVES")
    if device and _env_check is None:
        _env_check = check_tensor_devices(device)  # kept: a dropped context manager would undo itself
        _env_check.__enter__()


@contextmanager
def check_tensor_devices(device: torch.device | str):
    """Tests: make gloo fail where NCCL would. While active, (a) every tensor collective this
    module issues must get its tensor on ``device`` (the collective device is pretended to be
    ``device``, e.g. ``meta``: no data is reduced, so use it on paths whose reduced values do
    not matter, or a real device), and (b) project code that calls torch.distributed /
    deepspeed.comm tensor collectives directly, bypassing this module, raises at once."""
    dist = _dist()
    device = torch.device(device)
    originals = {n: getattr(dist, n) for n in _TENSOR_COLLECTIVES}
    ours = os.path.abspath(__file__)

    def wrap(name, fn):
        def checked(*args, **kwargs):
            tensor = args[0] if args else next((kwargs[k] for k in ("tensor", "input_tensor", "output_tensor",
                                                                     "tensor_list") if k in kwargs), None)
            caller = _direct_caller()
            if caller is not None and os.path.abspath(caller) != ours:
                raise RuntimeError(f"{name} called directly from {os.path.relpath(caller, _PROJECT)}: "
                                   "route collectives through pipelines.runtime.distributed")
            if caller is not None:
                t = tensor[0] if isinstance(tensor, (list, tuple)) else tensor
                if t.device.type != device.type:
                    raise RuntimeError(f"{name}: tensor on {t.device}, the backend needs {device} (NCCL: "
                                       f"'No backend type associated with device type {t.device.type}')")
                if t.device.type == "meta":
                    return None  # nothing to reduce on the pretend device
            return fn(*args, **kwargs)
        return checked

    set_collective_device(device)
    for n, fn in originals.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
        set_collective_device(None)
