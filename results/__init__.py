"""The result objects, built from a stored result: the SR with coordinates, the narrative SR, the presentation
state and the burned-in capture for the PACS, the ORU for the RIS, the FHIR bundle for the EHR, and the outbox
rows that hold them until they are sent. The worker builds them after an analysis; the API builds them at a
radiologist's sign-off. Sending is the worker's (``worker.delivery``)."""
