"""The DICOM node: receives studies from the PACS, stores them as received, and decides when they are complete."""
