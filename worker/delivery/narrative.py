"""The TID 2000 Basic Diagnostic Imaging Report (Enhanced SR): the draft as reporting systems read it."""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.sr import (
    ContainerContentItem,
    EnhancedSR,
    LanguageOfContentItemAndDescendants,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom import Dataset
from pydicom.sr.coding import Code

from records.schema import ImageResult
from worker.delivery import codes as cx
from worker.delivery.equipment import DRAFT_NOTICE, MANUFACTURER, Device, Placement, mark_device_author, stamp
from worker.delivery.sr import split_report

DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic Imaging Report")
FINDINGS_SECTION = Code("59776-5", "LN", "Findings")
IMPRESSION_SECTION = Code("19005-8", "LN", "Impression")


def _section(name: Code, concept: Code, text: str) -> ContainerContentItem:
    section = ContainerContentItem(name=name, relationship_type=RelationshipTypeValues.CONTAINS)
    section.ContentSequence = [TextContentItem(name=concept, value=text[:10000],
                                               relationship_type=RelationshipTypeValues.CONTAINS)]
    return section


def narrative_report(image: Dataset, result: ImageResult, device: Device, place: Placement,
                     previous: Sequence[Dataset] = ()) -> EnhancedSR:
    """``previous``: the narrative SRs of an earlier version of the study (predecessor documents)."""
    if str(image.SOPInstanceUID) != result.sop_instance_uid:
        raise ValueError("image and result describe different SOP instances")
    findings, impression = split_report(result.report.text)
    root = ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT, template_id="2000", is_content_continuous=False)
    root.ContentSequence = [
        *LanguageOfContentItemAndDescendants(Code("en-US", "RFC5646", "English (United States)")),
        *device.observation_context(),
        _section(FINDINGS_SECTION, cx.FINDING, f"{DRAFT_NOTICE}. {findings}"),
    ]
    if impression:
        root.ContentSequence.append(_section(IMPRESSION_SECTION, cx.IMPRESSION, impression))
    sr = EnhancedSR(
        evidence=[image], content=root, series_instance_uid=place.series_instance_uid,
        series_number=place.series_number, sop_instance_uid=place.sop_instance_uid,
        instance_number=place.instance_number, manufacturer=MANUFACTURER, is_complete=False, is_final=False,
        is_verified=False, institution_name=device.institution_name, previous_versions=list(previous) or None,
        contributing_equipment=[device.contributing_equipment(place.content_datetime)],
        series_description=f"RadVLM report - {DRAFT_NOTICE} - UNVERIFIED"[:64],
        manufacturer_model_name=device.model_name, software_versions=device.software_version,
        content_date=place.content_datetime.date(), content_time=place.content_datetime.time(),
        series_date=place.content_datetime.date(), series_time=place.content_datetime.time(),
    )
    stamp(sr, place)
    mark_device_author(sr, device)
    return sr
