"""Schemathesis over the API's own OpenAPI document: generated requests, valid and not, never get a 5xx.

Each generated case is sent as generated (mostly unknown studies) and once more aimed at the analysed
chest study and a real conversation, with the token of a radiologist who may see it.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from api.askers import LocalAsker
from api.main import create_app
from records.settings import Settings
from tests.conftest import RG1_STUDY, worker_context
from tests.test_chat import HOUSE, conversation, settings_for
from worker.backends.scripted import ScriptedBackend


@pytest.fixture
def api(analysed_node):  # type: ignore[no-untyped-def]
    running = analysed_node.running
    asker = LocalAsker(worker_context(running, ScriptedBackend()), analysed_node.model_thread)
    with TestClient(create_app(settings_for(running), asker), raise_server_exceptions=False) as client:
        yield client, conversation(client)


# the document is static: built from an app that is never started
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case, api):  # type: ignore[no-untyped-def]
    client, conversation_id = api
    aimed = {"uid": RG1_STUDY, "conversation_id": conversation_id}
    for path_parameters in (dict(case.path_parameters or {}),
                            {k: aimed.get(k, v) for k, v in (case.path_parameters or {}).items()}):
        case.path_parameters = path_parameters
        kwargs = case.as_transport_kwargs(headers=HOUSE)
        response = client.request(kwargs["method"], kwargs["url"].removeprefix("http://localhost"),
                                  headers=kwargs.get("headers"), params=kwargs.get("params"),
                                  json=kwargs.get("json"), content=kwargs.get("data"))
        case.validate_response(response, checks=[not_a_server_error])
