"""Fixtures of the reliability tests: S3 through the fault-injecting proxy, and report metadata."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.reliability.fault_proxy import FaultProxy, Faults


@pytest.fixture
def faulty_s3_env(s3_env, monkeypatch) -> Iterator[Callable[..., FaultProxy]]:
    """`proxy = faulty_s3_env(reset=0.1, seed=1, ...)` (the Faults fields) starts a FaultProxy in
    front of the session's S3 server and points AWS_ENDPOINT_URL at it; calling it again replaces
    the proxy. The credentials are s3_env's. No cache reset is needed: pipelines.storage.s3 keys its
    cached clients by the endpoint read from the environment on every call."""
    proxies = []

    def start(**faults) -> FaultProxy:
        proxy = FaultProxy(s3_env.endpoint_url, Faults(**faults))
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


@pytest.fixture(autouse=True)
def _docstring_for_the_report(request, record_property) -> None:
    """The first docstring line: RELIABILITY.md's row for a test that records no fault/checked."""
    doc = (getattr(request.function, "__doc__", None) or "").strip()
    if doc:
        record_property("doc", doc.splitlines()[0])
