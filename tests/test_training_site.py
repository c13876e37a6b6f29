"""The site's own data: studies signed off here become a data set folder (the image as received, the
report and findings as signed), which the instruction builder reads like the public ones."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import select

from dicom_node.retention import remove_old_images
from radvlm_pacs import main
from records.clock import utcnow
from records.tables import Instance
from tests.conftest import RG1_STUDY
from training import images
from training.sources import site
from worker.analysis import Outputs
from worker.delivery.equipment import Verifier
from worker.signoff import Signed, sign_off

SIGNED = ("Findings: Enlarged cardiac silhouette. Compared with the prior study, the heart is larger. "
          "Impression: Cardiomegaly.")


def test_signed_off_studies_are_exported_and_built_into_instructions(analysed_node, tmp_path, monkeypatch, capsys):
    running = analysed_node.running
    sign_off(running.sessions, running.store, RG1_STUDY, "dr.house", Verifier("House^Gregory", "Radiology"),
             Signed(SIGNED, frozenset({"Cardiomegaly", "Support Devices"})), Outputs(), utcnow)
    monkeypatch.setenv("RADVLM_DATABASE_URL", running.url)
    monkeypatch.setenv("RADVLM_STORAGE_DIR", str(running.store.root))
    folder = tmp_path / "site"
    for _ in range(2):  # a second export adds nothing twice
        assert main(["train", "export-site", "--out", str(folder)]) == 0
        assert capsys.readouterr().out.startswith(f"1 signed-off studies in {folder / site.TABLE}")
    [row] = list(site.rows(folder / site.TABLE))
    assert (row["study_instance_uid"], row["edited"], row["findings"]) == (RG1_STUDY, "true",
                                                                          "Cardiomegaly|Support Devices")
    assert row["report"] == SIGNED
    copied = folder / row["image"]
    with running.sessions() as session:
        stored = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == row["sop_instance_uid"]))
    assert copied.read_bytes() == running.store.path(stored).read_bytes()  # the file as the node received it
    assert images.load(copied).size == (1841, 1955)  # and the fine-tuning reads it

    out = tmp_path / "train.json"
    assert main(["train", "dataset", "--data", f"site={folder}", "--out", str(out)]) == 0
    built = {entry["task"]: entry for entry in json.loads(out.read_text())}
    assert set(built) == {"report", "abnormalities"} and {e["source"] for e in built.values()} == {"site"}
    report = built["report"]["conversations"][1]["value"]
    assert "Enlarged cardiac silhouette" in report and "prior" not in report  # what it says of another study goes
    assert "cardiomegaly" in built["abnormalities"]["conversations"][1]["value"]
    assert built["report"]["image"] == str(copied)

    remove_old_images(running.sessions, running.store, timedelta(days=30), utcnow() + timedelta(days=31))
    written, gone = site.export(running.sessions, running.store, tmp_path / "too-late")
    assert (written, gone) == (0, 1)
