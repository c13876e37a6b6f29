"""Tests of reception/."""
