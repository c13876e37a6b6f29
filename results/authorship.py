"""Who made an object: the model as the device that drafted it (manufacturer, model, version, the notice
that it is an unverified AI draft) and, after sign-off, the radiologist who verified it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObservationContext, ObserverContext
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

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
class Verifier:
    """The radiologist who signed a report off: their SR is COMPLETE, FINAL and VERIFIED."""

    observer_name: str  # DICOM PN, Family^Given
    organization: str


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
