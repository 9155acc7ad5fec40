"""Property-based API tests generated from /openapi.json (schemathesis): every operation, a bounded
number of examples each; no 5xx, and responses conform to the documented schemas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.app import create_app
from service.settings import Settings

APP = create_app(Settings(model_repository=Path("model_repository"), warmup=False, max_images_per_request=4))


@pytest.fixture(scope="module", autouse=True)
def loaded() -> Iterator[None]:
    with TestClient(APP):  # runs the lifespan: the models load onto APP.state
        yield


schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_and_answers_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
