"""This process's object-store traffic, counted where the requests are made (pipelines/storage/s3.py):

    gets      GET requests sent (each botocore retry of one is a request too)
    bytes     body bytes received
    retries   requests sent again: botocore's retries of a GET, and re-GETs that resume a broken body

Per process: loader workers send the change since their last batch with each batch
(pipelines/data/loader.py), so the trainer's process sees its workers' traffic too."""
from __future__ import annotations

from collections import Counter

KEYS = ("gets", "bytes", "retries")
COUNTS: Counter = Counter()


def count(**n: int) -> None:
    COUNTS.update(n)


def snapshot() -> dict:
    return {k: COUNTS[k] for k in KEYS}


def since(before: dict) -> dict:
    """What was counted after ``before`` (a snapshot())."""
    return {k: COUNTS[k] - before.get(k, 0) for k in KEYS}
