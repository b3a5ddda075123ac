"""World-size changes between runs: a ZeRO checkpoint written by 2 ranks resumes on 1 and back
(pipelines/checkpoints/reshard.py, DeepSpeed's universal checkpoint). Real trainer runs (torchrun, gloo, CPU),
and a probe rank script (this module's ``__main__``) that builds the engine as the trainer does,
loads through ``prepare_resume`` and saves again at once, so the fp32 master weights and Adam's
moments and step are compared bit for bit across 2 -> 1 -> 2 ranks for ZeRO 1, 2 and 3."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from pipelines.runtime.launch import free_port
from pipelines.checkpoints.reshard import MARKER, prepare_resume, saved_world_size, to_universal, universal_root
from tests.pipelines import test_pretrain
from tests.pipelines.test_pretrain import ROOT, consolidated, keys_by_step, launch

manifest = test_pretrain.manifest  # the module-scoped fixture: 128 tiny JPEGs sharded by crossmae-prep


def probe(config, root, tag, save_to=None, nproc=1, plain=False, expect=0):
    """Run this module's rank script under torchrun: load root/tag at ``nproc`` ranks (through
    prepare_resume, or ``plain``: DeepSpeed's own load), then save it unchanged under save_to."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "tests.pipelines.test_reshard", str(config), str(root), tag, str(save_to or "-"),
           "plain" if plain else "reshard"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def universal_state(path) -> dict:
    """Everything a universal checkpoint holds that does not depend on the world size: per
    parameter fp32 / exp_avg / exp_avg_sq (/ step), the optimizer's step and hyper-parameters."""
    zero = pathlib.Path(path) / "zero"
    out = {f"{d.name}/{f.stem}": torch.load(f, weights_only=False)
           for d in zero.iterdir() if d.is_dir() for f in d.glob("*.pt")}
    out = {k: v["param"] if isinstance(v, dict) else v for k, v in out.items()}  # ZeRO 1/2 wrap tensors, 3 not
    opt = torch.load(zero / "optimizer_state.pt", weights_only=False)
    out["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    inner = opt.get("optimizer_state_dict", {}).get("state")  # ZeRO-3 keeps the step here, not per parameter
    if inner:
        out["step"] = inner[0]["step"]
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, x in a.items():
        assert torch.equal(x, b[k]) if torch.is_tensor(x) else x == b[k], k


def client_state(tag_dir) -> dict:
    files = sorted(pathlib.Path(tag_dir).glob("*mp_rank_00_model_states.pt"))  # ZeRO-3: zero_pp_rank_0_...
    sd = torch.load(files[0], weights_only=False)
    return dict(step=sd["step"], loader=sd["loader"])


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-1: same path as 2 (measured bit for bit too; dropped for suite time)
def test_optimizer_state_survives_two_to_one_to_two_ranks_bit_for_bit(manifest, tmp_path, stage):
    run, one, two, tag = tmp_path / "run", tmp_path / "one", tmp_path / "two", "step00000002"
    launch(manifest, run, "run.max_steps=2", "run.save_every=2", f"deepspeed.zero_stage={stage}")
    config, src = run / "config.yaml", run / "checkpoints"
    assert saved_world_size(src / tag) == 2
    probe(config, src, tag, one, nproc=1)  # 2 -> 1: converts src/tag, loads it on one rank, saves
    converted = pathlib.Path(universal_root(src))
    marker = converted / tag / MARKER
    assert saved_world_size(one / tag) == 1 and marker.exists() and os.listdir(converted) == [tag]  # no staging left
    stamp = marker.stat().st_mtime_ns
    assert to_universal(str(src), tag) == str(converted / tag) and marker.stat().st_mtime_ns == stamp  # idempotent
    probe(config, one, tag, two, nproc=2)  # 1 -> 2
    assert saved_world_size(two / tag) == 2

    ref = universal_state(converted / tag)
    assert ref["step"] == 2 if "step" in ref else all(v == 2 for k, v in ref.items() if k.endswith("/step"))
    moments = [v for k, v in ref.items() if k.endswith("/exp_avg_sq")]
    assert len(moments) > 50 and all(float(m.sum()) > 0 for m in moments), "Adam moments were saved"
    assert_same(ref, universal_state(pathlib.Path(universal_root(one)) / tag))  # made by the second probe
    assert_same(ref, universal_state(to_universal(str(two), tag)))
    assert client_state(two / tag) == client_state(src / tag)  # step and loader position ride along
    if stage < 3:  # the module's weights (ZeRO-3 saves them partitioned: covered by fp32 above)
        src_module, two_module = (torch.load(d / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
                                  for d in (src, two))
        assert_same(src_module, two_module)


def test_two_ranks_resume_on_one_and_continue_the_run(manifest, tmp_path):
    """2 ranks to step 3, then 1 rank with grad_accum=2 (the same effective batch of 16) to step 6,
    against 2 uninterrupted ranks. The per-step samples differ (each rank reads its own contiguous
    part of the epoch order), so parameters agree within a tolerance: measured 0.17 of the step
    3 -> 6 update; a restart from the weights with fresh Adam moments measured 1.25."""
    full, part, tag = tmp_path / "full", tmp_path / "part", "step00000003"
    launch(manifest, full, "run.max_steps=6", "run.save_every=3")
    launch(manifest, part, "run.max_steps=3", "run.save_every=3")
    refused = probe(part / "config.yaml", part / "checkpoints", tag, nproc=1, plain=True, expect=1)
    assert ("load refused: ZeRORuntimeException: The checkpoint being loaded used a DP world size of 2 but the "
            "current world size is 1") in refused.stderr, "DeepSpeed's own load refuses another world size"

    proc = launch(manifest, part, "run.max_steps=6", "run.save_every=3", "deepspeed.grad_accum=2", nproc=1)
    assert f"resumed from {tag} at step 3 (saved by 2 ranks, universal checkpoint)" in proc.stderr
    assert saved_world_size(part / "checkpoints/step00000006") == 1

    keys = keys_by_step(part)
    before = {k for s in range(3) for ks in keys[s].values() for k in ks}
    after = [k for s in range(3, 6) for ks in keys[s].values() for k in ks]
    assert sorted(keys) == list(range(6)) and len(before) == 48 and len(after) == len(set(after)) == 48
    assert not before & set(after), "the resumed run saw only samples not yet seen this epoch"

    base, a, b = (consolidated(r, t) for r, t in ((part, tag), (full, "step00000006"), (part, "step00000006")))
    update = sum(float((a[k] - base[k]).detach().square().sum()) for k in a) ** 0.5
    apart = sum(float((a[k] - b[k]).detach().square().sum()) for k in a) ** 0.5
    assert update > 0 and apart < 0.5 * update, (apart, update)

    again = launch(manifest, part, "run.max_steps=7", "run.save_every=7", "deepspeed.grad_accum=2", nproc=1)
    resumed = [line for line in again.stderr.splitlines() if line.startswith("resumed from")]
    assert resumed == ["resumed from step00000006 at step 6"], "same world size: the checkpoint itself, no conversion"


def test_saved_world_size_reads_shard_files(tmp_path):
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        (tmp_path / name).write_bytes(b"")
    assert saved_world_size(tmp_path) == 3
    plan = prepare_resume(str(tmp_path.parent), tmp_path.name, 3)
    assert (plan.load_dir, plan.ds_config_patch, plan.universal) == (str(tmp_path.parent), {}, False)
    zero0 = tmp_path / "zero0"
    zero0.mkdir()
    (zero0 / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert saved_world_size(zero0) is None  # ZeRO-0: the optimizer state is not sharded; any world loads it


def _rank_main(config: str, root: str, tag: str, save_to: str, mode: str) -> int:
    """The probe: the trainer's model, optimizer and DeepSpeed config, a resume, and a save."""
    import deepspeed
    import deepspeed.comm as dist

    from crossmae import MaskedAutoencoder
    from pipelines.runtime import config_loader
    from pipelines.train.optim import build_optimizer
    from pipelines.runtime.launch import init_distributed
    from pipelines.checkpoints.reshard import ResumePlan, load_checkpoint
    from pipelines.train.config import PretrainConfig, deepspeed_config

    cfg = config_loader.load(PretrainConfig, config, [])
    _, world = init_distributed(False)
    torch.manual_seed(cfg.run.seed)
    model = MaskedAutoencoder(cfg.model_config())
    ds_config = deepspeed_config(cfg, world, False)
    ds_config["train_batch_size"] = cfg.deepspeed.micro_batch * world  # the probe never steps: accum 1
    ds_config["gradient_accumulation_steps"] = 1
    if mode == "plain":
        plan = ResumePlan(root, tag, None)
    else:
        plan = prepare_resume(root, tag, world, convert=os.environ.get("LOCAL_RANK", "0") == "0")
    dist.barrier()
    ds_config.update(plan.ds_config_patch)
    optimizer = build_optimizer(model, cfg.learning_rate(world), cfg.optim.weight_decay, cfg.optim.betas)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    try:
        client = load_checkpoint(engine, plan)
    except Exception as e:  # noqa: BLE001 - the plain mode's expected refusal, reported for the test
        print(f"load refused: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    engine.save_checkpoint(save_to, tag=tag, client_state=dict(step=client["step"], loader=client["loader"]))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(*sys.argv[1:6]))
