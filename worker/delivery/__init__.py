"""Results out: DICOM objects for the PACS (SR, presentation state) and the sending of them."""
