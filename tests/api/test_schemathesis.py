"""Property-based API tests generated from /openapi.json (schemathesis): every operation, a bounded
number of examples each; no 5xx, and responses conform to the documented schemas. /v2's model names
are drawn from the served ones as often as not, so its infer bodies reach the codec and the models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
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
SERVED = {"name": ["vit", "vit_image", "detr", "detr_image", "imagetransformer"], "version": ["1"]}


@schema.hook
def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any] | None) -> Any:
    """A served model (and its version) in place of the random one, most of the time."""
    if not path_parameters:
        return st.just(path_parameters)
    served = {k: st.sampled_from([v, *SERVED[k]]) for k, v in path_parameters.items() if k in SERVED}
    return st.fixed_dictionaries({**{k: st.just(v) for k, v in path_parameters.items()}, **served})


INFER = r"/infer$"  # /v2's infer bodies get more examples: the protocol codec is the hostile surface


@schema.exclude(path_regex=INFER).parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_and_answers_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])


@schema.include(path_regex=INFER).parametrize()
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_v2_infer_never_fails_and_answers_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
