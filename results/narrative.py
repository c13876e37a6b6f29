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
from results import concepts
from results.authorship import DRAFT_NOTICE, Device, mark_authors
from results.placement import Placement, sr_attributes, stamp
from results.sr import split_report

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
        _section(FINDINGS_SECTION, concepts.FINDING, f"{DRAFT_NOTICE}. {findings}"),
    ]
    if impression:
        root.ContentSequence.append(_section(IMPRESSION_SECTION, concepts.IMPRESSION, impression))
    sr = EnhancedSR(content=root, **sr_attributes(device, place, image, "report", previous))
    stamp(sr, place)
    mark_authors(sr, device)
    return sr
