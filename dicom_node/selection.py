"""Which received images are frontal chest radiographs, each decision with its reason.

The rules read only the header: Modality, SOP Class, BodyPartExamined, ViewPosition and the
View Code Sequence, Image Laterality and the series/protocol text. Where the structured
attributes are silent, descriptive text decides; where everything is silent the image is
kept as "assumed frontal", because a CR/DX routed to a chest AI node is most often a chest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset

from reception.sop import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
from records.settings import PriorityRule

XRAY_MODALITIES = {"CR", "DX"}
CHEST_SOP_CLASSES = {
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "HEART", "RIBS"}
FRONTAL_VIEWS = {"PA", "AP"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"}
OTHER_VIEWS = {"LLO", "RLO", "LPO", "RPO", "LAO", "RAO", "OBL"}

# View Code Sequence codes (CID 4010 / SNOMED CT, and the SRT codes older devices still send).
FRONTAL_VIEW_CODES = {"399348003", "272479007", "R-10214", "R-10206", "111046", "111047"}
LATERAL_VIEW_CODES = {"399198007", "260460007", "R-10236", "R-102CD", "R-10232", "399083002", "399173006"}

LATERAL_TEXT = re.compile(r"\b(LAT|LATERAL|LL|RL|SEITLICH|LATERALE?)\b")
FRONTAL_TEXT = re.compile(r"\b(PA|AP|FRONTAL|P\.A\.|A\.P\.|POSTEROANTERIOR|ANTEROPOSTERIOR)\b")
CHEST_TEXT = re.compile(r"\b(CHEST|THORAX|TORAX|LUNG|CXR|PULMO|THX)\b")


@dataclass(frozen=True)
class Selection:
    """Whether an image goes to the model, and the reason, in words an administrator reads."""

    selected: bool
    reason: str


def _text(ds: Dataset, *keywords: str) -> str:
    parts = [str(ds.get(k, "") or "") for k in keywords]
    return " ".join(parts).upper()


def _view_code(ds: Dataset) -> str | None:
    seq = ds.get("ViewCodeSequence")
    if not seq:
        return None
    item = seq[0]
    return str(item.get("CodeValue") or item.get("LongCodeValue") or "") or None


def select(ds: Dataset, *, for_processing: bool = False) -> Selection:
    """Decide whether ``ds`` (a header; pixel data not needed) is a frontal chest radiograph.

    ``for_processing``: analyse "For Processing" images too (raw detector data, which RadVLM never
    saw and no one reads); off by default (``node.analyse_for_processing``).
    """
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in XRAY_MODALITIES:
        return Selection(False, f"not an X-ray: Modality {modality or 'missing'}")
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in CHEST_SOP_CLASSES:
        return Selection(False, f"not a chest X-ray: SOP class {sop_class} (mammography or intra-oral)")

    intent = str(ds.get("PresentationIntentType", "") or "").upper().strip()
    if not for_processing and (sop_class == DigitalXRayImageStorageForProcessing or intent == "FOR PROCESSING"):
        return Selection(False, "for processing: raw detector data, not for reading (node.analyse_for_processing)")
    raw_type = ds.get("ImageType") or []
    image_type = [str(v).upper() for v in ([raw_type] if isinstance(raw_type, str) else raw_type)]
    if len(image_type) > 1 and image_type[1] == "SECONDARY":
        joined = "\\".join(image_type)
        return Selection(False, f"secondary image: ImageType {joined} (made from another image "
                                "after the acquisition: a copy, reprocessing or annotation)")

    body_part = str(ds.get("BodyPartExamined", "") or "").upper().strip()
    descriptions = _text(ds, "SeriesDescription", "ProtocolName", "StudyDescription")
    if body_part and body_part not in CHEST_BODY_PARTS:
        return Selection(False, f"not chest: BodyPartExamined {body_part}")
    if not body_part and descriptions.strip() and not CHEST_TEXT.search(descriptions):
        return Selection(False, f"not chest: no BodyPartExamined and no chest term in {descriptions.strip()!r}")

    view = str(ds.get("ViewPosition", "") or "").upper().strip()
    code = _view_code(ds)
    if view in LATERAL_VIEWS:
        return Selection(False, f"lateral: ViewPosition {view}")
    if view in OTHER_VIEWS:
        return Selection(False, f"oblique: ViewPosition {view}")
    if view in FRONTAL_VIEWS:
        return Selection(True, f"frontal chest: ViewPosition {view}")
    if code in LATERAL_VIEW_CODES:
        return Selection(False, f"lateral: View Code {code}")
    if code in FRONTAL_VIEW_CODES:
        return Selection(True, f"frontal chest: View Code {code}")
    if view:
        return Selection(False, f"not frontal: ViewPosition {view}")

    view_text = _text(ds, "SeriesDescription", "ProtocolName", "ImageComments",
                      "AcquisitionDeviceProcessingDescription")
    if LATERAL_TEXT.search(view_text):
        return Selection(False, f"lateral: series text {view_text.strip()!r}")
    if str(ds.get("ImageLaterality", "") or "").upper() in {"L", "R"}:
        return Selection(False, f"not frontal: ImageLaterality {ds.ImageLaterality} on a chest image")
    if FRONTAL_TEXT.search(view_text):
        return Selection(True, "frontal chest: series text")
    return Selection(True, "assumed frontal chest: no view attribute or text")


def is_stat(ds: Dataset, rules: Sequence[PriorityRule]) -> bool:
    """Whether the header asks for the study first: a rule's keyword holds its value (any case), in the dataset
    or in an item of its Request Attributes Sequence (where the modality worklist puts the order's priority)."""
    items = [ds, *ds.get("RequestAttributesSequence", [])]
    return any(str(item.get(rule.keyword, "") or "").strip().upper() == rule.value.upper()
               for rule in rules for item in items)
