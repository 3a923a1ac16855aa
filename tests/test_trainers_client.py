"""PlanClient against the real service under a real uvicorn, and against real flaky sockets."""
from __future__ import annotations

import http.server
import pickle
import socket
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from trainers import (
    LocalPlan,
    PlanBatchSampler,
    PlanClient,
    PlanExhausted,
    PlanServiceError,
    PlanServiceUnavailable,
    open_source,
)
from trainers.plans import EPOCH_COLUMNS

service_app = pytest.importorskip("service.app", reason="the REST service is not importable")
from service.settings import Settings  # noqa: E402
from service.testing import UvicornThread, free_port  # noqa: E402

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(small_plan, tmp_path_factory) -> Iterator[UvicornThread]:
    settings = Settings(data_root=tmp_path_factory.mktemp("svc"),
                        plans_dir=small_plan.path.parent)
    with UvicornThread(service_app.create_app(settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server(small_plan, tmp_path_factory) -> Iterator[UvicornThread]:
    settings = Settings(data_root=tmp_path_factory.mktemp("svc-keyed"),
                        plans_dir=small_plan.path.parent, api_keys=[API_KEY],
                        require_key_for_reads=True)
    with UvicornThread(service_app.create_app(settings)) as srv:
        yield srv


class FlakyProxy:
    """A real HTTP server that answers 503 to the first ``failures`` requests, then forwards
    to ``backend`` (the real service)."""

    def __init__(self, backend: str, failures: int) -> None:
        self.backend, self.failures, self.seen = backend, failures, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                proxy.seen += 1
                if proxy.seen <= proxy.failures:
                    body = b'{"error": {"field": null, "message": "warming up"}}'
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("accept", "if-none-match", "x-api-key")}
                r = httpx.get(proxy.backend + self.path, headers=headers, timeout=30)
                self.send_response(r.status_code)
                for k in ("content-type", "etag"):
                    if k in r.headers:
                        self.send_header(k, r.headers[k])
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_client_serves_the_same_plan_as_the_directory(server, small_plan):
    local = LocalPlan(small_plan)
    with PlanClient(server.url, small_plan.plan_id) as client:
        assert client.manifest == small_plan.manifest
        assert (client.epochs, client.batch_size, client.batches_per_epoch, client.n_rows) == (
            local.epochs, local.batch_size, local.batches_per_epoch, local.n_rows)
        for e in range(local.epochs):
            got = client.epoch_table(e).select(list(EPOCH_COLUMNS))
            assert got.equals(local.epoch_table(e).select(list(EPOCH_COLUMNS)))
        assert client.stats["requests"] == 1 + local.epochs  # manifest + one stream per epoch
        client.epoch_table(0)
        assert client.stats["requests"] == 1 + local.epochs  # memory cache: no new request

        for e, k in ((0, 0), (1, local.batches_per_epoch - 1)):
            assert client.batch_negatives(e, k).equals(local.batch_negatives(e, k))
        for kwargs in ({}, {"negatives": True, "rank": 1, "world_size": 2}):
            assert list(PlanBatchSampler(client, **kwargs)) == list(
                PlanBatchSampler(local, **kwargs))
        perm = np.random.default_rng(3).permutation(local.n_rows)
        by_id = PlanBatchSampler(client, ids=perm + 1000, negatives=True)
        assert list(by_id)[0][:local.batch_size] == list(
            PlanBatchSampler(local, ids=perm + 1000))[0]
        with pytest.raises(PlanExhausted):
            client.epoch_table(local.epochs)


def test_open_source_from_url_and_pickling(server, small_plan):
    client = open_source(f"{server.url}/v1/plans/{small_plan.plan_id}")
    assert isinstance(client, PlanClient) and client.plan_id == small_plan.plan_id
    clone = pickle.loads(pickle.dumps(client))  # e.g. handed to spawned workers
    assert clone.epoch_table(1).num_rows == small_plan.batches_per_epoch * small_plan.batch_size


def test_etag_revalidation_across_restarts(server, small_plan, tmp_path):
    first = PlanClient(server.url, small_plan.plan_id, cache_dir=tmp_path)
    table = first.epoch_table(0)
    assert first.stats["not_modified"] == 0
    restarted = PlanClient(server.url, small_plan.plan_id, cache_dir=tmp_path)
    assert restarted.epoch_table(0).equals(table)
    assert restarted.stats["not_modified"] == 2  # manifest and epoch: 304, no bodies


def test_api_key(keyed_server, small_plan, monkeypatch):
    monkeypatch.delenv("B3MINE_API_KEY", raising=False)
    with pytest.raises(PlanServiceError, match="HTTP 401.*api_key") as err:
        PlanClient(keyed_server.url, small_plan.plan_id).manifest
    assert err.value.status == 401
    with pytest.raises(PlanServiceError, match="HTTP 403"):
        PlanClient(keyed_server.url, small_plan.plan_id, api_key="wrong").manifest
    ok = PlanClient(keyed_server.url, small_plan.plan_id, api_key=API_KEY)
    assert ok.epoch_table(0).num_rows > 0
    monkeypatch.setenv("B3MINE_API_KEY", API_KEY)
    assert PlanClient(keyed_server.url, small_plan.plan_id).epochs == small_plan.epochs


def test_unknown_plan_is_not_retried(server):
    client = PlanClient(server.url, "nosuchplan", retries=3, backoff=0.01)
    with pytest.raises(PlanServiceError, match="HTTP 404") as err:
        client.manifest
    assert err.value.status == 404 and client.stats["retries"] == 0


def test_retries_5xx_then_succeeds(server, small_plan):
    with FlakyProxy(server.url, failures=2) as proxy:
        client = PlanClient(proxy.url, small_plan.plan_id, retries=3, backoff=0.01)
        assert client.epoch_table(0).num_rows == small_plan.batches_per_epoch * \
            small_plan.batch_size
        assert client.stats["retries"] == 2


def test_5xx_until_retries_run_out(server, small_plan):
    with FlakyProxy(server.url, failures=100) as proxy:
        client = PlanClient(proxy.url, small_plan.plan_id, retries=2, backoff=0.01)
        with pytest.raises(PlanServiceUnavailable, match=r"failed 3 time\(s\).*HTTP 503.*"
                                                         r"warming up"):
            client.manifest
        assert proxy.seen == 3


def test_connection_refused_after_retries():
    port = free_port()  # nothing listens there
    with socket.socket() as s:  # confirm, so the test cannot pass by accident
        assert s.connect_ex(("127.0.0.1", port)) != 0
    client = PlanClient(f"http://127.0.0.1:{port}", "someplan", retries=2, backoff=0.01)
    with pytest.raises(PlanServiceUnavailable, match=r"unreachable.*failed 3 time\(s\).*"
                                                     r"ConnectError") as err:
        client.manifest
    assert isinstance(err.value, ConnectionError)
