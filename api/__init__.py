"""The radiologist's API: the worklist, a study's result and images, chat, sign-off, and DICOMweb."""
