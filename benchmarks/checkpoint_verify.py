"""What checking a checkpoint's files costs (issue 19): sizes, sha256, weights-only pickles, against
the load DeepSpeed does anyway.

    python benchmarks/checkpoint_verify.py [--preset crossmae_vit_base_patch16_dec512d12b] [--json out.json]

Writes the files a one-rank ZeRO-2 checkpoint of the preset holds (mp_rank_00_model_states.pt: the
fp32 module; zero_pp_rank_0_..._optim_states.pt: fp32 master weights and Adam's two moments) into
a temporary directory, then times, with the files in the page cache (as right after a save or a
download): ``write_manifest`` (sha256 of every file, at each save), ``verify_checkpoint`` with
sizes only and with sha256 (at resume, crossmae-export), ``check_weights_only`` alone, and a full
``torch.load`` of both files (what DeepSpeed's load reads). The ratio is the sha256 check over the
load.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import emit  # noqa: E402


def best_of(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="crossmae_vit_base_patch16_dec512d12b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from crossmae import create_model
    from pipelines.checkpoints.integrity import check_weights_only, verify_checkpoint, write_manifest

    module = {k: v.float() for k, v in create_model(args.preset).state_dict().items()}
    flat = torch.cat([v.flatten() for v in module.values()])
    with tempfile.TemporaryDirectory() as tmp:
        tag = os.path.join(tmp, "step00000001")
        os.makedirs(tag)
        torch.save(dict(module=module), os.path.join(tag, "mp_rank_00_model_states.pt"))
        torch.save(dict(optimizer_state_dict=dict(fp32=flat, exp_avg=torch.randn_like(flat),
                                                  exp_avg_sq=torch.rand_like(flat))),
                   os.path.join(tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        del module, flat
        names = sorted(os.listdir(tag))
        size = sum(os.path.getsize(os.path.join(tag, n)) for n in names)

        def load_all():
            for n in names:
                torch.load(os.path.join(tag, n), map_location="cpu", weights_only=True)

        load_all()  # into the page cache
        seconds = dict(write_manifest=best_of(lambda: write_manifest(tag), args.rounds),
                       verify_sizes=best_of(lambda: verify_checkpoint(tag, hash=False), args.rounds),
                       verify_sha256=best_of(lambda: verify_checkpoint(tag), args.rounds),
                       check_weights_only=best_of(lambda: check_weights_only(tag), args.rounds),
                       torch_load=best_of(load_all, args.rounds))
    gb = size / 1e9
    print(f"{args.preset}: {len(names)} files, {gb:.2f} GB, {os.cpu_count()} CPUs, best of {args.rounds}")
    print(f"{'step':<20} {'seconds':>8} {'GB/s':>6}")
    for name, s in seconds.items():
        print(f"{name:<20} {s:>8.3f} {gb / s:>6.2f}")
    ratio = seconds["verify_sha256"] / seconds["torch_load"]
    print(f"sha256 check / torch.load: {ratio:.2f}x")
    emit(dict(preset=args.preset, bytes=size, files=len(names), cpus=os.cpu_count(),
              seconds={k: round(v, 4) for k, v in seconds.items()}, sha256_over_load=round(ratio, 3)), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
