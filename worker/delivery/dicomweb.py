"""STOW-RS of one stored object to a DICOMweb destination (dicomweb-client), and what the answer means
for the outbox: the same Attempt as a C-STORE."""

from __future__ import annotations

import io

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from records.settings import Destination
from worker.delivery.attempt import Attempt


def _client(destination: Destination, timeout_s: float) -> DICOMwebClient:
    assert destination.stow_url is not None
    headers = ({"Authorization": f"Bearer {destination.stow_token.get_secret_value()}"}
               if destination.stow_token else {})
    return DICOMwebClient(destination.stow_url, headers=headers, timeout=timeout_s)


def stow(payload: bytes, destination: Destination, timeout_s: float) -> Attempt:
    """Store one Part 10 object. A refusal of the object (409, or a failure reason other than out of
    resources) is final; a server that is down, overloaded or refuses our token is tried again."""
    ds = dcmread(io.BytesIO(payload))
    try:
        answer = _client(destination, timeout_s).store_instances([ds])
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        return Attempt(False, code != 409, f"STOW-RS answered HTTP {code}")
    except requests.RequestException as exc:
        return Attempt(False, True, f"cannot reach {destination.stow_url}: {type(exc).__name__}")
    failed = [item for item in answer.get("FailedSOPSequence", []) if item.get("ReferencedSOPInstanceUID") in
              (None, ds.SOPInstanceUID)]
    if failed:
        reason = int(failed[0].get("FailureReason", 0))
        return Attempt(False, 0xA700 <= reason <= 0xA7FF, f"refused with failure reason 0x{reason:04X}")
    return Attempt(True, False, "stored by STOW-RS")


def qido_reachable(destination: Destination, timeout_s: float) -> Attempt:
    """``config check``: does the DICOMweb service answer a QIDO-RS search with our token?"""
    try:
        _client(destination, timeout_s).search_for_studies(limit=1)
    except requests.RequestException as exc:
        return Attempt(False, True, f"QIDO-RS failed: {exc}")
    return Attempt(True, False, "QIDO-RS answered")
