"""DICOMweb on the API: STOW-RS into the same reception, completion and selection as C-STORE."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator

import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from api.main import create_app
from radvlm.backends.scripted import ScriptedBackend
from records.db import make_engine, make_session_factory
from records.settings import Settings
from records.tables import AuditEvent, DeliveryState, Instance, KeptObject, OutboxItem, Study, StudyState
from results.outbox import Routing
from testbed.accounts import HOUSE, auth, users
from testbed.dcmtk import storescu
from testbed.network import free_port, serving, wait_for
from testbed.node import worker_context
from testbed.orthanc import running_orthanc
from testbed.processes import serve_env, service
from testbed.radiographs import radiograph, rg1_copy
from worker.dispatch import InProcessRunner
from worker.model_thread import ModelThread

SENDER_TOKEN = "cloud archive token"
SENDER = {"Authorization": f"Bearer {SENDER_TOKEN}"}
RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
BOUNDARY = "radvlm-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def sender_users() -> list[dict]:
    return [*users(), {"name": "cloud.archive", "role": "sender", "ae_title": "CLOUDPACS",
                       "token_sha256": hashlib.sha256(SENDER_TOKEN.encode()).hexdigest()}]


def part(payload: bytes, media: str = "application/dicom") -> bytes:
    return f"--{BOUNDARY}\r\nContent-Type: {media}\r\n\r\n".encode() + payload + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()


def api_beside(node):  # type: ignore[no-untyped-def]
    """The API on a real port beside a node (its completion monitor) on the same database and storage."""
    settings = Settings(database_url=node.url, storage_dir=node.store.root, api={"users": sender_users()},
                        node={"disk_reserve_mb": 1, "fsync": False})
    return serving(create_app(settings))


@pytest.fixture
def stow_api(sqlite_url, start_node) -> Iterator[tuple[str, object]]:
    node = start_node(sqlite_url)
    with api_beside(node) as base:
        yield base, node


def _study(node, uid: str) -> Study | None:  # type: ignore[no-untyped-def]
    with node.sessions() as session:
        return session.scalar(select(Study).where(Study.study_instance_uid == uid))


def test_stow_rs_stores_selects_and_completes_like_c_store(stow_api):
    base, node = stow_api
    client = DICOMwebClient(f"{base}/dicom-web", headers=SENDER)
    rg1, rg3 = dcmread(radiograph("RG1_UNCI.dcm")), dcmread(radiograph("RG3_UNCI.dcm"))
    answer = client.store_instances([rg1, rg3])
    assert {i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence} == {rg1.SOPInstanceUID,
                                                                                   rg3.SOPInstanceUID}
    assert "FailedSOPSequence" not in answer
    study = wait_for(lambda: (s := _study(node, RG1_STUDY)) and s.state is StudyState.ready and s, 30)

    def judged() -> dict[str, Instance]:  # both studies complete: every instance selected or skipped
        with node.sessions() as session:
            rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        return rows if all(i.selected is not None for i in rows.values()) else {}

    rows = wait_for(judged, 30)
    assert node.ready == [(study.id, 1)]  # one "study ready" event (the tibia's study has nothing to analyse)
    assert rows[rg1.SOPInstanceUID].selected and rows[rg1.SOPInstanceUID].calling_ae == "CLOUDPACS"
    assert not rows[rg3.SOPInstanceUID].selected and "not chest" in rows[rg3.SOPInstanceUID].selection_reason
    stored = dcmread(node.store.path(rows[rg1.SOPInstanceUID].path))
    assert stored.PixelData == rg1.PixelData
    assert not list((node.store.root / ".stow").iterdir())  # no staging file left behind

    again = client.store_instances([rg1])  # the same instance again: stored once, answered as stored
    assert [i.ReferencedSOPInstanceUID for i in again.ReferencedSOPSequence] == [rg1.SOPInstanceUID]
    with node.sessions() as session:
        assert len(session.scalars(select(Instance)).all()) == 2


def test_each_refused_part_is_listed_with_its_reason(stow_api, tmp_path):
    base, node = stow_api
    good = rg1_copy(tmp_path, "good.dcm").read_bytes()
    ct = open(get_testdata_file("CT_small.dcm"), "rb").read()  # noqa: SIM115 (a CT: not a class the node stores)
    truncated = rg1_copy(tmp_path, "cut.dcm").read_bytes()[:200_000]
    body = part(good) + part(b"this is no DICOM file") + part(ct) + part(truncated) + part(b"{}", "application/json")
    rsp = httpx.post(f"{base}/dicom-web/studies", content=body + END, headers={**SENDER, "Content-Type": MULTIPART})
    assert rsp.status_code == 202 and rsp.headers["content-type"] == "application/dicom+json"
    failed = rsp.json()["00081198"]["Value"]
    reasons = sorted(item["00081197"]["Value"][0] for item in failed)
    assert reasons == sorted([0xC210, 0x0122, 0xC212, 0xC210])  # no DICOM, CT, pixel data cut, JSON part
    [stored] = rsp.json()["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [dcmread(tmp_path / "good.dcm").SOPInstanceUID]

    other = rg1_copy(tmp_path, "other.dcm", StudyInstanceUID=generate_uid()).read_bytes()
    rsp = httpx.post(f"{base}/dicom-web/studies/{RG1_STUDY}", content=part(other) + END,
                     headers={**SENDER, "Content-Type": MULTIPART})
    assert rsp.status_code == 409 and rsp.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]

    rsp = httpx.post(f"{base}/dicom-web/studies", content=b"{}", headers={**SENDER, "Content-Type": "application/json"})
    assert rsp.status_code == 415 and rsp.headers["content-type"] == "application/problem+json"
    rsp = httpx.post(f"{base}/dicom-web/studies", content=b"no boundary here", headers={**SENDER,
                                                                                      "Content-Type": MULTIPART})
    assert rsp.status_code == 400 and rsp.json()["title"] == "malformed multipart body"
    with node.sessions() as session:
        assert {i.sop_instance_uid for i in session.scalars(select(Instance))} == {
            dcmread(tmp_path / "good.dcm").SOPInstanceUID}


def test_only_a_sender_stores_and_a_sender_reads_nothing(stow_api, tmp_path):
    base, _ = stow_api
    body = part(rg1_copy(tmp_path).read_bytes()) + END
    assert httpx.post(f"{base}/dicom-web/studies", content=body, headers={"Content-Type": MULTIPART}).status_code == 401
    assert httpx.post(f"{base}/dicom-web/studies", content=body,
                      headers={**HOUSE, "Content-Type": MULTIPART}).status_code == 403
    assert httpx.get(f"{base}/studies", headers=SENDER).status_code == 403
    assert httpx.get(f"{base}/studies/{RG1_STUDY}", headers=SENDER).status_code == 403


def test_parts_are_received_while_the_body_is_still_arriving(stow_api, tmp_path):
    """Streaming: the first instance is stored before the client has sent the second."""
    base, node = stow_api
    first, second = rg1_copy(tmp_path, "1.dcm"), rg1_copy(tmp_path, "2.dcm")
    first_uid = dcmread(first).SOPInstanceUID
    seen_before_second: list[bool] = []

    def body() -> Iterator[bytes]:
        yield part(first.read_bytes())
        yield f"--{BOUNDARY}\r\n".encode()  # the parser knows the first part has ended here
        seen_before_second.append(bool(wait_for(lambda: _stored(node, first_uid), 20)))
        yield b"Content-Type: application/dicom\r\n\r\n" + second.read_bytes() + b"\r\n" + END

    rsp = requests.post(f"{base}/dicom-web/studies", data=body(), headers={**SENDER, "Content-Type": MULTIPART},
                        timeout=60)
    assert rsp.status_code == 200, rsp.text
    assert seen_before_second == [True]
    assert len(rsp.json()["00081199"]["Value"]) == 2


def _stored(node, sop_uid: str) -> bool:  # type: ignore[no-untyped-def]
    with node.sessions() as session:
        return session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_uid)) is not None


def test_qido_and_wado_serve_the_result_objects_the_node_kept(sqlite_url, start_node):
    holder: dict[str, InProcessRunner] = {}
    node = start_node(sqlite_url, on_ready=lambda s, v: holder["runner"](s, v))
    outputs = Routing(kept=("sr", "gsps"))
    with ModelThread() as thread:
        runner = holder["runner"] = InProcessRunner(worker_context(node, ScriptedBackend(), outputs), thread)
        runner.start()
        assert storescu(node.port, radiograph("RG1_UNCI.dcm")).returncode == 0
        wait_for(lambda: (s := _study(node, RG1_STUDY)) and s.state is StudyState.analysed, 30)
        runner.close()
    with api_beside(node) as base:
        client = DICOMwebClient(f"{base}/dicom-web", headers=HOUSE)
        [study] = client.search_for_studies(search_filters={"PatientID": dcmread(radiograph("RG1_UNCI.dcm")).PatientID})
        assert study["0020000D"]["Value"] == [RG1_STUDY] and sorted(study["00080061"]["Value"]) == ["PR", "SR"]
        series = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0] for s in client.search_for_series(RG1_STUDY)}
        [sr_meta] = client.retrieve_series_metadata(RG1_STUDY, series["SR"])
        [sr] = client.retrieve_series(RG1_STUDY, series["SR"])
        everything = client.retrieve_study(RG1_STUDY)
        too_far = httpx.get(f"{base}/dicom-web/studies", params={"offset": 2**63}, headers=HOUSE)
        assert too_far.status_code == 422  # found by schemathesis: past a database integer it was a 500
        # what a viewer's study list sends: a name typed in any case, a date range (RG1: 2004-08-26)
        typed = client.search_for_studies(search_filters={"PatientName": "compressedsamples*",
                                                          "StudyDate": "20040801-20040831"})
        later = client.search_for_studies(search_filters={"PatientName": "compressedsamples*",
                                                          "StudyDate": "20040827-"})
        bad_date = httpx.get(f"{base}/dicom-web/studies", params={"StudyDate": "2004-08-26"}, headers=HOUSE)
        elsewhere = DICOMwebClient(f"{base}/dicom-web", headers=auth("dr.elsewhere"))
        assert elsewhere.search_for_studies() == []  # another site's user sees none of it
        with pytest.raises(requests.HTTPError) as missing:
            elsewhere.search_for_series(RG1_STUDY)
        assert missing.value.response.status_code == 404
    with node.sessions() as session:
        kept = {k.sop_instance_uid: k for k in session.scalars(select(KeptObject))}
    assert [s["0020000D"]["Value"] for s in typed] == [[RG1_STUDY]] and later == []
    assert bad_date.status_code == 400 and "YYYYMMDD" in bad_date.json()["detail"]
    assert {k.kind for k in kept.values()} == {"sr", "gsps"}
    assert sr.SOPInstanceUID in kept and sr.Modality == "SR"
    assert sr_meta["00080018"]["Value"] == [sr.SOPInstanceUID]
    assert {ds.SOPInstanceUID for ds in everything} == set(kept)
    assert sr.ContentSequence == dcmread(io.BytesIO(kept[sr.SOPInstanceUID].payload)).ContentSequence


def test_orthanc_pushes_by_stow_rs_and_gets_the_results_back_by_stow_rs(tmp_path):
    """A real peer both ways: Orthanc's DICOMweb plugin sends a study to ``serve`` (the node's API, with a
    sender token), the study is analysed as after a C-STORE, and the outbox sends the results to
    Orthanc's own STOW-RS; dicomweb-client reads them back from Orthanc."""
    api_port, dicom_port = free_port(), free_port()
    sqlite = f"sqlite:///{tmp_path / 'radvlm.sqlite'}"
    plugin = {"Plugins": [ORTHANC_DICOMWEB], "DicomWeb": {
        "Enable": True, "Root": "/dicom-web/",
        "Servers": {"radvlm": {"Url": f"http://127.0.0.1:{api_port}/dicom-web/",
                               "HttpHeaders": {"Authorization": f"Bearer {SENDER_TOKEN}"}}}}}
    with running_orthanc(tmp_path / "orthanc", {}, extra=plugin) as orthanc:
        pacs_root = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
        env = serve_env(tmp_path, sqlite, dicom_port, api_port, [{"name": "pacs", "stow_url": pacs_root}],
                        RADVLM_API__USERS=json.dumps(sender_users()))
        with service("serve", ["serve"], env, tmp_path / "logs"):
            wait_for(lambda: _answers(f"http://127.0.0.1:{api_port}/health"), 60)
            study_id = orthanc.request("POST", "/instances", raw=radiograph("RG1_UNCI.dcm").read_bytes())["ParentStudy"]
            job = orthanc.request("POST", "/dicom-web/servers/radvlm/stow", {"Resources": [study_id],
                                                                           "Synchronous": True})
            assert job is not None
            wait_for(lambda: orthanc.request("GET", "/statistics")["CountInstances"] == 4, 90)
        sessions = make_session_factory(make_engine(sqlite))
        with sessions() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == RG1_STUDY))
            [instance] = session.scalars(select(Instance)).all()
            items = session.scalars(select(OutboxItem)).all()
            received = session.scalars(select(AuditEvent).where(AuditEvent.action == "receive")).all()
        client = DICOMwebClient(pacs_root)
        modalities = {s["00080060"]["Value"][0] for s in client.search_for_series(RG1_STUDY)}
        sr_uids = [i.object_uid for i in items if i.kind == "sr"]
        [sr] = [client.retrieve_instance(RG1_STUDY, dcmread(io.BytesIO(i.payload)).SeriesInstanceUID, i.object_uid)
                for i in items if i.kind == "sr"]
    assert study.state is StudyState.analysed and study.version == 1
    assert instance.calling_ae == "CLOUDPACS" and instance.selected
    assert [e.user_name for e in received] == ["CLOUDPACS"] and "STOW-RS by cloud.archive" in received[0].detail
    assert sorted(i.kind for i in items) == ["gsps", "narrative", "sr"]
    assert all(i.state is DeliveryState.sent and i.attempts == 1 for i in items)
    assert modalities == {"CR", "SR", "PR"}
    assert sr.SOPInstanceUID == sr_uids[0]
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == instance.sop_instance_uid


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
