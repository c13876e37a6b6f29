"""The TID 1500 SR: valid for dciodvfy, dsrdump, highdicom and Orthanc, and right where they don't look."""

from __future__ import annotations

import copy
import json
import subprocess
from datetime import datetime, timezone

import highdicom as hd
import numpy as np
import pydicom
import pytest

from radvlm.backends.scripted import ScriptedBackend
from records.pixels import read_model_image
from results.authorship import Device
from results.placement import Placement, closed_rectangle
from results.sr import measurement_report, split_report, verify_regions
from testbed.orthanc import running_orthanc
from testbed.radiographs import radiograph
from worker.pipeline import AnalysisOptions, analyse_image

DEVICE = Device(model_id="KrauthammerLab/RadVLM", model_revision="abc123", software_version="0.1.0")
PLACE = Placement(series_instance_uid="1.2.826.0.1.3680043.10.1.1", sop_instance_uid="1.2.826.0.1.3680043.10.1.2",
                  content_datetime=datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc))


@pytest.fixture(scope="module")
def analysed():
    path = radiograph("RG1_UNCI.dcm")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    backend = ScriptedBackend(boxes={
        "cardiomegaly": [(0.33, 0.45, 0.78, 0.79)],
        "pleural effusion": [(0.05, 0.62, 0.31, 0.88), (0.7, 0.64, 1.0, 1.0)],  # one box touching the edges
        "right lung": [(0.08, 0.12, 0.48, 0.86)],
    })
    result = analyse_image(backend, read_model_image(path), header.SOPInstanceUID, header.SeriesInstanceUID,
                           AnalysisOptions(regions=("right lung",)))
    return header, result


@pytest.fixture(scope="module")
def written(analysed, tmp_path_factory):
    header, result = analysed
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    measurement_report(header, result, DEVICE, PLACE).save_as(path, enforce_file_format=True)
    return path


