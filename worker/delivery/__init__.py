"""Sending the outbox: each built object to its destination by C-STORE, STOW-RS, MLLP or a FHIR POST, with one
``Attempt`` answer per try whatever the transport."""
