"""The TID 1500 Imaging Measurement Report (Comprehensive 3D SR) for one analysed image.

Built with highdicom as ``sr-spec.md`` describes: a device observer that is the model, an image
library, one planar ROI group per box (tracking identifier and UID, coded finding, finding site,
"Bounded by", a closed 5-point POLYLINE in the image's pixels), qualitative evaluations for all
14 CheXpert labels with the draft text, and the flags of an unverified, preliminary AI draft.
Every UID and date is passed in: the same inputs give the same bytes, so a resend is the same
instance.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    Comprehensive3DSR,
    ContainerContentItem,
    FindingSite,
    ImageContentItem,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from records.schema import ImageResult
from results import concepts
from results.authorship import DRAFT_NOTICE, Device, Verifier, mark_authors
from results.placement import Placement, closed_rectangle, sr_attributes, stamp

SOURCE = Code("260753009", "SCT", "Source")


def split_report(text: str) -> tuple[str, str]:
    """RadVLM's report as (findings, impression); an impression is only there when it says so."""
    parts = re.split(r"\bimpression\s*:", text, maxsplit=1, flags=re.IGNORECASE)
    findings = re.sub(r"^\s*findings\s*:\s*", "", parts[0], flags=re.IGNORECASE).strip()
    impression = parts[1].strip() if len(parts) > 1 else ""
    return findings, impression


def _image_group(image: Dataset, result: ImageResult, algorithm: AlgorithmIdentification,
                 sop_uid: str) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 for an image with no box (a normal radiograph, or findings the model did not localise):
    TID 1500 needs at least one measurement group, and this one names the image and what is present."""
    present = [label for label, value in result.labels.items() if value and label != "No Finding"]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=str(generate_uid(entropy_srcs=[sop_uid, "image"])),
                                               identifier="image-level evaluation"),
        finding_type=None if present else concepts.LABELS["No Finding"].finding,
        algorithm_id=algorithm,
        source_images=[SourceImageForMeasurementGroup(str(image.SOPClassUID), str(image.SOPInstanceUID))],
        qualitative_evaluations=[QualitativeEvaluation(concepts.LABELS[label].finding, concepts.PRESENT)
                                 for label in present] or None,
    )


def _groups(image: Dataset, result: ImageResult, device: Device, sop_uid: str
            ) -> list[PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations]:
    source = SourceImageForRegion.from_source_image(image)
    algorithm = AlgorithmIdentification(name=device.model_name, version=device.model_revision[:64])
    groups = []
    for grounding in result.groundings:
        if grounding.kind == "abnormality":
            coding = concepts.LABELS[grounding.label]
            finding, site, laterality, category = coding.finding, coding.site, None, concepts.LESION_CATEGORY
        elif grounding.label in concepts.REGIONS:
            site, laterality = concepts.REGIONS[grounding.label]
            finding, category = site, concepts.ANATOMY_CATEGORY
        else:
            continue  # a region with no exact code is kept in the result, not invented here
        for number, box in enumerate(grounding.answer.boxes, start=1):
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=str(generate_uid(entropy_srcs=[sop_uid, grounding.label, str(number)])),
                    identifier=f"{grounding.label} #{number}"),
                referenced_region=ImageRegion(graphic_type="POLYLINE", source_image=source,
                                              graphic_data=closed_rectangle(box, result.columns, result.rows)),
                finding_type=finding,
                finding_category=category,
                finding_sites=[FindingSite(site, laterality=laterality)] if site else None,
                algorithm_id=algorithm,
                geometric_purpose=concepts.BOUNDED_BY,
                qualitative_evaluations=[QualitativeEvaluation(finding, concepts.PRESENT)],
            ))
    return groups or [_image_group(image, result, algorithm, sop_uid)]


def _describable(image: Dataset) -> bool:
    """highdicom's TID 1602 descriptors for radiographs need these two attributes."""
    return "ImagerPixelSpacing" in image and "PatientOrientation" in image and len(image.PatientOrientation) == 2


def _bare_image_library(image: Dataset) -> ContainerContentItem:
    """TID 1600 with one entry and no descriptors (all conditional in TID 1602), for images that
    lack what highdicom's descriptors need, such as a CR whose only spacing is ``0\\0``."""
    entry = ImageContentItem(name=SOURCE, referenced_sop_class_uid=image.SOPClassUID,
                             referenced_sop_instance_uid=image.SOPInstanceUID,
                             relationship_type=RelationshipTypeValues.CONTAINS)
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS)
    group.ContentSequence = [entry]
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = [group]
    return library


