"""Property-based tests of the REST app from its own OpenAPI schema (schemathesis): no
5xx and no answer outside the schema, whatever the input."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agentos.api.app import ServerSettings, create_app
from agentos.api.tenants import Tenants
from agentos.engine import AsyncEngine

_engine = AsyncEngine("tiny", kv_blocks=4096)


def _record() -> bytes:
    from agentos.snapshot.codec import Record, array

    return Record(id="sess_x", kind="session", owner="default", token_ids=array("i", [1, 2, 3]),
                  mask=array("b", [0, 0, 1]), rng_state=b"", rng_device="other", created_at=0.0).pack()


# session records (POST /v1/sessions/import): a valid one, or any bytes (refused with a 400)
schemathesis.openapi.media_type("application/msgpack", st.one_of(st.just(_record()), st.binary(max_size=256)))
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


# the same schema on a server with API keys: a tenant without admin rights, as an attacker
# with a valid key would call it; the other tenant's sessions must stay out of reach
keyed_app = create_app(ServerSettings(max_tokens_cap=16, max_body_bytes=1 << 20), engine=_engine,
                       tenants=Tenants({"sk-schema-a": "a", "sk-schema-b": "b"}))
keyed_schema = schemathesis.openapi.from_asgi("/openapi.json", keyed_app)


@keyed_schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_schema_with_keys(case):
    case.call_and_validate(headers={"Authorization": "Bearer sk-schema-a"},
                           checks=[not_a_server_error, response_schema_conformance,
                                   status_code_conformance, content_type_conformance])
