"""The trainer says its time to first batch (cold and on resume, the slowest rank) and its store
traffic: on stderr when the first step is done, on the first metrics.jsonl line, in the summary."""
import json
import re

import pytest

from tests.pipelines.test_pretrain import launch, manifest  # noqa: F401 - the module's shard fixture

LINE = re.compile(r"crossmae-pretrain: first batch after (\d+\.\d\d) s \(loader (\d+\.\d\d) s\), "
                  r"slowest rank ([01]), (cold start|resume)")


def test_time_to_first_batch_and_store_traffic_are_reported_cold_and_on_resume(manifest, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    for max_steps, start in ((2, "cold start"), (4, "resume")):
        proc = launch(manifest, out, f"run.max_steps={max_steps}", "run.save_every=2", "run.log_every=1")
        said = LINE.findall(proc.stderr)
        assert len(said) == 1 and said[0][3] == start, proc.stderr[-2000:]
        total, from_loader, slowest = float(said[0][0]), float(said[0][1]), int(said[0][2])
        assert 0 < from_loader < total, "the process started before its loader was built"
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        first, later = recs[max_steps - 2], recs[max_steps - 1]  # this run's two log lines
        assert first["first_batch_start"] == start and first["first_batch_slowest_rank"] == slowest
        assert first["first_batch_s"] == max(first["first_batch_rank_s"]) == pytest.approx(total, abs=0.006)
        for r in range(2):  # every rank: process start > loader construction > the loader's own part
            span, loader_span, data = (first[k][r] for k in ("first_batch_rank_s", "first_batch_loader_rank_s",
                                                            "first_batch_data_rank_s"))
            assert span > loader_span > data > 0, first
        assert first["first_batch_data_s"] == first["first_batch_data_rank_s"][slowest]
        assert "first_batch_s" not in later, "only the run's first log line carries it"
        for r in (first, later):  # local shards: no object-store traffic
            assert (r["store_gets"], r["store_bytes"], r["store_retries"], r["shard_rereads"]) == (0, 0, 0, 0)
            assert r["bytes_read_per_dataset_epoch"] == 0.0
        done = next(x for x in proc.stderr.splitlines() if "crossmae-pretrain: done" in x)
        assert "store: 0 GETs, 0.0 MiB (0.00x the dataset), 0 retries, 0 shard re-reads (all ranks)" in done
        assert f"first batch after {said[0][0]} s" in done and start in done
