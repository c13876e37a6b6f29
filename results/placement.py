"""Where an object goes and what it is drawn on: its series, numbers, UIDs and content time (one
``Placement``), the keywords every SR passes to highdicom, the caller's clock stamped over highdicom's, and a
box as the closed rectangle SR and GSPS draw."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from pydicom import Dataset

from records.schema import Box
from results.authorship import MANUFACTURER, Device, Verifier
from results.charset import declare_character_set


@dataclass(frozen=True)
class Placement:
    """Where a new object goes: its UIDs, numbers and content time, chosen by the caller."""

    series_instance_uid: str
    sop_instance_uid: str
    content_datetime: datetime
    series_number: int = 9901
    instance_number: int = 1


def closed_rectangle(box: Box, columns: int, rows: int) -> np.ndarray:
    """The box as 5 (column, row) points, the last equal to the first, clamped to the image."""
    x1, y1, x2, y2 = box.px
    x1, x2 = (float(np.clip(v, 0, columns)) for v in (x1, x2))
    y1, y2 = (float(np.clip(v, 0, rows)) for v in (y1, y2))
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float32)


def sr_attributes(device: Device, place: Placement, image: Dataset, description: str,
                  previous: Sequence[Dataset], verifier: Verifier | None = None) -> dict[str, Any]:
    """The keyword arguments every SR of ours passes to highdicom: placement, equipment, and the
    flags: a partial, unverified draft, or, with ``verifier``, the signed-off document."""
    when = place.content_datetime
    if verifier is None:
        flags = dict(is_complete=False, is_final=False, is_verified=False)
        series = f"RadVLM {description} - AI draft, not verified - UNVERIFIED"  # within 64 characters
    else:
        flags = dict(is_complete=True, is_final=True, is_verified=True,
                     verifying_observer_name=verifier.observer_name, verifying_organization=verifier.organization)
        series = f"RadVLM {description} - VERIFIED by a radiologist"
    return dict(
        evidence=[image], series_instance_uid=place.series_instance_uid, series_number=place.series_number,
        sop_instance_uid=place.sop_instance_uid, instance_number=place.instance_number, manufacturer=MANUFACTURER,
        **flags, institution_name=device.institution_name,
        previous_versions=list(previous) or None, contributing_equipment=[device.contributing_equipment(when)],
        series_description=series[:64],
        manufacturer_model_name=device.model_name, software_versions=device.software_version,
        content_date=when.date(), content_time=when.time(), series_date=when.date(), series_time=when.time(),
    )


def stamp(ds: Dataset, place: Placement) -> None:
    """Replace highdicom's clock readings with the caller's time: the same inputs give the same bytes.
    The dates and times are the service's UTC, declared in Timezone Offset From UTC (without it a
    reader takes them for its own local time)."""
    when = place.content_datetime
    day, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = day, time
    if when.utcoffset() is not None:
        ds.TimezoneOffsetFromUTC = when.strftime("%z")
    for prefix in ("PresentationCreation", "Series", "Content"):
        if f"{prefix}Date" in ds:
            setattr(ds, f"{prefix}Date", day)
            setattr(ds, f"{prefix}Time", time)
    for item in ds.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
    for item in ds.get("VerifyingObserverSequence", []):
        item.VerificationDateTime = when.strftime("%Y%m%d%H%M%S")
    declare_character_set(ds)
