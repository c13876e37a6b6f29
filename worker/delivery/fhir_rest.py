"""FHIR to the EHR: the transaction Bundle POSTed to the server's base, and whether it answers."""

from __future__ import annotations

import httpx

from records.settings import FhirSettings
from worker.delivery.attempt import Attempt


def _headers(fhir: FhirSettings) -> dict[str, str]:
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if fhir.token is not None:
        headers["Authorization"] = f"Bearer {fhir.token.get_secret_value()}"
    return headers


def fhir_reachable(fhir: FhirSettings, timeout_s: float) -> Attempt:
    """``config check``: does the server answer ``GET [base]/metadata`` with our token?"""
    try:
        rsp = httpx.get(f"{fhir.base_url.rstrip('/')}/metadata", headers=_headers(fhir), timeout=timeout_s)
    except httpx.HTTPError as exc:
        return Attempt(False, True, f"cannot reach {fhir.base_url}: {type(exc).__name__}")
    return Attempt(rsp.is_success, True, f"capability statement: HTTP {rsp.status_code}")


def post_bundle(payload: bytes, fhir: FhirSettings, timeout_s: float) -> Attempt:
    """POST the transaction to the server's base. 2xx: delivered; a refusal of the content (400, 404,
    409, 412, 422) is final; anything else (down, 5xx, 401/403 until the token is fixed, 429) is retried."""
    try:
        rsp = httpx.post(fhir.base_url, content=payload, headers=_headers(fhir), timeout=timeout_s)
    except httpx.HTTPError as exc:
        return Attempt(False, True, f"cannot reach {fhir.base_url}: {type(exc).__name__}")
    if rsp.is_success:
        return Attempt(True, False, f"transaction accepted (HTTP {rsp.status_code})")
    final = rsp.status_code in (400, 404, 409, 412, 422)
    return Attempt(False, not final, f"transaction refused (HTTP {rsp.status_code}): {rsp.text[:200]}")
