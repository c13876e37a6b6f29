"""schemathesis against our OpenAPI schema, on the real app over an analysed study: no server error
anywhere, and no route but /health answers without the token. Each generated case is sent as generated
(mostly unknown studies) and once more aimed at the analysed chest study and a real conversation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import ignored_auth

from testbed.accounts import HOUSE
from testbed.chat import conversation
from testbed.radiographs import RG1_STUDY


# thousands of requests without a valid token, all from one address: over the per-minute limit of audited
# failures they would be answered 429, where ignored_auth wants to see each one refused with 401
@pytest.mark.parametrize("chat", [{"failed_logins_per_minute": 10**6}], indirect=True)
def test_no_server_errors_and_no_way_in_without_a_token(chat):  # noqa: F811
    client, _ = chat
    aimed = {"uid": RG1_STUDY, "conversation_id": conversation(client)}
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    assert [op.path for op in operations if op.definition.raw.get("security") != [{"HTTPBearer": []}]] == ["/health"]
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def exercise(case):  # type: ignore[no-untyped-def]
            generated = dict(case.path_parameters or {})
            for path_parameters in (generated, {k: aimed.get(k, v) for k, v in generated.items()}):
                case.path_parameters = path_parameters
                case.call_and_validate(headers=HOUSE, checks=[not_a_server_error, ignored_auth])

        exercise()
