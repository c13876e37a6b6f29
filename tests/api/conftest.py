"""Fixtures of the API's tests: the API over an analysed node, with a scripted model of its own."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from radvlm.backends.scripted import ScriptedBackend
from testbed.accounts import settings_for
from testbed.node import worker_context
from worker.askers import LocalAsker
from worker.model_thread import ModelThread


@pytest.fixture
def chat(analysed_node, request):
    """(client, backend): the API with a scripted model of its own on a model thread (``api`` settings
    from an indirect parameter)."""
    running = analysed_node.running
    backend = ScriptedBackend()
    with ModelThread() as thread:
        asker = LocalAsker(worker_context(running, backend), thread)
        with TestClient(create_app(settings_for(running, **getattr(request, "param", {})), asker)) as client:
            yield client, backend
