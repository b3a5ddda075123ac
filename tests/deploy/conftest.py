"""Fixtures of the deploy tests: a real Slurm cluster (tests/deploy/slurm_cluster.py), the S3
test server made reachable from its nodes, and the jobs several Slurm tests build on: the
prepared dataset and one uninterrupted 2-node run (the reference for every resume)."""
from __future__ import annotations

import os
import pathlib
import time
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from tests.data_prep.fixtures import make_imagenet_tree
from tests.deploy.slurm_cluster import SlurmCluster, missing_requirements, slurm_cluster as start_cluster
from tests.deploy.slurm_jobs import (CPU, RUN, SLURM, TIMINGS, TRAIN_IMAGES, VAL_IMAGES, job_env, output, store_url,
                                     submit_pretrain)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Two 1-CPU nodes (node1, node2), each slurmd in its own network namespace; torn down after
    the session, also when a test failed. Skipped, saying why, without root or the packages."""
    why = missing_requirements()
    if why:
        pytest.skip(f"no Slurm cluster: {why}")
    with start_cluster(nodes=2, cpus=1) as cluster:
        yield cluster
    if TIMINGS:  # the figures of deploy/README.md (pytest -s shows them)
        width = max(map(len, TIMINGS))
        print("\nSlurm phase timings (s):\n" + "\n".join(f"  {k:<{width}}  {v:6.1f}" for k, v in TIMINGS.items()))


@pytest.fixture(scope="session")
def slurm_s3(slurm_cluster: SlurmCluster, s3_server) -> dict:
    """The S3 test server as the nodes see it: its credentials, the endpoint on the bridge
    (relayed to the server's 127.0.0.1 port, which a node's namespace cannot reach)."""
    url = urlsplit(s3_server.endpoint_url)
    host, port = slurm_cluster.relay((url.hostname, url.port))
    return dict(s3_server.env(), AWS_ENDPOINT_URL=f"http://{host}:{port}",
                AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)


@pytest.fixture(scope="session")
def slurm_work(tmp_path_factory) -> pathlib.Path:
    """The submit directory: job outputs (%x-%j.out), run directories."""
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="session")
def slurm_dataset(slurm_cluster, slurm_s3, s3_server, slurm_work):
    """prep.sbatch as a 2-task array, finalize.sbatch after it (afterok)."""
    work = slurm_work
    src = make_imagenet_tree(work / "imagenet", per_class=TRAIN_IMAGES // 3, val_per_class=VAL_IMAGES // 3)
    dst = f"s3://{s3_server.create_bucket('slurm')}/imagenet-wds"
    env = job_env(slurm_s3, SRC=str(src.root), DST=dst)
    t0 = time.monotonic()
    prep = slurm_cluster.sbatch([*CPU, "--array=0-1", str(SLURM / "prep.sbatch"), "--shard-samples", "16"],
                                env=env, cwd=work)
    final = slurm_cluster.sbatch([*CPU, f"--dependency=afterok:{prep}", str(SLURM / "finalize.sbatch")],
                                 env=env, cwd=work)
    tasks = slurm_cluster.wait_done(prep, 180)
    (fin,) = slurm_cluster.wait_done(final, 180)
    TIMINGS["prep array + finalize"] = time.monotonic() - t0
    return dict(dst=dst, env=env, prep=prep, final=final, tasks=tasks, fin=fin)


@pytest.fixture(scope="session")
def slurm_baseline(slurm_dataset, slurm_cluster, slurm_work):
    """pretrain.sbatch on both nodes, never interrupted: the reference for every resume."""
    dataset, work = slurm_dataset, slurm_work
    t0 = time.monotonic()
    job = submit_pretrain(slurm_cluster, dataset, work, "baseline", *RUN)
    (info,) = slurm_cluster.wait_done(job, 300)
    TIMINGS["uninterrupted 2-node run (submit to end)"] = time.monotonic() - t0
    return dict(job=job, info=info, out=work / "baseline", log=output(work, f"crossmae-pretrain-{job}.out"),
                store=store_url(dataset, "baseline"))

