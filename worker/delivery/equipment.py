"""What every produced object shares: the model as device, where the object goes, its rectangles."""

from __future__ import annotations

import copy
import io
import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObservationContext, ObserverContext
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR

from records.schema import Box

MANUFACTURER = "radvlm-pacs"
DRAFT_NOTICE = "AI draft, not verified by a radiologist"


@dataclass(frozen=True)
class Device:
    """The model as the device observer and contributing equipment of every object it makes."""

    model_id: str
    model_revision: str
    software_version: str
    station_name: str = "RADVLM"
    institution_name: str | None = None

    @property
    def uid(self) -> str:
        """Deterministic, and different for every model revision."""
        return str(generate_uid(entropy_srcs=["radvlm-device", self.model_id, self.model_revision]))

    @property
    def model_name(self) -> str:
        return self.model_id.rsplit("/", 1)[-1][:64]

    def observation_context(self) -> ObservationContext:
        return ObservationContext(observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=self.uid, name=self.model_name, manufacturer_name=MANUFACTURER, model_name=self.model_name)))

    def contributing_equipment(self, when: datetime) -> hd.ContributingEquipment:
        """The IHE AI Results Contributing Equipment entry."""
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER, purpose_of_reference=Code("109102", "DCM", "Processing Equipment"),
            manufacturer_model_name=self.model_name, software_versions=self.software_version,
            station_name=self.station_name, contribution_datetime=when)


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


@dataclass(frozen=True)
class Verifier:
    """The radiologist who signed a report off: their SR is COMPLETE, FINAL and VERIFIED."""

    observer_name: str  # DICOM PN, Family^Given
    organization: str


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


UTF8 = "ISO_IR 192"
PIXEL_DATA = 0x7FE00010
_NOT_ENCODABLE = "Failed to encode value"  # pydicom's warning, before it writes '?' in place of characters


class _QuietProbe(logging.Filter):
    """Keeps pydicom's log line about a value it cannot encode out of the log while one thread probes."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread == self.thread and record.getMessage().startswith(_NOT_ENCODABLE))


def _all_ascii(ds: Dataset) -> bool:
    for element in ds:
        if element.VR == "SQ":
            if not all(_all_ascii(item) for item in element.value):
                return False
        elif element.VR in CUSTOMIZABLE_CHARSET_VR and element.value is not None:
            values = element.value if element.VM > 1 else [element.value]
            if not all(str(value).isascii() for value in values):
                return False
    return True


def declare_character_set(ds: Dataset) -> None:
    """Keep the Specific Character Set copied from the image when every text of ``ds`` (names, the
    model's and the radiologist's words) can be written in it; otherwise declare UTF-8, so that no
    character is written as '?'. With no set declared the repertoire is ASCII (pydicom would write
    Latin-1 undeclared)."""
    if not ds.get("SpecificCharacterSet"):
        if not _all_ascii(ds):
            ds.SpecificCharacterSet = UTF8
        return
    # every element but the pixel data, copied: writing caches encoded names, and the probe's must not stay
    probe = copy.deepcopy(Dataset({tag: element for tag, element in ds.items() if tag != PIXEL_DATA}))
    quiet = _QuietProbe()
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.addFilter(quiet)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            probe.save_as(io.BytesIO(), implicit_vr=False, little_endian=True)
    finally:
        pydicom_log.removeFilter(quiet)
    if any(str(warning.message).startswith(_NOT_ENCODABLE) for warning in caught):
        ds.SpecificCharacterSet = UTF8


def mark_authors(sr: Dataset, device: Device, verifier: Verifier | None = None) -> None:
    """The model as author of a draft (sr-spec.md item 4); a signed-off document names the
    radiologist first, then the model whose draft they verified."""
    if verifier is None:
        sr.PreliminaryFlag = "PRELIMINARY"
    author = Dataset()
    author.ObserverType = "DEV"
    author.DeviceUID = device.uid
    author.Manufacturer = MANUFACTURER
    author.ManufacturerModelName = device.model_name
    author.StationName = device.station_name
    author.InstitutionName = device.institution_name or ""
    author.InstitutionCodeSequence = []
    authors = [author]
    if verifier is not None:
        person = Dataset()
        person.ObserverType = "PSN"
        person.PersonName = verifier.observer_name
        person.PersonIdentificationCodeSequence = []
        person.InstitutionName = verifier.organization
        person.InstitutionCodeSequence = []
        authors.insert(0, person)
    sr.AuthorObserverSequence = authors
