"""Chat through the API: a conversation opened about RG1, and server-sent events read back."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from testbed.accounts import HOUSE
from testbed.radiographs import RG1_STUDY

if TYPE_CHECKING:
    from fastapi.testclient import TestClient


def conversation(client: TestClient) -> int:
    created = client.post(f"/studies/{RG1_STUDY}/conversations", json={}, headers=HOUSE)
    assert created.status_code == 201, created.text
    return created.json()["id"]


def sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.replace("\r\n", "\n").strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events
