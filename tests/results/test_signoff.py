"""Sign-off end to end: the draft goes to Orthanc and the RIS, a radiologist edits and signs it through the
API, and a verified SR naming the draft as predecessor follows it, with a final ORU."""

from __future__ import annotations

import io
import subprocess
import urllib.request

import highdicom as hd
import pydicom
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from radvlm.backends.scripted import ScriptedBackend
from records.settings import DeliverySettings, Destination, HL7Settings, Settings
from records.tables import DeliveryState, OutboxItem, Study, StudyState
from results.hl7 import parse_strict
from results.outbox import Routing
from testbed.accounts import HOUSE, users
from testbed.dcmtk import storescu
from testbed.hl7_listener import listener
from testbed.network import wait_for
from testbed.node import worker_context
from testbed.orthanc import running_orthanc
from testbed.radiographs import RG1_STUDY, radiograph
from worker.dispatch import InProcessRunner
from worker.model_thread import ModelThread

FAST = DeliverySettings(retry_backoff_s=0.5, max_backoff_s=1, timeout_s=5)
EDITED = "Findings: Enlarged cardiac silhouette. No effusion. Impression: Cardiomegaly."


def _items(sessions) -> list[OutboxItem]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return list(session.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def test_edited_sign_off_sends_a_verified_sr_after_the_draft(sqlite_url, start_node, tmp_path):
    holder = {}
    node = start_node(sqlite_url, on_ready=lambda s, v: holder["runner"](s, v))
    with running_orthanc(tmp_path / "orthanc", {}) as orthanc, listener(tmp_path) as ris_port, \
            ModelThread() as thread:
        pacs = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
        hl7 = HL7Settings(host="127.0.0.1", port=ris_port)
        settings = Settings(database_url=sqlite_url, storage_dir=node.store.root, destinations=[pacs], hl7=hl7,
                            delivery=FAST, api={"users": users(), "organization": "St Elsewhere Radiology"})
        ctx = worker_context(node, ScriptedBackend(), Routing(destinations=[pacs], policy=FAST, hl7=hl7),
                             destinations=[pacs], hl7=hl7, delivery=FAST)
        runner = holder["runner"] = InProcessRunner(ctx, thread)
        runner.start()
        assert storescu(node.port, radiograph("RG1_UNCI.dcm")).returncode == 0
        wait_for(lambda: len(items := _items(node.sessions)) == 4 and all(
            i.state is DeliveryState.sent for i in items), 60)
        [draft] = [i for i in _items(node.sessions) if i.kind == "sr"]

        with TestClient(create_app(settings, deliver=ctx.deliver)) as client:
            signed = client.post(f"/studies/{RG1_STUDY}/sign-off",
                                 json={"report": EDITED, "findings": ["Cardiomegaly"]}, headers=HOUSE)
            assert signed.status_code == 201, signed.text
            again = client.post(f"/studies/{RG1_STUDY}/sign-off", json={"report": EDITED, "findings": []},
                                headers=HOUSE)
            bad = client.post(f"/studies/{RG1_STUDY}/sign-off", json={"report": EDITED, "findings": ["Tumour"]},
                              headers=HOUSE)
            wait_for(lambda: len(items := _items(node.sessions)) == 6 and all(
                i.state is DeliveryState.sent for i in items), 60)
            detail = client.get(f"/studies/{RG1_STUDY}", headers=HOUSE).json()
        verified_uid = signed.json()["sr_uid"]
        [found] = orthanc.request("POST", "/tools/lookup", raw=verified_uid.encode())
        url = f"http://127.0.0.1:{orthanc.http_port}/instances/{found['ID']}/file"
        with urllib.request.urlopen(url, timeout=30) as response:
            (tmp_path / "verified.dcm").write_bytes(response.read())
        runner.close()

    assert signed.json()["edited"] is True and signed.json()["deliveries"] == 2
    assert again.status_code == 409 and again.json()["title"] == "already signed off"
    assert bad.status_code == 422
    assert detail["state"] == "signed_off" and detail["sign_off"]["findings"] == ["Cardiomegaly"]
    path = tmp_path / "verified.dcm"
    stored = pydicom.dcmread(path)
    # the verified SR: complete, final, verified by the radiologist, the draft as predecessor
    assert (stored.CompletionFlag, stored.VerificationFlag, stored.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    [observer] = stored.VerifyingObserverSequence
    assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == (
        "House^Gregory", "St Elsewhere Radiology")
    [predecessor_study] = stored.PredecessorDocumentsSequence
    [predecessor] = predecessor_study.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert predecessor.ReferencedSOPInstanceUID == draft.object_uid
    assert stored.StudyInstanceUID == RG1_STUDY and stored.SeriesInstanceUID != pydicom.dcmread(
        io.BytesIO(draft.payload)).SeriesInstanceUID
    assert [a.ObserverType for a in stored.AuthorObserverSequence] == ["PSN", "DEV"]
    # the signed content: the edited text without the draft notice, the removed finding absent and unboxed
    text = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True).stdout
    assert "Enlarged cardiac silhouette" in text and "AI draft" not in text
    assert 'CODE:(,,"Pleural effusion")=(272519000,SCT,"Absent")' in text.replace("Effusion", "effusion")
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    assert [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")] == []
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Cardiomegaly #1"]
    # the RIS got the preliminary draft, then the final report
    messages = sorted((tmp_path / "ris").glob("*.hl7"), key=lambda p: p.stat().st_mtime)
    requests = [parse_strict(m.read_text()).oru_r01_patient_result.oru_r01_order_observation.obr for m in messages]
    assert [obr.obr_25.value for obr in requests] == ["P", "F"]
    # the final names who signed it (OBR-32, Principal Result Interpreter); the draft names nobody
    assert [obr.obr_32.to_er7() for obr in requests] == ["", "&House&Gregory"]
    with node.sessions() as session:
        assert session.scalar(select(Study.state)) is StudyState.signed_off

