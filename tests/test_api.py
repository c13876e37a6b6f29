"""The API over a study analysed for real (scripted model): tokens, filters, detail, PNG, problems."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from records.settings import ApiUser, Settings
from tests.conftest import RG1_STUDY, RG3_STUDY
from worker.delivery.capture import BOX_COLOUR

TOKEN = "correct horse battery staple"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(analysed_node):
    running = analysed_node.running
    settings = Settings(database_url=running.url, storage_dir=running.store.root, api={
        "users": [ApiUser(name="dr.house", token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest())]})
    with TestClient(create_app(settings)) as client:
        yield client


def test_health_is_open_and_everything_else_needs_a_token(client):
    assert client.get("/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = client.get("/studies", headers=headers)
        assert answer.status_code == 401
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["status"] == 401


def test_list_and_filters(client):
    every = client.get("/studies", headers=HEADERS).json()
    assert every["count"] == 2
    analysed = client.get("/studies", params={"state": "analysed"}, headers=HEADERS).json()
    assert [s["study_instance_uid"] for s in analysed["data"]] == [RG1_STUDY]
    assert client.get("/studies", params={"patient_id": "nobody"}, headers=HEADERS).json()["count"] == 0
    bad = client.get("/studies", params={"date_from": "yesterday"}, headers=HEADERS)
    assert bad.status_code == 422 and "date_from" in bad.json()["detail"]


def test_detail_carries_the_result(client):
    detail = client.get(f"/studies/{RG1_STUDY}", headers=HEADERS).json()
    [image] = detail["result"]["images"]
    assert {k for k, v in image["labels"].items() if v} == {"Cardiomegaly", "Pleural Effusion"}
    assert detail["instances"][0]["reason"] == "frontal chest: ViewPosition PA"
    missing = client.get("/studies/1.2.3", headers=HEADERS)
    assert missing.status_code == 404 and missing.json()["title"] == "unknown study"


def test_image_with_and_without_boxes(client):
    detail = client.get(f"/studies/{RG1_STUDY}", headers=HEADERS).json()
    box = detail["result"]["images"][0]["groundings"][0]["answer"]["boxes"][0]["px"]
    x1, y1, x2, _ = (int(round(v)) for v in box)
    with_boxes = client.get(f"/studies/{RG1_STUDY}/image.png", headers=HEADERS)
    assert with_boxes.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(with_boxes.content)))
    assert pixels.shape == (1955, 1841, 3)
    assert tuple(pixels[y1, (x1 + x2) // 2]) == BOX_COLOUR
    plain = np.asarray(Image.open(io.BytesIO(client.get(f"/studies/{RG1_STUDY}/image.png",
                                                         params={"boxes": "false"}, headers=HEADERS).content)))
    assert tuple(plain[y1, (x1 + x2) // 2]) != BOX_COLOUR


def test_image_of_a_study_without_result_is_a_conflict_or_absent(client):
    tibia = RG3_STUDY
    conflict = client.get(f"/studies/{tibia}/image.png", headers=HEADERS)
    assert conflict.status_code == 409 and "nothing_to_analyse" in conflict.json()["detail"]
    absent = client.get(f"/studies/{tibia}/image.png", params={"boxes": "false"}, headers=HEADERS)
    assert absent.status_code == 404 and absent.json()["title"] == "no such image"
