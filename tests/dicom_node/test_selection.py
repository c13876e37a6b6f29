"""Frontal chest selection: each rule decided from the header, each skip with its reason."""

from __future__ import annotations

import pydicom
import pytest
from pydicom import Dataset

from dicom_node.selection import Selection, select
from reception.sop import (
    ComputedRadiographyImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
from testbed.radiographs import radiograph


def _header(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "DX"
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.BodyPartExamined = "CHEST"
    for key, value in attrs.items():
        if value is None:
            del ds[key]
        else:
            setattr(ds, key, value)
    return ds


def _view_code(value: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, "view"
    return item


@pytest.mark.parametrize("attrs, selected, reason", [
    ({"ViewPosition": "PA"}, True, "frontal chest: ViewPosition PA"),
    ({"ViewPosition": "AP"}, True, "frontal chest: ViewPosition AP"),
    ({"ViewPosition": "LL"}, False, "lateral: ViewPosition LL"),
    ({"ViewPosition": "RL"}, False, "lateral: ViewPosition RL"),
    ({"ViewPosition": "LAO"}, False, "oblique: ViewPosition LAO"),
    ({"Modality": "CT"}, False, "not an X-ray: Modality CT"),
    ({"Modality": None}, False, "not an X-ray: Modality missing"),
    ({"BodyPartExamined": "KNEE", "ViewPosition": "AP"}, False, "not chest: BodyPartExamined KNEE"),
    ({"BodyPartExamined": "THORAX", "ViewPosition": "PA"}, True, "frontal chest: ViewPosition PA"),
    ({"SOPClassUID": DigitalMammographyXRayImageStorageForPresentation, "Modality": "MG"}, False,
     "not an X-ray: Modality MG"),
    ({"SOPClassUID": DigitalMammographyXRayImageStorageForPresentation}, False,
     f"not a chest X-ray: SOP class {DigitalMammographyXRayImageStorageForPresentation} (mammography or intra-oral)"),
    ({"SeriesDescription": "Thorax lat"}, False, "lateral: series text 'THORAX LAT'"),
    ({"SeriesDescription": "Chest PA"}, True, "frontal chest: series text"),
    ({}, True, "assumed frontal chest: no view attribute or text"),
    ({"BodyPartExamined": None, "SeriesDescription": "Hand 2 views"}, False,
     "not chest: no BodyPartExamined and no chest term in 'HAND 2 VIEWS'"),
    ({"BodyPartExamined": None, "StudyDescription": "XR CHEST 1 VIEW"}, True,
     "assumed frontal chest: no view attribute or text"),
    ({"ImageLaterality": "L"}, False, "not frontal: ImageLaterality L on a chest image"),
])
def test_rules(attrs, selected, reason):
    choice = select(_header(**attrs))
    assert (choice.selected, choice.reason) == (selected, reason)


def test_view_code_sequence_decides_when_view_position_is_empty():
    frontal = _header(ViewPosition="", ViewCodeSequence=[_view_code("399348003")])
    lateral = _header(ViewPosition="", ViewCodeSequence=[_view_code("R-10236", "SRT")])
    assert select(frontal).selected and select(frontal).reason == "frontal chest: View Code 399348003"
    assert not select(lateral).selected and select(lateral).reason == "lateral: View Code R-10236"


def test_real_files():
    chest = pydicom.dcmread(radiograph("RG1_UNCI.dcm"), stop_before_pixels=True)
    tibia = pydicom.dcmread(radiograph("RG3_UNCI.dcm"), stop_before_pixels=True)
    assert chest.SOPClassUID == ComputedRadiographyImageStorage
    assert select(chest).selected
    assert select(tibia).reason == "not chest: BodyPartExamined EXTREMITY"


FOR_PROCESSING = "for processing: raw detector data, not for reading (node.analyse_for_processing)"


@pytest.mark.parametrize("attrs, selected, reason", [
    ({"SOPClassUID": DigitalXRayImageStorageForProcessing, "ViewPosition": "PA"}, False, FOR_PROCESSING),
    ({"PresentationIntentType": "FOR PROCESSING", "ViewPosition": "PA"}, False, FOR_PROCESSING),
    ({"PresentationIntentType": "FOR PRESENTATION", "ViewPosition": "PA"}, True, "frontal chest: ViewPosition PA"),
    ({"ImageType": ["DERIVED", "SECONDARY"], "ViewPosition": "PA"}, False,
     "secondary image: ImageType DERIVED\\SECONDARY (made from another image after the acquisition: a copy, "
     "reprocessing or annotation)"),
    ({"ImageType": ["DERIVED", "PRIMARY"], "ViewPosition": "PA"}, True, "frontal chest: ViewPosition PA"),
    ({"ImageType": "ORIGINAL", "ViewPosition": "AP"}, True, "frontal chest: ViewPosition AP"),
])
def test_for_processing_and_secondary_images(attrs, selected, reason):
    choice = select(_header(**attrs))
    assert (choice.selected, choice.reason) == (selected, reason)


def test_for_processing_images_are_analysed_when_the_site_says_so():
    header = _header(SOPClassUID=DigitalXRayImageStorageForProcessing, ViewPosition="PA")
    assert select(header, for_processing=True) == Selection(True, "frontal chest: ViewPosition PA")
