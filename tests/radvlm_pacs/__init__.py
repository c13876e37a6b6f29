"""Tests of radvlm_pacs/."""
