"""Tests of dicom_node/."""