def test_dciodvfy_finds_no_error(written):
    out = subprocess.run(["dciodvfy", str(written)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
    assert "Comprehensive3DSR" in out.stdout + out.stderr


def test_dsrdump_reads_the_tree(written):
    out = subprocess.run(["dsrdump", str(written)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Verification Flag   : UNVERIFIED" in out.stdout and "Completion Flag     : PARTIAL" in out.stdout
    assert 'Tracking Identifier")="Pleural Effusion #2"' in out.stdout
    assert "(75958009,SCT,\"Bounded by\")" in out.stdout
    assert out.stdout.count('CODE:(,,"Pneumothorax")=(272519000,SCT,"Absent")') == 1


def test_highdicom_reads_groups_and_regions(written, analysed):
    header, result = analysed
    sr = hd.sr.srread(written)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Cardiomegaly #1", "Pleural Effusion #1",
                                                       "Pleural Effusion #2", "right lung #1"]
    region = groups[1].roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    box = result.groundings[1].answer.boxes[0]
    np.testing.assert_allclose(region.value, [[box.px[0], box.px[1]], [box.px[2], box.px[1]], [box.px[2], box.px[3]],
                                              [box.px[0], box.px[3]], [box.px[0], box.px[1]]], rtol=1e-6)
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.AuthorObserverSequence[0].ObserverType == "DEV"
    # the service's clock is UTC, and the object says so (a reader would otherwise assume its local time)
    assert (sr.ContentDate, sr.ContentTime, sr.TimezoneOffsetFromUTC) == ("20261123", "120000", "+0000")
    assert sr.SeriesDescription.endswith("not verified - UNVERIFIED") and len(sr.SeriesDescription) <= 64
    assert sr.StudyInstanceUID == header.StudyInstanceUID and sr.SeriesInstanceUID != header.SeriesInstanceUID
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99RADVLM"


def test_a_normal_radiograph_gets_an_image_level_group(tmp_path):
    """No finding, no box: TID 1500 still needs a measurement group; a TID 1501 one names the image."""
    path = radiograph("RG1_UNCI.dcm")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    result = analyse_image(ScriptedBackend(findings=[], boxes={}), read_model_image(path), header.SOPInstanceUID,
                           header.SeriesInstanceUID, AnalysisOptions())
    assert not result.groundings and {label for label, v in result.labels.items() if v} == {"No Finding"}
    written = tmp_path / "normal.dcm"
    measurement_report(header, result, DEVICE, PLACE).save_as(written, enforce_file_format=True)
    assert test_dciodvfy_finds_no_error(written) is None
    sr = hd.sr.srread(written)
    assert sr.content.get_planar_roi_measurement_groups() == []
    [group] = sr.content.get_image_measurement_groups()
    assert group.tracking_identifier == "image-level evaluation"
    assert group.finding_type == hd.sr.CodedConcept("17621005", "SCT", "Normal")
    assert group.source_images[0].referenced_sop_instance_uid == header.SOPInstanceUID


def test_regions_closed_inside_and_equal_to_the_model_box(analysed):
    header, result = analysed
    edge = result.groundings[1].answer.boxes[1]
    rectangle = closed_rectangle(edge, result.columns, result.rows)
    assert rectangle.max(axis=0).tolist() == [1841, 1955] and (rectangle[0] == rectangle[-1]).all()
    sr = measurement_report(header, result, DEVICE, PLACE)
    verify_regions(sr, result)
    # a tampered region is caught
    scoord = sr.ContentSequence[-2].ContentSequence[0].ContentSequence[-1]
    assert scoord.ValueType == "SCOORD"
    scoord.GraphicData = [*scoord.GraphicData[:-2], 0.0, 0.0]
    with pytest.raises(ValueError, match="closed 5-point POLYLINE"):
        verify_regions(sr, result)


@pytest.mark.parametrize("builder", ["sr", "narrative", "gsps"])
def test_same_inputs_same_bytes_and_a_new_model_a_new_device(analysed, tmp_path, builder):
    from results.gsps import presentation_state
    from results.narrative import narrative_report

    build = {"sr": measurement_report, "narrative": narrative_report, "gsps": presentation_state}[builder]
    header, result = analysed
    first, second = tmp_path / "a.dcm", tmp_path / "b.dcm"
    build(header, result, DEVICE, PLACE).save_as(first, enforce_file_format=True)
    build(header, result, DEVICE, PLACE).save_as(second, enforce_file_format=True)
    assert first.read_bytes() == second.read_bytes()
    other = Device(model_id=DEVICE.model_id, model_revision="def456", software_version="0.1.0")
    assert other.uid != DEVICE.uid


def test_mismatched_image_is_refused(analysed):
    header, result = analysed
    other = pydicom.dcmread(radiograph("RG3_UNCI.dcm"), stop_before_pixels=True)
    with pytest.raises(ValueError, match="different SOP instances"):
        measurement_report(other, result, DEVICE, PLACE)


def test_split_report():
    assert split_report("Findings: Clear lungs. Impression: Normal.") == ("Clear lungs.", "Normal.")
    assert split_report("Clear lungs.") == ("Clear lungs.", "")


def test_orthanc_accepts_every_object(analysed, written, tmp_path):
    from results.capture import burned_in_capture
    from results.gsps import presentation_state
    from results.narrative import narrative_report

    header, result = analysed
    others = [narrative_report(header, result, DEVICE, PLACE), presentation_state(header, result, DEVICE, PLACE),
              burned_in_capture(header, read_model_image(radiograph("RG1_UNCI.dcm")), result, DEVICE, PLACE)]
    payloads = [written.read_bytes()]
    for number, ds in enumerate(others):
        ds.SeriesInstanceUID = ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.2.{number}"
        path = tmp_path / f"other{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        payloads.append(path.read_bytes())
    with running_orthanc(tmp_path / "orthanc", {}) as orthanc:
        orthanc.upload(radiograph("RG1_UNCI.dcm"))
        answers = [orthanc.request("POST", "/instances", raw=payload) for payload in payloads]
        assert [a["Status"] for a in answers] == ["Success"] * 4
        study = orthanc.request("GET", f"/studies/{answers[0]['ParentStudy']}")
        assert len(study["Series"]) == 5  # the image's series and one per object, in the same study


def _dciodvfy_errors(path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_narrative_report_tid_2000(analysed, tmp_path):
    from results.narrative import narrative_report

    header, result = analysed
    path = tmp_path / "narrative.dcm"
    narrative_report(header, result, DEVICE, PLACE).save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "Enhanced SR Document" in dump.stdout
    assert '<CONTAINER:(,,"Diagnostic Imaging Report")=SEPARATE>' in dump.stdout
    assert 'CONTAINER:(,,"Findings")' in dump.stdout and 'CONTAINER:(,,"Impression")' in dump.stdout
    sr = hd.sr.srread(path)
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "PARTIAL"
    assert sr.SeriesDescription == "RadVLM report - AI draft, not verified - UNVERIFIED"


def test_presentation_state_draws_every_box(analysed, tmp_path):
    from results.gsps import presentation_state

    header, result = analysed
    path = tmp_path / "gsps.dcm"
    presentation_state(header, result, DEVICE, PLACE).save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    state = pydicom.dcmread(path)
    [annotation] = state.GraphicAnnotationSequence
    boxes = [b for g in result.groundings for b in g.answer.boxes]
    assert len(annotation.GraphicObjectSequence) == len(boxes) == 4
    for graphic, box in zip(annotation.GraphicObjectSequence, boxes):
        points = np.asarray(graphic.GraphicData, dtype=np.float32).reshape(-1, 2)
        assert graphic.GraphicType == "POLYLINE" and graphic.NumberOfGraphicPoints == 5
        np.testing.assert_allclose(points, closed_rectangle(box, result.columns, result.rows))
        assert graphic.GraphicAnnotationUnits == "PIXEL"
    assert [t.UnformattedTextValue for t in annotation.TextObjectSequence] == [
        "AI: Cardiomegaly", "AI: Pleural Effusion", "AI: Pleural Effusion", "AI: right lung"]
    assert state.BodyPartExamined == "CHEST"


def test_burned_in_capture(analysed, tmp_path):
    from results.capture import BOX_COLOUR, burned_in_capture

    header, result = analysed
    model_image = read_model_image(radiograph("RG1_UNCI.dcm"))
    path = tmp_path / "sc.dcm"
    burned_in_capture(header, model_image, result, DEVICE, PLACE).save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    capture = pydicom.dcmread(path)
    assert capture.BurnedInAnnotation == "YES" and capture.SeriesInstanceUID != header.SeriesInstanceUID
    pixels = capture.pixel_array
    assert pixels.shape == (1955, 1841, 3)
    x1, y1, x2, y2 = (int(round(v)) for v in result.groundings[0].answer.boxes[0].px)
    assert tuple(pixels[y1, (x1 + x2) // 2]) == BOX_COLOUR  # the top edge of the cardiomegaly box
    assert tuple(pixels[(y1 + y2) // 2, (x1 + x2) // 2]) != BOX_COLOUR  # its inside is the image


def test_text_the_image_character_set_cannot_hold_switches_the_object_to_utf8(analysed, tmp_path):
    """The image's character set is kept while every text fits it; a report with characters it lacks
    makes the SR declare UTF-8 instead of writing them as '?', names included."""
    header, result = analysed
    latin = tmp_path / "latin-header.dcm"  # an image header in Latin-1, as a modality writes it
    header = copy.deepcopy(header)  # the fixture's header stays as it is
    header.SpecificCharacterSet, header.PatientName = "ISO_IR 100", "Müller^Hans"
    header.save_as(latin, enforce_file_format=True)
    header = pydicom.dcmread(latin)
    kept = tmp_path / "kept.dcm"
    measurement_report(header, result, DEVICE, PLACE).save_as(kept, enforce_file_format=True)
    assert pydicom.dcmread(kept).SpecificCharacterSet == "ISO_IR 100"

    words = "Épanchement pleural → 2 cm; 胸水"
    wider = result.model_copy(update={"report": result.report.model_copy(update={"text": words})})
    path = tmp_path / "utf8.dcm"
    measurement_report(header, wider, DEVICE, PLACE).save_as(path, enforce_file_format=True)
    sr = pydicom.dcmread(path)
    assert sr.SpecificCharacterSet == "ISO_IR 192" and str(sr.PatientName) == "Müller^Hans"
    texts = []
    pending = list(sr.ContentSequence)
    while pending:
        item = pending.pop()
        texts += [item.TextValue] if "TextValue" in item else []
        pending += list(item.get("ContentSequence", []))
    assert any("胸水" in text and "→" in text for text in texts)
    assert "?" not in "".join(texts)
    assert _dciodvfy_errors(path) == []
    with running_orthanc(tmp_path / "orthanc", {}) as orthanc:  # a real PACS reads it as written
        stored = orthanc.request("POST", "/instances", raw=path.read_bytes())
        tags = orthanc.request("GET", f"/instances/{stored['ID']}/simplified-tags")
    assert tags["PatientName"] == "Müller^Hans" and tags["SpecificCharacterSet"] == "ISO_IR 192"
    assert words in json.dumps(tags["ContentSequence"], ensure_ascii=False)


def test_an_image_without_a_character_set_gets_utf8_only_for_text_beyond_ascii(analysed, tmp_path):
    header, result = analysed
    header = copy.deepcopy(header)
    del header.SpecificCharacterSet  # the default repertoire: ASCII
    ascii_only = measurement_report(header, result, DEVICE, PLACE)
    assert "SpecificCharacterSet" not in ascii_only
    wider = result.model_copy(update={"report": result.report.model_copy(update={"text": "Épanchement pleural"})})
    path = tmp_path / "sr.dcm"
    measurement_report(header, wider, DEVICE, PLACE).save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).SpecificCharacterSet == "ISO_IR 192"
