"""Hostile input: mutated real radiographs end in a DICOM status or a pixel-error reason, never a crash.

The full run (10,000 examples) is ``benchmarks/fuzz_reception.py``; this runs a few hundred of the same."""

from __future__ import annotations

import warnings

from benchmarks.fuzz_reception import Harness, Mutation, Tally, _deep, _huge_length, _oversized, _zero_pixels, run


def test_mutated_radiographs_are_refused_or_judged_with_a_reason(tmp_path, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tally = run(400, 0, tmp_path)
    assert tally.crashes == []
    assert sum(tally.kinds.values()) >= 390 and len(tally.kinds) >= 6
    refused = {k for k in tally.outcomes if k.startswith("refused: ")}
    assert {"refused: undecodable", "refused: bad_pixel_data"} <= refused
    assert tally.outcomes["stored: selected"] > 0  # mutations the node tolerates still reach the model image
    assert "refused" in caplog.text  # each refusal is a log line with its reason


def test_each_named_hostile_input_gets_its_status(tmp_path):
    harness = Harness(tmp_path)
    expected = {"oversized image": _oversized(65535, 65535), "zero-length pixel data": Mutation("zero", _zero_pixels),
                "1 GB declared length": _huge_length(0x40000000), "deep sequence": _deep(5000)}
    outcomes = {}
    for name, mutation in expected.items():
        tally = Tally()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            harness.feed("RG1_UNCR.dcm", mutation, tally)
        assert tally.crashes == []
        [outcomes[name]] = tally.outcomes
    assert outcomes == {"oversized image": "refused: bad_pixel_data",
                        "zero-length pixel data": "refused: bad_pixel_data",
                        "1 GB declared length": "refused: bad_pixel_data", "deep sequence": "refused: undecodable"}


def test_a_refusal_comment_is_a_valid_lo_whatever_the_parser_said():
    from dicom_node.handlers import _status
    from reception.receiver import UNDECODABLE

    comment = _status(UNDECODABLE, "cannot decode dataset: bad\\value\nat (0008,0060)" + "x" * 80).ErrorComment
    assert comment.startswith("cannot decode dataset: bad value at (0008,0060)") and len(comment) == 64
