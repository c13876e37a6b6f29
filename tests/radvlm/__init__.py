"""Tests of radvlm/."""
