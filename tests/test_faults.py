"""Faults in the production layout: the node killed in the middle of a C-STORE loses nothing it
acknowledged, keeps nothing half-written, and the study, sent again, is stored and analysed once."""

from __future__ import annotations

from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, evt
from sqlalchemy import func, select

from records.db import make_engine, make_session_factory
from records.tables import Instance, Job, StudyState
from tests.conftest import free_port, radiograph, storescu, wait_for
from tests.processes import kill_hard, service
from tests.test_production_layout import RG1_STUDY, _env, _listening, _study, broker_url  # noqa: F401


def test_node_killed_during_a_c_store(sqlite_url, broker_url, tmp_path):  # noqa: F811
    port = free_port()
    env = _env(tmp_path, sqlite_url, broker_url, port, TMPDIR=str(tmp_path),
               RADVLM_NODE__MAX_PDU_BYTES="16384")  # the sender cuts the dataset into 16 KiB PDUs
    sessions = make_session_factory(make_engine(sqlite_url))
    logs = tmp_path / "logs"
    rg1 = dcmread(radiograph("RG1_UNCI.dcm"))
    sent_pdus = []

    with service("node", ["node"], env, logs) as node:
        wait_for(lambda: _listening(port), 30)

        def kill_mid_transfer(event) -> None:  # type: ignore[no-untyped-def]
            sent_pdus.append(event.pdu)
            if len(sent_pdus) == 40:  # of about 440 P-DATA PDUs of 16 KiB: the dataset is half sent
                kill_hard(node)

        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(rg1.SOPClassUID, ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="RADVLM", evt_handlers=[(evt.EVT_PDU_SENT, kill_mid_transfer)])
        assert assoc.is_established
        status = assoc.send_c_store(rg1)
        assert "Status" not in status  # no answer: the sender knows the instance was not taken
        assoc.abort()
    assert len(sent_pdus) >= 40
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    assert not list((tmp_path / "dicom").rglob("*.dcm"))  # nothing half-written was kept

    with service("node-again", ["node"], env, logs), service("worker", ["worker"], env, logs):
        wait_for(lambda: _listening(port), 30)
        assert storescu(port, radiograph("RG1_UNCI.dcm")).returncode == 0
        study = wait_for(lambda: (s := _study(sessions)) and s.state is StudyState.analysed and s, 90)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    assert study.version == 1
    assert len(list((tmp_path / "dicom").rglob("*.dcm"))) == 1
