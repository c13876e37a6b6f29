"""A real PACS (Orthanc) routes a study to the node, which completes it after the stable age."""

from __future__ import annotations

import time

from sqlalchemy import select

from records.settings import CallerRule
from records.tables import Study, StudyState
from testbed.network import wait_for
from testbed.orthanc import running_orthanc
from testbed.radiographs import radiograph


def test_orthanc_sends_a_study_and_the_node_completes_it(database_url, start_node, tmp_path):
    stable_age = 2.0
    node = start_node(database_url, stable_age_s=stable_age,
                      allowed_callers=[CallerRule(ae_title="ORTHANC", host="127.0.0.1")])
    with running_orthanc(tmp_path / "orthanc", {"RADVLM": ("RADVLM", "127.0.0.1", node.port)}) as orthanc:
        chest = orthanc.upload(radiograph("RG1_UNCI.dcm"))
        tibia = orthanc.upload(radiograph("RG3_UNCI.dcm"))
        sent_at = time.monotonic()
        orthanc.send("RADVLM", chest, tibia)

    def study(uid: str) -> Study | None:
        with node.sessions() as session:
            found = session.scalar(select(Study).where(Study.study_instance_uid == uid))
            if found is not None:
                assert all(i.calling_ae == "ORTHANC" for i in found.instances)
            return found

    chest_uid = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
    wait_for(lambda: (s := study(chest_uid)) and s.state is not StudyState.receiving, 20)
    waited = time.monotonic() - sent_at
    assert study(chest_uid).state is StudyState.ready
    assert stable_age <= waited < stable_age + 3.0, waited
    tibia_study = wait_for(lambda: (s := study("1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"))
                           and s.state is not StudyState.receiving and s, 10)
    assert tibia_study.state is StudyState.nothing_to_analyse
    wait_for(lambda: node.ready, 5)
    assert node.ready == [(study(chest_uid).id, 1)]
