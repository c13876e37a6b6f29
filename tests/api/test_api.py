"""The API over a study analysed for real (scripted model): tokens, filters, detail, PNG, problems."""

from __future__ import annotations

import hashlib
import io
import tomllib
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from radvlm_pacs import main
from records.settings import ApiUser, Settings
from results.capture import BOX_COLOUR
from testbed.radiographs import RG1_STUDY, RG3_STUDY

TOKEN = "correct horse battery staple"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
EXPIRED = "last year's token"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture
def client(analysed_node):
    running = analysed_node.running
    settings = Settings(database_url=running.url, storage_dir=running.store.root, api={"users": [
        ApiUser(name="dr.house", token_sha256=_digest(TOKEN), expires=NOW + timedelta(seconds=1)),
        ApiUser(name="dr.former", token_sha256=_digest(EXPIRED), expires=NOW)],
        "failed_logins_per_minute": 1000})  # every route is tried with bad tokens: more than a minute's worth
    with TestClient(create_app(settings, clock=lambda: NOW)) as client:
        yield client


def test_health_is_open_and_every_other_route_refuses_a_missing_wrong_or_expired_token(client):
    assert client.get("/health").json() == {"status": "ok"}
    routes = [(method.upper(), path) for path, operations in client.app.openapi()["paths"].items()
              for method in operations if path != "/health"]
    assert len(routes) >= 11
    for method, template in routes:
        path = template.format_map(defaultdict(lambda: "1"))
        for headers, title in (({}, "authentication required"), ({"Authorization": "Bearer wrong"}, "invalid token"),
                               ({"Authorization": f"Bearer {EXPIRED}"}, "token expired")):
            answer = client.request(method, path, headers=headers, json={})
            assert answer.status_code == 401, (method, path, headers)
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["title"] == title
    assert client.get("/studies", headers=HEADERS).status_code == 200  # expires a second after NOW


def test_answers_carry_the_headers_a_security_review_asks_for(client):
    data, refused, page = (client.get("/studies", headers=HEADERS), client.get("/studies"), client.get("/ui/"))
    assert (data.status_code, refused.status_code, page.status_code) == (200, 401, 200)
    for answer in (data, refused, page):
        assert (answer.headers["x-content-type-options"], answer.headers["x-frame-options"],
                answer.headers["referrer-policy"]) == ("nosniff", "DENY", "no-referrer")
        assert "strict-transport-security" not in answer.headers  # plain HTTP (HTTPS: test_security)
    assert data.headers["cache-control"] == refused.headers["cache-control"] == "no-store"  # patient data
    assert "cache-control" not in page.headers and "content-security-policy" not in data.headers
    assert page.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self';")


def _token_entry(capsys, *args: str) -> tuple[str, ApiUser]:  # type: ignore[no-untyped-def]
    """The token the command printed, and the user its settings entry makes."""
    assert main(["token", *args]) == 0
    out, err = capsys.readouterr()
    entry = tomllib.loads(f"users = [ {out.strip().rstrip(',')} ]")["users"][0]
    return err.rsplit(": ", 1)[1].strip(), ApiUser.model_validate(entry)


def test_token_command_prints_a_token_once_and_an_entry_with_its_hash(capsys):
    token, user = _token_entry(capsys, "dr.north", "--days", "30", "--sources", "NORTHPACS",
                               "--person-name", "North^Anna")
    assert user.token_sha256 == _digest(token)
    assert user.sources == ["NORTHPACS"] and user.role == "radiologist" and user.observer_name == "North^Anna"
    assert timedelta(days=29) < user.expires - datetime.now(timezone.utc) <= timedelta(days=30)
    _, sender = _token_entry(capsys, "cloud.archive", "--role", "sender", "--ae-title", "CLOUDPACS")
    assert (sender.role, sender.ae_title, sender.person_name) == ("sender", "CLOUDPACS", None)
    # what a sign-off or a STOW-RS reception needs is asked for, not left to fail later
    assert main(["token", "dr.south"]) == 2
    assert "a radiologist needs --person-name" in capsys.readouterr().err
    assert main(["token", "pacs", "--role", "sender"]) == 2
    assert capsys.readouterr() == ("", "radvlm-pacs token: a sender needs --ae-title AE: the calling AE title its "
                                       "studies are recorded under\n")
    with pytest.raises(ValueError, match="UTC offset"):
        ApiUser(name="x", token_sha256=_digest("x"), expires=datetime(2030, 1, 1))


def test_list_and_filters(client):
    every = client.get("/studies", headers=HEADERS).json()
    assert every["count"] == 2
    analysed = client.get("/studies", params={"state": "analysed"}, headers=HEADERS).json()
    assert [s["study_instance_uid"] for s in analysed["data"]] == [RG1_STUDY]
    assert client.get("/studies", params={"patient_id": "nobody"}, headers=HEADERS).json()["count"] == 0

    def named(words: str) -> list[str]:
        found = client.get("/studies", params={"patient_name": words}, headers=HEADERS).json()["data"]
        return sorted(study["study_instance_uid"] for study in found)

    assert named("samples rg1") == [RG1_STUDY]  # CompressedSamples^RG1: words in order, any case
    assert named("COMPRESSED") == named("rg?") == sorted(s["study_instance_uid"] for s in every["data"])
    assert named("rg1 samples") == []
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
