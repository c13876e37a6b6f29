"""The radiologist's worklist: each study's findings, those the site counts as urgent, and urgent studies first;
a sign-off's findings replace the draft's; the migration fills the findings of studies analysed before it."""

from __future__ import annotations

from datetime import timedelta

from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.main import create_app
from records.db import alembic_config, upgrade
from records.settings import Settings
from records.tables import Study
from testbed.accounts import HOUSE, users
from testbed.radiographs import RG1_STUDY, RG3_STUDY


def _migrated_again(running) -> dict[str, list[str] | None]:  # type: ignore[no-untyped-def]
    """Each study's findings as the migration fills them in a database from before the column."""
    command.downgrade(alembic_config(running.url), "0008")
    upgrade(running.url)
    with running.sessions() as session:
        return {s.study_instance_uid: s.findings for s in session.scalars(select(Study))}


def test_urgent_studies_come_first_with_their_findings(analysed_node):
    running = analysed_node.running
    with running.sessions() as session, session.begin():  # the tibia arrived after the chest
        chest = session.scalars(select(Study).where(Study.study_instance_uid == RG1_STUDY)).one()
        session.execute(update(Study).where(Study.study_instance_uid == RG3_STUDY)
                        .values(last_received_at=chest.last_received_at + timedelta(minutes=1)))
    settings = Settings(database_url=running.url, storage_dir=running.store.root, api={"users": users()},
                        delivery={"urgent_findings": ["Pleural Effusion", "Pneumothorax"]})
    with TestClient(create_app(settings)) as client:
        def listed(**params: object) -> list[tuple[str, list[str] | None, list[str]]]:
            found = client.get("/studies", params=params, headers=HOUSE)
            assert found.status_code == 200, found.text
            return [(s["study_instance_uid"], s["findings"], s["urgent"]) for s in found.json()["data"]]

        chest_row = (RG1_STUDY, ["Cardiomegaly", "Pleural Effusion"], ["Pleural Effusion"])
        assert listed() == [(RG3_STUDY, None, []), chest_row]  # newest first
        assert listed(urgent_first=True) == [chest_row, (RG3_STUDY, None, [])]
        assert listed(finding="Cardiomegaly") == [chest_row]
        assert listed(finding="Pneumothorax") == []
        unknown = client.get("/studies", params={"finding": "Broken Heart"}, headers=HOUSE)
        assert unknown.status_code == 422 and unknown.json()["title"] == "unknown finding"
        assert client.get(f"/studies/{RG1_STUDY}", headers=HOUSE).json()["urgent"] == ["Pleural Effusion"]
        assert _migrated_again(running) == {RG1_STUDY: ["Cardiomegaly", "Pleural Effusion"], RG3_STUDY: None}

        signed = client.post(f"/studies/{RG1_STUDY}/sign-off", headers=HOUSE, json={
            "report": "Findings: Enlarged heart. Impression: Cardiomegaly.", "findings": ["Cardiomegaly"]})
        assert signed.status_code == 201
        assert listed(urgent_first=True) == [(RG3_STUDY, None, []), (RG1_STUDY, ["Cardiomegaly"], [])]

    assert _migrated_again(running) == {RG1_STUDY: ["Cardiomegaly"], RG3_STUDY: None}  # the signed ones
