"""How the drafts fare at sign-off: the radiologist's findings against the draft's, per finding and model
revision, through the API, the command line and the Prometheus counters."""

from __future__ import annotations

import json
from datetime import timedelta

from alembic import command
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select

from api.main import create_app
from radvlm_pacs import main
from records.clock import utcnow
from records.db import alembic_config, upgrade
from records.tables import SignOff
from results.agreement import FINDINGS, agreement
from testbed.accounts import HOUSE, auth, settings_for
from testbed.radiographs import RG1_STUDY

SIGNED = {"report": "Findings: Enlarged cardiac silhouette. Impression: Cardiomegaly. Line in place.",
          "findings": ["Cardiomegaly", "Support Devices"]}  # the draft said Cardiomegaly and Pleural Effusion


def _counted(label: str, drafted: bool, signed: bool) -> float:
    return REGISTRY.get_sample_value("radvlm_signed_findings_total", {
        "label": label, "drafted": str(drafted).lower(), "signed": str(signed).lower()}) or 0.0


def test_agreement_counts_what_radiologists_kept_removed_and_added(analysed_node, monkeypatch, capsys):
    running = analysed_node.running
    combinations = [("Cardiomegaly", True, True), ("Pleural Effusion", True, False),
                    ("Support Devices", False, True), ("Edema", False, False)]
    before = {c: _counted(*c) for c in combinations}
    edited_before = REGISTRY.get_sample_value("radvlm_sign_offs_total", {"edited": "true"}) or 0.0
    with TestClient(create_app(settings_for(running))) as client:
        assert client.get("/agreement", headers=HOUSE).json() == []  # nothing signed yet
        assert client.post(f"/studies/{RG1_STUDY}/sign-off", json=SIGNED, headers=HOUSE).status_code == 201

        [entry] = client.get("/agreement", headers=auth("it.admin")).json()
        assert (entry["model_id"], entry["model_revision"], entry["sign_offs"], entry["edited"]) == (
            "scripted-radvlm", "scripted", 1, 1)
        findings = {f["label"]: f for f in entry["findings"]}
        assert list(findings) == list(FINDINGS)
        assert findings["Cardiomegaly"] == {"label": "Cardiomegaly", "kept": 1, "removed": 0, "added": 0,
                                                 "absent": 0, "ppv": 1.0, "sensitivity": 1.0, "f1": 1.0}
        assert (findings["Pleural Effusion"]["removed"], findings["Pleural Effusion"]["ppv"],
                findings["Pleural Effusion"]["sensitivity"]) == (1, 0.0, None)  # drafted, never signed
        assert (findings["Support Devices"]["added"], findings["Support Devices"]["ppv"],
                findings["Support Devices"]["sensitivity"]) == (1, None, 0.0)  # signed, never drafted
        assert findings["Edema"]["absent"] == 1 and findings["Edema"]["f1"] is None

        tomorrow = (utcnow() + timedelta(days=1)).isoformat()
        assert client.get("/agreement", params={"since": tomorrow}, headers=HOUSE).json() == []
        assert client.get("/agreement", params={"until": tomorrow}, headers=HOUSE).json() == [entry]
        naive = (utcnow() - timedelta(minutes=5)).replace(tzinfo=None).isoformat()  # read as UTC
        assert client.get("/agreement", params={"until": naive}, headers=HOUSE).json() == []
        assert client.get("/agreement", headers=auth("dr.elsewhere")).json() == []  # not a study they may see
        empty = client.get("/agreement", params={"since": tomorrow, "until": tomorrow}, headers=HOUSE)
        assert empty.status_code == 422 and empty.headers["content-type"] == "application/problem+json"
        [audited] = [e for e in client.get("/audit", params={"action": "read_agreement"},
                                           headers=auth("it.admin")).json() if e["user_name"] == "dr.elsewhere"]
        assert audited["event_id"] == "110112"

    assert {c: _counted(*c) - before[c] for c in combinations} == {c: 1.0 for c in combinations}
    assert REGISTRY.get_sample_value("radvlm_sign_offs_total", {"edited": "true"}) - edited_before == 1.0

    monkeypatch.setenv("RADVLM_DATABASE_URL", running.url)
    assert main(["agreement", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [entry]
    assert main(["agreement", "--since", "2000-01-01"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "scripted-radvlm @ scripted: 1 sign-offs, 1 edited (100%)"
    assert table[3].split() == ["Cardiomegaly", "1", "0", "0", "1.00", "1.00", "1.00"]
    assert main(["agreement", "--until", "2000-01-01"]) == 0
    assert capsys.readouterr().out.strip() == "no sign-offs in that period"

    command.downgrade(alembic_config(running.url), "0007")  # a database from before sign-offs kept the draft's
    upgrade(running.url)  # findings: they are filled in from the stored drafts
    with running.sessions() as session:
        [signed] = session.scalars(select(SignOff)).all()
        assert signed.drafted == ["Cardiomegaly", "Pleural Effusion"]
        assert [entry.as_dict() for entry in agreement(session)] == [entry]
