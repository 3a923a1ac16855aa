"""Property-based fuzzing of the OpenAPI spec with schemathesis: no input may cause a 5xx, and
responses must match the documented schemas. Bounded examples so that it runs in CI."""
from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings
from service.testing import populate_data_root

KEY = "schema-key"


@pytest.fixture(scope="module")
def app(tmp_path_factory, corpus_path, small_plan):
    root = tmp_path_factory.mktemp("schemathesis") / "data"
    populate_data_root(root, corpus_path, [small_plan.path])
    # job_workers=1 and a tiny page cap keep generated jobs and pages cheap on a 2-core box
    app = create_app(Settings(data_root=root, api_keys=[KEY], max_page=20))
    with TestClient(app):  # run the lifespan (registry recovery) once
        yield app


def test_no_server_errors(app, small_plan) -> None:
    # Driven operation by operation with hypothesis directly (schemathesis' lazy pytest fixture
    # does not run under this pytest); the checks are schemathesis' own.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            # Half the cases aim at the real plan so paging and batches get past the 404.
            params = case.path_parameters or {}
            if "plan_id" in params and len(str(params)) % 2:
                params["plan_id"] = small_plan.plan_id
                if isinstance(params.get("epoch"), int):
                    params["epoch"] %= small_plan.epochs
                if isinstance(params.get("batch"), int):
                    params["batch"] %= small_plan.batches_per_epoch
                query = case.query or {}
                if isinstance(query.get("start"), int):
                    query["start"] %= small_plan.batches_per_epoch
            # Every other built-in check runs; a schema-valid body can still name a file that
            # is not there (400), which is correct and not a conformance failure.
            response = case.call_and_validate(headers={"X-API-Key": KEY},
                                              excluded_checks=[positive_data_acceptance])
            assert response.status_code < 500, (operation.label, response.text)

        check()
    # The fuzzing reached real data, not only 404s and 422s.
    metrics = TestClient(app).get("/metrics").text
    for route in ("/v1/plans/{plan_id}/epochs/{epoch}/batches",
                  "/v1/plans/{plan_id}/epochs/{epoch}/batches/{batch}"):
        assert f'route="{route}",status="200"' in metrics, route
