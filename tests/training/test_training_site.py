"""The site's own data: studies signed off here become a de-identified data set folder (the model's
picture of the image, the report and findings as signed), which the instruction builder reads like the
public ones."""

from __future__ import annotations

import getpass
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from sqlalchemy import select

from dicom_node.retention import remove_old_images
from radvlm_pacs import main
from records.clock import utcnow
from records.pixels import read_model_image
from records.tables import AuditEvent, Instance, Study
from results.authorship import Verifier
from results.outbox import Routing
from results.signoff import Signed, sign_off
from testbed.radiographs import RG1_STUDY
from training import deidentify, images
from training.sources import site

SIGNED = ("Findings: Enlarged cardiac silhouette, 16.5 cm wide. Compared with the prior study of 03/12/2024, "
          "the heart is larger. Discussed with Dr. Chen at 14:30 (phone 555-123-4567); patient CompressedSamples, "
          "ID 9RG1, exam number noted. Impression: Cardiomegaly.")
# what RG1's header and its sign-off say of the patient, the study and the people: none may leave the node
IDENTIFYING = ("CompressedSamples", "9RG1", "26210", "19400305", "20040826", "exam Number", "House", "Gregory",
               "Chen", "03/12/2024", "14:30", "555-123-4567", RG1_STUDY, "1.3.6.1.4.1.5962")


def test_signed_off_studies_are_exported_de_identified_and_built_into_instructions(analysed_node, tmp_path,
                                                                                   monkeypatch, capsys):
    running = analysed_node.running
    sign_off(running.sessions, running.store, RG1_STUDY, "dr.house", Verifier("House^Gregory", "Radiology"),
             Signed(SIGNED, frozenset({"Cardiomegaly", "Support Devices"})), Routing(), utcnow)
    monkeypatch.setenv("RADVLM_DATABASE_URL", running.url)
    monkeypatch.setenv("RADVLM_STORAGE_DIR", str(running.store.root))
    folder = tmp_path / "site"
    for added in (1, 0):  # a second export adds nothing twice
        assert main(["train", "export-site", "--out", str(folder)]) == 0
        assert capsys.readouterr().out.startswith(
            f"1 signed-off studies in {folder / site.TABLE}, {added} added now, de-identified")
    [row] = list(site.rows(folder / site.TABLE))
    assert (row["edited"], row["findings"]) == ("true", "Cardiomegaly|Support Devices")
    assert row["report"] == ("Findings: Enlarged cardiac silhouette, 16.5 cm wide. Compared with the prior study of "
                             "___, the heart is larger. Discussed with Dr. ___ at ___ (phone ___); patient ___, "
                             "ID ___, ___ noted. Impression: Cardiomegaly.")
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert sorted(path.suffix for path in files) == [".csv", ".png"]
    for path in files:
        content = path.read_bytes().lower()
        assert not [word for word in IDENTIFYING if word.lower().encode() in content], path
    with running.sessions() as session:
        stored, study_uid = session.execute(select(Instance.path, Study.study_instance_uid).join(Study)
                                            .where(Instance.id == int(Path(row["image"]).stem))).one()
        [audit] = session.scalars(select(AuditEvent).where(AuditEvent.action == "export_training")).all()
    assert study_uid == RG1_STUDY and (audit.study_instance_uid, audit.user_name) == (RG1_STUDY, getpass.getuser())
    exported = folder / row["image"]
    original = read_model_image(running.store.path(stored)).pixels
    assert np.array_equal(images.gray_pixels(exported), original)  # the pixels the model was shown, exactly
    assert images.load(exported).size == (1841, 1955)  # and the fine-tuning reads them

    out = tmp_path / "train.json"
    assert main(["train", "dataset", "--data", f"site={folder}", "--out", str(out)]) == 0
    built = {entry["task"]: entry for entry in json.loads(out.read_text())}
    assert set(built) == {"report", "abnormalities"} and {e["source"] for e in built.values()} == {"site"}
    report = built["report"]["conversations"][1]["value"]
    assert "Enlarged cardiac silhouette" in report and "prior" not in report  # what it says of another study goes
    assert "cardiomegaly" in built["abnormalities"]["conversations"][1]["value"]
    assert built["report"]["image"] == str(exported)

    ds = pydicom.dcmread(running.store.path(stored))  # the header now says the pixels carry text
    ds.BurnedInAnnotation = "YES"
    ds.save_as(running.store.path(stored))
    assert site.export(running.sessions, running.store, tmp_path / "burned", user="ml", clock=utcnow) == \
        site.Exported(rows=0, added=0, removed=0, burned_in=1)

    old = tmp_path / "old"  # a folder from before the export de-identified
    old.mkdir()
    (old / site.TABLE).write_text("image,study_instance_uid,sop_instance_uid,signed_at,edited,findings,report\n")
    assert main(["train", "export-site", "--out", str(old)]) == 2
    assert "an earlier export (which kept UIDs and DICOM headers)" in capsys.readouterr().err
    assert not (old / "images").exists()

    remove_old_images(running.sessions, running.store, timedelta(days=30), utcnow() + timedelta(days=31))
    assert site.export(running.sessions, running.store, tmp_path / "too-late", user="ml", clock=utcnow) == \
        site.Exported(rows=0, added=0, removed=1, burned_in=0)


@pytest.mark.parametrize(("text", "scrubbed"), [
    # measurements, levels, views and a year alone are the report's, not the patient's
    ("Nodule 1.5-2.0 cm at T10-T12, 3.2 x 4.1 cm, PA and lateral, stable since 2019.",
     "Nodule 1.5-2.0 cm at T10-T12, 3.2 x 4.1 cm, PA and lateral, stable since 2019."),
    ("Compared to March 3, 2021 and 4 Jan 2020 and 2020-01-04 and 4.1.20.",
     "Compared to ___ and ___ and ___ and ___."),
    ("Called Mrs. O'Neil Smith at 3 pm, mrn 12345678, j.doe@example.org.",
     "Called Mrs. ___ at ___, mrn ___, ___."),
    ("Seen by Doe; DOE-SMITH notified; Doerfler is another name.",
     "Seen by ___; ___ notified; Doerfler is another name."),
])
def test_report_text_loses_what_names_the_patient(text, scrubbed):
    ds = Dataset()
    ds.PatientName, ds.PatientID = "Doe^John", "AB"  # an ID under 3 characters would strike ordinary words
    ds.OtherPatientIDs = ["DOE-SMITH", "X1"]
    assert deidentify.scrub(text, deidentify.Identifiers.of(ds, "House^Gregory")) == scrubbed