def _evaluations(result: ImageResult, draft: bool) -> ContainerContentItem:
    """TID 1500 rows 12-14: every label present or absent, and the report text."""
    container = ContainerContentItem(name=concepts.QUALITATIVE_EVALUATIONS,
                                     relationship_type=RelationshipTypeValues.CONTAINS)
    items = [CodeContentItem(name=concepts.LABELS[label].finding,
                             value=concepts.PRESENT if present else concepts.ABSENT,
                             relationship_type=RelationshipTypeValues.CONTAINS)
             for label, present in result.labels.items()]
    findings, impression = split_report(result.report.text)
    text = f"{DRAFT_NOTICE}. {findings}" if draft else findings
    items.append(TextContentItem(name=concepts.FINDING, value=text[:10000],
                                 relationship_type=RelationshipTypeValues.CONTAINS))
    if impression:
        items.append(TextContentItem(name=concepts.IMPRESSION, value=impression[:10000],
                                     relationship_type=RelationshipTypeValues.CONTAINS))
    container.ContentSequence = items
    return container


def measurement_report(image: Dataset, result: ImageResult, device: Device, place: Placement,
                       previous: Sequence[Dataset] = (), verifier: Verifier | None = None) -> Comprehensive3DSR:
    """The TID 1500 SR for ``result`` about ``image`` (a header suffices; no pixel data needed).

    ``previous``: the SRs this one replaces (an earlier study version's, or the draft a
    radiologist signed off), named as predecessor documents. ``verifier``: who signed it off.
    """
    if str(image.SOPInstanceUID) != result.sop_instance_uid:
        raise ValueError("image and result describe different SOP instances")
    if (int(image.Rows), int(image.Columns)) != (result.rows, result.columns):
        raise ValueError("result was computed on an image of another size")
    report = MeasurementReport(
        observation_context=device.observation_context(),
        procedure_reported=concepts.XR_PROCEDURE,
        imaging_measurements=_groups(image, result, device, place.sop_instance_uid),
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(
            Code("en-US", "RFC5646", "English (United States)")),
        referenced_images=[image] if _describable(image) else None,
    )
    root = report[0]
    if not _describable(image):  # the library goes before the measurements, as TID 1500 orders them
        names = [item.ConceptNameCodeSequence[0].CodeValue for item in root.ContentSequence]
        at = names.index("126010") if "126010" in names else len(names)
        root.ContentSequence.insert(at, _bare_image_library(image))
    root.ContentSequence.append(_evaluations(result, draft=verifier is None))
    sr = Comprehensive3DSR(
        content=root, **sr_attributes(device, place, image, "findings", previous, verifier),
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=concepts.PRIVATE_SCHEME, name="radvlm-pacs private codes",
            responsible_organization="radvlm-pacs project")],
    )
    stamp(sr, place)
    mark_authors(sr, device, verifier)
    verify_regions(sr, result)
    return sr


def _scoords(items: Sequence[Dataset]) -> Iterator[Dataset]:
    for item in items:
        if item.ValueType == "SCOORD":
            yield item
        yield from _scoords(item.get("ContentSequence", []))


def verify_regions(sr: Dataset, result: ImageResult) -> None:
    """What no validator checks: every region a closed 5-point POLYLINE inside the image, equal to
    the model's normalised box times Columns and Rows (clamped). Raises ``ValueError``."""
    expected = [closed_rectangle(box, result.columns, result.rows)
                for g in result.groundings if g.kind == "abnormality" or g.label in concepts.REGIONS
                for box in g.answer.boxes]
    found = list(_scoords(sr.ContentSequence))
    if len(found) != len(expected):
        raise ValueError(f"{len(found)} regions in the SR for {len(expected)} boxes in the result")
    for item, rectangle in zip(found, expected):
        points = np.asarray(item.GraphicData, dtype=np.float32).reshape(-1, 2)
        if item.GraphicType != "POLYLINE" or len(points) != 5 or not np.array_equal(points[0], points[-1]):
            raise ValueError(f"region is not a closed 5-point POLYLINE: {item.GraphicType} {len(points)} points")
        if (points < 0).any() or (points[:, 0] > result.columns).any() or (points[:, 1] > result.rows).any():
            raise ValueError("region outside the image")
        if not np.allclose(points, rectangle, atol=1e-3):
            raise ValueError("region differs from the model's box mapped to pixels")
