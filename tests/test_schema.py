"""Property-based tests of the REST app from its own OpenAPI schema (schemathesis): no
5xx and no answer outside the schema, whatever the input."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agentos.api.app import ServerSettings, create_app
from agentos.engine import AsyncEngine

_engine = AsyncEngine("tiny", kv_blocks=4096)
app = create_app(ServerSettings(max_tokens_cap=16, max_body_bytes=1 << 20), engine=_engine)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def _shutdown():
    yield
    _engine.kernel.shutdown()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_schema(case):
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance,
                                   status_code_conformance, content_type_conformance])
