"""What one try at sending an object came to, whatever the transport: the same answer for the outbox from
C-STORE, STOW-RS, MLLP and a FHIR POST."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    """``delivered``, or why not, and whether trying again can help."""

    delivered: bool
    retry: bool
    detail: str
