"""The character set an object declares: ASCII when it is, UTF-8 (ISO_IR 192) when a name or a report needs
more, found by asking pydicom to encode every text value rather than guessing from the patient's name."""

from __future__ import annotations

import copy
import io
import logging
import threading
import warnings

from pydicom import Dataset
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR

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
